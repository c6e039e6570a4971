import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// Each role's state machine on its own (the router, MigrationCoordinator, is exercised by the scenario and
// conformance tests). The paper is the Dysco paper (SIGCOMM 2017); each test names the section it checks.

private let chainID = TestSession.chainID
private let newSub = FiveTuple(srcAddr: Host.client, srcPort: 10001, dstAddr: Host.fw2, dstPort: 80)

private func message(_ body: ControlBody, requestID: UInt32 = 7, left: IPAddress = Host.client,
                     right: IPAddress = Host.server) -> ControlMessage {
    ControlMessage(identity: TestSession.identity, requestID: requestID, session: TestSession.tuple,
                   leftAnchor: left, rightAnchor: right, body: body)
}

/// fw2 between client and fw3, its box changing no byte.
private let plainHop = OldPathHop.Hop(me: Host.fw2, delta: .zero)

private func sent(_ actions: [Action]) -> [(ControlMessageType, IPAddress)] {
    actions.compactMap { if case .send(let m, let to) = $0 { return (m.body.type, to) }; return nil }
}

private func leftAnchor(stateful: Bool, env: inout LeftAnchor.Environment, _ out: inout [Action]) -> LeftAnchor {
    let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.client,
                                 leftNeighbour: nil, rightNeighbour: Host.fw1)
    let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: stateful, deadlineMilliseconds: 3000)
    let request = LeftAnchor.Request(requestID: 7, context: context, trigger: trigger, controller: Host.fw1,
                                     oldRight: Host.fw1, rightAnchor: Host.server, startedAt: 1_000_000)
    return LeftAnchor(request: request, now: 1_000_000, &env, &out)
}

@Suite("Role state machines (paper §3)")
struct RoleStateMachineTests {
    @Test("left anchor, stateful: lock (§3.2) → new path (§3.3) → drain (§3.5) → state (§3.5) → probes → teardown")
    func leftAnchorStateful() throws {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        // §3.2: the left anchor holds its side and sends requestLock along the old path.
        #expect(start.first == .hold(chainID: chainID, side: .right, stateful: true))
        #expect(sent(start).map(\.0) == [.requestLock] && sent(start).map(\.1) == [Host.fw1])
        #expect(l.step == .lock)

        #expect(l.locked(leftDelta: 0, now: 2_000_000, &env).actions.contains(.openPath(chainID: chainID, next: Host.fw2)))
        #expect(l.step == .newPath && l.waitsForPath)
        // §3.3: the new path's SYN is a control message along the new path.
        #expect(sent(l.pathOpened(newSub, now: 2_100_000, &env).actions).map(\.0) == [.newPathSyn])
        // §3.5: once the new path is up, the anchors drain the old one (stateful: our side is buffered).
        let drain = l.newPathAnswered(now: 3_000_000, &env).actions
        #expect(drain.contains(.setPhase(chainID: chainID, .buffering)))
        #expect(sent(drain).map(\.0) == [.drainStart])
        #expect(l.step == .drain)
        // Both directions must drain, in either order; one is not enough.
        #expect(l.peerDrained(now: 3_500_000, &env).actions.isEmpty && l.step == .drain)
        #expect(l.peerDrained(now: 3_600_000, &env).actions.isEmpty && l.step == .drain)  // a duplicate
        let state = l.selfDrained(now: 4_000_000, &env).actions
        #expect(sent(state).map(\.0) == [.stateRequest] && sent(state).map(\.1) == [Host.fw1])
        #expect(l.step == .state)
        // The old box's answer carries the export and import durations as fields (protocol version 3).
        let probe = l.stateInstalled(ok: true, times: StateTimes(exportMicroseconds: 40, importMicroseconds: 60), reason: "",
                                     now: 5_000_000, &env).actions
        #expect(probe.contains(.promote(chainID: chainID)) && probe.contains(.sendProbe(chainID: chainID)))
        #expect(l.step == .release)
        let release = l.probeSeen(now: 6_000_000, &env).actions
        #expect(release.contains(.releaseBuffer(chainID: chainID)))
        #expect(sent(release).map(\.0) == [.oldPathFin])
        #expect(l.step == .teardown)
        // A cancel is no longer possible: the data flows on the new path (§3.5).
        #expect(l.bufferFull(now: 6_100_000, &env).actions.isEmpty && l.step == .teardown)
        let done = l.oldPathGone(now: 7_000_000)
        let result = try #require(done.finished)
        #expect(result.outcome == .moved && result.failedStep == nil)
        #expect(done.actions.first == .finishAnchor(chainID: chainID))
        #expect(sent(done.actions).map(\.0) == [.triggerResult] && sent(done.actions).map(\.1) == [Host.fw1])
        #expect(result.phases == PhaseTimes(lockEnd: 1000, newPathEnd: 2000, drainEnd: 3000, stateEnd: 4000, releaseEnd: 5000,
                                            teardownEnd: 6000, exportMicroseconds: 40, importMicroseconds: 60,
                                            newPathSynToUse: 5000 - 1100))
    }

    @Test("left anchor, stateless (§3.5): new data on the new path at once, the old path goes once both sides drained")
    func leftAnchorStateless() throws {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: false, env: &env, &start)
        _ = l.locked(leftDelta: 5, now: 2_000_000, &env)
        _ = l.pathOpened(newSub, now: 2_000_000, &env)
        let drain = l.newPathAnswered(now: 3_000_000, &env).actions
        #expect(drain.contains(.promote(chainID: chainID)) && drain.contains(.setPhase(chainID: chainID, .released)))
        _ = l.selfDrained(now: 4_000_000, &env)
        #expect(sent(l.peerDrained(now: 5_000_000, &env).actions).map(\.0) == [.oldPathFin])
        let result = try #require(l.oldPathGone(now: 6_000_000).finished)
        // No state step (it ends with the drain); the release ends when the new path was up.
        #expect(result.phases?.stateEnd == result.phases?.drainEnd && result.phases?.releaseEnd == result.phases?.newPathEnd)
    }

    @Test("left anchor, §3.6: no new path by the deadline → back on the old path, newPathCancel, cancelLock until ackCancel")
    func leftAnchorCancel() throws {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        _ = l.locked(leftDelta: 0, now: 2_000_000, &env)
        _ = l.pathOpened(newSub, now: 2_000_000, &env)
        let cancel = l.deadlinePassed(now: 4_000_000_000, &env).actions
        #expect(cancel.contains(.cancelAnchor(chainID: chainID)))
        #expect(sent(cancel).map(\.0) == [.newPathCancel, .cancelLock])
        #expect(sent(cancel).map(\.1) == [Host.fw2, Host.fw1])
        #expect(l.isCancelling && l.step == .newPath)
        #expect(l.deadlinePassed(now: 4_100_000_000, &env).actions.isEmpty)  // cancelling already
        // The cancel ends when the old path (ackCancel) and the new box (newPathCancelAck) both have it (issue 19).
        #expect(l.cancelAcknowledged().finished == nil)
        #expect(l.newPathCancelAcknowledged(by: Host.fw3).finished == nil)  // not a new box of this request
        let result = try #require(l.newPathCancelAcknowledged(by: Host.fw2).finished)
        #expect(result.outcome == .cancelled && result.failedStep == .newPath)
        #expect(result.reason.contains("no answer from \(Host.fw2) to newPathSyn"))
    }

    @Test("left anchor, §3.6 (issue 19): newPathCancel is retransmitted with cancelLock on the retransmission timer until newPathCancelAck; either answer may come first")
    func leftAnchorNewPathCancelRetransmitted() throws {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        _ = l.locked(leftDelta: 0, now: 2_000_000, &env)
        _ = l.pathOpened(newSub, now: 2_000_000, &env)
        _ = l.deadlinePassed(now: 4_000_000_000, &env)
        // Nothing answered: both again, on the left anchor's retransmission timer (the RTO's backoff).
        let again = l.retransmitTimerFired(now: 4_020_000_000, &env).actions
        #expect(sent(again).map(\.0) == [.newPathCancel, .cancelLock])
        #expect(sent(again).map(\.1) == [Host.fw2, Host.fw1])
        #expect(again.contains { if case .setTimer(let k, _) = $0 { k.kind == .retransmit } else { false } })
        // The new box answers first: only cancelLock is outstanding now.
        #expect(l.newPathCancelAcknowledged(by: Host.fw2).finished == nil)
        #expect(sent(l.retransmitTimerFired(now: 4_060_000_000, &env).actions).map(\.0) == [.cancelLock])
        #expect(l.newPathCancelAcknowledged(by: Host.fw2).finished == nil)  // a duplicate changes nothing
        let result = try #require(l.cancelAcknowledged().finished)
        #expect(result.outcome == .cancelled && !result.reason.contains("newPathCancel unanswered"))
    }

    @Test("left anchor, §3.6 (issue 19): a new box that never answers newPathCancel is given up after maxTries sends, and the result says so")
    func leftAnchorNewPathCancelUnanswered() throws {
        var settings = MigrationCoordinator.Settings()
        settings.maxTries = 3
        var env = LeftAnchor.Environment(settings: settings, clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        _ = l.locked(leftDelta: 0, now: 2_000_000, &env)
        _ = l.pathOpened(newSub, now: 2_000_000, &env)
        _ = l.deadlinePassed(now: 4_000_000_000, &env)  // send 1 of newPathCancel and cancelLock
        #expect(l.cancelAcknowledged().finished == nil)
        #expect(sent(l.retransmitTimerFired(now: 4_020_000_000, &env).actions).map(\.0) == [.newPathCancel])  // 2
        #expect(sent(l.retransmitTimerFired(now: 4_060_000_000, &env).actions).map(\.0) == [.newPathCancel])  // 3
        let result = try #require(l.retransmitTimerFired(now: 4_140_000_000, &env).finished)
        #expect(result.outcome == .cancelled && result.failedStep == .newPath)
        #expect(result.reason.contains("newPathCancel unanswered by \(Host.fw2)"), "\(result.reason)")
    }

    @Test("left anchor, §3.6: a cancel at the lock step sends no newPathCancel and ends with ackCancel alone")
    func leftAnchorCancelAtLock() throws {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        #expect(sent(l.bufferFull(now: 2_000_000, &env).actions).map(\.0) == [.cancelLock])
        #expect(l.cancelAcknowledged().finished?.outcome == .cancelled)
    }

    @Test("left anchor, §3.6: an unanswered cancelLock gives up after endTries sends (the session is on the old path)")
    func leftAnchorCancelUnanswered() throws {
        var settings = MigrationCoordinator.Settings()
        settings.endTries = 3
        var env = LeftAnchor.Environment(settings: settings, clock: RetransmitClock(), active: 1)
        var start: [Action] = []
        var l = leftAnchor(stateful: true, env: &env, &start)
        _ = l.bufferFull(now: 2_000_000, &env)  // cancel at the lock step: no new middlebox to tell
        #expect(l.step == .lock && l.isCancelling)
        #expect(sent(l.retransmitTimerFired(now: 3_000_000, &env).actions).map(\.0) == [.cancelLock])
        #expect(sent(l.retransmitTimerFired(now: 4_000_000, &env).actions).map(\.0) == [.cancelLock])
        let result = try #require(l.retransmitTimerFired(now: 5_000_000, &env).finished)
        #expect(result.outcome == .cancelled && result.failedStep == .lock)
    }

    @Test("old-path hop, §3.2: a request meeting lockPending is held; refused if the pending one is acknowledged")
    func hopHeldRefused() {
        var hop = OldPathHop()
        let x = message(.requestLock(rightDelta: 0), requestID: 1, left: Host.fw1, right: Host.server)
        let w = message(.requestLock(rightDelta: 0), requestID: 2, left: Host.client, right: Host.fw3)
        #expect(sent(hop.requestLock(x, rightDelta: 0, hop: plainHop, left: Host.client, right: Host.fw3).actions).map(\.1) == [Host.fw3])
        #expect(hop.requestLock(w, rightDelta: 0, hop: plainHop, left: Host.client, right: Host.fw3).actions.isEmpty)  // held
        let ack = hop.ackLock(message(.ackLock(leftDelta: 0, rightDelta: 0), requestID: 1, left: Host.fw1), hop: plainHop, left: Host.client)
        #expect(ack.matched && ack.refused == [2])
        #expect(sent(ack.actions).map(\.0) == [.nackLock] && sent(ack.actions).map(\.1) == [Host.client])
        #expect(hop.owner == 1)
    }

    @Test("old-path hop, §3.4: the box's deltas join the sums (forward in requestLock, reverse in ackLock), an ackAgain repeats the sum passed on, the hop's own left-anchor request gets none")
    func hopAddsBoxDelta() throws {
        var hop = OldPathHop()
        let box = OldPathHop.Hop(me: Host.fw2, delta: .init(forward: 5, reverse: -7))
        let x = message(.requestLock(rightDelta: 2), requestID: 1, left: Host.client, right: Host.server)
        let forwarded = hop.requestLock(x, rightDelta: 2, hop: box, left: Host.client, right: Host.fw3).actions
        guard case .send(let out, let to) = forwarded.first else { Issue.record("\(forwarded)"); return }
        #expect(out.body == .requestLock(rightDelta: 7) && to == Host.fw3)
        let ack = hop.ackLock(message(.ackLock(leftDelta: 3, rightDelta: 7), requestID: 1), hop: box, left: Host.client)
        #expect(ack.matched && ack.passOn.leftDelta == -4 && ack.passOn.rightDelta == 7)
        // A duplicate requestLock (the ackLock was lost on its way left): the same sums again.
        let again = hop.requestLock(x, rightDelta: 2, hop: box, left: Host.client, right: Host.fw3).actions
        guard case .send(let answer, _) = again.first else { Issue.record("\(again)"); return }
        #expect(answer.body == .ackLock(leftDelta: -4, rightDelta: 7))
        // fw2 as the left anchor of its own request: its subsessions' deltas carry over (no box sum).
        var own = OldPathHop()
        let locked = own.lockForLeftAnchor(LockRequest(requestID: 2, leftAnchor: Host.fw2, rightAnchor: Host.server))
        #expect(locked)
        let ownAck = own.ackLock(message(.ackLock(leftDelta: 3, rightDelta: 0), requestID: 2, left: Host.fw2),
                                 hop: box, left: Host.client)
        #expect(ownAck.matched && ownAck.passOn.leftDelta == 3)
    }

    @Test("old-path hop, §3.2: if the pending request is refused, the held one is forwarded")
    func hopHeldForwarded() {
        var hop = OldPathHop()
        let x = message(.requestLock(rightDelta: 0), requestID: 1, left: Host.fw1, right: Host.server)
        let w = message(.requestLock(rightDelta: 3), requestID: 2, left: Host.client, right: Host.fw3)
        _ = hop.requestLock(x, rightDelta: 0, hop: plainHop, left: Host.client, right: Host.fw3)
        _ = hop.requestLock(w, rightDelta: 3, hop: plainHop, left: Host.client, right: Host.fw3)
        let nack = hop.nackLock(message(.nackLock(reason: .contention), requestID: 1, left: Host.fw1), hop: plainHop, right: Host.fw3)
        #expect(nack.matched && nack.refused == [1])
        guard case .send(let forwarded, let to) = nack.actions.first else { Issue.record("\(nack.actions)"); return }
        #expect(forwarded.requestID == 2 && forwarded.body == .requestLock(rightDelta: 3) && to == Host.fw3)
        #expect(hop.owner == 2)
        // §3.6: cancelLock of the locked request unlocks and goes on to the right.
        let cancel = hop.cancelLock(message(.cancelLock(reason: "x"), requestID: 2, left: Host.client), hop: plainHop,
                                    from: Host.client,
                                    right: Host.fw3)
        #expect(cancel.released && hop.isUnlocked && sent(cancel.actions).map(\.1) == [Host.fw3])
    }

    @Test("right anchor, §3.5: drained is answered once both drainStart and its own side's drain happened")
    func rightAnchorDrain() {
        var out: [Action] = []
        let lock = message(.requestLock(rightDelta: 4))
        var r = RightAnchor(lock, me: Host.server, rightDelta: 4, silence: 10, &out)
        #expect(out.contains(.hold(chainID: chainID, side: .left, stateful: true)) && out.contains(.setDelta(chainID: chainID, 4)))
        let last = FiveTuple(srcAddr: Host.fw2, srcPort: 10002, dstAddr: Host.server, dstPort: 80)
        #expect(r.newPathSyn(message(.newPathSyn(subsession: last, remaining: [])), subsession: last, from: Host.fw2)
                == [.addPath(chainID: chainID, subsession: last)])
        #expect(sent(r.pathOpened(last)).map(\.0) == [.newPathSynAck])
        #expect(r.selfDrained().isEmpty)  // not asked yet
        let start = r.drainStart(message(.drainStart(stateful: true)), stateful: true, from: Host.client)
        #expect(start.first == .setPhase(chainID: chainID, .buffering) && sent(start).map(\.0) == [.drained])
        // The window-opening probes: the first switches egress and answers, the second releases.
        #expect(r.probeSeen().contains(.sendProbe(chainID: chainID)))
        #expect(r.probeSeen().contains(.releaseBuffer(chainID: chainID)) && r.isReleased)
        #expect(r.oldPathFin() == [.cancelTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline)),
                                   .finishAnchor(chainID: chainID)])
    }

    @Test("old box and new box, §3.5 (state migration): export, statePut, import; the durations travel as fields")
    func stateTransfer() {
        var out: [Action] = []
        let request = message(.stateRequest(newBox: Host.fw2))
        var old = OldBox(request, newBox: Host.fw2, from: Host.client, &out)
        #expect(out == [.exportState(chainID: chainID, requestID: 7, session: TestSession.tuple)])
        #expect(old.stateRequestAgain(request, from: Host.client).isEmpty)  // still exporting
        let put = old.stateExported(.success([1, 2]), micros: 40)
        #expect(sent(put).map(\.0) == [.statePut] && sent(put).map(\.1) == [Host.fw2])

        var boxOut: [Action] = []
        let syn = message(.newPathSyn(subsession: newSub, remaining: [Host.server]))
        var box = NewBox(syn, left: newSub, remaining: [Host.server], next: Host.server, linger: 1, &boxOut)
        #expect(box.statePut(message(.statePut(document: [1, 2])), document: [1, 2], from: Host.fw1)
                == [.importState(chainID: chainID, requestID: 7, document: [1, 2])])
        let installed = box.stateImported(.success(nil), micros: 60)
        #expect(installed == [.send(syn.answer(.stateInstalled(ok: true, times: StateTimes(importMicroseconds: 60), reason: "")),
                                    to: Host.fw1)])
        let relayed = old.newBoxAnswered(request, ok: true, times: StateTimes(importMicroseconds: 60), reason: "")
        #expect(relayed == [.send(request.answer(.stateInstalled(ok: true, times: StateTimes(exportMicroseconds: 40,
                                                                                              importMicroseconds: 60),
                                                                 reason: "")), to: Host.client)])
        // A failed export goes straight to the left anchor, with its duration.
        var failing = OldBox(request, newBox: Host.fw2, from: Host.client, &out)
        guard case .send(let m, let to) = failing.stateExported(.failure(StepFailure("ENOENT")), micros: 5).first,
              case .stateInstalled(false, let times, let reason) = m.body else { Issue.record("no stateInstalled"); return }
        #expect(to == Host.client && times.exportMicroseconds == 5 && reason.contains("ENOENT"))
    }

    @Test("new box, §3.5 with §2.1: an imported NAT binding re-keys the box's right side, committed before the answer leaves")
    func importedTranslation() {
        var boxOut: [Action] = []
        let syn = message(.newPathSyn(subsession: newSub, remaining: [Host.server]))
        var box = NewBox(syn, left: newSub, remaining: [Host.server], next: Host.server, linger: 1, &boxOut)
        _ = box.statePut(message(.statePut(document: [1])), document: [1], from: Host.fw1)
        let translated = FiveTuple(srcAddr: IPAddress("10.0.0.250")!, srcPort: 61000, dstAddr: TestSession.tuple.dstAddr,
                                   dstPort: TestSession.tuple.dstPort)
        let installed = box.stateImported(.success(translated), micros: 60)
        #expect(installed == [.translate(chainID: chainID, translated), .commitKernel,
                              .send(syn.answer(.stateInstalled(ok: true, times: StateTimes(importMicroseconds: 60), reason: "")),
                                    to: Host.fw1)])
    }

    @Test("controller, §3.1: the trigger goes to the left anchor until its result, or the deadline and grace pass")
    func controllerGivesUp() throws {
        var settings = MigrationCoordinator.Settings()
        settings.controllerGrace = 1_000
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.fw1,
                                     leftNeighbour: Host.client, rightNeighbour: Host.server)
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: true, deadlineMilliseconds: 1)
        var out: [Action] = []
        var c = Controller(context: context, trigger: trigger, leftAnchor: Host.client, requestID: 7, now: 0,
                           firstTimeout: 100, settings: settings, &out)
        #expect(sent(out).map(\.0) == [.trigger] && sent(out).map(\.1) == [Host.client])
        #expect(sent(c.timerFired(now: 500, settings: settings).actions).map(\.0) == [.trigger])
        #expect(c.resultArrived(TriggerResult(outcome: .moved), requestID: 8).actions.isEmpty)  // another request
        let given = c.timerFired(now: 1_001_000, settings: settings)
        #expect(given.finished)
        guard case .report(_, 7, let result) = given.actions.first else { Issue.record("\(given.actions)"); return }
        #expect(result.outcome == .cancelled && result.failedStep == .lock)
    }

    @Test("controller, §3.1/§3.6: with a long deadline the trigger still goes again at least every controllerRetransmitCap (a lost result is asked for again)")
    func controllerRetransmitsOftenEnough() throws {
        let settings = MigrationCoordinator.Settings()
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.fw1,
                                     leftNeighbour: Host.client, rightNeighbour: Host.server)
        let trigger = Trigger(newPath: [Host.server], oldBox: Host.fw1, mode: .held, deadlineMilliseconds: 10_000)
        var out: [Action] = []
        var c = Controller(context: context, trigger: trigger, leftAnchor: Host.client, requestID: 7, now: 0,
                           firstTimeout: 20_000_000, settings: settings, &out)
        var now: UInt64 = 20_000_000
        var sends = 1
        while true {
            let fired = c.timerFired(now: now, settings: settings)
            if fired.finished { break }
            sends += sent(fired.actions).count
            guard let delay = fired.actions.compactMap({ action -> UInt64? in
                if case .setTimer(_, let after) = action { return after } else { return nil }
            }).first else { Issue.record("no timer: \(fired.actions)"); return }
            #expect(delay <= settings.controllerRetransmitCap, "delay \(delay)")
            now += delay
        }
        // 12 s (deadline + grace) at most 0.5 s apart after the first doublings: more than 20 sends.
        #expect(sends > 20, "\(sends) sends")
    }
}
