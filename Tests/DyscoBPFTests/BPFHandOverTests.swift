import CLibbpf
import DyscoBPF
import DyscoCore
import Testing

/// The agent's side of the hand-over rule (docs/BPF.md, "Hand-over without reordering"): what it writes to the
/// maps at a hold, per verdict, at a release, and when it reads the entry back.
@Suite struct BPFHandOverTests {
    static let key = BPFSessionKey(FiveTuple(srcAddr: IPAddress(10, 0, 0, 1), srcPort: 40000,
                                             dstAddr: IPAddress(10, 0, 0, 2), dstPort: 80), hook: .ingress)
    static let other = BPFSessionKey(key.tuple, hook: .egress)
    let ms: UInt64 = 1_000_000

    @Test("a hold zeroes both counts before HELD and counts verdicts without writing them")
    func holdCounts() {
        var h = BPFHandOver()
        #expect(h.isEmpty)
        #expect(h.hold(Self.key) == [.clearCounts(Self.key)])
        #expect(!h.isEmpty && h.isTracked(Self.key) && !h.isTracked(Self.other))
        #expect(h.verdicted(Self.key) == nil && h.verdicted(Self.key) == nil)
        #expect(h.verdicted(Self.other) == nil)  // not held: not counted
        #expect(h.seen(Self.key) == 2 && h.seen(Self.other) == nil)
        #expect(h.releasing.isEmpty)
    }

    @Test("a release writes the agent's count, then every later verdict writes the new count")
    func releaseWritesSeen() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        for _ in 0..<5 { _ = h.verdicted(Self.key) }
        #expect(h.release(Self.key, now: 10 * ms) == .writeSeen(Self.key, 5))
        #expect(h.releasing == [Self.key])
        #expect(h.verdicted(Self.key) == .writeSeen(Self.key, 6))
        #expect(h.verdicted(Self.key) == .writeSeen(Self.key, 7))
        // A key that was not held is not released by the rule (the caller writes it unheld).
        #expect(h.release(Self.other, now: 10 * ms) == nil)
    }

    @Test("the program took over (entry no longer held): counted in order, counts cleared, nothing forced")
    func takenOver() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        _ = h.release(Self.key, now: 0)
        #expect(h.observed(Self.key, held: true, passed: 1, now: 50 * ms).isEmpty)
        #expect(h.observed(Self.key, held: false, passed: 0, now: 60 * ms) == [.clearCounts(Self.key)])
        #expect(h.isEmpty && h.releasedInOrder == 1 && h.forcedReleases == 0)
        #expect(h.verdicted(Self.key) == nil)
    }

    @Test("counts equal but no packet came (an idle direction): the agent takes the translation over itself")
    func idleTakeOver() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        _ = h.verdicted(Self.key)
        _ = h.verdicted(Self.key)
        _ = h.release(Self.key, now: 0)
        #expect(h.observed(Self.key, held: true, passed: 3, now: ms).isEmpty)  // one still in the queue
        #expect(h.verdicted(Self.key) == .writeSeen(Self.key, 3))
        #expect(h.observed(Self.key, held: true, passed: 3, now: 2 * ms) == [.takeOver(Self.key), .clearCounts(Self.key)])
        #expect(h.isEmpty && h.releasedInOrder == 1 && h.forcedReleases == 0)
    }

    @Test("counts that never meet: after the bound the agent forces the release and counts it")
    func forced() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        _ = h.release(Self.key, now: 5 * ms)
        _ = h.verdicted(Self.key)
        #expect(h.observed(Self.key, held: true, passed: 3, now: 5 * ms + BPFHandOver.releaseBoundNanoseconds - 1).isEmpty)
        #expect(h.observed(Self.key, held: true, passed: 3, now: 5 * ms + BPFHandOver.releaseBoundNanoseconds)
                == [.forceRelease(Self.key, seen: 1), .clearCounts(Self.key)])
        #expect(h.isEmpty && h.forcedReleases == 1 && h.releasedInOrder == 0)
    }

    @Test("a key held only (not releasing) is not read back; a key dropped or held again starts over")
    func dropAndRehold() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        #expect(h.observed(Self.key, held: false, passed: 0, now: 0).isEmpty)  // not releasing: ignored
        _ = h.verdicted(Self.key)
        _ = h.release(Self.key, now: 0)
        #expect(h.hold(Self.key) == [.clearCounts(Self.key)])  // a second migration's hold while releasing
        #expect(h.seen(Self.key) == 0 && h.releasing.isEmpty)
        #expect(h.drop(Self.key) == .clearCounts(Self.key))
        #expect(h.drop(Self.key) == nil && h.isEmpty)
        _ = h.hold(Self.other)
        h.reset()
        #expect(h.isEmpty)
    }

    @Test("a new key: counts zeroed before its HELD entry, only marked ingress verdicts count, released after its barrier's drain")
    func newIngressKey() {
        var h = BPFHandOver()
        #expect(h.fresh(Self.key, barrier: 3) == .clearCounts(Self.key))
        #expect(h.awaitingDrain == 1 && h.releasing.isEmpty && !h.isEmpty)
        // Packets queued before the entry existed carry no mark: not counted; the program's marked ones are.
        #expect(h.verdicted(Self.key, counted: false) == nil)
        #expect(h.verdicted(Self.key, counted: true) == nil)
        #expect(h.verdicted(Self.key, counted: true) == nil)
        #expect(h.seen(Self.key) == 2)
        // An empty queue seen before the key's barrier returned proves nothing.
        #expect(h.drained(through: 2, now: 0, passed: { _ in 99 }).isEmpty)
        #expect(h.awaitingDrain == 1)
        // After it: the agent's count of marked verdicts, then RELEASING; the program's count is not read.
        #expect(h.drained(through: 3, now: 5 * ms, passed: { _ in 99 }) == [.writeSeen(Self.key, 2), .setReleasing(Self.key)])
        #expect(h.awaitingDrain == 0 && h.releasing == [Self.key])
        #expect(h.drained(through: 4, now: 6 * ms, passed: { _ in 99 }).isEmpty)
        #expect(h.verdicted(Self.key, counted: false) == nil)
        #expect(h.verdicted(Self.key, counted: true) == .writeSeen(Self.key, 3))
        // From here the ordinary rule: the program took it over (or the counts meet, or the bound forces it).
        #expect(h.observed(Self.key, held: true, passed: 4, now: 7 * ms).isEmpty)
        #expect(h.observed(Self.key, held: false, passed: 0, now: 8 * ms) == [.clearCounts(Self.key)])
        #expect(h.isEmpty && h.releasedInOrder == 1)
    }

    @Test("a new egress key is released at the program's count read at the drain; later verdicts count from there")
    func newEgressKey() {
        var h = BPFHandOver()
        #expect(h.fresh(Self.other, barrier: 1) == .clearCounts(Self.other))
        _ = h.verdicted(Self.other)  // before the drain: replaced by the program's count
        #expect(h.drained(through: 1, now: 0, passed: { $0 == Self.other ? 7 : 0 })
                == [.writeSeen(Self.other, 7), .setReleasing(Self.other)])
        #expect(h.verdicted(Self.other) == .writeSeen(Self.other, 8))
        #expect(h.observed(Self.other, held: true, passed: 8, now: ms) == [.takeOver(Self.other), .clearCounts(Self.other)])
    }

    @Test("the queue read past the barrier's last packet id (not empty): ingress-only installs released, an install with an egress key waits for an empty queue")
    func drainedByPacketID() {
        var h = BPFHandOver()
        let anchor = BPFSessionKey(FiveTuple(srcAddr: IPAddress(10, 0, 0, 9), srcPort: 40001,
                                             dstAddr: IPAddress(10, 0, 0, 2), dstPort: 80), hook: .ingress)
        _ = h.fresh(anchor, barrier: 1)                       // an anchor's install: its new ingress key
        _ = h.fresh(Self.key, barrier: 2)                     // a middlebox's install: ingress and egress
        _ = h.fresh(Self.other, barrier: 2)
        #expect(h.drained(through: 2, queueEmpty: false, now: 0, passed: { _ in 5 }) == [.writeSeen(anchor, 0), .setReleasing(anchor)])
        #expect(h.awaitingDrain == 2)
        let empty = h.drained(through: 2, queueEmpty: true, now: 0, passed: { _ in 5 })
        #expect(Set(empty.map { "\($0)" }) == Set([BPFHandOver.Action.writeSeen(Self.key, 0), .setReleasing(Self.key),
                                                      .writeSeen(Self.other, 5), .setReleasing(Self.other)].map { "\($0)" }))
        #expect(h.awaitingDrain == 0)
    }

    @Test("a key already held or releasing is not made new; a new key held again by a migration starts the plain rule")
    func newKeyAgainstHeld() {
        var h = BPFHandOver()
        _ = h.hold(Self.key)
        #expect(h.fresh(Self.key, barrier: 1) == nil)
        #expect(h.awaitingDrain == 0)
        #expect(h.fresh(Self.other, barrier: 1) == .clearCounts(Self.other))
        #expect(h.hold(Self.other) == [.clearCounts(Self.other)])
        #expect(h.awaitingDrain == 0)
        #expect(h.drained(through: 9, now: 0, passed: { _ in 0 }).isEmpty)
        #expect(h.drop(Self.other) == .clearCounts(Self.other))
    }

    @Test("flag and stat indices agree with the header")
    func header() {
        #expect(BPFSessionFlags.releasing.rawValue == 1 << 5)
        #expect(DYSCO_STAT_RELEASED_IN_ORDER == 8 && DYSCO_STAT_HELD_PASSED == 9 && DYSCO_STAT_COUNT == 16)
        // The counted mark is a bit no queue rule matches on (FastPath's marks).
        #expect(BPFHandOver.countedMark == 0x0080_0000)
        #expect(BPFHandOver.countedMark & (FastPath.ingressMark | FastPath.egressMark | FastPath.ownedIngressMark
                                           | FastPath.ownedEgressMark) == 0)
        // The SYN tag of a box that translates (§2.1): the program's bit, distinct from every other mark.
        #expect(FastPath.natSynMark == DYSCO_NAT_SYN_MARK)
        #expect(FastPath.natSynMark & (FastPath.ingressMark | FastPath.egressMark | FastPath.ownedIngressMark
                                       | FastPath.ownedEgressMark | BPFHandOver.countedMark) == 0)
        #expect(BPFEvent.Kind(UInt32(DYSCO_EV_NAT_SYN)) == .natSyn && DYSCO_STAT_NAT_SYN == 10)
    }
}
