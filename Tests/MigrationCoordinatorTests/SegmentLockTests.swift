import DyscoCore
@testable import MigrationCoordinator
import Testing

private let w = IPAddress(10, 0, 0, 1)
private let x = IPAddress(10, 0, 0, 2)
private let y = IPAddress(10, 0, 0, 4)
private let z = IPAddress(10, 0, 0, 9)

@Suite("SegmentLock (paper §3.2: contention over segments)")
struct SegmentLockTests {
    let a = LockRequest(requestID: 1, leftAnchor: x, rightAnchor: z)
    let b = LockRequest(requestID: 2, leftAnchor: w, rightAnchor: y, rightDelta: 5)
    let c = LockRequest(requestID: 3, leftAnchor: w, rightAnchor: z)

    @Test("unlocked → lockPending on a request → locked on its ackLock → unlocked on release")
    func lifecycle() {
        var lock = SegmentLock()
        #expect(lock.isUnlocked && lock.owner == nil)
        #expect(lock.request(a) == .forward(a))
        #expect(lock.state == .lockPending(a, held: nil))
        #expect(lock.owner == 1 && !lock.isUnlocked)
        #expect(lock.acknowledged(1) == .init(matched: true, refuse: nil, forward: nil))
        #expect(lock.state == .locked(a))
        #expect(lock.owner == 1)
        #expect(lock.release(1) == .init(matched: true, refuse: nil, forward: nil))
        #expect(lock.isUnlocked)
    }

    @Test("a duplicate request is forwarded again while pending and acknowledged again once locked; nothing changes")
    func duplicates() {
        var lock = SegmentLock()
        _ = lock.request(a)
        #expect(lock.request(a) == .forwardDuplicate(a))
        #expect(lock.state == .lockPending(a, held: nil))
        _ = lock.acknowledged(1)
        #expect(lock.request(a) == .ackAgain(a))
        #expect(lock.state == .locked(a))
        // A duplicate ackLock matches and changes nothing.
        #expect(lock.acknowledged(1).matched)
        #expect(lock.state == .locked(a))
    }

    @Test("§3.4: an ackAgain carries the deltas of the ackLock that locked (found by the Spin model, issue 17)")
    func ackAgainKeepsTheAnswer() {
        var lock = SegmentLock()
        _ = lock.request(a)
        _ = lock.acknowledged(1, leftDelta: -3, rightDelta: 5)
        guard case .ackAgain(let locked) = lock.request(a) else { Issue.record("no ackAgain"); return }
        #expect(locked.answer?.leftDelta == -3 && locked.answer?.rightDelta == 5)
        // A duplicate ackLock changes nothing: the first answer stays.
        _ = lock.acknowledged(1, leftDelta: 0, rightDelta: 0)
        guard case .ackAgain(let again) = lock.request(a) else { Issue.record("no ackAgain"); return }
        #expect(again.answer?.leftDelta == -3)
    }

    @Test("a request meeting lockPending is held, and refused when the pending one is acknowledged")
    func heldThenRefused() {
        var lock = SegmentLock()
        _ = lock.request(a)
        #expect(lock.request(b) == .held)
        #expect(lock.state == .lockPending(a, held: b))
        // The held request retransmitted: still held, nothing changes.
        #expect(lock.request(b) == .held)
        #expect(lock.state == .lockPending(a, held: b))
        let outcome = lock.acknowledged(1)
        #expect(outcome == .init(matched: true, refuse: b, forward: nil))
        #expect(lock.state == .locked(a))
    }

    @Test("a request meeting lockPending is held, and forwarded (now pending) when the pending one is refused")
    func heldThenForwarded() {
        var lock = SegmentLock()
        _ = lock.request(a)
        _ = lock.request(b)
        let outcome = lock.refused(1)
        #expect(outcome == .init(matched: true, refuse: nil, forward: b))
        #expect(lock.state == .lockPending(b, held: nil))
        #expect(lock.owner == 2)
        // The forwarded request keeps its accumulated delta (§3.4).
        #expect(outcome.forward?.rightDelta == 5)
        #expect(lock.acknowledged(2).matched)
        #expect(lock.state == .locked(b))
    }

    @Test("a request meeting locked is refused at once; the lock stays")
    func lockedRefuses() {
        var lock = SegmentLock()
        _ = lock.request(a)
        _ = lock.acknowledged(1)
        #expect(lock.request(b) == .refuse(b))
        #expect(lock.state == .locked(a))
    }

    @Test("at most one request is held: a third one is refused")
    func thirdRefused() {
        var lock = SegmentLock()
        _ = lock.request(a)
        _ = lock.request(b)
        #expect(lock.request(c) == .refuse(c))
        #expect(lock.state == .lockPending(a, held: b))
    }

    @Test("withdraw forgets a held request only")
    func withdraw() {
        var lock = SegmentLock()
        let nothingHeld = lock.withdraw(2)
        #expect(!nothingHeld)
        _ = lock.request(a)
        _ = lock.request(b)
        let pendingOne = lock.withdraw(1)  // the pending one is not withdrawn: it is released
        #expect(!pendingOne)
        let heldOne = lock.withdraw(2)
        #expect(heldOne)
        #expect(lock.state == .lockPending(a, held: nil))
        let again = lock.withdraw(2)
        #expect(!again)
        // After the withdraw, refusing the pending request unlocks (nothing held is forwarded).
        #expect(lock.refused(1) == .init(matched: true, refuse: nil, forward: nil))
        #expect(lock.isUnlocked)
    }

    @Test("answers for another request do not match and change nothing")
    func unmatchedAnswers() {
        var lock = SegmentLock()
        #expect(!lock.acknowledged(1).matched)
        #expect(!lock.refused(1).matched)
        #expect(lock.isUnlocked)
        _ = lock.request(a)
        _ = lock.request(b)
        #expect(!lock.acknowledged(2).matched)  // the held one was never forwarded
        #expect(!lock.refused(2).matched)
        #expect(lock.state == .lockPending(a, held: b))
        _ = lock.acknowledged(1)
        #expect(!lock.release(2).matched)
        #expect(lock.state == .locked(a))
    }

    @Test("a refused pending request with nothing held unlocks; a new request is then forwarded")
    func refusedUnlocks() {
        var lock = SegmentLock()
        _ = lock.request(a)
        #expect(lock.refused(1).matched)
        #expect(lock.isUnlocked)
        #expect(lock.request(b) == .forward(b))
    }
}

@Suite("Retransmission timeout (RFC 6298 estimator, Karn's rule; the left anchor's retransmission, §3.6 control loss)")
struct RetransmitClockTests {
    let settings = MigrationCoordinator.Settings()

    @Test("before any sample the first timeout grows with the reconfigurations under way, up to the ceiling")
    func initialScalesWithLoad() {
        let clock = RetransmitClock()
        #expect(clock.timeout(settings, active: 1) == settings.retransmitInitial)
        #expect(clock.timeout(settings, active: 101) == settings.retransmitInitial + 100 * settings.retransmitPerActive)
        #expect(clock.timeout(settings, active: 1_000_000) == settings.retransmitCeiling)
    }

    @Test("samples set SRTT and RTTVAR as RFC 6298 §2 does; the timeout is SRTT + 4·RTTVAR, never below the floor")
    func estimator() {
        var clock = RetransmitClock()
        clock.sample(200_000_000)
        #expect(clock.smoothed == 200_000_000 && clock.variation == 100_000_000)
        #expect(clock.timeout(settings, active: 1000) == 600_000_000)  // load no longer matters once measured
        clock.sample(100_000_000)
        #expect(clock.smoothed == (7 * 200_000_000 + 100_000_000) / 8)
        #expect(clock.variation == (3 * 100_000_000 + 100_000_000) / 4)
        var fast = RetransmitClock()
        for _ in 0..<20 { fast.sample(100_000) }
        #expect(fast.timeout(settings, active: 1) == settings.retransmitInitial)
    }

    @Test("backoff doubles up to the larger of retransmitMax and four first timeouts")
    func backoff() {
        let clock = RetransmitClock()
        #expect(clock.backoff(20_000_000, settings, active: 1) == 40_000_000)
        #expect(clock.backoff(80_000_000, settings, active: 1) == settings.retransmitMax)
        let loaded = clock.timeout(settings, active: 1001)
        #expect(clock.backoff(loaded * 8, settings, active: 1001) == 4 * loaded)
    }
}
