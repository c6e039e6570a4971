import DyscoCore
import Testing

/// Sequence-number deltas after a reconfiguration (paper §3.4): what the anchors apply for the rest of the
/// session once a box that changed the byte stream is gone (docs/ARCHITECTURE.md, "Sequence deltas").
@Suite("Sequence deltas (paper §3.4): per-packet translation, permanent after the reconfiguration")
struct SequenceDeltaTests {
    typealias A = AnchorDataplaneTests
    static let session = A.session

    /// NOP, NOP, SACK with two blocks (RFC 2018 §3), as Linux writes it; `misalign` drops one NOP and pads at the
    /// end instead (blocks at odd offsets).
    static func sackOptions(_ blocks: [(UInt32, UInt32)], misalign: Bool = false) -> [UInt8] {
        var o: [UInt8] = misalign ? [1] : [1, 1]
        o += [5, UInt8(2 + 8 * blocks.count)]
        for (l, r) in blocks { for v in [l, r] { o += [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] } }
        if misalign { o += [0] }
        return o
    }

    static func sackBlocks(_ b: [UInt8], at offset: Int, count: Int) -> [UInt32] {
        (0..<(2 * count)).map { i in
            let o = 20 + 20 + offset + 2 + 4 * i
            return UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3])
        }
    }

    static func apply(_ builder: PacketBuilder, _ body: (IPv4TCPPacket) -> Void) throws -> [UInt8] {
        var bytes = builder.build()
        let count = bytes.count
        try bytes.withUnsafeMutableBytes { raw in
            guard case .success(let packet) = IPv4TCPPacket.parse(raw.baseAddress!, count: count) else {
                throw ParseFailure()
            }
            body(packet)
        }
        return bytes
    }
    struct ParseFailure: Error {}

    @Test("§3.4 egress: the acknowledgment number and both edges of every SACK block lose the delta; checksum stays valid (aligned and odd offsets)")
    func egressShiftsAckAndSack() throws {
        for misalign in [false, true] {
            let blocks: [(UInt32, UInt32)] = [(5000, 6000), (0xFFFF_FFF0, 20)]
            let builder = PacketBuilder(tuple: Self.session, seq: 1, ack: 4000,
                                        options: Self.sackOptions(blocks, misalign: misalign))
            let out = try Self.apply(builder) { $0.applyEgressDelta(100) }
            #expect(A.ack(out) == 3900)
            #expect(Self.sackBlocks(out, at: misalign ? 1 : 2, count: 2) == [4900, 5900, 0xFFFF_FF8C, 0xFFFF_FFB0])
            #expect(Reference.tcpChecksumValid(out), "misaligned: \(misalign)")
            // A negative delta (a box that deleted bytes) moves the other way, across the wrap.
            let back = try Self.apply(builder) { $0.applyEgressDelta(-0x20) }
            #expect(A.ack(back) == 4032 && Self.sackBlocks(back, at: misalign ? 1 : 2, count: 2)[2] == 0x10)
            #expect(Reference.tcpChecksumValid(back))
        }
    }

    @Test("§3.4 ingress: the sequence number gains the delta; SYNs (their own initial number) and zero deltas are untouched")
    func ingressShiftsSeq() throws {
        let data = try Self.apply(PacketBuilder(tuple: Self.session, seq: 0xFFFF_FFFF, payload: [1])) { $0.applyIngressDelta(2) }
        #expect(A.seq(data) == 1 && Reference.tcpChecksumValid(data))
        let syn = try Self.apply(PacketBuilder(tuple: Self.session, flags: [.syn], seq: 77)) { $0.applyIngressDelta(2) }
        #expect(A.seq(syn) == 77)
        let none = PacketBuilder(tuple: Self.session, seq: 5, ack: 6)
        let untouched = try Self.apply(none) { $0.applyIngressDelta(0); $0.applyEgressDelta(0) }
        #expect(untouched == none.build())
    }

    @Test("§3.4: after the reconfiguration ends, the new path keeps its delta for every packet, and the kernel fast path gets it with the translations")
    func deltaOutlivesTheReconfiguration() throws {
        var s = try A.setup(stateful: false)
        s.processor.settings.fastPath = true
        s.processor.settings.fastPathAfterPackets = 1
        s.processor.anchorSetDelta(chainID: s.chainID, 100)
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .released, now: 1)
        let finished = s.processor.anchorFinish(chainID: s.chainID, now: 1)
        let id = try #require(s.processor.table.byChain[s.chainID])
        #expect(s.processor.table.records[id]?.migration == nil)
        #expect(s.processor.table.records[id]?.rightLink?.active.seqDelta == 100)
        var installed: [FastPath.Translation] = []
        for case .install(_, let t) in finished.fastPath { installed += t }
        for i in 0..<3 {
            let (_, out, effects) = A.runCollecting(&s.processor, PacketBuilder(tuple: Self.session, seq: 5000 + UInt32(i),
                                                                                 ack: 9000, payload: [1]), hook: .egress)
            #expect(A.tuple(out) == s.new && A.ack(out) == 8900 && Reference.tcpChecksumValid(out))
            for case .install(_, let t) in effects.fastPath { installed += t }
            let (_, inBytes) = A.run(&s.processor, PacketBuilder(tuple: s.new.reversed, seq: 7000, ack: 5001), hook: .ingress)
            #expect(A.seq(inBytes) == 7100)
        }
        #expect(s.processor.table.records[id]?.carrier == .pending)
        #expect(installed.map(\.key) == [Self.session, s.new.reversed] && installed.allSatisfy { $0.seqDelta == 100 },
                "the kernel's translations carry the delta: \(installed)")
    }

    @Test("§3.4: a second reconfiguration of a path that already has a delta: the old path keeps it, the new one adds the new sum to it")
    func deltasAccumulate() throws {
        var s = try A.setup(stateful: false)
        s.processor.anchorSetDelta(chainID: s.chainID, 100)
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .released, now: 1)
        _ = s.processor.anchorFinish(chainID: s.chainID, now: 1)
        // Again: the fw2 path (delta 100) is now the old one, a path through fw1 the new one.
        _ = s.processor.anchorHold(chainID: s.chainID, side: .right, stateful: false, now: 2)
        s.processor.anchorSetDelta(chainID: s.chainID, -30)
        let third = try s.processor.openPath(chainID: s.chainID, next: A.fw1).get()
        let id = try #require(s.processor.table.byChain[s.chainID])
        #expect(s.processor.table.records[id]?.rightLink?.other?.seqDelta == 70)
        let (_, viaOld) = A.run(&s.processor, PacketBuilder(tuple: s.new.reversed, seq: 7000, ack: 5001), hook: .ingress)
        #expect(A.seq(viaOld) == 7100)
        let (_, viaNew) = A.run(&s.processor, PacketBuilder(tuple: third.reversed, seq: 7000, ack: 5001), hook: .ingress)
        #expect(A.seq(viaNew) == 7070)
    }

    @Test("a box's delta reported by its tuple in either direction becomes the hop's contribution; the hop adds its own subsessions' deltas")
    func boxDeltaAndHopDelta() throws {
        var p = PacketProcessor(config: AgentConfig(), portRange: 20000...20100, trust: TestKeys.group)
        let left = FiveTuple.t("10.0.0.1", 10001, "10.0.0.2", 80)
        let id = try p.table.insertFromLeft(session: Self.session, left: left, remaining: [A.server], now: 0)
        let fromServerSide = p.setBoxDelta(session: Self.session.reversed, .init(forward: 11, reverse: 0))
        #expect(fromServerSide)
        #expect(p.table.records[id]?.boxDelta == .init(forward: 0, reverse: 11))
        let fromClientSide = p.setBoxDelta(session: Self.session, .init(forward: 3, reverse: 11))
        #expect(fromClientSide)
        #expect(p.table.records[id]?.hopDelta == .init(forward: 3, reverse: 11))
        let unknown = p.setBoxDelta(session: .t("10.9.9.9", 1, "10.9.9.8", 2), .zero)
        #expect(!unknown)
    }

    @Test("§3.4 at a middlebox anchor whose local subsession has a delta (it was a right anchor before): the keep-alive it sends its endpoint acknowledges in that subsession's numbering")
    func middleboxAnchorElicitUsesLocalDelta() throws {
        var p = PacketProcessor(config: AgentConfig(), portRange: 20000...20100, trust: TestKeys.group)
        let left = FiveTuple.t("10.0.0.1", 10001, "10.0.0.2", 80)
        let id = try p.table.insertFromLeft(session: Self.session, left: left, remaining: [A.server], now: 0)
        try p.table.openRight(id, local: A.fw1, next: A.server)
        p.table.update(id) { $0.rightEstablished = true; $0.established = true }
        let chainID = try #require(p.table.records[id]).identity.chainID
        // First reconfiguration: this box is the right anchor of a segment on its left whose boxes added 40 bytes
        // to the forward stream; the new left subsession keeps the delta.
        _ = p.anchorHold(chainID: chainID, side: .left, stateful: false, now: 0)
        p.anchorSetDelta(chainID: chainID, 40)
        let newLeft = FiveTuple.t("10.0.0.1", 10002, "10.0.0.2", 80)
        try p.table.addOtherLeft(id, tuple: newLeft)
        p.anchorPromote(chainID: chainID)
        _ = p.anchorSetPhase(chainID: chainID, .released, now: 1)
        _ = p.anchorFinish(chainID: chainID, now: 1)
        #expect(p.table.records[id]?.leftLink?.active.seqDelta == 40)
        // Second: it is the left anchor of the segment on its right. Its local side (the client) sends data and
        // acks; the far side acknowledges the client's bytes.
        _ = p.anchorHold(chainID: chainID, side: .right, stateful: false, now: 2)
        let right = try #require(p.table.records[id]?.right)
        _ = A.run(&p, PacketBuilder(tuple: newLeft, seq: 1000, ack: 7000, payload: [1, 2]), hook: .ingress)
        _ = A.run(&p, PacketBuilder(tuple: Self.session, seq: 1040, ack: 7000, payload: [1, 2]), hook: .egress)
        _ = A.run(&p, PacketBuilder(tuple: right.reversed, seq: 7000, ack: 1042), hook: .ingress)
        var buffer = [UInt8](repeating: 0, count: 64)
        let built = buffer.withUnsafeMutableBytes { p.anchorElicit(chainID: chainID, into: $0.baseAddress!) }
        let (length, destination) = try #require(built)
        let packet = Array(buffer[0..<length])
        #expect(destination == IPAddress("10.0.0.1")! && A.tuple(packet) == newLeft.reversed)
        #expect(A.ack(packet) == 1002, "the client's numbering: 1042 − 40")
        #expect(A.seq(packet) == 6999)
        // The host's own box changes the streams too (it reported +3 forward, +5 reverse): the packet does not cross
        // it, so it carries the client's side of the box's numbers.
        let reported = p.setBoxDelta(session: Self.session, .init(forward: 3, reverse: 5))
        #expect(reported)
        let again = buffer.withUnsafeMutableBytes { p.anchorElicit(chainID: chainID, into: $0.baseAddress!) }
        let (length2, _) = try #require(again)
        #expect(A.ack(Array(buffer[0..<length2])) == 999 && A.seq(Array(buffer[0..<length2])) == 7004)
    }
}
