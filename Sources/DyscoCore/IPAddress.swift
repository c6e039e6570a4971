import Foundation

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

/// An IPv4 or IPv6 address: sessions, hops and agents of either family share one type, so a five-tuple, the session
/// table and the control messages are written once. Held as the 16 bytes of an IPv6 address in two host-order
/// halves (`high` is the first 8 bytes on the wire); an IPv4 address is its IPv4-mapped form `::ffff:a.b.c.d`
/// (RFC 4291 §2.5.5.2), so the two families never compare equal by accident and IPv4 keeps its 32-bit accessors.
public struct IPAddress: Hashable, Comparable, Sendable, TextCodable {
    public var high: UInt64
    public var low: UInt64

    static let mappedPrefix: UInt64 = 0xffff_0000_0000

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// The IPv4 address with this 32-bit value (host order).
    public init(_ value: UInt32) {
        high = 0
        low = Self.mappedPrefix | UInt64(value)
    }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        self.init(UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d))
    }

    /// Parses dotted-quad IPv4 ("10.1.2.3") or any IPv6 text form inet_pton(3) takes ("fd00::1"); nil for anything
    /// else (zone indices such as "%eth0" included: an address in a packet has none). "::ffff:10.1.2.3" is the IPv4
    /// address 10.1.2.3.
    public init?(_ text: some StringProtocol) {
        if text.contains(":") {
            var raw = in6_addr()
            let parsed = String(text).withCString { inet_pton(AF_INET6, $0, &raw) }
            guard parsed == 1 else { return nil }
            self = withUnsafeBytes(of: raw) { Self(networkBytes: $0) }
            return
        }
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCII), let octet = UInt8(part) else { return nil }
            v = v << 8 | UInt32(octet)
        }
        self.init(v)
    }

    /// The address from its 16 wire bytes (an IPv6 header's field).
    public init(networkBytes bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= 16)
        high = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        low = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    }

    /// Writes the 16 wire bytes at `base`.
    public func store(to base: UnsafeMutableRawPointer) {
        base.storeBytes(of: high.bigEndian, as: UInt64.self)
        base.storeBytes(of: low.bigEndian, toByteOffset: 8, as: UInt64.self)
    }

    public var isIPv4: Bool { high == 0 && low >> 32 == 0xffff }

    /// The IPv4 address's 32 bits (host order); meaningful only when ``isIPv4`` (an IPv6 address gives its last 32
    /// bits). Every 4-byte field on the wire (IPv4 headers, trailer v2, control messages) is written from this, so
    /// their encoders check ``isIPv4`` first.
    public var value: UInt32 { UInt32(truncatingIfNeeded: low) }

    /// "10.1.2.3" for IPv4; RFC 5952 text for IPv6 (inet_ntop's canonical form: lower case, the longest run of zero
    /// groups as "::").
    public var description: String {
        if isIPv4 { return "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)" }
        var raw = in6_addr()
        withUnsafeMutableBytes(of: &raw) { store(to: $0.baseAddress!) }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        guard inet_ntop(AF_INET6, &raw, &text, socklen_t(text.count)) != nil else { return "?" }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The one's-complement sum of the 16 bytes as they lie on the wire (for IPv6 pseudo-headers).
    @usableFromInline var wireSum: UInt64 {
        let h = high.bigEndian, l = low.bigEndian
        return (h & 0xffff_ffff) &+ (h >> 32) &+ (l & 0xffff_ffff) &+ (l >> 32)
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { (lhs.high, lhs.low) < (rhs.high, rhs.low) }

    public init?(parsing text: String) { self.init(text) }
    public static let textKind = "an IP address"
}

/// The address family of an ``IPAddress``, written as conntrack's state documents spell it.
public enum AddressFamily: String, Codable, Sendable, Hashable, CustomStringConvertible {
    case ipv4, ipv6

    public var description: String { rawValue }
}

extension IPAddress {
    public var family: AddressFamily { isIPv4 ? .ipv4 : .ipv6 }

    /// The address as a URL's host (RFC 3986: an IPv6 address in brackets).
    public var urlHost: String { isIPv4 ? description : "[\(description)]" }

    public static func v4(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) -> IPAddress { IPAddress(a, b, c, d) }

    /// The IPv6 address with these 16 wire bytes (an IPv4-mapped one is the IPv4 address).
    public static func v6(_ bytes: [UInt8]) -> IPAddress {
        precondition(bytes.count == 16)
        return bytes.withUnsafeBytes { IPAddress(networkBytes: $0) }
    }

    /// 4 bytes for IPv4, 16 for IPv6 (network order); nil for any other count.
    public init?(bytes: [UInt8]) {
        switch bytes.count {
        case 4: self.init(bytes[0], bytes[1], bytes[2], bytes[3])
        case 16: self = .v6(bytes)
        default: return nil
        }
    }

    /// The address in network byte order: 4 bytes for IPv4, 16 for IPv6.
    public var bytes: [UInt8] { isIPv4 ? withUnsafeBytes(of: value.bigEndian, Array.init) : ipv6Bytes }

    /// The 16 bytes of the address as IPv6 (an IPv4 address in its mapped form).
    public var ipv6Bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        out.withUnsafeMutableBytes { store(to: $0.baseAddress!) }
        return out
    }

    /// 0.0.0.0 / ::, multicast and (IPv4) limited broadcast: never an endpoint of a TCP connection.
    public var isUnusableTCPEndpoint: Bool {
        if isIPv4 { return value == 0 || value >> 28 == 0xe || value == 0xffff_ffff }
        return (high == 0 && low == 0) || high >> 56 == 0xff
    }
}

/// An address prefix of either family: `10.1.0.0/24`, `fd00:0:4f:73::/64`; a bare address is its own /32 (/128).
/// `length` counts the family's own bits (0...32 for IPv4, 0...128 for IPv6). A prefix holds addresses of its own
/// family only: an IPv4 prefix (even /0) never contains an IPv6 address, nor the reverse (an IPv4 address is kept
/// in its mapped form, ``IPAddress``, and the mapped /96 is not an IPv6 prefix anyone writes for it).
public struct IPPrefix: Hashable, Sendable, TextCodable {
    /// The first address of the prefix (the host bits cleared).
    public var address: IPAddress
    public var length: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = IPAddress(parts[0]) else { return nil }
        let bits = address.isIPv4 ? 32 : 128
        let length = parts.count == 2 ? Int(parts[1]) : bits
        guard let length, (0...bits).contains(length) else { return nil }
        self.address = Self.masked(address, length)
        self.length = length
    }

    /// `address` with all but its first `length` bits (of its own family) cleared.
    static func masked(_ address: IPAddress, _ length: Int) -> IPAddress {
        let bits = address.isIPv4 ? 96 + length : length  // an IPv4 address is the low 32 bits of its mapped form
        func mask(_ n: Int) -> UInt64 { n <= 0 ? 0 : n >= 64 ? ~0 : ~UInt64(0) << (64 - n) }
        return IPAddress(high: address.high & mask(bits), low: address.low & mask(bits - 64))
    }

    public var isIPv4: Bool { address.isIPv4 }

    public func contains(_ candidate: IPAddress) -> Bool {
        candidate.isIPv4 == address.isIPv4 && Self.masked(candidate, length) == address
    }

    public var description: String { "\(address)/\(length)" }

    public init?(parsing text: String) { self.init(text) }
    public static let textKind = "an IPv4 or IPv6 prefix"
}
