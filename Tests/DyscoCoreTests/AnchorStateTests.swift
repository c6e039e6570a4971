import DyscoCore
import Testing

@Suite("AnchorState (paper §3.5: two paths, drain predicate)")
struct AnchorStateTests {
    /// An anchor in `phase` with the cutoff (oldSent) at `cutoff`.
    func anchor(_ phase: AnchorState.Phase, stateful: Bool, cutoff: UInt32? = 1000) -> AnchorState {
        var m = AnchorState(side: .right, stateful: stateful, now: 0)
        m.sentEnd = cutoff
        m.enter(phase)
        return m
    }

    @Test("locked: everything on the old path", arguments: [true, false])
    func locked(stateful: Bool) {
        let m = anchor(.locked, stateful: stateful)
        #expect(m.cutoff == nil)  // not fixed yet
        #expect(m.egressPath(seq: 0, length: 0) == .old)
        #expect(m.egressPath(seq: 900, length: 100) == .old)
        #expect(m.egressPath(seq: 5000, length: 1460) == .old)
    }

    @Test("buffering / probing (stateful): retransmissions below the cutoff old, new data held, pure ACKs old",
          arguments: [AnchorState.Phase.buffering, .probing])
    func holding(phase: AnchorState.Phase) {
        let m = anchor(phase, stateful: true)
        #expect(m.cutoff == 1000)
        #expect(m.egressPath(seq: 900, length: 100) == .old)  // ends exactly at the cutoff
        #expect(m.egressPath(seq: 500, length: 10) == .old)
        #expect(m.egressPath(seq: 1000, length: 1) == .hold)
        #expect(m.egressPath(seq: 2000, length: 100) == .hold)
        #expect(m.egressPath(seq: 950, length: 100) == .hold)  // straddles the cutoff: new bytes, held whole
        #expect(m.egressPath(seq: 2000, length: 0) == .old)  // pure ACK
    }

    @Test("§3.5: once a segment came in on the new path (the far anchor released), pure ACKs leave on the new path in every phase; data keeps its rule (issue 19: an ACK of the new path's FIN on the old path was INVALID at the old box)",
          arguments: [AnchorState.Phase.locked, .buffering, .probing, .released])
    func pureAckAfterNewPathSegment(phase: AnchorState.Phase) {
        var m = anchor(phase, stateful: true)
        let before = m.egressPath(seq: 2000, length: 0)
        #expect(before == (phase == .released ? .new : .old))
        m.noteIngress(seq: 7000, length: 0, ack: 1000, onNewPath: true, now: 1)  // a probe: no data
        #expect(m.egressPath(seq: 2000, length: 0) == before)
        m.noteIngress(seq: 7000, length: 1, ack: 1000, onNewPath: true, now: 2)  // the far side's FIN
        #expect(m.egressPath(seq: 2000, length: 0) == .new)
        #expect(m.egressPath(seq: 900, length: 100) == .old || phase == .released)  // a retransmission keeps its path
        #expect(m.egressPath(seq: 2000, length: 100) == (phase == .locked ? .old : phase == .released ? .new : .hold))
    }

    @Test("buffering without a known cutoff holds any data")
    func holdingUnknownCutoff() {
        let m = anchor(.buffering, stateful: true, cutoff: nil)
        #expect(m.cutoff == nil)
        #expect(m.egressPath(seq: 5, length: 1) == .hold)
        #expect(m.egressPath(seq: 5, length: 0) == .old)
    }

    @Test("released, stateful: everything on the new path (the old one is empty)")
    func releasedStateful() {
        let m = anchor(.released, stateful: true)
        #expect(m.egressPath(seq: 500, length: 10) == .new)
        #expect(m.egressPath(seq: 1000, length: 10) == .new)
        #expect(m.egressPath(seq: 1000, length: 0) == .new)
    }

    @Test("released, stateless (§3.5 table): below oldSent old, at or above new, pure ACKs new")
    func releasedStateless() {
        let m = anchor(.released, stateful: false)
        #expect(m.cutoff == 1000)
        #expect(m.egressPath(seq: 900, length: 100) == .old)
        #expect(m.egressPath(seq: 1000, length: 100) == .new)
        #expect(m.egressPath(seq: 4000, length: 100) == .new)
        #expect(m.egressPath(seq: 900, length: 0) == .new)
        let unknown = anchor(.released, stateful: false, cutoff: nil)
        #expect(unknown.egressPath(seq: 1, length: 10) == .new)
    }

    @Test("straddling rule: a segment carrying bytes on both sides of the cutoff goes whole on the new path")
    func straddling() {
        let m = anchor(.released, stateful: false)
        #expect(m.egressPath(seq: 999, length: 2) == .new)
        #expect(m.egressPath(seq: 500, length: 1000) == .new)
        // The old path never carries a byte at or above the cutoff: sentEnd does not pass it.
        var n = m
        n.noteEgress(seq: 500, length: 1000, ack: 7, window: 100, choice: n.egressPath(seq: 500, length: 1000), now: 1)
        #expect(n.sentEnd == 1000)
        n.noteEgress(seq: 800, length: 100, ack: 7, window: 100, choice: n.egressPath(seq: 800, length: 100), now: 2)
        #expect(n.sentEnd == 1000)
        // The receiving side's predicate accepts the overlap (firstNewRcvd ≤ oldRcvd, no gap).
        var r = AnchorState(side: .left, stateful: false, now: 0)
        r.noteIngress(seq: 0, length: 999, ack: nil, onNewPath: false, now: 1)  // old path up to 999
        r.noteIngress(seq: 900, length: 200, ack: nil, onNewPath: true, now: 2)  // repacketized on the new path
        r.noteEgress(seq: 50, length: 0, ack: 999, window: 100, choice: .old, now: 3)
        #expect(r.receivedDrained)
    }

    @Test("sentDrained: oldSentAcked = oldSent")
    func sentDrained() {
        var m = anchor(.buffering, stateful: true)
        #expect(!m.sentDrained)  // nothing acknowledged yet
        m.noteIngress(seq: 0, length: 0, ack: 999, onNewPath: false, now: 1)
        #expect(m.peerAcked == 999)
        #expect(!m.sentDrained)
        m.noteIngress(seq: 0, length: 0, ack: 1000, onNewPath: false, now: 2)
        #expect(m.sentDrained)
        // An older ACK arriving late does not move peerAcked back.
        m.noteIngress(seq: 0, length: 0, ack: 10, onNewPath: false, now: 3)
        #expect(m.peerAcked == 1000 && m.sentDrained)
        // ACKs on the new path are not the old path's.
        var n = anchor(.buffering, stateful: true)
        n.noteIngress(seq: 0, length: 0, ack: 5000, onNewPath: true, now: 1)
        #expect(n.peerAcked == nil && !n.sentDrained)
    }

    @Test("receivedDrained: oldRcvdAcked = oldRcvd and the new path starts without a gap")
    func receivedDrained() {
        var m = AnchorState(side: .right, stateful: false, now: 0)
        #expect(!m.receivedDrained)
        m.noteIngress(seq: 100, length: 100, ack: nil, onNewPath: false, now: 1)
        #expect(m.oldRcvd == 200)
        m.noteEgress(seq: 1, length: 0, ack: 150, window: 10, choice: .old, now: 2)
        m.noteIngress(seq: 200, length: 10, ack: nil, onNewPath: true, now: 3)
        #expect(m.firstNewRcvd == 200)
        #expect(!m.receivedDrained)  // 150 < oldRcvd: not all acknowledged
        m.noteEgress(seq: 1, length: 0, ack: 200, window: 10, choice: .old, now: 4)
        #expect(m.receivedDrained)
        // A gap: the new path starts after oldRcvd.
        var g = AnchorState(side: .right, stateful: false, now: 0)
        g.noteIngress(seq: 100, length: 100, ack: nil, onNewPath: false, now: 1)
        g.noteIngress(seq: 300, length: 10, ack: nil, onNewPath: true, now: 2)
        g.noteEgress(seq: 1, length: 0, ack: 200, window: 10, choice: .old, now: 3)
        #expect(!g.receivedDrained)
        // An earlier new-path segment (reordered) fills it: firstNewRcvd is the lowest.
        g.noteIngress(seq: 200, length: 100, ack: nil, onNewPath: true, now: 4)
        #expect(g.firstNewRcvd == 200)
        #expect(g.receivedDrained)
    }

    @Test("the cutoff is fixed at the phase change and does not move afterwards")
    func cutoffFixed() {
        var m = AnchorState(side: .right, stateful: true, now: 0)
        m.noteEgress(seq: 0, length: 100, ack: 1, window: 10, choice: m.egressPath(seq: 0, length: 100), now: 1)
        m.noteEgress(seq: 100, length: 100, ack: 1, window: 10, choice: m.egressPath(seq: 100, length: 100), now: 2)
        #expect(m.sentEnd == 200 && m.cutoff == nil)
        m.enter(.buffering)
        #expect(m.cutoff == 200)
        // New data is held; it does not move the cutoff nor sentEnd.
        let choice = m.egressPath(seq: 200, length: 100)
        #expect(choice == .hold)
        m.noteEgress(seq: 200, length: 100, ack: 1, window: 10, choice: choice, now: 3)
        #expect(m.cutoff == 200 && m.sentEnd == 200)
        // A retransmission below it goes old and leaves it too.
        m.noteEgress(seq: 100, length: 100, ack: 1, window: 10, choice: m.egressPath(seq: 100, length: 100), now: 4)
        #expect(m.cutoff == 200)
        m.enter(.probing)
        #expect(m.cutoff == 200)
        m.enter(.released)
        #expect(m.cutoff == 200)
        #expect(m.phase == .released)
    }

    @Test("no segment seen before the phase change: the first one after it gives the cutoff")
    func cutoffFromFirstSegment() {
        var m = AnchorState(side: .left, stateful: false, now: 0)
        m.enter(.released)
        #expect(m.cutoff == nil)
        let choice = m.egressPath(seq: 7000, length: 10)
        #expect(choice == .new)
        m.noteEgress(seq: 7000, length: 10, ack: 3, window: 9, choice: choice, now: 1)
        #expect(m.cutoff == 7000)
        #expect(m.lastAck == 3 && m.lastWindow == 9 && m.lastPacketAt == 1)
        #expect(m.egressPath(seq: 6990, length: 10) == .old)
        #expect(m.egressPath(seq: 7000, length: 10) == .new)
    }

    @Test("probe numbers: the acknowledgment is only ever the local side's own; the sequence number falls back on the far side's acknowledgment (issue 20's stall)")
    func probeNumbers() {
        var m = AnchorState(side: .right, stateful: true, now: 0)
        #expect(m.probeNumbers == nil)
        // A silent local side: the far side's sequence end is not an acknowledgment the local side sent (a
        // segment before it may be missing), so no probe yet.
        m.noteIngress(seq: 5000, length: 100, ack: 1200, window: 300, onNewPath: false, now: 1)
        #expect(m.probeNumbers == nil)
        #expect(m.peerWindow == 300)
        // Once the local side has spoken, its numbers.
        m.noteEgress(seq: 1200, length: 50, ack: 5100, window: 9, choice: .old, now: 2)
        #expect(m.probeNumbers?.seq == 1250 && m.probeNumbers?.ack == 5100)
        // A local side that only acknowledged: the sequence number is what the far side acknowledged of it.
        var n = AnchorState(side: .left, stateful: true, now: 0)
        n.noteIngress(seq: 77, length: 0, ack: 10, onNewPath: false, now: 1)
        #expect(n.oldRcvd == nil && n.peerSeqEnd == 77)
        #expect(n.probeNumbers == nil)
        n.lastAck = 70  // what the local side last acknowledged (seeded from the slow path's tracking, or seen)
        #expect(n.probeNumbers?.seq == 10 && n.probeNumbers?.ack == 70, "never the far side's sequence end (77)")
        // New-path packets do not count.
        var o = AnchorState(side: .left, stateful: true, now: 0)
        o.noteIngress(seq: 1, length: 10, ack: 2, onNewPath: true, now: 1)
        #expect(o.probeNumbers == nil)
    }

    @Test("seqLE is modular: comparisons across 2^32")
    func seqLE() {
        #expect(AnchorState.seqLE(5, 5))
        #expect(AnchorState.seqLE(5, 6))
        #expect(!AnchorState.seqLE(6, 5))
        #expect(AnchorState.seqLE(0xFFFF_FFF0, 0x10))
        #expect(!AnchorState.seqLE(0x10, 0xFFFF_FFF0))
        #expect(AnchorState.seqLE(UInt32.max, 0))
        #expect(!AnchorState.seqLE(0, UInt32.max))
        #expect(AnchorState.seqLE(0, 0x7FFF_FFFF))
        #expect(!AnchorState.seqLE(0x7FFF_FFFF, 0))
    }

    @Test("sequence wrap-around: cutoff, sentEnd, drain and firstNewRcvd across 2^32")
    func wrapAround() {
        var m = AnchorState(side: .right, stateful: false, now: 0)
        m.noteEgress(seq: 0xFFFF_FF00, length: 0xF0, ack: 1, window: 1, choice: .old, now: 1)
        #expect(m.sentEnd == 0xFFFF_FFF0)
        m.noteEgress(seq: 0xFFFF_FFF0, length: 0x20, ack: 1, window: 1, choice: .old, now: 2)  // wraps
        #expect(m.sentEnd == 0x10)
        m.noteEgress(seq: 0xFFFF_FF00, length: 0x10, ack: 1, window: 1, choice: .old, now: 3)  // old retransmission
        #expect(m.sentEnd == 0x10)
        m.enter(.released)
        #expect(m.cutoff == 0x10)
        #expect(m.egressPath(seq: 0xFFFF_FFF0, length: 0x20) == .old)  // ends at the cutoff, across the wrap
        #expect(m.egressPath(seq: 0xFFFF_FFF0, length: 0x21) == .new)
        #expect(m.egressPath(seq: 0x10, length: 1) == .new)
        m.noteIngress(seq: 0, length: 0, ack: 0xFFFF_FFFF, onNewPath: false, now: 4)
        #expect(!m.sentDrained)
        m.noteIngress(seq: 0, length: 0, ack: 0x10, onNewPath: false, now: 5)
        #expect(m.sentDrained)
        m.noteIngress(seq: 0, length: 0, ack: 0xFFFF_FFFF, onNewPath: false, now: 6)  // late old ACK
        #expect(m.peerAcked == 0x10)
        // The far side's stream wrapping too.
        m.noteIngress(seq: 0xFFFF_FFF8, length: 0x10, ack: nil, onNewPath: false, now: 7)
        #expect(m.oldRcvd == 8)
        m.noteIngress(seq: 0x20, length: 5, ack: nil, onNewPath: true, now: 8)
        m.noteIngress(seq: 0xFFFF_FFFC, length: 5, ack: nil, onNewPath: true, now: 9)
        #expect(m.firstNewRcvd == 0xFFFF_FFFC)
        m.noteEgress(seq: 0x10, length: 0, ack: 8, window: 1, choice: .new, now: 10)
        #expect(m.receivedDrained)
    }
}
