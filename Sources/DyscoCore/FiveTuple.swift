/// A TCP connection identifier as it appears in one packet's header (protocol is always TCP here; IPv4 or IPv6, both
/// ends of one family).
public struct FiveTuple: Hashable, Sendable, CustomStringConvertible, Codable {
    public var srcAddr: IPAddress
    public var dstAddr: IPAddress
    public var srcPort: UInt16
    public var dstPort: UInt16

    public init(srcAddr: IPAddress, srcPort: UInt16, dstAddr: IPAddress, dstPort: UInt16) {
        self.srcAddr = srcAddr
        self.dstAddr = dstAddr
        self.srcPort = srcPort
        self.dstPort = dstPort
    }

    /// The same connection seen from the other direction.
    public var reversed: FiveTuple {
        FiveTuple(srcAddr: dstAddr, srcPort: dstPort, dstAddr: srcAddr, dstPort: srcPort)
    }

    public var description: String { "\(Self.endpoint(srcAddr, srcPort))->\(Self.endpoint(dstAddr, dstPort))" }

    /// `10.0.0.1:80`, or `[fd00::1]:80` for IPv6 (RFC 3986's brackets).
    static func endpoint(_ address: IPAddress, _ port: UInt16) -> String {
        address.isIPv4 ? "\(address):\(port)" : "[\(address)]:\(port)"
    }

    /// Parses ``description``'s form, `10.0.0.1:40000->10.0.0.9:80` or `[fd00::1]:40000->[fd00::9]:80` (nil for
    /// anything else, a tuple mixing the families included).
    public init?(parsing text: some StringProtocol) {
        let ends = text.split(separator: "->", omittingEmptySubsequences: false)
        guard ends.count == 2 else { return nil }
        func endpoint(_ e: Substring) -> (IPAddress, UInt16)? {
            guard let colon = e.lastIndex(of: ":"), let port = UInt16(e[e.index(after: colon)...]) else { return nil }
            var host = e[..<colon]
            if host.hasPrefix("[") && host.hasSuffix("]") {
                host = host.dropFirst().dropLast()
                guard host.contains(":") else { return nil }
            } else if host.contains(":") {
                return nil
            }
            guard let address = IPAddress(String(host)) else { return nil }
            return (address, port)
        }
        guard let src = endpoint(Substring(ends[0])), let dst = endpoint(Substring(ends[1])),
              src.0.isIPv4 == dst.0.isIPv4 else { return nil }
        self.init(srcAddr: src.0, srcPort: src.1, dstAddr: dst.0, dstPort: dst.1)
    }

    enum CodingKeys: String, CodingKey {
        case src, sport, dst, dport
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        srcAddr = try c.decode(IPAddress.self, forKey: .src)
        srcPort = try c.decode(UInt16.self, forKey: .sport)
        dstAddr = try c.decode(IPAddress.self, forKey: .dst)
        dstPort = try c.decode(UInt16.self, forKey: .dport)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(srcAddr, forKey: .src)
        try c.encode(srcPort, forKey: .sport)
        try c.encode(dstAddr, forKey: .dst)
        try c.encode(dstPort, forKey: .dport)
    }
}
