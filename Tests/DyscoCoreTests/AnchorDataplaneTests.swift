import DyscoCore
import Testing

/// The anchor's per-packet rules in PacketProcessor during a reconfiguration (paper §3.4, §3.5), on a left end
/// whose old path goes through fw1 and whose new path through fw2.
@Suite("Anchor data plane (paper §3.4 deltas, §3.5 two paths, stateful holding)")
struct AnchorDataplaneTests {
    static let session = FiveTuple.t("10.0.0.1", 40000, "10.0.0.9", 80)
    static let fw1 = IPAddress("10.0.0.2")!, fw2 = IPAddress("10.0.0.3")!, server = IPAddress("10.0.0.9")!

    struct Setup {
        var processor: PacketProcessor
        var chainID: UInt64
        var old: FiveTuple
        var new: FiveTuple
    }

    /// A left end with its session held for a reconfiguration and a new path opened to fw2.
    static func setup(stateful: Bool) throws -> Setup {
        var p = PacketProcessor(config: AgentConfig(), portRange: 10000...10100, trust: TestKeys.group)
        let id = try p.table.insertLeftEnd(session: session, hops: [fw1, server], now: 0)
        p.table.update(id) { $0.rightEstablished = true }
        let chainID = try #require(p.table.records[id]).identity.chainID
        let old = try #require(p.table.records[id]?.right)
        _ = p.anchorHold(chainID: chainID, side: .right, stateful: stateful, now: 0)
        let new = try p.openPath(chainID: chainID, next: fw2).get()
        return Setup(processor: p, chainID: chainID, old: old, new: new)
    }

    /// Runs one packet through the processor; returns the verdict and the bytes as they leave.
    static func run(_ p: inout PacketProcessor, _ builder: PacketBuilder, hook: HookPoint) -> (Verdict, [UInt8]) {
        let (verdict, bytes, _) = runCollecting(&p, builder, hook: hook)
        return (verdict, bytes)
    }

    /// ``run(_:_:hook:)`` with what the processor produced besides the verdict.
    static func runCollecting(_ p: inout PacketProcessor, _ builder: PacketBuilder, hook: HookPoint)
        -> (Verdict, [UInt8], DataplaneEffects) {
        var bytes = builder.build() + [UInt8](repeating: 0, count: 64)
        let count = bytes.count - 64
        let outcome = bytes.withUnsafeMutableBytes { raw in
            p.process(raw.baseAddress!, count: count, capacity: raw.count, hook: hook, checksum: .complete, now: 1)
        }
        let verdict = outcome.verdict
        if case .acceptModified(let length) = verdict { return (verdict, Array(bytes[0..<length]), outcome.effects) }
        return (verdict, Array(bytes[0..<count]), outcome.effects)
    }

    static func tuple(_ bytes: [UInt8]) -> FiveTuple {
        FiveTuple(srcAddr: IPAddress(UInt32(get16(bytes, 12)) << 16 | UInt32(get16(bytes, 14))), srcPort: get16(bytes, 20),
                  dstAddr: IPAddress(UInt32(get16(bytes, 16)) << 16 | UInt32(get16(bytes, 18))), dstPort: get16(bytes, 22))
    }

    static func seq(_ b: [UInt8]) -> UInt32 { UInt32(get16(b, 24)) << 16 | UInt32(get16(b, 26)) }
    static func ack(_ b: [UInt8]) -> UInt32 { UInt32(get16(b, 28)) << 16 | UInt32(get16(b, 30)) }
    static func window(_ b: [UInt8]) -> UInt16 { get16(b, 34) }

    @Test("§3.4: with a non-zero delta, packets in from the new path get delta added to seq, packets out lose it from ack")
    func deltaOnTheNewPath() throws {
        var s = try Self.setup(stateful: false)
        s.processor.anchorSetDelta(chainID: s.chainID, 100)
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .released, now: 1)

        let (outVerdict, out) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 5000, ack: 9000,
                                                                     payload: [1, 2, 3]), hook: .egress)
        guard case .acceptModified = outVerdict else { Issue.record("egress verdict \(outVerdict)"); return }
        #expect(Self.tuple(out) == s.new, "new data goes on the new path")
        #expect(Self.ack(out) == 8900, "out: ack − delta")
        #expect(Reference.tcpChecksumValid(out))

        let (inVerdict, inBytes) = Self.run(&s.processor, PacketBuilder(tuple: s.new.reversed, seq: 7000, ack: 5003,
                                                                       payload: [9]), hook: .ingress)
        guard case .acceptModified = inVerdict else { Issue.record("ingress verdict \(inVerdict)"); return }
        #expect(Self.tuple(inBytes) == Self.session.reversed)
        #expect(Self.seq(inBytes) == 7100, "in: seq + delta")
        #expect(Reference.tcpChecksumValid(inBytes))
    }

    @Test("§3.5 stateful: while buffering, new data is held, retransmissions and pure ACKs keep the old path")
    func statefulHolding() throws {
        var s = try Self.setup(stateful: true)
        // The client's packets before the drain fix the cutoff (oldSent).
        _ = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50, payload: [UInt8](repeating: 7, count: 100)),
                     hook: .egress)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .buffering, now: 2)
        let (newData, _) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1100, ack: 50, payload: [1, 2]),
                                    hook: .egress)
        #expect(newData == .hold(chainID: s.chainID), "new data waits in the anchor buffer")
        let (retransmission, r) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50,
                                                                      payload: [UInt8](repeating: 7, count: 100)), hook: .egress)
        guard case .acceptModified = retransmission else { Issue.record("\(retransmission)"); return }
        #expect(Self.tuple(r) == s.old, "a retransmission below the cutoff stays on the old path")
        let (pureAck, a) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1102, ack: 60), hook: .egress)
        guard case .acceptModified = pureAck else { Issue.record("\(pureAck)"); return }
        #expect(Self.tuple(a) == s.old)

        // The far side acknowledges everything sent on the old path: drained (oldSentAcked = oldSent).
        let (fromServer, f, effects) = Self.runCollecting(&s.processor, PacketBuilder(tuple: s.old.reversed, seq: 60, ack: 1100),
                                                          hook: .ingress)
        guard case .acceptModified = fromServer else { Issue.record("\(fromServer)"); return }
        #expect(effects.anchor == [.drained(chainID: s.chainID)])
        #expect(Self.window(f) == 0, "the zero-window clamp keeps the endpoint from sending new data meanwhile")

        // After the release (state installed, egress promoted) the held packet goes on the new path.
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .released, now: 3)
        let (held, _) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1100, ack: 50, payload: [1, 2]),
                                 hook: .egress)
        #expect(held == .hold(chainID: s.chainID), "until the shell releases the buffer, later packets queue behind it")
        s.processor.endRelease(chainID: s.chainID)
        let (released, n) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1100, ack: 50, payload: [1, 2]),
                                     hook: .egress)
        guard case .acceptModified = released else { Issue.record("\(released)"); return }
        #expect(Self.tuple(n) == s.new)
    }

    @Test("the release's window update reopens the endpoint's window with the far side's numbers and real window (once)")
    func windowUpdate() throws {
        var s = try Self.setup(stateful: true)
        // Both directions seen: the far side's numbers and window are known, so the elicit is a keep-alive
        // (one byte longer than a pure ACK) — the update must still be built from it.
        _ = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50, payload: [1]), hook: .egress)
        _ = Self.run(&s.processor, PacketBuilder(tuple: s.old.reversed, seq: 50, ack: 1001, payload: [2], window: 777), hook: .ingress)
        var buffer = [UInt8](repeating: 0, count: PureAck.maxLength)
        let built = buffer.withUnsafeMutableBytes { s.processor.anchorUnclamp(chainID: s.chainID, into: $0.baseAddress!) }
        let (length, destination) = try #require(built, "no window update built")
        let update = Array(buffer[0..<length])
        #expect(destination == Self.session.srcAddr, "towards the local endpoint")
        #expect(Self.tuple(update) == Self.session.reversed, "as from the far side, in the session's own tuple")
        #expect(Self.window(update) == 777, "the far side's real window, not the clamp's 0")
        #expect(Self.seq(update) == 51 && Self.ack(update) == 1001, "the far side's latest numbers")
        #expect(Reference.tcpChecksumValid(update))
        // The clamp is over: a second call has nothing to reopen.
        let again = buffer.withUnsafeMutableBytes { s.processor.anchorUnclamp(chainID: s.chainID, into: $0.baseAddress!) }
        #expect(again == nil)
    }

    @Test("issue 20's stall: the anchor's keep-alive, poke and probe never acknowledge data the local endpoint did not acknowledge itself, even with a segment missing before the far side's sequence end")
    func noForgedAcknowledgment() throws {
        var s = try Self.setup(stateful: true)
        var buffer = [UInt8](repeating: 0, count: PureAck.maxLength)
        // The server's segments 50..<60 are lost on the old path; 60..<70 crosses the anchor: the far side's
        // sequence end is 70, but the client can acknowledge no more than 50. It has not spoken yet.
        _ = Self.run(&s.processor, PacketBuilder(tuple: s.old.reversed, seq: 60, ack: 1000, payload: [UInt8](repeating: 3, count: 10),
                                                 window: 500), hook: .ingress)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .buffering, now: 2)
        let poke = buffer.withUnsafeMutableBytes { s.processor.anchorPoke(chainID: s.chainID, into: $0.baseAddress!) }
        #expect(poke == .unknownNumbers, "no poke towards the server until the client's own acknowledgment is known")
        #expect(s.processor.anchorLacksProbeNumbers(chainID: s.chainID), "no probe either: the anchor elicits again")
        let elicit = buffer.withUnsafeMutableBytes { s.processor.anchorElicit(chainID: s.chainID, into: $0.baseAddress!) }
        let (length, _) = try #require(elicit)
        let syn = Array(buffer[0..<length])
        #expect(syn[33] & 0x02 != 0, "the client's numbers unknown: a SYN (challenge ACK), not a keep-alive at 69 (new data to it)")
        // The client answers with what it really has: 50.
        _ = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50, window: 40), hook: .egress)
        let keepAlive = buffer.withUnsafeMutableBytes { s.processor.anchorElicit(chainID: s.chainID, into: $0.baseAddress!) }
        let (kLength, _) = try #require(keepAlive)
        let k = Array(buffer[0..<kLength])
        #expect(Self.seq(k) == 49 && kLength == IPv4TCPPacket.pureAckLength + 1, "a keep-alive one byte below what the client acknowledged")
        let poked = buffer.withUnsafeMutableBytes { s.processor.anchorPoke(chainID: s.chainID, into: $0.baseAddress!) }
        guard case .sent(let pLength, let to, _) = poked else { Issue.record("\(poked)"); return }
        let p = Array(buffer[0..<pLength])
        #expect(to == Self.fw1 && Self.ack(p) == 50 && Self.seq(p) == 999, "the poke acknowledges 50 (the client's), not 70")
        #expect(Reference.tcpChecksumValid(p))
        let probe = buffer.withUnsafeMutableBytes { s.processor.anchorProbe(chainID: s.chainID, into: $0.baseAddress!) }
        #expect(probe != nil)
        if probe != nil { #expect(Self.ack(Array(buffer)) == 50) }
    }

    @Test("a hold seeds the local side's acknowledgment from the slow path's tracking (a number it really sent)")
    func holdSeedsFromTracking() throws {
        var p = PacketProcessor(config: AgentConfig(), portRange: 10000...10100, trust: TestKeys.group)
        let id = try p.table.insertLeftEnd(session: Self.session, hops: [Self.fw1, Self.server], now: 0)
        p.table.update(id) {
            $0.rightEstablished = true
            $0.sequence.observe(.forward, seq: 1000, ack: 4321, window: 77, flags: [.ack], payloadLength: 0, windowScale: nil)
            $0.sequence.observe(.reverse, seq: 4321, ack: 1000, window: 88, flags: [.ack], payloadLength: 0, windowScale: nil)
        }
        let chainID = try #require(p.table.records[id]).identity.chainID
        _ = p.anchorHold(chainID: chainID, side: .right, stateful: true, now: 0)
        let m = try #require(p.table.records[id]?.migration)
        #expect(m.lastAck == 4321 && m.lastWindow == 77, "the client's (forward) acknowledgment, not the server's")
        // Tracking invalidated (the kernel carried the session): nothing is seeded.
        var q = PacketProcessor(config: AgentConfig(), portRange: 10000...10100, trust: TestKeys.group)
        let id2 = try q.table.insertLeftEnd(session: Self.session, hops: [Self.fw1, Self.server], now: 0)
        q.table.update(id2) {
            $0.sequence.observe(.forward, seq: 1000, ack: 4321, window: 77, flags: [.ack], payloadLength: 0, windowScale: nil)
            $0.sequence.invalidate()
        }
        let chain2 = try #require(q.table.records[id2]).identity.chainID
        _ = q.anchorHold(chainID: chain2, side: .right, stateful: true, now: 0)
        #expect(q.table.records[id2]?.migration?.lastAck == nil)
    }

    @Test("a probe on the new path before the release is kept from the endpoint; the probe we send carries our numbers")
    func probes() throws {
        var s = try Self.setup(stateful: true)
        _ = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50), hook: .egress)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .buffering, now: 2)
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .probing, now: 3)
        let (verdict, _, effects) = Self.runCollecting(&s.processor, PacketBuilder(tuple: s.new.reversed, seq: 50, ack: 1000),
                                                       hook: .ingress)
        #expect(verdict == .drop)
        #expect(effects.anchor == [.newPathPacket(chainID: s.chainID)])
        #expect(s.processor.counters.probesReceived == 1)

        var buffer = [UInt8](repeating: 0, count: PureAck.maxLength)
        let length = try #require(buffer.withUnsafeMutableBytes { s.processor.anchorProbe(chainID: s.chainID, into: $0.baseAddress!) })
        let probe = Array(buffer[0..<length])
        #expect(Self.tuple(probe) == s.new)
        #expect(Self.seq(probe) == 1000 && Self.ack(probe) == 50)
        #expect(Reference.ipChecksumValid(probe) && Reference.tcpChecksumValid(probe))
    }

    @Test("cancel (§3.6): egress back on the old path, the new subsession and its port gone")
    func cancel() throws {
        var s = try Self.setup(stateful: true)
        let portsBefore = s.processor.table.ports.inUse
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorCancel(chainID: s.chainID, now: 1)
        s.processor.endRelease(chainID: s.chainID)
        #expect(s.processor.table.ports.inUse == portsBefore - 1)
        #expect(s.processor.table.ingress[s.new.reversed] == nil)
        let (verdict, out) = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1, ack: 1, payload: [1]), hook: .egress)
        guard case .acceptModified = verdict else { Issue.record("\(verdict)"); return }
        #expect(Self.tuple(out) == s.old)
        #expect(s.processor.anchoring == 0)
    }

    @Test("cancel (§3.6): a late packet on the dropped new subsession is dropped, never handed to the stack (which would reset the session)")
    func cancelKeepsTheNewTupleDeparted() throws {
        var s = try Self.setup(stateful: true)
        _ = Self.run(&s.processor, PacketBuilder(tuple: Self.session, seq: 1000, ack: 50), hook: .egress)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .buffering, now: 2)
        s.processor.anchorPromote(chainID: s.chainID)
        _ = s.processor.anchorSetPhase(chainID: s.chainID, .probing, now: 3)
        _ = s.processor.anchorCancel(chainID: s.chainID, now: 4)
        s.processor.endRelease(chainID: s.chainID)
        // The other anchor's probe (or released data) still on the new path: not the local stack's to answer.
        let (verdict, _) = Self.run(&s.processor, PacketBuilder(tuple: s.new.reversed, seq: 50, ack: 1000), hook: .ingress)
        #expect(verdict == .drop)
        #expect(s.processor.counters.droppedAfterLeaving == 1)
        // The old path is untouched.
        let (old, _) = Self.run(&s.processor, PacketBuilder(tuple: s.old.reversed, seq: 50, ack: 1000), hook: .ingress)
        guard case .acceptModified = old else { Issue.record("\(old)"); return }
    }
}
