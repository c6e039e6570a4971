/// A value written in JSON as its text form ("10.1.2.3", "10.0.0.0/8", "8000-8080").
public protocol TextCodable: Codable, CustomStringConvertible {
    init?(parsing text: String)
    /// What the text must be, for the error message ("an IPv4 address").
    static var textKind: String { get }
}

extension TextCodable {
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let parsed = Self(parsing: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath,
                                                    debugDescription: "'\(text)' is not \(Self.textKind)"))
        }
        self = parsed
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An IPv4 address, held in host byte order.
public struct IPv4Address: Hashable, Comparable, Sendable, TextCodable {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Parses dotted-quad notation ("10.1.2.3"); nil for anything else.
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCII), let octet = UInt8(part) else { return nil }
            v = v << 8 | UInt32(octet)
        }
        value = v
    }

    public var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.value < rhs.value }

    public init?(parsing text: String) { self.init(text) }
    public static let textKind = "an IPv4 address"
}

/// An IPv4 prefix such as 10.1.0.0/24.
public struct IPv4Prefix: Hashable, Sendable, TextCodable {
    public var address: IPv4Address
    public var length: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = IPv4Address(parts[0]) else { return nil }
        let length = parts.count == 2 ? Int(parts[1]) : 32
        guard let length, (0...32).contains(length) else { return nil }
        self.address = IPv4Address(address.value & Self.mask(length))
        self.length = length
    }

    static func mask(_ length: Int) -> UInt32 { length == 0 ? 0 : ~UInt32(0) << (32 - length) }

    public func contains(_ candidate: IPv4Address) -> Bool {
        candidate.value & Self.mask(length) == address.value
    }

    public var description: String { "\(address)/\(length)" }

    public init?(parsing text: String) { self.init(text) }
    public static let textKind = "an IPv4 prefix"
}
