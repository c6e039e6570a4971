import DyscoCore

/// The left anchor of one session's reconfiguration (paper §2.3, §3): it drives everything — lock (§3.2), new
/// path (§3.1, §3.3), drain (§3.5), state transfer (stateful, §3.5 last paragraph), release, teardown, or cancel
/// (§3.6) — and alone keeps a deadline and retransmits end to end.
///
/// A state machine in the style of grpc-swift's handler state machines: ``State`` holds the data of each state,
/// every event is a `mutating func` that returns what the shell must do (``Output``). The router
/// (``MigrationCoordinator``) owns the lock of this agent's right subsession (``OldPathHop``) and the shared
/// ``RetransmitClock``, which it lends to each call.
struct LeftAnchor: Sendable {
    /// What stays the same for the whole reconfiguration.
    struct Request: Sendable {
        var requestID: UInt32
        var context: SessionContext
        var trigger: Trigger
        var controller: IPAddress
        /// The old path's next hop (where lock, cancel and teardown messages go).
        var oldRight: IPAddress
        /// The new path's last hop (trigger.newPath is never empty: checked before the machine is made).
        var rightAnchor: IPAddress
        var startedAt: UInt64

        var newMiddleboxes: ArraySlice<IPAddress> { trigger.newPath.dropLast() }
        var firstNewHop: IPAddress { trigger.newPath.first ?? rightAnchor }

        func message(_ body: ControlBody) -> ControlMessage {
            ControlMessage(identity: context.identity, requestID: requestID, session: context.session,
                           leftAnchor: context.me, rightAnchor: rightAnchor, body: body)
        }
    }

    /// The phase times so far: the end of each step reached (µs since the trigger), the boxes' durations.
    struct Timeline: Sendable {
        var times = PhaseTimes()
        /// The last step whose end is recorded.
        var reached: MigrationStep?
        var newPathSynSentAt: UInt64?

        mutating func mark(_ step: MigrationStep, startedAt: UInt64, now: UInt64) {
            times.setEnd(of: step, UInt32(clamping: (now &- startedAt) / 1000))
            reached = step
        }

        /// The report: a step not reached ends with the last one reached; the paper's measure (§5.3).
        func result(startedAt: UInt64) -> PhaseTimes {
            var t = times
            var last: UInt32 = 0
            var passed = reached == nil
            for step in MigrationStep.allCases {
                if passed { t.setEnd(of: step, last) } else { last = t.end(of: step) }
                if step == reached { passed = true }
            }
            let releaseEnd = UInt64(t.releaseEnd)
            let synSent = newPathSynSentAt.map { ($0 &- startedAt) / 1000 } ?? 0
            t.newPathSynToUse = UInt32(clamping: releaseEnd &- min(synSent, releaseEnd))
            return t
        }
    }

    /// A message sent until it is answered: where, how often so far, the next delay, and when it was first
    /// sent (for the RTT sample of its answer, Karn's rule).
    struct Outstanding: Sendable {
        var message: ControlMessage
        var to: IPAddress
        var tries = 0
        var delay: UInt64 = 0
        var sentAt: UInt64 = 0
    }

    /// The drain (§3.5) ends when both directions are drained: ours (the data plane) and the right anchor's.
    enum Drain: Sendable {
        case neither, selfDrained, peerDrained
    }

    /// The cancel (§3.6) under way: cancelLock along the old path until ackCancel, and newPathCancel to each new
    /// middlebox until its newPathCancelAck, on the one retransmission timer, at most `maxTries` sends (issue 19).
    struct Cancelling: Sendable {
        var step: MigrationStep
        var reason: String
        /// cancelLock; its tries and delay pace the newPathCancel retransmissions too.
        var lock: Outstanding
        /// ackCancel came back: every agent of the old path has the cancel.
        var lockAcknowledged = false
        /// New middleboxes whose newPathCancelAck has not come back, in path order.
        var newBoxes: [IPAddress]

        var done: Bool { lockAcknowledged && newBoxes.isEmpty }
    }

    /// Window-opening probes on the new path (the release step): how many, and the next delay.
    struct Probes: Sendable {
        var tries: Int
        var delay: UInt64
    }

    enum State: Sendable {
        /// requestLock is travelling along the old path (§3.2).
        case locking(Outstanding)
        /// Locked; the shell opens the new path's first subsession (openPath).
        case openingPath
        /// newPathSyn is travelling along the new path (§3.3).
        case synSent(subsession: FiveTuple, Outstanding)
        /// drainStart sent to the right anchor; waiting for both directions to drain (§3.5).
        case draining(Outstanding, Drain)
        /// stateRequest sent to the old box (stateful only).
        case transferringState(Outstanding)
        /// Held, with a session-terminating proxy on the segment: drainStart sent to the proxy, which answers
        /// `drained` once its sockets and buffers hold nothing (docs/ARCHITECTURE.md, "Session-terminating proxies").
        case emptyingProxy(Outstanding)
        /// The release step: egress on the new path, probing until the right anchor's probe comes back.
        case probing(Probes)
        /// oldPathFin along the old path; the data already flows on the new one.
        case tearingDown(Outstanding)
        /// cancelLock along the old path and newPathCancel to the new middleboxes (§3.6), after a failure.
        case cancelling(Cancelling)
        /// Only while a handler changes the state's data in place (no copy-on-write of the associated values).
        case modifying
    }

    /// What one event makes this left anchor do; `finished` when its part is over (the router forgets it,
    /// releases its lock and keeps the result for duplicate triggers).
    struct Output: Sendable {
        var actions: [Action] = []
        var finished: TriggerResult?
    }

    /// What the router lends each call: the shared RTT estimator and the number of left anchors here.
    struct Environment {
        var settings: MigrationCoordinator.Settings
        var clock: RetransmitClock
        var active: Int
    }

    let request: Request
    /// A session-terminating proxy on the segment (its `splice` notice came): the release waits for it to empty.
    private(set) var proxy: IPAddress?
    private(set) var timeline = Timeline()
    private(set) var state: State

    var requestID: UInt32 { request.requestID }

    /// The step the reconfiguration is at (while cancelling: the step it failed at).
    var step: MigrationStep {
        switch state {
        case .locking: .lock
        case .openingPath, .synSent: .newPath
        case .draining: .drain
        case .transferringState, .emptyingProxy: .state
        case .probing: .release
        case .tearingDown: .teardown
        case .cancelling(let c): c.step
        case .modifying: preconditionFailure("LeftAnchor.step while modifying")
        }
    }

    var isCancelling: Bool { if case .cancelling = state { true } else { false } }

    /// Whether a path result (pathOpened) is for this left anchor: it waits for one.
    var waitsForPath: Bool {
        switch state {
        case .openingPath, .synSent: true
        default: false
        }
    }

    // MARK: - Start (§3.1: the trigger; §3.2: requestLock)

    /// A trigger was accepted (the router checked the session, the new path, and locked the segment here).
    init(request: Request, now: UInt64, _ env: inout Environment, _ out: inout [Action]) {
        self.request = request
        var outstanding = Outstanding(message: request.message(.requestLock(rightDelta: 0)), to: request.oldRight)
        out.append(.hold(chainID: request.context.identity.chainID, side: .right, stateful: request.trigger.stateful))
        out.append(.commitKernel)  // the hold is in the kernel before requestLock leaves (§3.2, §3.5)
        out.append(.setTimer(Self.timerKey(request, .deadline),
                             afterNanoseconds: UInt64(request.trigger.deadlineMilliseconds) * 1_000_000))
        Self.send(&outstanding, fresh: true, key: Self.timerKey(request, .retransmit), now: now, &env, &out)
        state = .locking(outstanding)
    }

    // MARK: - Events

    /// ackLock for our request came back (§3.2): the segment is locked.
    mutating func locked(leftDelta: Int32, now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard case .locking(let outstanding) = state else { return out }
        answered(outstanding, now: now, &env, &out.actions)
        timeline.mark(.lock, startedAt: request.startedAt, now: now)
        state = .openingPath
        if leftDelta != 0 { out.actions.append(.setDelta(chainID: chainID, leftDelta)) }
        out.actions.append(.openPath(chainID: chainID, next: request.firstNewHop))
        return out
    }

    /// nackLock for our request (§3.2): refused, in whatever state.
    mutating func lockRefused(_ reason: NackReason, now: UInt64) -> Output {
        var out = Output()
        out.actions.append(.cancelAnchor(chainID: chainID))
        finish(TriggerResult(
            outcome: .refused, reason: reason == .contention
                ? "lock refused (\(reason)): another reconfiguration holds part of the segment (§3.2)"
                : "lock refused (\(reason)) on the old path (§3.2)",
            failedStep: .lock, phases: timeline.result(startedAt: request.startedAt)), &out)
        return out
    }

    /// The shell opened the new path's first subsession: newPathSyn (§3.3).
    mutating func pathOpened(_ subsession: FiveTuple, now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        switch state {
        case .openingPath, .synSent: break
        default: return out
        }
        timeline.newPathSynSentAt = timeline.newPathSynSentAt ?? now
        var outstanding = Outstanding(
            message: request.message(.newPathSyn(subsession: subsession, remaining: Array(request.trigger.newPath.dropFirst()))),
            to: request.firstNewHop)
        Self.send(&outstanding, fresh: true, key: key(.retransmit), now: now, &env, &out.actions)
        state = .synSent(subsession: subsession, outstanding)
        return out
    }

    /// The shell could not open the new path's first subsession.
    mutating func pathRefused(_ reason: String, now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard step == .newPath else { return out }
        cancel(step: .newPath, reason: "new path: \(reason)", now: now, &env, &out)
        return out
    }

    /// A hop of the new path cannot take the session (issue 20): cancel now, with its reason.
    mutating func newPathRefused(by hop: IPAddress, reason: String, now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        let outstanding: Outstanding?
        switch state {
        case .openingPath: outstanding = nil
        case .synSent(_, let o): outstanding = o
        default: return out
        }
        if let outstanding { answered(outstanding, now: now, &env, &out.actions) }
        else { out.actions.append(.cancelTimer(key(.retransmit))) }
        cancel(step: .newPath, reason: "new path refused by \(hop): \(reason)", now: now, &env, &out)
        return out
    }

    /// newPathSynAck (§3.3): the new path is up; drain the old one (§3.5).
    mutating func newPathAnswered(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard case .synSent(_, let outstanding) = state else { return out }
        answered(outstanding, now: now, &env, &out.actions)
        timeline.mark(.newPath, startedAt: request.startedAt, now: now)
        var drain = Outstanding(message: request.message(.drainStart(stateful: request.trigger.stateful)),
                                to: request.rightAnchor)
        if request.trigger.stateful {
            out.actions.append(.setPhase(chainID: chainID, .buffering))
        } else {
            // Stateless (§3.5): new data on the new path from now on; old bytes stay on the old one.
            out.actions.append(.promote(chainID: chainID))
            out.actions.append(.setPhase(chainID: chainID, .released))
        }
        Self.send(&drain, fresh: true, key: key(.retransmit), now: now, &env, &out.actions)
        state = .draining(drain, .neither)
        return out
    }

    /// The data plane: everything this anchor sent on the old path is acknowledged (§3.5).
    mutating func selfDrained(now: UInt64, _ env: inout Environment) -> Output {
        drained(.selfDrained, now: now, &env)
    }

    /// The right anchor's `drained` (§3.5).
    mutating func peerDrained(now: UInt64, _ env: inout Environment) -> Output {
        drained(.peerDrained, now: now, &env)
    }

    private mutating func drained(_ side: Drain, now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard case .draining(let outstanding, let drain) = state else { return out }
        switch (drain, side) {
        case (.neither, _):
            state = .draining(outstanding, side)
            return out
        case (.selfDrained, .selfDrained), (.peerDrained, .peerDrained):
            return out
        default:
            break  // both directions drained
        }
        timeline.mark(.drain, startedAt: request.startedAt, now: now)
        // No RTT sample: the drain's answer waits for the data, not the network.
        out.actions.append(.cancelTimer(key(.retransmit)))
        switch request.trigger.mode {
        case .stateful:
            var stateRequest = Outstanding(message: request.message(.stateRequest(newBox: request.firstNewHop)),
                                           to: request.trigger.oldBox)
            Self.send(&stateRequest, fresh: true, key: key(.retransmit), now: now, &env, &out.actions)
            state = .transferringState(stateRequest)
        case .held:
            if let proxy {
                // A proxy acknowledged what the anchors counted as drained, and may still hold it (a pipe, its own
                // buffer): with both sides held nothing new enters it, so it empties; the release waits for that.
                var empty = Outstanding(message: request.message(.drainStart(stateful: true)), to: proxy)
                Self.send(&empty, fresh: true, key: key(.retransmit), now: now, &env, &out.actions)
                state = .emptyingProxy(empty)
                return out
            }
            // Held, no state to move (an insertion of a box that needs none, a deletion): the release follows the
            // drain (the state step ends with it).
            timeline.mark(.state, startedAt: request.startedAt, now: now)
            startRelease(now: now, &env, &out.actions)
        case .stateless:
            // Stateless: both directions drained: the old path is no longer needed (§3.5). No state step (it
            // ends with the drain); new data used the new path once it was up (the release ends with it).
            timeline.times.stateEnd = timeline.times.drainEnd
            timeline.times.releaseEnd = timeline.times.newPathEnd
            timeline.reached = .release
            startTeardown(now: now, &env, &out.actions)
        }
        return out
    }

    /// A session-terminating proxy of the segment announced itself (its `splice` notice, with the ackLock): a held
    /// release waits for it to empty. Only before the drain ends.
    mutating func proxyOnSegment(_ address: IPAddress) {
        switch state {
        case .locking, .openingPath, .synSent, .draining: proxy = address
        default: break
        }
    }

    /// Whether `from`'s `drained` answers this anchor's drainStart to the proxy (not the right anchor's).
    func awaitsProxy(_ from: IPAddress) -> Bool {
        if case .emptyingProxy(let o) = state { o.to == from } else { false }
    }

    /// The proxy's `drained`: it holds nothing of the session; the release follows (the state step ends).
    mutating func proxyEmptied(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard case .emptyingProxy = state else { return out }
        // No RTT sample: the answer waits for the proxy's data, not the network.
        out.actions.append(.cancelTimer(key(.retransmit)))
        timeline.mark(.state, startedAt: request.startedAt, now: now)
        startRelease(now: now, &env, &out.actions)
        return out
    }

    /// stateInstalled from the old box (stateful, §3.5): the state moved, or could not.
    mutating func stateInstalled(ok: Bool, times: StateTimes, reason: String, now: UInt64,
                                 _ env: inout Environment) -> Output {
        var out = Output()
        guard case .transferringState(let outstanding) = state else { return out }
        timeline.times.exportMicroseconds = times.exportMicroseconds
        timeline.times.importMicroseconds = times.importMicroseconds
        answered(outstanding, now: now, &env, &out.actions)
        guard ok else {
            cancel(step: .state, reason: reason.isEmpty ? "state transfer failed" : reason, now: now, &env, &out)
            return out
        }
        timeline.mark(.state, startedAt: request.startedAt, now: now)
        startRelease(now: now, &env, &out.actions)
        return out
    }

    /// The release step begins (after the state step, or after the drain when held): switch egress to the new path
    /// and open the new firewall's window tracking with a probe; our data stays held until the right anchor's probe
    /// comes back (docs/ARCHITECTURE.md, "After the import").
    private mutating func startRelease(now: UInt64, _ env: inout Environment, _ out: inout [Action]) {
        out.append(.promote(chainID: chainID))
        out.append(.setPhase(chainID: chainID, .probing))
        out.append(.sendProbe(chainID: chainID))
        let first = env.clock.timeout(env.settings, active: env.active)
        out.append(.setTimer(key(.retransmit), afterNanoseconds: first))
        state = .probing(Probes(tries: 1, delay: env.clock.backoff(first, env.settings, active: env.active)))
    }

    /// The right anchor's probe came back through the new box: answer with a last probe (so the new firewall
    /// has seen each side after the other), then release our buffer on the new path.
    mutating func probeSeen(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        guard case .probing = state else { return out }
        timeline.mark(.release, startedAt: request.startedAt, now: now)
        out.actions.append(.cancelTimer(key(.retransmit)))
        out.actions.append(.sendProbe(chainID: chainID))
        out.actions.append(.setPhase(chainID: chainID, .released))
        out.actions.append(.releaseBuffer(chainID: chainID))
        startTeardown(now: now, &env, &out.actions)
        return out
    }

    /// oldPathFinAck: the old path is gone; the reconfiguration succeeded.
    mutating func oldPathGone(now: UInt64) -> Output {
        var out = Output()
        guard case .tearingDown = state else { return out }
        timeline.mark(.teardown, startedAt: request.startedAt, now: now)
        out.actions.append(.finishAnchor(chainID: chainID))
        finish(TriggerResult(outcome: .moved, reason: "", failedStep: nil,
                             phases: timeline.result(startedAt: request.startedAt)), &out)
        return out
    }

    /// ackCancel (§3.6): every agent of the old path has the cancel. The cancel ends when every new middlebox has
    /// acknowledged its newPathCancel too.
    mutating func cancelAcknowledged() -> Output {
        var out = Output()
        guard case .cancelling(var c) = state else { return out }
        c.lockAcknowledged = true
        state = .cancelling(c)
        if c.done { cancelFinished(c, &out) }
        return out
    }

    /// newPathCancelAck from a new middlebox (§3.6): it dropped the session (or never had it), and refuses a late
    /// newPathSyn of this request from now on.
    mutating func newPathCancelAcknowledged(by hop: IPAddress) -> Output {
        var out = Output()
        guard case .cancelling(var c) = state, c.newBoxes.contains(hop) else { return out }
        c.newBoxes.removeAll { $0 == hop }
        state = .cancelling(c)
        if c.done { cancelFinished(c, &out) }
        return out
    }

    private func cancelFinished(_ c: Cancelling, _ out: inout Output) {
        var reason = c.reason
        if !c.newBoxes.isEmpty {
            // Bounded like every retransmission: the session at those boxes is on no path and expires by idleness.
            reason += "; newPathCancel unanswered by \(c.newBoxes.map(\.description).joined(separator: ","))"
        }
        finish(TriggerResult(outcome: .cancelled, reason: String(reason.utf8.prefix(ControlBody.maxReasonBytes)) ?? c.reason,
                             failedStep: c.step, phases: timeline.result(startedAt: request.startedAt)), &out)
    }

    /// The anchor buffer is full (documented bound): cancel.
    mutating func bufferFull(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        cancel(step: step, reason: "anchor buffer full at the left anchor", now: now, &env, &out)
        return out
    }

    // MARK: - Timers

    /// The session began to close (a FIN either way, or an RST, at this anchor) before anything of it went on the
    /// new path. A new box learns that a session ended only from FINs it sees: if one crossed the old path, the new
    /// box would never see both and would keep its record until idle expiry (issue 19's soak: established records
    /// at the new box, and a new session with the same tuple refused there). Cancel (§3.6): the new boxes drop the
    /// session; the old path, which saw the first FIN, carries the rest of the close. Once data may have gone on the
    /// new path (released; stateless from newPathSynAck on) the move goes on.
    mutating func sessionEnding(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        switch state {
        case .locking, .openingPath, .synSent:
            break
        case .draining, .transferringState, .emptyingProxy, .probing:
            guard request.trigger.mode != .stateless else { return out }
        case .tearingDown, .cancelling, .modifying:
            return out
        }
        cancel(step: step, reason: "the session is closing (a FIN or an RST seen at step \(step.rawValue)): not moved",
               now: now, &env, &out)
        return out
    }

    mutating func deadlinePassed(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        var reason = "deadline of \(request.trigger.deadlineMilliseconds) ms passed during step \(step.rawValue)"
        switch state {
        case .cancelling, .tearingDown, .modifying:
            return out
        case .locking(let o), .synSent(_, let o), .draining(let o, _), .transferringState(let o), .emptyingProxy(let o):
            reason += ": no answer from \(o.to) to \(o.message.body.type) after \(o.tries) tries"
        case .probing(let probes):
            reason += ": no probe came back on the new path after \(probes.tries) probes"
        case .openingPath:
            break
        }
        cancel(step: step, reason: reason, now: now, &env, &out)
        return out
    }

    mutating func retransmitTimerFired(now: UInt64, _ env: inout Environment) -> Output {
        var out = Output()
        let key = key(.retransmit)
        switch state {
        case .probing(var probes):
            // The probe (or the right anchor's answer to it) was lost, or could not be built yet (the anchor is
            // still eliciting its endpoint's numbers: issue 20): probe again until the deadline, which cancels
            // ("no probe came back on the new path after N probes").
            out.actions.append(.sendProbe(chainID: chainID))
            out.actions.append(.setTimer(key, afterNanoseconds: probes.delay))
            probes.tries += 1
            probes.delay = env.clock.backoff(probes.delay, env.settings, active: env.active)
            state = .probing(probes)
        case .openingPath, .modifying:
            break
        case .locking(var o):
            // Before the release the deadline decides when to give up (it cancels).
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .locking(o)
        case .synSent(let subsession, var o):
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .synSent(subsession: subsession, o)
        case .draining(var o, let drain):
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .draining(o, drain)
        case .transferringState(var o):
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .transferringState(o)
        case .emptyingProxy(var o):
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .emptyingProxy(o)
        case .tearingDown(var o):
            // After the release a bounded number of sends decides.
            if o.tries >= env.settings.endTries {
                // Data already flows on the new path; the old path's agents expire the session by idleness.
                out.actions.append(.finishAnchor(chainID: chainID))
                finish(TriggerResult(outcome: .moved, reason: "\(TriggerResult.teardownUnanswered): no oldPathFinAck from \(o.to) after \(o.tries) sends; the old path expires by idleness",
                                     failedStep: nil,
                                     phases: timeline.result(startedAt: request.startedAt)), &out)
                return out
            }
            state = .modifying
            Self.send(&o, fresh: false, key: key, now: now, &env, &out.actions)
            state = .tearingDown(o)
        case .cancelling(var c):
            // An unanswered cancelLock leaves the segment locked (until hopLockSilence): endTries sends. Once it is
            // answered only a new box's newPathCancel is outstanding, and a box that does not answer is usually down
            // (its session, if any, expires by idleness): maxTries.
            if c.lock.tries >= (c.lockAcknowledged ? env.settings.maxTries : env.settings.endTries) {
                // The old path or a new box does not answer the cancel: the session is back on the old path here
                // anyway; an unanswered new box's session is on no path and expires by idleness.
                cancelFinished(c, &out)
                return out
            }
            state = .modifying
            for hop in c.newBoxes { out.actions.append(.send(request.message(.newPathCancel), to: hop)) }
            if c.lockAcknowledged {
                // Only newPathCancel is outstanding: the same pacing, without cancelLock.
                c.lock.tries += 1
                out.actions.append(.setTimer(key, afterNanoseconds: c.lock.delay))
                c.lock.delay = env.clock.backoff(c.lock.delay, env.settings, active: env.active)
            } else {
                Self.send(&c.lock, fresh: false, key: key, now: now, &env, &out.actions)
            }
            state = .cancelling(c)
        }
        return out
    }

    // MARK: - Steps

    private var chainID: UInt64 { request.context.identity.chainID }

    private func key(_ kind: TimerKey.Kind) -> TimerKey { Self.timerKey(request, kind) }

    private static func timerKey(_ request: Request, _ kind: TimerKey.Kind) -> TimerKey {
        TimerKey(chainID: request.context.identity.chainID, role: .leftAnchor, kind: kind)
    }

    /// Sends (or re-sends) an outstanding message and arms the retransmission timer.
    private static func send(_ o: inout Outstanding, fresh: Bool, key: TimerKey, now: UInt64, _ env: inout Environment,
                             _ out: inout [Action]) {
        if fresh {
            o.tries = 0
            o.delay = env.clock.timeout(env.settings, active: env.active)
            o.sentAt = now
        }
        o.tries += 1
        out.append(.send(o.message, to: o.to))
        out.append(.setTimer(key, afterNanoseconds: o.delay))
        o.delay = env.clock.backoff(o.delay, env.settings, active: env.active)
    }

    /// The answer to the outstanding message arrived: an RTT sample if it was sent once.
    private func answered(_ o: Outstanding, now: UInt64, _ env: inout Environment, _ out: inout [Action]) {
        if o.tries == 1, now > o.sentAt { env.clock.sample(now - o.sentAt) }
        out.append(.cancelTimer(key(.retransmit)))
    }

    private mutating func startTeardown(now: UInt64, _ env: inout Environment, _ out: inout [Action]) {
        var fin = Outstanding(message: request.message(.oldPathFin), to: request.oldRight)
        out.append(.cancelTimer(key(.deadline)))
        Self.send(&fin, fresh: true, key: key(.retransmit), now: now, &env, &out)
        state = .tearingDown(fin)
    }

    /// Cancel (§3.6): back on the old path at once (nothing waits for the cancel handshake); the new path's
    /// boxes drop the session; cancelLock along the old path until ackCancel.
    private mutating func cancel(step: MigrationStep, reason: String, now: UInt64, _ env: inout Environment,
                                 _ out: inout Output) {
        switch state {
        case .cancelling, .tearingDown, .modifying: return  // already cancelling, or data already on the new path
        default: break
        }
        var cancelLock = Outstanding(message: request.message(.cancelLock(reason: String(reason.utf8.prefix(200)) ?? "")),
                                     to: request.oldRight)
        out.actions.append(.cancelTimer(key(.deadline)))
        out.actions.append(.cancelAnchor(chainID: chainID))
        // New boxes exist from the new-path step on; each gets newPathCancel until it answers (issue 19: sent once,
        // a lost one left an orphan session and a late newPathSyn could make it again).
        let newBoxes = step == .lock ? [] : Array(request.newMiddleboxes)
        for hop in newBoxes {
            out.actions.append(.send(request.message(.newPathCancel), to: hop))
        }
        Self.send(&cancelLock, fresh: true, key: key(.retransmit), now: now, &env, &out.actions)
        state = .cancelling(Cancelling(step: step, reason: reason, lock: cancelLock, newBoxes: newBoxes))
    }

    private func finish(_ result: TriggerResult, _ out: inout Output) {
        out.actions.append(.cancelTimer(key(.retransmit)))
        out.actions.append(.cancelTimer(key(.deadline)))
        out.actions.append(.send(request.message(.triggerResult(result)), to: request.controller))
        out.finished = result
    }
}
