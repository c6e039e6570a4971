import DyscoCore

/// Builds IPv4/TCP or IPv6/TCP packets (by the tuple's family) for tests, with checksums from the naive reference
/// below.
struct PacketBuilder {
    var tuple: FiveTuple
    var flags: TCPFlags = [.ack]
    var seq: UInt32 = 1000
    var ack: UInt32 = 2000
    var options: [UInt8] = []
    var payload: [UInt8] = []
    var ttl: UInt8 = 64
    var window: UInt16 = 64240

    func build() -> [UInt8] {
        precondition(options.count % 4 == 0)
        guard tuple.srcAddr.isIPv4 else { return build6() }
        let tcpLength = 20 + options.count
        let total = 20 + tcpLength + payload.count
        var b = [UInt8](repeating: 0, count: total)
        b[0] = 0x45
        put16(&b, 2, UInt16(total))
        put16(&b, 4, 0x1234)
        put16(&b, 6, 0x4000)  // DF
        b[8] = ttl
        b[9] = 6
        put32(&b, 12, tuple.srcAddr.value)
        put32(&b, 16, tuple.dstAddr.value)
        put16(&b, 10, Reference.checksum(Array(b[0..<20])))
        put16(&b, 20, tuple.srcPort)
        put16(&b, 22, tuple.dstPort)
        put32(&b, 24, seq)
        put32(&b, 28, ack)
        b[32] = UInt8(tcpLength / 4) << 4
        b[33] = flags.rawValue
        put16(&b, 34, window)
        b.replaceSubrange(40..<40 + options.count, with: options)
        b.replaceSubrange(20 + tcpLength..<total, with: payload)
        put16(&b, 36, Reference.tcpChecksum(b))
        return b
    }

    /// The IPv6 packet: fixed header (hop limit `ttl`), `extensionHeaders` (each a whole header, its next-header byte
    /// filled in here), then TCP.
    func build6(extensionHeaders: [[UInt8]] = []) -> [UInt8] {
        let tcpLength = 20 + options.count
        var ext: [UInt8] = []
        for (i, header) in extensionHeaders.enumerated() {
            var h = header
            h[0] = i + 1 < extensionHeaders.count ? extensionHeaders[i + 1][0] : 6
            ext += h
        }
        let payloadLength = ext.count + tcpLength + payload.count
        var b = [UInt8](repeating: 0, count: 40 + payloadLength)
        b[0] = 0x60
        put16(&b, 4, UInt16(payloadLength))
        b[6] = extensionHeaders.first?[0] ?? 6
        b[7] = ttl
        b.replaceSubrange(8..<24, with: tuple.srcAddr.ipv6Bytes)
        b.replaceSubrange(24..<40, with: tuple.dstAddr.ipv6Bytes)
        b.replaceSubrange(40..<40 + ext.count, with: ext)
        let t = 40 + ext.count
        put16(&b, t, tuple.srcPort)
        put16(&b, t + 2, tuple.dstPort)
        put32(&b, t + 4, seq)
        put32(&b, t + 8, ack)
        b[t + 12] = UInt8(tcpLength / 4) << 4
        b[t + 13] = flags.rawValue
        put16(&b, t + 14, window)
        b.replaceSubrange(t + 20..<t + 20 + options.count, with: options)
        b.replaceSubrange(t + tcpLength..<b.count, with: payload)
        put16(&b, t + 16, Reference.tcpChecksum6(b, tcpOffset: t))
        return b
    }
}

func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) {
    b[at] = UInt8(v >> 8)
    b[at + 1] = UInt8(v & 0xff)
}

func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
    put16(&b, at, UInt16(v >> 16))
    put16(&b, at + 2, UInt16(v & 0xffff))
}

func get16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }

/// RFC 1071 done the slow, obvious way: big-endian 16-bit words, summed with end-around carry.
enum Reference {
    static func sum(_ bytes: [UInt8]) -> UInt32 {
        var s: UInt32 = 0
        var i = 0
        while i + 1 < bytes.count {
            s += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1])
            i += 2
        }
        if i < bytes.count { s += UInt32(bytes[i]) << 8 }
        while s > 0xffff { s = (s & 0xffff) + (s >> 16) }
        return s
    }

    static func checksum(_ bytes: [UInt8]) -> UInt16 { ~UInt16(sum(bytes)) }

    /// The TCP checksum of an IPv4 packet, computed with its checksum field taken as zero.
    static func tcpChecksum(_ packet: [UInt8]) -> UInt16 {
        let ihl = Int(packet[0] & 0x0f) * 4
        let total = Int(get16(packet, 2))
        var segment = Array(packet[ihl..<total])
        segment[16] = 0
        segment[17] = 0
        let pseudo = Array(packet[12..<20]) + [0, 6, UInt8((total - ihl) >> 8), UInt8((total - ihl) & 0xff)]
        return checksum(pseudo + segment)
    }

    /// The TCP checksum of an IPv6 packet whose TCP header is at `tcpOffset` (RFC 8200 §8.1 pseudo-header).
    static func tcpChecksum6(_ packet: [UInt8], tcpOffset: Int) -> UInt16 {
        var segment = Array(packet[tcpOffset...])
        segment[16] = 0
        segment[17] = 0
        let n = segment.count
        let pseudo = Array(packet[8..<40]) + [UInt8(n >> 24 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff), 0, 0, 0, 6]
        return checksum(pseudo + segment)
    }

    static func ipChecksumValid(_ packet: [UInt8]) -> Bool {
        sum(Array(packet[0..<Int(packet[0] & 0x0f) * 4])) == 0xffff
    }

    static func tcpChecksumValid(_ packet: [UInt8]) -> Bool {
        let ihl = Int(packet[0] & 0x0f) * 4
        return tcpChecksum(packet) == get16(packet, ihl + 16)
    }
}

extension FiveTuple {
    static func t(_ src: String, _ sport: UInt16, _ dst: String, _ dport: UInt16) -> FiveTuple {
        FiveTuple(srcAddr: IPAddress(src)!, srcPort: sport, dstAddr: IPAddress(dst)!, dstPort: dport)
    }
}

/// Deterministic pseudo-random numbers for reproducible "random packet" tests.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Trust keys for tests (paper §2.3): `group` is what the test agents share; `other` an attacker's key.
enum TestKeys {
    static let current = TrustKey(hex: "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")!
    static let previous = TrustKey(hex: "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100")!
    static let attacker = TrustKey(hex: "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de")!
    /// The deployment's group: signs and accepts `current` only.
    static let group = TrustGroup(current: current)
    static let wrong = TrustGroup(current: attacker)
}

extension PacketBuilder {
    /// A SYN on `tuple` whose payload is `leading` followed by a v2 Dysco trailer signed with `trust` for
    /// `signedFor` (default: the packet's own tuple).
    static func dyscoSyn(tuple: FiveTuple, session: FiveTuple, remaining: [IPAddress],
                         identity: SessionIdentity = SessionIdentity(chainID: 0x1234_5678_9abc_def1, nonce: 42),
                         trust: TrustGroup = TestKeys.group, signedFor: FiveTuple? = nil,
                         leading: [UInt8] = []) -> [UInt8] {
        let trailer = DyscoSynPayload(identity: identity, session: session, remaining: remaining)
            .encoded(tuple: signedFor ?? tuple, trust: trust)
        return PacketBuilder(tuple: tuple, flags: [.syn], payload: leading + trailer).build()
    }
}

/// The version-1 trailer (unauthenticated, no longer sent), built by hand as an old agent or a forger would.
func versionOneTrailer(session: FiveTuple, remaining: [IPAddress]) -> [UInt8] {
    var b: [UInt8] = [1, 4, UInt8(remaining.count), 0]
    b += be32(session.srcAddr.value) + be32(session.dstAddr.value) + be16(session.srcPort) + be16(session.dstPort)
    for address in remaining { b += be32(address.value) }
    b += be16(UInt16(22 + 4 * remaining.count)) + [0x44, 0x59, 0x53, 0x43]
    return b
}

func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
func be32(_ v: UInt32) -> [UInt8] { be16(UInt16(v >> 16)) + be16(UInt16(v & 0xffff)) }
