import DyscoCore
import DyscoLab
import Testing

/// The lab's byte-inserting middlebox (paper §3.4's case): what it does to each packet of a session.
@Suite("HeaderInserter: the lab box that adds a line to each response (paper §3.4, issue 17 test (e))")
struct HeaderInserterTests {
    static let client = IPAddress(10, 0, 0, 1), server = IPAddress(10, 0, 0, 9)
    static let forward = FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80)
    static let text = Array("X-Inserted: yes\r\n".utf8)

    /// An IPv4/TCP packet with valid checksums.
    static func packet(_ tuple: FiveTuple, flags: TCPFlags, seq: UInt32, ack: UInt32 = 0, options: [UInt8] = [],
                       payload: [UInt8] = []) -> [UInt8] {
        let total = 40 + options.count + payload.count
        var bytes = [UInt8](repeating: 0, count: total)
        bytes.withUnsafeMutableBytes { raw in
            let b = raw.baseAddress!
            b.storeBytes(of: 0x45, as: UInt8.self)
            b.storeBytes(of: UInt16(total).bigEndian, toByteOffset: 2, as: UInt16.self)
            b.storeBytes(of: 64, toByteOffset: 8, as: UInt8.self)
            b.storeBytes(of: 6, toByteOffset: 9, as: UInt8.self)
            b.storeBytes(of: tuple.srcAddr.value.bigEndian, toByteOffset: 12, as: UInt32.self)
            b.storeBytes(of: tuple.dstAddr.value.bigEndian, toByteOffset: 16, as: UInt32.self)
            b.storeBytes(of: tuple.srcPort.bigEndian, toByteOffset: 20, as: UInt16.self)
            b.storeBytes(of: tuple.dstPort.bigEndian, toByteOffset: 22, as: UInt16.self)
            b.storeBytes(of: seq.bigEndian, toByteOffset: 24, as: UInt32.self)
            b.storeBytes(of: ack.bigEndian, toByteOffset: 28, as: UInt32.self)
            b.storeBytes(of: UInt8((20 + options.count) / 4) << 4, toByteOffset: 32, as: UInt8.self)
            b.storeBytes(of: flags.rawValue, toByteOffset: 33, as: UInt8.self)
            b.storeBytes(of: UInt16(65535).bigEndian, toByteOffset: 34, as: UInt16.self)
            for (i, o) in (options + payload).enumerated() { b.storeBytes(of: o, toByteOffset: 40 + i, as: UInt8.self) }
            guard case .success(let p) = IPv4TCPPacket.parse(b, count: total) else { return }
            p.ip.recomputeChecksum()
            p.recomputeTCPChecksum()
        }
        return bytes
    }

    struct Out { var bytes: [UInt8]; var inserted: FiveTuple? }

    static func run(_ box: inout HeaderInserter, _ bytes: [UInt8]) -> Out {
        var output = [UInt8](repeating: 0, count: bytes.count + box.text.count)
        let result = bytes.withUnsafeBytes { input in output.withUnsafeMutableBytes { box.process(input, into: $0.baseAddress!) } }
        switch result {
        case .unchanged: return Out(bytes: bytes)
        case .modified(let length, let inserted): return Out(bytes: Array(output[0..<length]), inserted: inserted)
        case .drop: return Out(bytes: [])
        }
    }

    static func view(_ bytes: [UInt8], _ body: (IPv4TCPPacket) -> Void) {
        var copy = bytes
        copy.withUnsafeMutableBytes { raw in
            if case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) { body(p) }
        }
    }

    @Test("the line goes after the status line; later segments move up, the client's acks and SACK blocks move down; checksums stay valid; reported once")
    func insertsAndTranslates() {
        var box = HeaderInserter(text: Self.text, port: 80)
        let mss: [UInt8] = [2, 4, 0x05, 0xb4]  // 1460
        let syn = Self.run(&box, Self.packet(Self.forward, flags: [.syn], seq: 100, options: mss))
        Self.view(syn.bytes) { p in
            #expect(p.bytes(at: p.tcpOffset + 22, count: 2) == [0x05, 0xb4 - UInt8(Self.text.count)], "MSS lowered")
            #expect(p.isTCPChecksumValid)
        }
        _ = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.syn, .ack], seq: 1000, ack: 101, options: mss))
        let status = Array("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n".utf8)
        let first = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.ack, .psh], seq: 1001, ack: 101,
                                                payload: status))
        #expect(first.inserted == Self.forward)
        Self.view(first.bytes) { p in
            #expect(p.payloadLength == status.count + Self.text.count)
            #expect(p.bytes(at: p.payloadOffset, count: p.payloadLength) == Array(status[0..<17]) + Self.text + Array(status[17...]))
            #expect(p.isTCPChecksumValid && p.ip.isChecksumValid)
        }
        // Its retransmission gets the same bytes, without a second report.
        let again = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.ack, .psh], seq: 1001, ack: 101, payload: status))
        #expect(again.inserted == nil && again.bytes == first.bytes)
        let n = UInt32(Self.text.count)
        let body = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.ack], seq: 1001 + UInt32(status.count), ack: 101,
                                               payload: [1, 2, 3]))
        Self.view(body.bytes) { p in #expect(p.tcp.sequenceNumber == 1001 + UInt32(status.count) + n && p.isTCPChecksumValid) }
        let sack: [UInt8] = [1, 1, 5, 10] + [0, 0, 0x10, 0] + [0, 0, 0x11, 0]
        let ack = Self.run(&box, Self.packet(Self.forward, flags: [.ack], seq: 101, ack: 1001 + UInt32(status.count) + n,
                                              options: sack + [1, 1]))
        Self.view(ack.bytes) { p in
            #expect(p.tcp.acknowledgmentNumber == 1001 + UInt32(status.count))
            #expect(p.bytes(at: p.tcpOffset + 24, count: 4) == [0, 0, 0x0f, UInt8(256 - Int(n))], "SACK edge down by n")
            #expect(p.isTCPChecksumValid)
        }
        // SACK blocks below the ack's mapping point too (the first response segment lost, later ones SACKed), and an
        // edge inside the text maps to where it starts.
        let low: [UInt8] = [1, 1, 5, 10, 0, 0, 0x03, 0xfd, 0, 0, 0x11, 0]  // 1021 (inside the text 1018..<1035), 4352
        let early = Self.run(&box, Self.packet(Self.forward, flags: [.ack], seq: 101, ack: 1001, options: low + [1, 1]))
        Self.view(early.bytes) { p in
            #expect(p.tcp.acknowledgmentNumber == 1001)
            let expected: [UInt8] = [0, 0, 0x03, 0xfa, 0, 0, 0x10, 0xef]  // 1018 (the text's start), 4352 − 17
            #expect(p.bytes(at: p.tcpOffset + 24, count: 8) == expected, "an edge inside the text → its start; above it → down by n")
            #expect(p.isTCPChecksumValid)
        }
        // An ack inside the inserted text acknowledges up to the insertion point.
        let partial = Self.run(&box, Self.packet(Self.forward, flags: [.ack], seq: 101, ack: 1001 + 17 + 3))
        Self.view(partial.bytes) { p in #expect(p.tcp.acknowledgmentNumber == 1001 + 17) }
        // Other ports pass untouched.
        let other = Self.packet(FiveTuple(srcAddr: Self.client, srcPort: 1, dstAddr: Self.server, dstPort: 22), flags: [.ack], seq: 5)
        #expect(Self.run(&box, other).bytes == other)
    }

    @Test("a later response segment before the first one (reordered): dropped until the first decides where the text goes")
    func laterSegmentFirstIsDropped() {
        var box = HeaderInserter(text: Self.text, port: 80)
        _ = Self.run(&box, Self.packet(Self.forward, flags: [.syn], seq: 100))
        _ = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.syn, .ack], seq: 1000, ack: 101))
        let later = Self.packet(Self.forward.reversed, flags: [.ack], seq: 1501, ack: 101, payload: [1, 2, 3])
        #expect(Self.run(&box, later).bytes.isEmpty, "dropped")
        _ = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.ack], seq: 1001, ack: 101, payload: Array("HTTP/1.1 200 OK\r\n".utf8)))
        let again = Self.run(&box, later)
        Self.view(again.bytes) { p in #expect(p.tcp.sequenceNumber == 1501 + UInt32(Self.text.count)) }
    }

    @Test("a first response segment without a line end: the session passes unchanged")
    func noLineNoInsertion() {
        var box = HeaderInserter(text: Self.text, port: 80)
        _ = Self.run(&box, Self.packet(Self.forward, flags: [.syn], seq: 100))
        _ = Self.run(&box, Self.packet(Self.forward.reversed, flags: [.syn, .ack], seq: 1000, ack: 101))
        let data = Self.packet(Self.forward.reversed, flags: [.ack], seq: 1001, ack: 101, payload: Array("binary".utf8))
        let out = Self.run(&box, data)
        #expect(out.bytes == data && out.inserted == nil)
        let later = Self.packet(Self.forward.reversed, flags: [.ack], seq: 1007, ack: 101, payload: Array("\r\nx".utf8))
        #expect(Self.run(&box, later).bytes == later)
    }
}

extension IPv4TCPPacket {
    func bytes(at offset: Int, count: Int) -> [UInt8] {
        (0..<count).map { ip.base.load(fromByteOffset: offset + $0, as: UInt8.self) }
    }
}
