import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// Single-coordinator checks of the fixes found with the harness (each names the scenario that found it).

private let chainID = TestSession.chainID

private func message(_ body: ControlBody, requestID: UInt32 = 9, left: IPAddress = Host.client,
                     right: IPAddress = Host.server) -> ControlMessage {
    ControlMessage(identity: TestSession.identity, requestID: requestID, session: TestSession.tuple,
                   leftAnchor: left, rightAnchor: right, body: body)
}

private func context(_ me: IPAddress, left: IPAddress?, right: IPAddress?) -> SessionContext {
    SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: me, leftNeighbour: left,
                   rightNeighbour: right)
}

private func sends(_ actions: [Action]) -> [(ControlBody, IPAddress)] {
    actions.compactMap { if case .send(let m, let to) = $0 { return (m.body, to) }; return nil }
}

@Suite("Coordinator regressions found by the harness (paper §3.2, §3.6)")
struct CoordinatorRegressionTests {
    let fw1 = context(Host.fw1, left: Host.client, right: Host.server)
    let server = context(Host.server, left: Host.fw1, right: nil)

    @Test("§3.6: a retransmitted cancelLock at an old-path agent that already released goes on to the right anchor")
    func cancelRetransmissionReachesRightAnchor() {
        var c = MigrationCoordinator()
        _ = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.client, context: fw1), now: 1)
        _ = c.handle(.message(message(.ackLock(leftDelta: 0, rightDelta: 0)), from: Host.server, context: fw1), now: 2)
        #expect(c.locks[chainID]?.owner == 9)
        let first = c.handle(.message(message(.cancelLock(reason: "x")), from: Host.client, context: fw1), now: 3)
        #expect(c.locks.isEmpty)
        #expect(sends(first).map(\.1) == [Host.server])
        // The forwarded copy was lost: the left anchor's retransmission must reach the right anchor too
        // (answering it here left the right anchor holding the session for ever).
        let again = c.handle(.message(message(.cancelLock(reason: "x")), from: Host.client, context: fw1), now: 4)
        #expect(sends(again).count == 1)
        if case .cancelLock = sends(again).first?.0 { #expect(sends(again).first?.1 == Host.server) }
        else { Issue.record("expected the cancelLock forwarded, got \(again)") }
        // At the right end of the path, with nothing further right, it is answered.
        var end = MigrationCoordinator()
        let lone = context(Host.fw1, left: Host.client, right: nil)
        let answered = end.handle(.message(message(.cancelLock(reason: "x"), right: Host.fw3), from: Host.client, context: lone), now: 1)
        #expect(answered == [.send(message(.ackCancel, right: Host.fw3), to: Host.client)])
    }

    @Test("§3.2/§3.6: a late copy of a cancelled requestLock locks nothing, at an old-path agent or the right anchor")
    func staleRequestAfterCancel() {
        var c = MigrationCoordinator()
        _ = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.client, context: fw1), now: 1)
        _ = c.handle(.message(message(.cancelLock(reason: "deadline")), from: Host.client, context: fw1), now: 2)
        #expect(c.locks.isEmpty)
        let late = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.client, context: fw1), now: 3)
        #expect(late.isEmpty && c.locks.isEmpty)
        // Another request is not affected.
        let other = c.handle(.message(message(.requestLock(rightDelta: 0), requestID: 10), from: Host.client, context: fw1), now: 4)
        #expect(c.locks[chainID]?.owner == 10 && !other.isEmpty)

        // The cancel reached the right anchor before the request did (or after it): no hold afterwards.
        var r = MigrationCoordinator()
        let ack = r.handle(.message(message(.cancelLock(reason: "deadline")), from: Host.fw1, context: server), now: 1)
        #expect(ack == [.send(message(.ackCancel), to: Host.fw1)])
        let stale = r.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: server), now: 2)
        #expect(stale.isEmpty && r.isIdle)
        // Nor after a teardown.
        var t = MigrationCoordinator()
        _ = t.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: server), now: 1)
        #expect(t.role(of: chainID) == [.rightAnchor])
        _ = t.handle(.message(message(.oldPathFin), from: Host.fw1, context: server), now: 2)
        #expect(t.isIdle)
        let afterFin = t.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: server), now: 3)
        #expect(afterFin.isEmpty && t.isIdle)
    }

    @Test("a duplicated oldPathFinAck at a left anchor that is a middlebox does not make it leave the session")
    func duplicateFinAckAtMiddleboxLeftAnchor() {
        // fw1 is the left anchor (§3.2 figure, request B): client → fw1 → fw3 → server, fw3 replaced by fw4.
        var c = MigrationCoordinator()
        let me = context(Host.fw1, left: Host.client, right: Host.fw3)
        func m(_ body: ControlBody) -> ControlMessage { message(body, left: Host.fw1, right: Host.server) }
        let trigger = Trigger(newPath: [Host.fw4, Host.server], oldBox: Host.fw3, stateful: false, deadlineMilliseconds: 1000)
        _ = c.handle(.message(m(.trigger(trigger)), from: Host.fw3, context: me), now: 1)
        _ = c.handle(.message(m(.ackLock(leftDelta: 0, rightDelta: 0)), from: Host.fw3, context: me), now: 2)
        _ = c.handle(.pathOpened(chainID: chainID, subsession: FiveTuple(srcAddr: Host.fw1, srcPort: 30001, dstAddr: Host.fw4, dstPort: 80)), now: 3)
        _ = c.handle(.message(m(.newPathSynAck(subsession: FiveTuple(srcAddr: Host.fw1, srcPort: 30001, dstAddr: Host.fw4, dstPort: 80))),
                              from: Host.fw4, context: me), now: 4)
        _ = c.handle(.drained(chainID: chainID), now: 5)
        _ = c.handle(.message(m(.drained), from: Host.server, context: me), now: 6)
        #expect(c.leftAnchorStep(chainID) == .teardown)
        let promoted = context(Host.fw1, left: Host.client, right: Host.fw4)
        let done = c.handle(.message(m(.oldPathFinAck), from: Host.fw3, context: promoted), now: 7)
        #expect(done.contains(.finishAnchor(chainID: chainID)))
        #expect(c.isIdle && c.locks.isEmpty)
        let duplicate = c.handle(.message(m(.oldPathFinAck), from: Host.fw3, context: promoted), now: 8)
        #expect(duplicate.isEmpty, "\(duplicate)")  // was: removeSession, and the ack passed on to the client
        let lateAckCancel = c.handle(.message(m(.ackCancel), from: Host.fw3, context: promoted), now: 9)
        #expect(lateAckCancel.isEmpty)
        // An agent between the anchors still leaves on the ack.
        var between = MigrationCoordinator()
        let fw3 = context(Host.fw3, left: Host.fw1, right: Host.server)
        let leaves = between.handle(.message(m(.oldPathFinAck), from: Host.server, context: fw3), now: 1)
        #expect(leaves == [.removeSession(chainID: chainID, deleteConntrack: true), .send(m(.oldPathFinAck), to: Host.fw1)])
    }

    @Test("the new box forgets its part after the linger time (nothing tells it the reconfiguration ended)")
    func newBoxLinger() {
        var settings = MigrationCoordinator.Settings()
        settings.newBoxLinger = 5_000
        var c = MigrationCoordinator(settings: settings)
        let left = FiveTuple(srcAddr: Host.client, srcPort: 30001, dstAddr: Host.fw2, dstPort: 80)
        let key = TimerKey(chainID: chainID, role: .newBox, kind: .deadline)
        let created = c.handle(.message(message(.newPathSyn(subsession: left, remaining: [Host.server])), from: Host.client, context: nil), now: 1)
        #expect(created.contains(.setTimer(key, afterNanoseconds: 5_000)))
        #expect(c.role(of: chainID) == [.newBox])
        _ = c.handle(.pathOpened(chainID: chainID, subsession: FiveTuple(srcAddr: Host.fw2, srcPort: 30001, dstAddr: Host.server, dstPort: 80)), now: 2)
        #expect(!c.isIdle)
        #expect(c.handle(.timer(key), now: 5_001).isEmpty)
        #expect(c.isIdle)
    }

    @Test("§3.3, DrainTests (c): a half-made new-box session (its SYN never answered through this box, or no data carried) gives way to the same left anchor's next request; one carrying data, or another left anchor's request, is refused")
    func halfMadeNewBoxGivesWay() {
        let left1 = FiveTuple(srcAddr: Host.client, srcPort: 30001, dstAddr: Host.fw2, dstPort: 80)
        let left2 = FiveTuple(srcAddr: Host.client, srcPort: 30002, dstAddr: Host.fw2, dstPort: 80)
        let right1 = FiveTuple(srcAddr: Host.fw2, srcPort: 30001, dstAddr: Host.server, dstPort: 80)
        let key = TimerKey(chainID: chainID, role: .newBox, kind: .deadline)
        // The late SYN of request 9 (its left anchor gave up meanwhile) made the session here.
        func halfMade() -> MigrationCoordinator {
            var c = MigrationCoordinator()
            _ = c.handle(.message(message(.newPathSyn(subsession: left1, remaining: [Host.server])), from: Host.client, context: nil), now: 1)
            _ = c.handle(.pathOpened(chainID: chainID, subsession: right1), now: 2)
            return c
        }
        let here = context(Host.fw2, left: Host.client, right: Host.server)
        var c = halfMade()
        let next = c.handle(.message(message(.newPathSyn(subsession: left2, remaining: [Host.server]), requestID: 10),
                                     from: Host.client, context: here), now: 3)
        #expect(next == [.cancelTimer(key), .removeSession(chainID: chainID, deleteConntrack: false),
                         .setTimer(key, afterNanoseconds: MigrationCoordinator.Settings().newBoxLinger),
                         .createSession(TestSession.identity, session: TestSession.tuple, left: left2, next: Host.server)],
                "\(next)")
        // Answered through this box but abandoned before any data (its cancel went stale): it gives way too.
        var abandoned = halfMade()
        _ = abandoned.handle(.message(message(.newPathSynAck(subsession: right1)), from: Host.server, context: here), now: 3)
        let replaced = abandoned.handle(.message(message(.newPathSyn(subsession: left2, remaining: [Host.server]), requestID: 10),
                                                 from: Host.client, context: here), now: 4)
        #expect(replaced.contains(.removeSession(chainID: chainID, deleteConntrack: false)), "\(replaced)")
        // Answered and carrying data here: the session is on a path in use; the next request is refused.
        var answered = halfMade()
        var carrying = here
        carrying.carried = true
        _ = answered.handle(.message(message(.newPathSynAck(subsession: right1)), from: Host.server, context: carrying), now: 3)
        let refused = answered.handle(.message(message(.newPathSyn(subsession: left2, remaining: [Host.server]), requestID: 10),
                                               from: Host.client, context: carrying), now: 4)
        #expect(sends(refused).count == 1 && !refused.contains(.removeSession(chainID: chainID, deleteConntrack: false)), "\(refused)")
        if case .newPathRefused = sends(refused).first?.0 {} else { Issue.record("not refused: \(refused)") }
        // Another left anchor's request does not remove this one's session.
        var other = halfMade()
        let fromFw1 = FiveTuple(srcAddr: Host.fw1, srcPort: 30003, dstAddr: Host.fw2, dstPort: 80)
        let foreign = other.handle(.message(message(.newPathSyn(subsession: fromFw1, remaining: [Host.server]), requestID: 11,
                                                    left: Host.fw1), from: Host.fw1, context: here), now: 3)
        #expect(!foreign.contains(.removeSession(chainID: chainID, deleteConntrack: false)), "\(foreign)")
    }

    @Test("a lock refused for another reason than contention says so")
    func refusalReason() {
        var c = MigrationCoordinator()
        let client = context(Host.client, left: nil, right: Host.fw1)
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: false, deadlineMilliseconds: 1000)
        _ = c.handle(.message(message(.trigger(trigger)), from: Host.fw1, context: client), now: 1)
        let actions = c.handle(.message(message(.nackLock(reason: .notOnPath)), from: Host.fw1, context: client), now: 2)
        let result = actions.compactMap { a -> TriggerResult? in
            if case .send(let m, _) = a, case .triggerResult(let r) = m.body { return r }
            return nil
        }.first
        #expect(result?.outcome == .refused)
        #expect(result?.reason.contains("not-on-path") == true)
        #expect(result?.reason.contains("another reconfiguration") == false)
        #expect(actions.contains(.cancelAnchor(chainID: chainID)) && c.isIdle && c.locks.isEmpty)
    }

    @Test("a left anchor whose box translates the session's tuple (NAT, §2.1) refuses the trigger with the reason, and locks nothing")
    func translatingLeftAnchor() {
        var c = MigrationCoordinator()
        var fw1 = context(Host.fw1, left: Host.client, right: Host.fw2)
        fw1.translates = true
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw2, stateful: true, deadlineMilliseconds: 1000)
        let actions = c.handle(.message(message(.trigger(trigger)), from: Host.fw2, context: fw1), now: 1)
        let result = actions.compactMap { a -> TriggerResult? in
            if case .send(let m, _) = a, case .triggerResult(let r) = m.body { return r }
            return nil
        }.first
        #expect(result?.outcome == .refused && result?.failedStep == .lock)
        #expect(result?.reason == SessionContext.translatingBoxRefusal)
        #expect(c.isIdle && c.locks.isEmpty)
    }

    @Test("§2.1, §3.3: a right anchor whose box translates the session's destination (DNAT) refuses the new path with the reason (newPathRefused to the left anchor, which cancels at once); its lock goes with the cancel; a box translating only the source takes the new path")
    func destinationTranslatingRightAnchor() {
        let newPath = FiveTuple(srcAddr: Host.fw2, srcPort: 30002, dstAddr: Host.server, dstPort: 80)
        for dnat in [true, false] {
            var c = MigrationCoordinator()
            var end = server
            end.translates = true
            end.translatesDestination = dnat
            let locked = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: end), now: 1)
            #expect(sends(locked).map(\.0) == [.ackLock(leftDelta: 0, rightDelta: 0)], "the lock itself is granted: \(locked)")
            let answer = c.handle(.message(message(.newPathSyn(subsession: newPath, remaining: [])), from: Host.fw2, context: end), now: 2)
            if dnat {
                #expect(sends(answer).map(\.1) == [Host.client], "to the left anchor: \(answer)")
                guard case .newPathRefused(let reason) = sends(answer).first?.0 else {
                    Issue.record("not refused: \(answer)")
                    continue
                }
                #expect(reason == SessionContext.translatingRightAnchorRefusal)
                // The left anchor's cancel ends the right anchor's part.
                _ = c.handle(.message(message(.cancelLock(reason: "new path refused")), from: Host.fw1, context: end), now: 3)
                #expect(c.isIdle, "\(c)")
            } else {
                #expect(!sends(answer).contains { if case .newPathRefused = $0.0 { true } else { false } }, "\(answer)")
            }
        }
    }
}
