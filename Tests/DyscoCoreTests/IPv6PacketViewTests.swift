import DyscoCore
import Foundation
import Testing

/// IPv6 views (issue 18, item 3). The byte vectors were written by scapy 2.5 (an independent implementation of the
/// headers and of the RFC 8200 §8.1 checksum), so a checksum or offset error here cannot hide behind our own code.
@Suite("IPv6 packet views (RFC 8200)")
struct IPv6PacketViewTests {
    /// fd00:78::1.40000 → fd00:78:1::2.80, PSH|ACK seq 1000 ack 2000 window 512, payload "hello, dysco".
    static let plain = "6000000000200640fd000078000000000000000000000001fd0000780001000000000000000000029c400050000003e8000007d050180200c93d000068656c6c6f2c20647973636f"
    /// The same after the rewrite to fd00:78::3.41000 → fd00:78:1::2.8080.
    static let rewritten = "6000000000200640fd000078000000000000000000000003fd000078000100000000000000000002a0281f90000003e8000007d050180200a613000068656c6c6f2c20647973636f"
    /// A SYN behind a Hop-by-Hop Options and a Destination Options header (8 bytes each, PadN).
    static let withExtensions = "6000000000240040fd000078000000000000000000000001fd0000780001000000000000000000023c0001040000000006000104000000009c400050000000070000000050022000f8550000"

    static func bytes(_ hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            out.append(UInt8(hex[index..<next], radix: 16)!)
            index = next
        }
        return out
    }

    static func parse(_ bytes: inout [UInt8]) -> Result<IPv6TCPPacket, IPv6TCPPacket.ParseError> {
        let count = bytes.count
        return bytes.withUnsafeMutableBytes { IPv6TCPPacket.parse($0.baseAddress!, count: count) }
    }

    @Test("five-tuple text: IPv6 ends in brackets (RFC 3986); parse inverts description; mixed families and bare IPv6 refused")
    func tupleText() throws {
        let v6 = FiveTuple(srcAddr: IPAddress("fd00:78::1")!, srcPort: 40000, dstAddr: IPAddress("fd00:78::9")!, dstPort: 80)
        #expect(v6.description == "[fd00:78::1]:40000->[fd00:78::9]:80")
        #expect(FiveTuple(parsing: v6.description) == v6)
        let v4 = FiveTuple(srcAddr: IPAddress(10, 0, 0, 1), srcPort: 40000, dstAddr: IPAddress(10, 0, 0, 9), dstPort: 80)
        #expect(v4.description == "10.0.0.1:40000->10.0.0.9:80" && FiveTuple(parsing: v4.description) == v4)
        for bad in ["fd00::1:40000->[fd00::9]:80", "[10.0.0.1]:1->10.0.0.9:80", "[fd00::1]:1->10.0.0.9:80", "[fd00::1]->[fd00::9]:80",
                    "[fd00::1]:70000->[fd00::9]:80"] {
            #expect(FiveTuple(parsing: bad) == nil, "\(bad)")
        }
    }

    @Test("forbidden hops of both families (paper §2.3): IPv6 ::, ::1, fe80::/10, ff00::/8, ::/8; an IPv4 prefix never holds IPv6")
    func forbiddenHops() {
        for bad in ["::", "::1", "fe80::1", "febf::1", "ff02::1", "::10.0.0.1", "127.0.0.1", "169.254.0.1", "224.0.0.1", "0.1.2.3"] {
            #expect(IPAddress(bad)!.isForbiddenHop, "\(bad)")
        }
        for good in ["fd00::1", "2001:db8::1", "fec0::1", "10.0.0.1", "::ffff:10.0.0.1"] {
            #expect(!IPAddress(good)!.isForbiddenHop, "\(good)")
        }
        let prefix = IPPrefix("10.0.0.0/8")!
        #expect(prefix.contains(IPAddress(10, 1, 2, 3)) && !prefix.contains(IPAddress(high: 0, low: 0x0a01_0203)))
    }

    @Test("prefixes of both families (policies, filters): an IPv6 prefix masks 128 bits, a bare address is its own /128; neither family's prefix holds the other's addresses, not even /0")
    func prefixesOfBothFamilies() throws {
        let lab = try #require(IPPrefix("fd00:0:4f:73::1/64"))
        #expect(lab.description == "fd00:0:4f:73::/64" && !lab.isIPv4)
        #expect(lab.contains(IPAddress("fd00:0:4f:73::c9")!) && !lab.contains(IPAddress("fd00:0:4f:74::c9")!))
        let host = try #require(IPPrefix("fd00:0:4f:73::c9"))
        #expect(host.length == 128 && host.contains(IPAddress("fd00:0:4f:73::c9")!) && !host.contains(IPAddress("fd00:0:4f:73::c8")!))
        #expect(IPPrefix("fd00:0:4f:73::/65")!.contains(IPAddress("fd00:0:4f:73:7fff::1")!))
        #expect(!IPPrefix("fd00:0:4f:73::/65")!.contains(IPAddress("fd00:0:4f:73:8000::1")!))
        #expect(IPPrefix("fd00::/8")!.contains(IPAddress("fdff::1")!))
        #expect(!IPPrefix("::/0")!.contains(IPAddress(10, 1, 2, 3)) && IPPrefix("::/0")!.contains(IPAddress("2001:db8::1")!))
        #expect(!IPPrefix("0.0.0.0/0")!.contains(IPAddress("2001:db8::1")!) && IPPrefix("0.0.0.0/0")!.contains(IPAddress(10, 1, 2, 3)))
        for bad in ["fd00::/129", "10.0.0.0/33", "fd00::/-1", "fd00::/", "fd00::/64/1", "fd00:::/64"] {
            #expect(IPPrefix(bad) == nil, "\(bad)")
        }
        // A filter (`state export --match`, policies) takes them.
        let filter = try SessionPredicate(filter: "src=fd00:0:4f:73::/64,dst=fd00:0:4f:73::c9,dport=80")
        #expect(filter.matches(FiveTuple(parsing: "[fd00:0:4f:73::b]:40000->[fd00:0:4f:73::c9]:80")!))
        #expect(!filter.matches(FiveTuple(parsing: "[fd00:0:4f:73::b]:40000->[fd00:0:4f:73::65]:80")!))
        #expect(!filter.matches(FiveTuple(parsing: "10.79.115.11:40000->10.79.115.201:80")!))
    }

    @Test("addresses: inet_pton's text forms in, RFC 5952 out; JSON as text; garbage refused")
    func addressText() throws {
        let a = try #require(IPAddress("FD00:0078:0000:0000:0000:0000:0000:0001"))
        #expect(a.description == "fd00:78::1")
        #expect(a.high == 0xfd00_0078_0000_0000 && a.low == 1)
        // IPv4-mapped text is the IPv4 address: one type for both families.
        #expect(IPAddress("::ffff:10.1.2.3") == IPAddress(10, 1, 2, 3))
        #expect(IPAddress("::ffff:10.1.2.3")?.description == "10.1.2.3")
        #expect(IPAddress(10, 1, 2, 3).isIPv4 && !a.isIPv4 && a.family == .ipv6)
        #expect(IPAddress(10, 1, 2, 3) != IPAddress("::10.1.2.3"), "IPv4-compatible (deprecated) is not IPv4-mapped")
        #expect(IPAddress("2001:db8:0:0:1:0:0:1")?.description == "2001:db8::1:0:0:1")
        for bad in ["", "10.1.2", "10.1.2.256", "fd00::1::2", "fd00::1%eth0", "fd00:78::1/64", "gggg::1", "1:2:3:4:5:6:7:8:9"] {
            #expect(IPAddress(bad) == nil, "\(bad)")
        }
        #expect(IPAddress("fd00::1")! < IPAddress("fd00::2")!)
        #expect(IPAddress("fd00::ffff")! < IPAddress("fd01::")!)
        let json = try JSONEncoder().encode([a])
        #expect(String(decoding: json, as: UTF8.self) == #"["fd00:78::1"]"#)
        #expect(try JSONDecoder().decode([IPAddress].self, from: json) == [a])
        #expect(try JSONDecoder().decode([IPAddress].self, from: Data(#"["10.1.2.3"]"#.utf8)) == [IPAddress(10, 1, 2, 3)])
        #expect(throws: DecodingError.self) { try JSONDecoder().decode([IPAddress].self, from: Data(#"["10.1.2.300"]"#.utf8)) }
    }

    @Test("a plain segment: fixed header and TCP header read, its checksum verifies")
    func plainSegment() throws {
        var bytes = Self.bytes(Self.plain)
        let packet = try Self.parse(&bytes).get()
        #expect(packet.ip.version == 6 && packet.ip.hopLimit == 64 && packet.ip.payloadLength == 32)
        #expect(packet.ip.sourceAddress == IPAddress("fd00:78::1"))
        #expect(packet.ip.destinationAddress == IPAddress("fd00:78:1::2"))
        #expect(packet.tcpOffset == 40 && packet.payloadOffset == 60 && packet.payloadLength == 12)
        #expect(packet.tcp.sourcePort == 40000 && packet.tcp.destinationPort == 80)
        #expect(packet.tcp.sequenceNumber == 1000 && packet.tcp.acknowledgmentNumber == 2000)
        #expect(packet.isTCPChecksumValid)
        bytes[70] ^= 1  // one payload bit
        #expect(!(try Self.parse(&bytes).get()).isTCPChecksumValid)
    }

    @Test("rewrite of both address and port, incremental (RFC 1624) and full, gives scapy's bytes")
    func rewrite() throws {
        for mode in [ChecksumState.complete, .partial] {
            var bytes = Self.bytes(Self.plain)
            let packet = try Self.parse(&bytes).get()
            packet.rewrite(source: IPAddress("fd00:78::3")!, sourcePort: 41000,
                           destination: IPAddress("fd00:78:1::2")!, destinationPort: 8080, checksum: mode)
            #expect(bytes == Self.bytes(Self.rewritten), "\(mode)")
        }
    }

    @Test("the incremental update of a changed address equals recomputation, on random addresses")
    func incrementalAddress() throws {
        var rng = SplitMix64(state: 6)
        for _ in 0..<500 {
            var bytes = Self.bytes(Self.plain)
            let packet = try Self.parse(&bytes).get()
            let source = IPAddress(high: rng.next(), low: rng.next())
            let destination = IPAddress(high: rng.next(), low: rng.next())
            packet.rewrite(source: source, sourcePort: packet.tcp.sourcePort, destination: destination,
                           destinationPort: packet.tcp.destinationPort, checksum: .complete)
            #expect(packet.ip.sourceAddress == source && packet.ip.destinationAddress == destination)
            #expect(packet.isTCPChecksumValid)
        }
    }

    @Test("extension headers (RFC 8200 §4): Hop-by-Hop and Destination Options are walked to the TCP header")
    func extensionChain() throws {
        var bytes = Self.bytes(Self.withExtensions)
        let packet = try Self.parse(&bytes).get()
        #expect(packet.tcpOffset == 56 && packet.tcp.flags == [.syn] && packet.tcp.sequenceNumber == 7)
        #expect(packet.isTCPChecksumValid)
        let upper = try bytes.withUnsafeBytes {
            try IPv6ExtensionHeaders.walk($0.baseAddress!, length: bytes.count, first: 0).get()
        }
        #expect(upper.protocolNumber == 6 && upper.offset == 56 && upper.extensionHeaders == 2)
    }

    /// A packet: fixed header (payload length from the chain), then `chain` as (next header, body length in 8-byte
    /// units) pairs, then 20 bytes of TCP header.
    static func chained(first: UInt8, _ chain: [(UInt8, UInt8)], tcp: Bool = true) -> [UInt8] {
        var body: [UInt8] = []
        for (next, units) in chain {
            body += [next, units] + [UInt8](repeating: 0, count: 8 * (Int(units) + 1) - 2)
        }
        body += tcp ? [0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0x20, 0, 0, 0, 0, 0]
            : [UInt8](repeating: 0, count: 8)  // an ESP SPI and sequence number, or anything
        var header = Self.bytes(Self.plain).prefix(40).map { $0 }
        header[4] = UInt8(body.count >> 8)
        header[5] = UInt8(body.count & 0xff)
        header[6] = first
        return header + body
    }

    @Test("the documented rule: fragments, ESP/AH, No Next Header, other upper layers and long chains are not sessions' segments")
    func refusedChains() {
        let cases: [([UInt8], IPv6TCPPacket.ParseError)] = [
            (Self.chained(first: 44, [(6, 0)]), .extensionHeaders(.fragment)),
            (Self.chained(first: 0, [(44, 0), (6, 0)]), .extensionHeaders(.fragment)),
            (Self.chained(first: 50, [], tcp: false), .extensionHeaders(.encrypted)),
            (Self.chained(first: 60, [(51, 0)], tcp: false), .extensionHeaders(.encrypted)),
            (Self.chained(first: 59, [], tcp: false), .extensionHeaders(.noNextHeader)),
            (Self.chained(first: 17, [], tcp: true), .notTCP),
            (Self.chained(first: 58, [], tcp: true), .notTCP),
            (Self.chained(first: 60, Array(repeating: (60, 0), count: 8) + [(6, 0)]), .extensionHeaders(.chainTooLong)),
            (Self.chained(first: 0, [(43, 40), (6, 40)]), .extensionHeaders(.chainTooLong)),
        ]
        for (bytes, expected) in cases {
            var copy = bytes
            #expect(Self.parse(&copy).failureValue == expected, "\(expected)")
        }
        var eight = Self.chained(first: 60, Array(repeating: (60, 0), count: 7) + [(6, 0)])
        #expect((try? Self.parse(&eight).get())?.tcpOffset == 40 + 64, "eight headers are within the limit")
    }

    @Test("malformed: truncated anywhere, a header past the payload length, a jumbogram, not version 6 — refused, never read past the bytes")
    func malformed() {
        let good = Self.bytes(Self.withExtensions)
        for cut in 0..<good.count {
            var short = Array(good.prefix(cut))
            #expect(Self.parse(&short).failureValue != nil, "cut at \(cut)")
        }
        var overlong = good
        overlong[5] = 0x40  // payload length 64 > the 36 bytes there
        #expect(Self.parse(&overlong).failureValue == .truncated)
        var lying = good
        lying[5] = 12  // payload length ends inside the Destination Options header
        #expect(Self.parse(&lying).failureValue == .extensionHeaders(.truncated))
        var jumbo = good
        jumbo[4] = 0; jumbo[5] = 0
        #expect(Self.parse(&jumbo).failureValue == .jumbogram)
        var four = good
        four[0] = 0x45
        #expect(Self.parse(&four).failureValue == .notIPv6)
        var badOffset = Self.bytes(Self.plain)
        badOffset[52] = 0x40  // TCP data offset 16 bytes
        #expect(Self.parse(&badOffset).failureValue == .badTCPHeaderLength)
    }

    @Test("random bytes behind a valid fixed header never crash the walk and never yield a header past the packet")
    func fuzz() {
        var rng = SplitMix64(state: 18)
        for _ in 0..<20_000 {
            let count = Int.random(in: 40...200, using: &rng)
            var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
            bytes[0] = 0x60
            let payload = Int.random(in: 0...(count - 40 + 8), using: &rng)
            bytes[4] = UInt8(payload >> 8)
            bytes[5] = UInt8(payload & 0xff)
            bytes[6] = [0, 43, 60, 6, 44, 50, 59, UInt8.random(in: 0...255, using: &rng)].randomElement(using: &rng)!
            if case .success(let packet) = Self.parse(&bytes) {
                #expect(packet.length <= count && packet.payloadOffset <= packet.length)
            }
        }
    }
}
