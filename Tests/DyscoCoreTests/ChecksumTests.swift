import DyscoCore
import Testing

@Suite("Internet checksum (RFC 1071, RFC 1624)")
struct ChecksumTests {
    @Test("full checksum equals the naive reference on random buffers of every length parity")
    func fullMatchesReference() {
        var rng = SplitMix64(state: 1)
        for length in [0, 1, 2, 3, 5, 20, 21, 40, 1460, 1461, 9001, 65535] {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let ours = bytes.withUnsafeBytes { raw in
                UInt16(bigEndian: InternetChecksum.checksum(raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!,
                                                            count: length))
            }
            #expect(ours == Reference.checksum(bytes), "length \(length)")
        }
    }

    @Test("RFC 1624 incremental update of a 16-bit word equals recomputation")
    func incremental16() {
        var rng = SplitMix64(state: 2)
        for _ in 0..<2000 {
            var words = (0..<10).map { _ in UInt16.random(in: 0...0xffff, using: &rng) }
            let bytes = { (w: [UInt16]) in w.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] } }
            let before = Reference.checksum(bytes(words))
            let index = Int.random(in: 0..<10, using: &rng)
            let old = words[index]
            words[index] = UInt16.random(in: 0...0xffff, using: &rng)
            let updated = InternetChecksum.update(before.bigEndian, old: old.bigEndian, new: words[index].bigEndian)
            let expected = Reference.checksum(bytes(words))
            #expect(UInt16(bigEndian: updated) == expected)
        }
    }
}

@Suite("Packet header views")
struct PacketViewTests {
    @Test("accessors read what the builder wrote")
    func accessors() throws {
        var bytes = PacketBuilder(tuple: .t("10.1.0.1", 4000, "10.1.0.2", 80), flags: [.syn], seq: 77,
                                  options: [2, 4, 5, 0xb4], payload: [1, 2, 3]).build()
        try bytes.withUnsafeMutableBytes { raw in
            guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else {
                Issue.record("parse failed")
                return
            }
            #expect(p.tuple == .t("10.1.0.1", 4000, "10.1.0.2", 80))
            #expect(p.tcp.flags == [.syn])
            #expect(p.tcp.sequenceNumber == 77)
            #expect(p.tcp.headerLength == 24)
            #expect(p.payloadLength == 3)
            #expect(p.ip.isChecksumValid)
            #expect(p.isTCPChecksumValid)
            _ = try #require(Optional(p))
        }
    }

    @Test("rewriting a random packet incrementally keeps IP and TCP checksums equal to the reference")
    func rewriteIncremental() {
        var rng = SplitMix64(state: 3)
        for _ in 0..<500 {
            let payload = (0..<Int.random(in: 0...1500, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let from = FiveTuple(srcAddr: IPAddress(UInt32.random(in: 1...UInt32.max, using: &rng)), srcPort: .random(in: 1...65535, using: &rng),
                                 dstAddr: IPAddress(UInt32.random(in: 1...UInt32.max, using: &rng)), dstPort: .random(in: 1...65535, using: &rng))
            var to = from
            if Bool.random(using: &rng) { to.srcAddr = IPAddress(UInt32.random(in: 1...UInt32.max, using: &rng)) }
            if Bool.random(using: &rng) { to.dstAddr = IPAddress(UInt32.random(in: 1...UInt32.max, using: &rng)) }
            if Bool.random(using: &rng) { to.srcPort = .random(in: 1...65535, using: &rng) }
            if Bool.random(using: &rng) { to.dstPort = .random(in: 1...65535, using: &rng) }
            var bytes = PacketBuilder(tuple: from, options: [1, 1, 1, 0], payload: payload).build()
            bytes.withUnsafeMutableBytes { raw in
                guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { return }
                p.rewrite(to: to, checksum: .complete)
            }
            #expect(Reference.ipChecksumValid(bytes))
            #expect(Reference.tcpChecksumValid(bytes))
            #expect(Array(bytes[40..<44]) == [1, 1, 1, 0], "TCP options untouched")
        }
    }

    @Test("a CHECKSUM_PARTIAL packet (pseudo-header sum only) gets a full checksum after rewrite")
    func rewritePartial() {
        var bytes = PacketBuilder(tuple: .t("10.1.0.1", 4000, "10.1.0.2", 80), payload: Array(repeating: 7, count: 3001)).build()
        // What the kernel leaves in a CHECKSUM_PARTIAL skb: the folded pseudo-header sum, not complemented.
        let pseudo = Array(bytes[12..<20]) + [0, 6, UInt8((bytes.count - 20) >> 8), UInt8((bytes.count - 20) & 0xff)]
        put16(&bytes, 36, UInt16(Reference.sum(pseudo)))
        #expect(!Reference.tcpChecksumValid(bytes))
        bytes.withUnsafeMutableBytes { raw in
            guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { return }
            p.rewrite(to: .t("10.9.0.1", 10001, "10.9.0.2", 80), checksum: .partial)
        }
        #expect(Reference.tcpChecksumValid(bytes))
        #expect(Reference.ipChecksumValid(bytes))
    }

    @Test("a 64 KiB GSO-sized segment is rewritten with a correct full checksum")
    func gsoSized() {
        var rng = SplitMix64(state: 4)
        let payload = (0..<(65535 - 40)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var bytes = PacketBuilder(tuple: .t("10.1.0.1", 4000, "10.1.0.2", 80), payload: payload).build()
        bytes.withUnsafeMutableBytes { raw in
            guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { return }
            p.rewrite(to: .t("10.1.0.1", 12000, "10.1.0.101", 80), checksum: .partial)
        }
        #expect(Reference.tcpChecksumValid(bytes))
    }

    @Test("malformed headers are rejected by parse, never trap", arguments: [
        ([UInt8](repeating: 0, count: 10), IPv4TCPPacket.ParseError.truncated),
        ([0x65] + [UInt8](repeating: 0, count: 39), .notIPv4),
        ([0x44] + [UInt8](repeating: 0, count: 39), .badHeaderLength),
    ])
    func malformed(bytes: [UInt8], error: IPv4TCPPacket.ParseError) {
        var copy = bytes
        copy.withUnsafeMutableBytes { raw in
            #expect(IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count).failureValue == error)
        }
    }

    @Test("random bytes never crash the parser")
    func fuzzParse() {
        var rng = SplitMix64(state: 5)
        for _ in 0..<20000 {
            var bytes = (0..<Int.random(in: 0...80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if bytes.count > 0, Bool.random(using: &rng) { bytes[0] = 0x45 }
            if bytes.count > 9, Bool.random(using: &rng) { bytes[9] = 6 }
            bytes.withUnsafeMutableBytes { raw in
                guard let base = raw.baseAddress else { return }
                if case .success(let p) = IPv4TCPPacket.parse(base, count: raw.count) {
                    #expect(p.payloadOffset <= p.length && p.length <= raw.count)
                }
            }
        }
    }
}

extension Result {
    var failureValue: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
