import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// Issue 19, item 4: the protocol's loose ends. The cancel (paper §3.6) reaches every new box (newPathCancel sent
// until newPathCancelAck) and a late newPathSyn cannot make the session again; a lock (§3.2) held at an agent
// between the anchors for a left anchor that fell silent expires; an unanswered teardown says so in the result.
// The model has the first two (model/replace.pml: replace-cancel-resent, replace-la-crash; mutants
// MUT_CANCEL_ONCE, MUT_SYN_AFTER_CANCEL, MUT_NO_LOCK_EXPIRY).

private let chainID = TestSession.chainID

private func message(_ body: ControlBody, requestID: UInt32 = 9) -> ControlMessage {
    ControlMessage(identity: TestSession.identity, requestID: requestID, session: TestSession.tuple,
                   leftAnchor: Host.client, rightAnchor: Host.server, body: body)
}

private func sends(_ actions: [Action]) -> [(ControlMessageType, IPAddress)] {
    actions.compactMap { if case .send(let m, let to) = $0 { return (m.body.type, to) }; return nil }
}

private func kinds(_ actions: [Action]) -> [String] { actions.map(Describe.kind) }

/// The new path's first subsession, from the left anchor (client) to the new box (fw2).
private let newSub = FiveTuple(srcAddr: Host.client, srcPort: 41000, dstAddr: Host.fw2, dstPort: 80)

@Suite("Issue 19: newPathCancel until answered; no session made again by a late newPathSyn (paper §3.6)")
struct NewPathCancelTests {
    @Test("§3.6: a newPathSyn that arrives after the new box handled the cancel of its request is refused (newPathRefused), the session is not made; another request is not affected")
    func lateSynAfterCancelRefused() {
        var fw2 = MigrationCoordinator()
        // The cancel overtakes the SYN (reordering, or the SYN was retransmitted before the deadline passed).
        let cancel = fw2.handle(.message(message(.newPathCancel), from: Host.client, context: nil), now: 1)
        #expect(sends(cancel).map(\.0) == [.newPathCancelAck] && sends(cancel).map(\.1) == [Host.client])
        #expect(!kinds(cancel).contains("removeSession"))
        let late = fw2.handle(.message(message(.newPathSyn(subsession: newSub, remaining: [Host.server])),
                                       from: Host.client, context: nil), now: 2)
        #expect(!kinds(late).contains("createSession"), "\(late)")
        #expect(sends(late).map(\.0) == [.newPathRefused] && sends(late).map(\.1) == [Host.client])
        #expect(fw2.role(of: chainID).isEmpty)
        // The next request of the session (another request id) is a new path like any other.
        let next = fw2.handle(.message(message(.newPathSyn(subsession: newSub, remaining: [Host.server]), requestID: 10),
                                       from: Host.client, context: nil), now: 3)
        #expect(kinds(next).contains("createSession"))
        #expect(fw2.role(of: chainID) == [.newBox])
    }

    @Test("§3.6: the new box drops its session at newPathCancel once; a retransmitted newPathCancel only gets its answer again, and a duplicated newPathSyn after it is refused")
    func cancelRetransmissionIdempotent() {
        var fw2 = MigrationCoordinator()
        let syn = message(.newPathSyn(subsession: newSub, remaining: [Host.server]))
        #expect(kinds(fw2.handle(.message(syn, from: Host.client, context: nil), now: 1)).contains("createSession"))
        let made = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.fw2,
                                  leftNeighbour: Host.client, rightNeighbour: Host.server)
        let first = fw2.handle(.message(message(.newPathCancel), from: Host.client, context: made), now: 2)
        #expect(kinds(first).filter { $0 == "removeSession" }.count == 1)
        #expect(sends(first).map(\.0) == [.newPathCancelAck])
        // The left anchor did not hear the answer: the same cancel again (the shell may not have removed yet).
        let again = fw2.handle(.message(message(.newPathCancel), from: Host.client, context: made), now: 3)
        #expect(kinds(again) == ["send"] && sends(again).map(\.0) == [.newPathCancelAck])
        let duplicate = fw2.handle(.message(syn, from: Host.client, context: nil), now: 4)
        #expect(sends(duplicate).map(\.0) == [.newPathRefused] && !kinds(duplicate).contains("createSession"))
    }

    @Test("§3.6: a newPathCancel of an older request does not remove the new box of the request that replaced it")
    func staleCancelKeepsNewerRequest() {
        var fw2 = MigrationCoordinator()
        _ = fw2.handle(.message(message(.newPathSyn(subsession: newSub, remaining: [Host.server]), requestID: 10),
                                from: Host.client, context: nil), now: 1)
        let stale = fw2.handle(.message(message(.newPathCancel, requestID: 9), from: Host.client, context: nil), now: 2)
        #expect(!kinds(stale).contains("removeSession") && sends(stale).map(\.0) == [.newPathCancelAck])
        #expect(fw2.role(of: chainID) == [.newBox])
    }

    @Test("§3.6, harness: the new box drops everything: newPathCancel is retransmitted on the left anchor's timer, maxTries sends, and the cancelled result names the unanswered box")
    func unansweredNewBoxGivenUp() throws {
        var config = Harness.Config()
        config.down = [Host.fw2]
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
        let id = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                           stateful: true, deadlineMilliseconds: 300)
        let run = h.run()
        let result = try #require(run.reports[id]?.result, "\(run.trace)")
        #expect(result.outcome == .cancelled && result.failedStep == .newPath)
        #expect(result.reason.contains("newPathCancel unanswered by \(Host.fw2)"), "\(result.reason)")
        let cancels = h[Host.client].actions.filter {
            if case .send(let m, let to) = $0, case .newPathCancel = m.body { return to == Host.fw2 }
            return false
        }
        #expect(cancels.count == MigrationCoordinator.Settings().maxTries)
        #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
    }

    @Test("§3.6, harness: 200 short-deadline runs under 30 % loss, duplicates and reordering: every cancelled run leaves no session at the new box", arguments: [true, false])
    func noOrphanAfterLossyCancel(stateful: Bool) {
        var cancelled = 0
        var orphans: [UInt64] = []
        for seed in UInt64(1)...200 {
            let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2],
                            config: LossyScenarioTests.lossy(seed: 1000 + seed))
            let id = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                               stateful: stateful, deadlineMilliseconds: 60)
            let run = h.run()
            guard run.reports[id]?.result.outcome == .cancelled else { continue }
            cancelled += 1
            // Before issue 19, a lost newPathCancel (sent once) or a newPathSyn that arrived after it left fw2
            // with the session, on no path, until idle expiry.
            if h[Host.fw2].context != nil { orphans.append(seed) }
        }
        #expect(cancelled > 100)
        #expect(orphans.isEmpty, "seeds with an orphan session at fw2: \(orphans)")
    }
}

@Suite("Issue 19: a lock at an agent between the anchors expires when its left anchor falls silent (paper §3.2)")
struct LockExpiryTests {
    /// client → fw1 → server. A request (999) of the client's session locks fw1 → server and the server, then its
    /// left anchor falls silent (the client has no left anchor for it: the ackLock is dropped there, as if its
    /// host had died after sending requestLock). A real replace of fw1 comes at `first` and at `second`.
    private func silentLeftAnchor(_ settings: MigrationCoordinator.Settings, first: UInt64, second: UInt64)
        -> (Harness, Harness.RunResult, UInt32, UInt32) {
        var config = Harness.Config()
        config.settings = settings
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
        h.inject(.message(message(.requestLock(rightDelta: 0), requestID: 999), from: Host.client, context: nil), at: Host.fw1)
        let a = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                          stateful: true, after: first)
        let b = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                          stateful: true, after: second)
        return (h, h.run(), a, b)
    }

    @Test("§3.2: fw1 locked for a silent left anchor refuses the segment, then gives the lock up after hopLockSilence (30 s); the next replace moves")
    func lockExpires() throws {
        let settings = MigrationCoordinator.Settings()
        #expect(settings.hopLockSilence == 30_000_000_000)  // docs/CONTROL-PROTOCOL.md, "Timers"
        let (h, run, a, b) = silentLeftAnchor(settings, first: 5_000_000_000, second: 45_000_000_000)
        let refused = try #require(run.reports[a]?.result, "\(run.trace)")
        #expect(refused.outcome == .refused && refused.failedStep == .lock, "\(refused)")
        let moved = try #require(run.reports[b]?.result, "\(run.trace)")
        #expect(moved.outcome == .moved, "\(moved) \(run.trace)")
        // The expiry is fw1's silence timer: it fired once, for request 999, and nothing else was released by it.
        let silences = h.steps.filter {
            if case .timer(let key) = $0.event { return key.role == .oldPathHop }
            return false
        }
        #expect(silences.map { Host.name($0.agent) } == ["fw1"])
        #expect(silences.first?.lockBefore?.owner == 999 && silences.first?.lockAfter == nil)
        #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
    }

    @Test("§3.2: with a silence timeout longer than the wait, the segment stays locked for the silent request (the expiry is what frees it)")
    func lockKeptWithinTimeout() throws {
        var settings = MigrationCoordinator.Settings()
        settings.hopLockSilence = 100_000_000_000
        let (_, run, _, b) = silentLeftAnchor(settings, first: 5_000_000_000, second: 45_000_000_000)
        let second = try #require(run.reports[b]?.result, "\(run.trace)")
        #expect(second.outcome == .refused && second.failedStep == .lock, "\(second)")
    }

    @Test("§3.2: messages of the request holding the lock restart the silence timer; its own left anchor's lock has none")
    func timerRearmedAndOwnLockUntimed() {
        var fw1 = MigrationCoordinator()
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.fw1,
                                     leftNeighbour: Host.client, rightNeighbour: Host.server)
        let key = TimerKey(chainID: chainID, role: .oldPathHop, kind: .deadline)
        func armed(_ actions: [Action]) -> Bool {
            actions.contains { if case .setTimer(let k, let after) = $0 { return k == key && after == 30_000_000_000 }; return false }
        }
        #expect(armed(fw1.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.client, context: context), now: 1)))
        #expect(armed(fw1.handle(.message(message(.ackLock(leftDelta: 0, rightDelta: 0)), from: Host.server, context: context), now: 2)))
        #expect(armed(fw1.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.client, context: context), now: 3)))
        // The teardown passes: the agent leaves the session, the timer goes with the lock.
        let gone = fw1.handle(.message(message(.oldPathFinAck), from: Host.server, context: context), now: 4)
        #expect(gone.contains(.cancelTimer(key)) && fw1.locks.isEmpty)
        // A left anchor's own lock (fw1 leads request 20 of its session towards server): its deadline governs it.
        var la = MigrationCoordinator()
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw3, stateful: false, deadlineMilliseconds: 1000)
        let lead = ControlMessage(identity: TestSession.identity, requestID: 20, session: TestSession.tuple,
                                  leftAnchor: Host.fw1, rightAnchor: Host.server, body: .trigger(trigger))
        let start = la.handle(.message(lead, from: Host.client, context: context), now: 1)
        #expect(la.locks[chainID]?.owner == 20 && !armed(start))
        #expect(la.handle(.timer(key), now: 2).isEmpty && la.locks[chainID]?.owner == 20)  // a stray timer frees nothing
    }
}

/// A left anchor at client1 replacing fw1 by fw2 (request 7), driven up to both drains (the last answer pending:
/// peerDrained's output is returned): the teardown next (stateless), or the state request (stateful).
private func drainedLeftAnchor(stateful: Bool, settings: MigrationCoordinator.Settings = MigrationCoordinator.Settings())
    -> (LeftAnchor, LeftAnchor.Environment, LeftAnchor.Output) {
    var env = LeftAnchor.Environment(settings: settings, clock: RetransmitClock(), active: 1)
    var out: [Action] = []
    let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.client,
                                 leftNeighbour: nil, rightNeighbour: Host.fw1)
    let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: stateful, deadlineMilliseconds: 3000)
    let request = LeftAnchor.Request(requestID: 7, context: context, trigger: trigger, controller: Host.fw1,
                                     oldRight: Host.fw1, rightAnchor: Host.server, startedAt: 1_000_000)
    var l = LeftAnchor(request: request, now: 1_000_000, &env, &out)
    _ = l.locked(leftDelta: 0, now: 2_000_000, &env)
    _ = l.pathOpened(newSub, now: 2_000_000, &env)
    _ = l.newPathAnswered(now: 3_000_000, &env)
    _ = l.selfDrained(now: 4_000_000, &env)
    let drained = l.peerDrained(now: 5_000_000, &env)
    return (l, env, drained)
}

@Suite("Issue 19: an unanswered teardown is reported as such")
struct TeardownUnansweredTests {
    @Test("§3.5 teardown: oldPathFin unanswered after endTries: moved, with the reason \"teardown unanswered\" naming the hop")
    func teardownUnansweredReported() throws {
        var settings = MigrationCoordinator.Settings()
        settings.endTries = 3
        var (l, env, drained) = drainedLeftAnchor(stateful: false, settings: settings)
        #expect(sends(drained.actions).map(\.0) == [.oldPathFin])  // send 1
        #expect(sends(l.retransmitTimerFired(now: 6_000_000, &env).actions).map(\.0) == [.oldPathFin])  // 2
        #expect(sends(l.retransmitTimerFired(now: 7_000_000, &env).actions).map(\.0) == [.oldPathFin])  // 3
        let end = l.retransmitTimerFired(now: 8_000_000, &env)
        let result = try #require(end.finished)
        #expect(result.outcome == .moved && result.failedStep == nil)
        #expect(result.reason.hasPrefix(TriggerResult.teardownUnanswered), "\(result.reason)")
        #expect(result.reason.contains("\(Host.fw1)"))
        #expect(result.teardownUnanswered)
        #expect(!TriggerResult(outcome: .moved).teardownUnanswered)
        // It reaches the controller on the wire (control protocol v3: the reason field of triggerResult).
        let sent = try #require(end.actions.compactMap { a -> TriggerResult? in
            if case .send(let m, _) = a, case .triggerResult(let r) = m.body { return r }
            return nil
        }.first)
        let trust = TrustGroup(current: TrustKey(bytes: Array(repeating: 7, count: 32)))
        let wire = ControlMessage(identity: TestSession.identity, requestID: 7, session: TestSession.tuple,
                                  leftAnchor: Host.client, rightAnchor: Host.server, body: .triggerResult(sent)).encode(trust: trust)
        let decoded = try ControlMessage.decode(wire, trust: trust)
        if case .triggerResult(let r) = decoded.body { #expect(r.teardownUnanswered && r.outcome == .moved) }
        else { Issue.record("decoded \(decoded.body)") }
    }
}

@Suite("Issue 19 (soak): a teardown that comes after the session ended is still answered (paper §3.5)")
struct TeardownAfterCloseTests {
    @Test("§3.5: the right anchor with no session left answers an oldPathFin addressed to it; an agent that is not its right anchor, or does not know its own address, does not")
    func rightAnchorAnswersWithoutSession() {
        var server = MigrationCoordinator()
        // Taken without a session only where it can be acted on: at its right anchor (by the address it was sent to).
        #expect(server.acceptsWithoutSession(message(.oldPathFin), to: Host.server))
        #expect(!server.acceptsWithoutSession(message(.oldPathFin), to: nil))
        #expect(!MigrationCoordinator().acceptsWithoutSession(message(.oldPathFin), to: Host.fw1))
        #expect(!MigrationCoordinator().acceptsWithoutSession(message(.oldPathFinAck), to: Host.client))  // no left anchor
        #expect(!MigrationCoordinator().acceptsWithoutSession(message(.requestLock(rightDelta: 0)), to: Host.server))
        let answered = server.handle(.message(message(.oldPathFin), from: Host.fw1, context: nil, to: Host.server), now: 1)
        #expect(sends(answered).map(\.0) == [.oldPathFinAck] && sends(answered).map(\.1) == [Host.fw1])
        #expect(!kinds(answered).contains("removeSession"))
        #expect(server.handle(.message(message(.oldPathFin), from: Host.fw1, context: nil), now: 2).isEmpty)
        var fw1 = MigrationCoordinator()
        #expect(fw1.handle(.message(message(.oldPathFin), from: Host.client, context: nil, to: Host.fw1), now: 1).isEmpty)
        #expect(fw1.handle(.message(message(.oldPathFinAck), from: Host.server, context: nil, to: Host.fw1), now: 2).isEmpty)
    }

    /// The soak's stale records: both ends close the session on the new path (their records linger out) while the
    /// teardown is still retransmitted; the old box must still leave the session.
    @Test("§3.5: both ends' sessions end before the teardown arrives: the old box still leaves the session and the result is a plain moved (no \"teardown unanswered\")")
    func teardownAfterBothEndsClosed() throws {
        for seed in UInt64(1)...20 {
            let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2],
                            config: LossyScenarioTests.lossy(seed: 70_000 + seed))
            h.config.tamper = { [unowned h] m, _, _ in
                if case .oldPathFin = m.body {
                    h.agents[Host.client]?.context = nil
                    h.agents[Host.server]?.context = nil
                }
                return m
            }
            let request = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server],
                                    oldBox: Host.fw1, stateful: false, deadlineMilliseconds: 10_000)
            let run = h.run()
            let result = try #require(run.reports[request]?.result, "seed \(seed): \(run.trace)")
            guard result.outcome == .moved else { continue }  // a cancel under loss: no teardown to check
            #expect(!result.teardownUnanswered, "seed \(seed): \(result.reason)")
            #expect(h[Host.fw1].did("removeSession"), "seed \(seed): \(run.trace)")
        }
    }
}

@Suite("Issue 19 (soak): a session that begins to close before anything of it went on the new path is not moved (paper §3.6)")
struct ClosedDuringMoveTests {
    /// Replaces fw1 by fw2; the client's record sees a FIN once `closeAt` is sent (it crosses the old path).
    private func run(stateful: Bool, closeAt: ControlMessageType, seed: UInt64) -> (Harness, Harness.RunResult, UInt32) {
        var config = Harness.Config()
        config.seed = seed
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
        h.config.tamper = { [unowned h] m, _, _ in
            if m.body.type == closeAt { h.agents[Host.client]?.context?.ending = true }
            return m
        }
        let request = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server],
                                oldBox: Host.fw1, stateful: stateful, deadlineMilliseconds: 10_000)
        return (h, h.run(), request)
    }

    @Test("§3.6: stateful, a FIN crosses the old path before the release: cancelled with the reason, the new box drops its record, the old box keeps its own, nothing stays locked", arguments: [ControlMessageType.requestLock, .newPathSyn, .drainStart, .stateRequest, .stateInstalled])
    func statefulCancelled(closeAt: ControlMessageType) throws {
        for seed in UInt64(1)...5 {
            let (h, run, request) = run(stateful: true, closeAt: closeAt, seed: seed)
            let result = try #require(run.reports[request]?.result, "\(run.trace)")
            #expect(result.outcome == .cancelled && result.reason.contains("the session is closing"), "\(result)")
            #expect(h[Host.fw2].count("removeSession") >= 1 || !h[Host.fw2].did("createSession"), "\(run.trace)")
            #expect(!h[Host.fw1].did("removeSession"), "the old path saw the close and keeps its record for the linger")
            #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
        }
    }

    @Test("§3.5: stateless, the FIN comes after newPathSynAck (data may already be on the new path): the move goes on; before it, the move is cancelled")
    func statelessAfterPromotionMoves() throws {
        let (_, run, request) = run(stateful: false, closeAt: .drainStart, seed: 3)
        let result = try #require(run.reports[request]?.result, "\(run.trace)")
        #expect(result.outcome == .moved, "\(result)")
        let (_, early, earlyRequest) = self.run(stateful: false, closeAt: .newPathSyn, seed: 3)
        let cancelled = try #require(early.reports[earlyRequest]?.result, "\(early.trace)")
        #expect(cancelled.outcome == .cancelled && cancelled.reason.contains("the session is closing"), "\(cancelled)")
    }

    @Test("§3.6: stateful, a FIN seen while the release's probe is out (newPathPacket finds the record ending): cancelled, the held data goes back to the old path, the new box gets newPathCancel")
    func endingAtRelease() throws {
        var (l, env, drained) = drainedLeftAnchor(stateful: true)
        #expect(sends(drained.actions).map(\.0) == [.stateRequest])
        #expect(kinds(l.stateInstalled(ok: true, times: StateTimes(), reason: "", now: 6_000_000, &env).actions).contains("sendProbe"))
        let ending = l.sessionEnding(now: 7_000_000, &env)
        #expect(kinds(ending.actions).contains("cancelAnchor"))
        #expect(sends(ending.actions).map(\.0) == [.newPathCancel, .cancelLock] && sends(ending.actions).map(\.1) == [Host.fw2, Host.fw1])
        // Once released, the move goes on: a FIN then crosses the new path too.
        var (released, _, _) = drainedLeftAnchor(stateful: true)
        _ = released.stateInstalled(ok: true, times: StateTimes(), reason: "", now: 6_000_000, &env)
        #expect(sends(released.probeSeen(now: 7_000_000, &env).actions).map(\.0) == [.oldPathFin])
        #expect(released.sessionEnding(now: 8_000_000, &env).actions.isEmpty)
    }
}
