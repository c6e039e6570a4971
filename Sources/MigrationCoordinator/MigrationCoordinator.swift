import DyscoCore

/// The reconfiguration protocol of paper §3 at one agent, as a pure state machine: events in (control
/// messages, data-plane observations, timers, results of actions), actions out. No I/O, no clock: the agent
/// shell (DyscoAgent.MigrationEngine) performs the actions and feeds their results back as events.
///
/// One agent plays, per session, any of these roles (docs/ARCHITECTURE.md, "Reconfiguration"):
/// - **controller**: asked locally (`replace`) to move a session; sends `trigger` to the left anchor (§3.1:
///   "the triggering component must always communicate with the left anchor") and waits for its result;
/// - **left anchor** (§2.3): drives everything: lock (§3.2), new path (§3.1), drain (§3.5), state transfer
///   (stateful), release, teardown, or cancel (§3.6); it alone keeps deadlines and retransmits end to end;
/// - **old-path agent** (between the anchors): forwards lock messages, keeps its subsession lock (§3.2),
///   exports the firewall's state when it is the old box, leaves the session at teardown;
/// - **new box** (on the new path): creates the session from the new-path SYN, imports the state;
/// - **right anchor**: answers the lock, installs the new path's last subsession, buffers its side (stateful),
///   answers drainStart with drained, releases after the probes, drops the old path at teardown.
///
/// Handlers are idempotent: a duplicate gets the same answer and changes nothing.
public struct MigrationCoordinator: Sendable {
    public struct Settings: Sendable {
        /// First retransmission timeout; doubled on each retry.
        public var retransmitInitial: UInt64 = 20_000_000
        public var retransmitMax: UInt64 = 100_000_000
        /// Before any answer was timed, each reconfiguration under way here adds this to the first timeout
        /// (``RetransmitClock``).
        public var retransmitPerActive: UInt64 = 500_000
        /// No timeout is longer than this.
        public var retransmitCeiling: UInt64 = 2_000_000_000
        /// Sends of one message before the step is given up (and the reconfiguration cancelled).
        public var maxTries = 7
        /// How long the controller waits for the left anchor's result beyond the deadline.
        public var controllerGrace: UInt64 = 2_000_000_000
        /// How long a new box keeps its part of a reconfiguration (for retransmitted newPathSyn / statePut)
        /// before forgetting it: nothing tells a new box that the reconfiguration ended well.
        public var newBoxLinger: UInt64 = 60_000_000_000
        /// A right anchor whose left anchor falls silent (crashed, partitioned) gives up after this long without
        /// a message of the reconfiguration: it goes back to the old path (and reopens its endpoint's window).
        public var rightAnchorSilence: UInt64 = 10_000_000_000
        public init() {}
    }

    public var settings: Settings
    /// The lock of this agent's right subsession, per session (chain id).
    public private(set) var locks: [UInt64: SegmentLock] = [:]
    private var leftAnchors: [UInt64: LeftAnchor] = [:]
    /// Round-trip times of the left anchor's messages (one estimator for all its peers: they share the load).
    public private(set) var clock = RetransmitClock()
    private var rightAnchors: [UInt64: RightAnchor] = [:]
    private var oldBoxes: [UInt64: OldBox] = [:]
    private var newBoxes: [UInt64: NewBox] = [:]
    private var controllers: [UInt64: Controller] = [:]
    /// Results of finished reconfigurations this agent led, for duplicate triggers (bounded).
    private var finished: [UInt64: (UInt32, TriggerResult)] = [:]
    /// Requests that ended here (cancelled, or the old path torn down), per session (bounded): a late or
    /// duplicated requestLock of one of them must not lock the segment again for nobody.
    private var ended: [UInt64: Set<UInt32>] = [:]
    /// Requests refused here or further right (nackLock), per session (bounded): a late duplicate of one is
    /// refused again instead of locking the segment for a left anchor that has given up (found by the Spin
    /// model, docs/VERIFICATION.md).
    private var refusedRequests: [UInt64: Set<UInt32>] = [:]

    public init(settings: Settings = Settings()) { self.settings = settings }

    /// Chain ids of sessions this agent is reconfiguring in any role (the shell shows them in `sessions`).
    public func role(of chainID: UInt64) -> [Role] {
        var roles: [Role] = []
        if controllers[chainID] != nil { roles.append(.controller) }
        if leftAnchors[chainID] != nil { roles.append(.leftAnchor) }
        if rightAnchors[chainID] != nil { roles.append(.rightAnchor) }
        if oldBoxes[chainID] != nil { roles.append(.oldBox) }
        if newBoxes[chainID] != nil { roles.append(.newBox) }
        return roles
    }

    /// The step a left anchor is at (nil if this agent is not one for the session).
    public func leftAnchorStep(_ chainID: UInt64) -> MigrationStep? { leftAnchors[chainID]?.step }

    public var isIdle: Bool {
        leftAnchors.isEmpty && rightAnchors.isEmpty && oldBoxes.isEmpty && newBoxes.isEmpty && controllers.isEmpty
    }

    // MARK: - Dispatch

    public mutating func handle(_ event: Event, now: UInt64) -> [Action] {
        var out: [Action] = []
        switch event {
        case .replaceRequested(let context, let trigger, let leftAnchor, let requestID):
            startController(context, trigger: trigger, leftAnchor: leftAnchor, requestID: requestID, now: now, &out)
        case .message(let message, let from, let context):
            receive(message, from: from, context: context, now: now, &out)
        case .timer(let key):
            timerFired(key, now: now, &out)
        case .drained(let chainID):
            if leftAnchors[chainID] != nil {
                leftAnchors[chainID]!.selfDrained = true
                leftAnchorAdvance(chainID, now: now, &out)
            } else if var r = rightAnchors[chainID] {
                r.drained = true
                rightAnchors[chainID] = r
                if r.drainRequested { out.append(.send(r.reply(.drained), to: r.leftAnchor)) }
            }
        case .newPathPacket(let chainID):
            if leftAnchors[chainID] != nil { leftAnchorProbeSeen(chainID, now: now, &out) }
            else if rightAnchors[chainID] != nil { rightAnchorProbeSeen(chainID, &out) }
        case .bufferFull(let chainID):
            if leftAnchors[chainID] != nil {
                cancel(chainID, step: leftAnchors[chainID]!.step, reason: "anchor buffer full at the left anchor", now: now, &out)
            }
        case .pathOpened(let chainID, let subsession):
            pathOpened(chainID, subsession: subsession, now: now, &out)
        case .pathRefused(let chainID, let reason):
            pathRefused(chainID, reason: reason, now: now, &out)
        case .stateExported(let chainID, let requestID, let result, let micros):
            stateExported(chainID, requestID: requestID, result, micros: micros, &out)
        case .stateImported(let chainID, let requestID, let result, let micros):
            stateImported(chainID, requestID: requestID, result, micros: micros, &out)
        }
        return out
    }

    private mutating func receive(_ m: ControlMessage, from: IPv4Address, context: SessionContext?, now: UInt64,
                                  _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if let r = rightAnchors[chainID], r.requestID == m.requestID {
            // The left anchor is alive: the right anchor's silence timer starts again.
            out.append(.setTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline),
                                 afterNanoseconds: settings.rightAnchorSilence))
        }
        switch m.body {
        case .trigger(let trigger):
            receiveTrigger(m, trigger: trigger, from: from, context: context, now: now, &out)
        case .triggerResult(let result):
            guard let c = controllers[chainID], c.requestID == m.requestID else { return }
            controllers[chainID] = nil
            out.append(.cancelTimer(TimerKey(chainID: chainID, role: .controller, kind: .retransmit)))
            out.append(.report(chainID: chainID, requestID: m.requestID, result))
        case .requestLock(let rightDelta):
            guard let context else { return }
            receiveRequestLock(m, rightDelta: rightDelta, context: context, &out)
        case .ackLock(let leftDelta, let rightDelta):
            guard let context else { return }
            receiveAckLock(m, leftDelta: leftDelta, rightDelta: rightDelta, context: context, now: now, &out)
        case .nackLock(let reason):
            guard let context else { return }
            receiveNackLock(m, reason: reason, context: context, now: now, &out)
        case .cancelLock:
            guard let context else { return }
            receiveCancelLock(m, from: from, context: context, &out)
        case .ackCancel:
            guard let context else { return }
            receiveAckCancel(m, context: context, now: now, &out)
        case .newPathSyn(let subsession, let remaining):
            receiveNewPathSyn(m, subsession: subsession, remaining: remaining, from: from, context: context, &out)
        case .newPathSynAck(let subsession):
            receiveNewPathSynAck(m, subsession: subsession, context: context, now: now, &out)
        case .newPathCancel:
            if newBoxes.removeValue(forKey: chainID) != nil || context != nil {
                out.append(.removeSession(chainID: chainID, deleteConntrack: true))
            }
            out.append(.send(m.answer(.newPathCancelAck), to: from))
        case .newPathCancelAck:
            leftAnchors[chainID]?.cancelAcks.insert(from)
            leftAnchorCancelProgress(chainID, now: now, &out)
        case .newPathRefused(let reason):
            // A hop of the new path cannot take the session (issue 20): cancel now, with its reason, instead of
            // retransmitting newPathSyn until the deadline.
            guard let l = leftAnchors[chainID], l.requestID == m.requestID, l.step == .newPath, l.cancelling == nil else { return }
            answered(chainID, now: now, &out)
            cancel(chainID, step: .newPath, reason: "new path refused by \(from): \(reason)", now: now, &out)
        case .drainStart(let stateful):
            receiveDrainStart(m, stateful: stateful, from: from, &out)
        case .drained:
            guard leftAnchors[chainID]?.requestID == m.requestID else { return }
            leftAnchors[chainID]!.peerDrained = true
            leftAnchorAdvance(chainID, now: now, &out)
        case .stateRequest(let newBox):
            receiveStateRequest(m, newBox: newBox, from: from, context: context, &out)
        case .statePut(let document):
            receiveStatePut(m, document: document, from: from, &out)
        case .stateInstalled(let ok, let times, let reason):
            receiveStateInstalled(m, ok: ok, times: times, reason: reason, from: from, now: now, &out)
        case .oldPathFin:
            guard let context else { return }
            receiveOldPathFin(m, from: from, context: context, &out)
        case .oldPathFinAck:
            guard let context else { return }
            receiveOldPathFinAck(m, context: context, now: now, &out)
        }
    }

    // MARK: - Controller (§3.1: the trigger)

    private struct Controller: Sendable {
        var requestID: UInt32
        var message: ControlMessage
        var leftAnchor: IPv4Address
        var tries = 1
        var delay: UInt64
        var giveUpAt: UInt64
        var deadline: UInt64
    }

    private mutating func startController(_ context: SessionContext, trigger: Trigger, leftAnchor: IPv4Address,
                                          requestID: UInt32, now: UInt64, _ out: inout [Action]) {
        let chainID = context.identity.chainID
        if let existing = controllers[chainID] {
            // A reconfiguration this agent already asked for is under way: refuse the second one here.
            out.append(.report(chainID: chainID, requestID: requestID, TriggerResult(
                outcome: .refused, reason: "a reconfiguration of this session (request \(existing.requestID)) is already under way from this agent",
                failedStep: .lock)))
            return
        }
        let message = ControlMessage(identity: context.identity, requestID: requestID, session: context.session,
                                     leftAnchor: leftAnchor, rightAnchor: trigger.newPath.last ?? leftAnchor,
                                     body: .trigger(trigger))
        let giveUp = now &+ UInt64(trigger.deadlineMilliseconds) * 1_000_000 &+ settings.controllerGrace
        let first = 2 * clock.timeout(settings, active: controllers.count + 1)
        controllers[chainID] = Controller(requestID: requestID, message: message, leftAnchor: leftAnchor,
                                          delay: first * 2, giveUpAt: giveUp,
                                          deadline: UInt64(trigger.deadlineMilliseconds) * 1_000_000)
        out.append(.send(message, to: leftAnchor))
        out.append(.setTimer(TimerKey(chainID: chainID, role: .controller, kind: .retransmit), afterNanoseconds: first))
    }

    // MARK: - Left anchor

    private struct LeftAnchor: Sendable {
        var requestID: UInt32
        var context: SessionContext
        var trigger: Trigger
        var controller: IPv4Address
        var step: MigrationStep = .lock
        var startedAt: UInt64
        var phaseEnds: [UInt32] = []
        var newPathSynSentAt: UInt64?
        var exportMicros: UInt32 = 0
        var importMicros: UInt32 = 0
        /// The message being retransmitted, where to, how often so far, and the next delay.
        var outstanding: (ControlMessage, IPv4Address)?
        var tries = 0
        var delay: UInt64 = 0
        /// When the outstanding message was first sent (for the RTT sample of its answer, Karn's rule).
        var sentAt: UInt64 = 0
        var newSubsession: FiveTuple?
        var selfDrained = false
        var peerDrained = false
        var promoted = false
        var released = false
        /// Cancelling: why, at which step, and which hops acknowledged.
        var cancelling: (step: MigrationStep, reason: String)?
        var cancelAcked = false
        var cancelAcks: Set<IPv4Address> = []
        var oldRight: IPv4Address

        var rightAnchor: IPv4Address { trigger.newPath.last! }
        var newMiddleboxes: [IPv4Address] { Array(trigger.newPath.dropLast()) }

        func message(_ body: ControlBody) -> ControlMessage {
            ControlMessage(identity: context.identity, requestID: requestID, session: context.session,
                           leftAnchor: context.me, rightAnchor: rightAnchor, body: body)
        }
    }

    private mutating func receiveTrigger(_ m: ControlMessage, trigger: Trigger, from: IPv4Address,
                                         context: SessionContext?, now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        func refuse(_ reason: String, step: MigrationStep = .lock) {
            let result = TriggerResult(outcome: .refused, reason: reason, failedStep: step)
            out.append(.send(m.answer(.triggerResult(result)), to: from))
        }
        if let (requestID, result) = finished[chainID], requestID == m.requestID {
            out.append(.send(m.answer(.triggerResult(result)), to: from))
            return
        }
        if let l = leftAnchors[chainID] {
            if l.requestID != m.requestID {
                refuse("the session is being reconfigured already (request \(l.requestID), at step \(l.step.rawValue))")
            }
            return  // a retransmitted trigger of the running reconfiguration
        }
        guard let context else { refuse("this agent does not know the session"); return }
        guard let oldRight = context.rightNeighbour else { refuse("this agent has no right subsession to reconfigure"); return }
        guard !trigger.newPath.isEmpty, !trigger.newPath.contains(context.me), !trigger.newPath.dropLast().contains(oldRight) else {
            refuse("the new path \(trigger.newPath) is not a replacement of the old one")
            return
        }
        var lock = locks[chainID] ?? SegmentLock()
        let request = LockRequest(requestID: m.requestID, leftAnchor: context.me, rightAnchor: trigger.newPath.last!)
        guard case .forward = lock.request(request) else {
            refuse("the segment is locked by another reconfiguration (§3.2)")
            return
        }
        locks[chainID] = lock
        var l = LeftAnchor(requestID: m.requestID, context: context, trigger: trigger, controller: from,
                           startedAt: now, oldRight: oldRight)
        l.outstanding = (l.message(.requestLock(rightDelta: 0)), oldRight)
        leftAnchors[chainID] = l
        out.append(.hold(chainID: chainID, side: .right, stateful: trigger.stateful))
        out.append(.setTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .deadline),
                             afterNanoseconds: UInt64(trigger.deadlineMilliseconds) * 1_000_000))
        sendOutstanding(chainID, fresh: true, now: now, &out)
    }

    /// Sends (or re-sends) the left anchor's outstanding message and arms the retransmission timer.
    private mutating func sendOutstanding(_ chainID: UInt64, fresh: Bool, now: UInt64, _ out: inout [Action]) {
        guard var l = leftAnchors[chainID], let (message, to) = l.outstanding else { return }
        if fresh {
            l.tries = 0
            l.delay = clock.timeout(settings, active: leftAnchors.count)
            l.sentAt = now
        }
        l.tries += 1
        out.append(.send(message, to: to))
        out.append(.setTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit), afterNanoseconds: l.delay))
        l.delay = clock.backoff(l.delay, settings, active: leftAnchors.count)
        leftAnchors[chainID] = l
    }

    /// The answer to the left anchor's outstanding message arrived: an RTT sample if it was sent once.
    private mutating func answered(_ chainID: UInt64, now: UInt64, _ out: inout [Action]) {
        if let l = leftAnchors[chainID], l.outstanding != nil, l.tries == 1, now > l.sentAt {
            clock.sample(now - l.sentAt)
        }
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit)))
    }

    private mutating func mark(_ chainID: UInt64, now: UInt64) {
        guard var l = leftAnchors[chainID] else { return }
        l.phaseEnds.append(UInt32(clamping: (now &- l.startedAt) / 1000))
        leftAnchors[chainID] = l
    }

    private mutating func leftAnchorLocked(_ chainID: UInt64, leftDelta: Int32, now: UInt64, _ out: inout [Action]) {
        guard var l = leftAnchors[chainID], l.step == .lock, l.cancelling == nil else { return }
        answered(chainID, now: now, &out)
        mark(chainID, now: now)
        l = leftAnchors[chainID]!
        l.step = .newPath
        l.outstanding = nil
        leftAnchors[chainID] = l
        if leftDelta != 0 { out.append(.setDelta(chainID: chainID, leftDelta)) }
        out.append(.openPath(chainID: chainID, next: l.trigger.newPath[0]))
    }

    private mutating func leftAnchorAdvance(_ chainID: UInt64, now: UInt64, _ out: inout [Action]) {
        guard var l = leftAnchors[chainID], l.step == .drain, l.cancelling == nil, l.selfDrained, l.peerDrained else { return }
        mark(chainID, now: now)
        l = leftAnchors[chainID]!
        // No RTT sample: the drain's answer waits for the data, not the network.
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit)))
        if l.trigger.stateful {
            l.step = .state
            l.outstanding = (l.message(.stateRequest(newBox: l.trigger.newPath[0])), l.trigger.oldBox)
            leftAnchors[chainID] = l
            sendOutstanding(chainID, fresh: true, now: now, &out)
        } else {
            // Stateless: both directions drained: the old path is no longer needed (§3.5).
            l.phaseEnds.append(l.phaseEnds.last ?? 0)  // no state step: as the drain
            l.phaseEnds.append(l.phaseEnds[1])  // new data used the new path once it was up
            l.released = true
            leftAnchors[chainID] = l
            startTeardown(chainID, now: now, &out)
        }
    }

    private mutating func leftAnchorProbeSeen(_ chainID: UInt64, now: UInt64, _ out: inout [Action]) {
        guard var l = leftAnchors[chainID], l.step == .release, l.cancelling == nil, !l.released else { return }
        // The right anchor's probe came back through the new box: answer with a last probe (so the new
        // firewall has seen each side after the other), then release our buffer on the new path.
        l.released = true
        leftAnchors[chainID] = l
        mark(chainID, now: now)
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit)))
        out.append(.sendProbe(chainID: chainID))
        out.append(.setPhase(chainID: chainID, .released))
        out.append(.releaseBuffer(chainID: chainID))
        startTeardown(chainID, now: now, &out)
    }

    private mutating func startTeardown(_ chainID: UInt64, now: UInt64, _ out: inout [Action]) {
        guard var l = leftAnchors[chainID] else { return }
        l.step = .teardown
        l.outstanding = (l.message(.oldPathFin), l.oldRight)
        leftAnchors[chainID] = l
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .deadline)))
        sendOutstanding(chainID, fresh: true, now: now, &out)
    }

    private mutating func finishLeftAnchor(_ chainID: UInt64, result: TriggerResult, _ out: inout [Action]) {
        guard let l = leftAnchors.removeValue(forKey: chainID) else { return }
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit)))
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .deadline)))
        if finished.count > 4096 { finished.removeAll(keepingCapacity: true) }
        finished[chainID] = (l.requestID, result)
        let message = ControlMessage(identity: l.context.identity, requestID: l.requestID, session: l.context.session,
                                     leftAnchor: l.context.me, rightAnchor: l.rightAnchor, body: .triggerResult(result))
        out.append(.send(message, to: l.controller))
    }

    private func result(_ l: LeftAnchor, now: UInt64) -> PhaseTimes {
        // Phase ends (µs since the trigger): lock, new path, drain, state, release, teardown (a step that did not
        // run ends with the one before it); the export and import durations reported by the boxes, and the
        // paper's measure (new-path SYN sent → new path used).
        var times = PhaseTimes(exportMicroseconds: l.exportMicros, importMicroseconds: l.importMicros)
        var last: UInt32 = 0
        for (index, step) in MigrationStep.allCases.enumerated() {
            if index < l.phaseEnds.count { last = l.phaseEnds[index] }
            times.setEnd(of: step, last)
        }
        let releaseEnd = UInt64(times.releaseEnd)
        let synSent = l.newPathSynSentAt.map { ($0 &- l.startedAt) / 1000 } ?? 0
        times.newPathSynToUse = UInt32(clamping: releaseEnd &- min(synSent, releaseEnd))
        return times
    }

    // MARK: - Cancel (§3.6)

    private mutating func cancel(_ chainID: UInt64, step: MigrationStep, reason: String, now: UInt64,
                                 _ out: inout [Action]) {
        guard var l = leftAnchors[chainID], l.cancelling == nil else { return }
        guard !l.released else { return }  // data already on the new path: teardown goes on
        l.cancelling = (step, reason)
        l.outstanding = (l.message(.cancelLock(reason: String(reason.utf8.prefix(200)) ?? "")), l.oldRight)
        leftAnchors[chainID] = l
        out.append(.cancelTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .deadline)))
        // Back on the old path at once: nothing waits for the cancel handshake.
        out.append(.cancelAnchor(chainID: chainID))
        for hop in l.newMiddleboxes where step != .lock {
            out.append(.send(l.message(.newPathCancel), to: hop))
        }
        sendOutstanding(chainID, fresh: true, now: now, &out)
    }

    private mutating func leftAnchorCancelProgress(_ chainID: UInt64, now: UInt64, _ out: inout [Action]) {
        guard let l = leftAnchors[chainID], let (step, reason) = l.cancelling, l.cancelAcked else { return }
        if let request = locks[chainID]?.owner, request == l.requestID { _ = locks[chainID]!.release(request) }
        cleanupLock(chainID)
        finishLeftAnchor(chainID, result: TriggerResult(outcome: .cancelled, reason: reason, failedStep: step,
                                                        phases: result(l, now: now)), &out)
    }

    // MARK: - Lock messages along the old path (§3.2)

    private mutating func receiveRequestLock(_ m: ControlMessage, rightDelta: Int32, context: SessionContext,
                                             _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard let left = context.leftNeighbour else { return }
        if ended[chainID]?.contains(m.requestID) == true { return }  // a stale copy: its left anchor is done with it
        if refusedRequests[chainID]?.contains(m.requestID) == true {
            out.append(.send(m.answer(.nackLock(reason: .contention)), to: left))  // refused before: again
            return
        }
        if m.rightAnchor == context.me {
            // The right anchor: nothing to lock to its right; it takes part from now on (§3.1).
            if rightAnchors[chainID] == nil || rightAnchors[chainID]!.requestID != m.requestID {
                if let r = rightAnchors[chainID] {
                    // A different request while one is under way: refuse it (its left anchor retries later).
                    _ = r
                    out.append(.send(m.answer(.nackLock(reason: .contention)), to: left))
                    return
                }
                rightAnchors[chainID] = RightAnchor(requestID: m.requestID, identity: m.identity, session: m.session,
                                                    leftAnchor: m.leftAnchor, rightAnchor: context.me)
                out.append(.hold(chainID: chainID, side: .left, stateful: true))
                out.append(.setTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline),
                                     afterNanoseconds: settings.rightAnchorSilence))
                if rightDelta != 0 { out.append(.setDelta(chainID: chainID, rightDelta)) }
            }
            out.append(.send(m.answer(.ackLock(leftDelta: 0, rightDelta: rightDelta)), to: left))
            return
        }
        guard let right = context.rightNeighbour else {
            out.append(.send(m.answer(.nackLock(reason: .notOnPath)), to: left))
            return
        }
        var lock = locks[chainID] ?? SegmentLock()
        let decision = lock.request(LockRequest(requestID: m.requestID, leftAnchor: m.leftAnchor,
                                                rightAnchor: m.rightAnchor, rightDelta: rightDelta))
        locks[chainID] = lock
        switch decision {
        case .forward, .forwardDuplicate:
            // This agent's middlebox adds its delta (zero: the agent knows of no byte-stream change).
            out.append(.send(m.with(body: .requestLock(rightDelta: rightDelta)), to: right))
        case .ackAgain:
            out.append(.send(m.answer(.ackLock(leftDelta: 0, rightDelta: rightDelta)), to: left))
        case .held:
            break
        case .refuse:
            rememberRefusal(chainID, m.requestID)
            out.append(.send(m.answer(.nackLock(reason: .contention)), to: left))
        }
    }

    private mutating func receiveAckLock(_ m: ControlMessage, leftDelta: Int32, rightDelta: Int32,
                                         context: SessionContext, now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard var lock = locks[chainID] else { return }
        let outcome = lock.acknowledged(m.requestID)
        locks[chainID] = lock
        guard outcome.matched else { return }
        if let refused = outcome.refuse, let left = context.leftNeighbour {
            rememberRefusal(chainID, refused.requestID)
            out.append(.send(lockMessage(m, refused, body: .nackLock(reason: .contention)), to: left))
        }
        if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
            leftAnchorLocked(chainID, leftDelta: leftDelta, now: now, &out)
        } else if let left = context.leftNeighbour {
            out.append(.send(m.with(body: .ackLock(leftDelta: leftDelta, rightDelta: rightDelta)), to: left))
        }
    }

    private mutating func receiveNackLock(_ m: ControlMessage, reason: NackReason, context: SessionContext, now: UInt64,
                                          _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard var lock = locks[chainID] else { return }
        let outcome = lock.refused(m.requestID)
        locks[chainID] = lock
        guard outcome.matched else { return }
        rememberRefusal(chainID, m.requestID)
        if let forward = outcome.forward, let right = context.rightNeighbour {
            out.append(.send(lockMessage(m, forward, body: .requestLock(rightDelta: forward.rightDelta)), to: right))
        }
        if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
            cleanupLock(chainID)
            out.append(.cancelAnchor(chainID: chainID))
            let l = leftAnchors[chainID]!
            finishLeftAnchor(chainID, result: TriggerResult(
                outcome: .refused, reason: reason == .contention
                    ? "lock refused (\(reason)): another reconfiguration holds part of the segment (§3.2)"
                    : "lock refused (\(reason)) on the old path (§3.2)",
                failedStep: MigrationStep.lock, phases: result(l, now: now)), &out)
        } else if let left = context.leftNeighbour {
            out.append(.send(m, to: left))
        }
        cleanupLock(chainID)
    }

    private mutating func receiveCancelLock(_ m: ControlMessage, from: IPv4Address, context: SessionContext,
                                            _ out: inout [Action]) {
        let chainID = m.identity.chainID
        endRequest(chainID, m.requestID)
        if m.rightAnchor == context.me {
            if let r = rightAnchors[chainID], r.requestID == m.requestID {
                rightAnchors[chainID] = nil
                out.append(.cancelTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline)))
                out.append(.cancelAnchor(chainID: chainID))
            }
            out.append(.send(m.answer(.ackCancel), to: from))
            return
        }
        var lock = locks[chainID] ?? SegmentLock()
        if lock.withdraw(m.requestID) {
            // The request waited here (§3.2) and went no further: the cancel ends here too.
            locks[chainID] = lock
            out.append(.send(m.answer(.ackCancel), to: from))
            return
        }
        guard lock.owner == m.requestID else {
            // The request never reached this agent, or its cancel passed here already and was lost further
            // right: pass it on, only the right anchor's ackCancel shows that every agent has it (§3.6).
            if let right = context.rightNeighbour { out.append(.send(m, to: right)) }
            else { out.append(.send(m.answer(.ackCancel), to: from)) }
            return
        }
        let outcome = lock.release(m.requestID)
        locks[chainID] = lock
        oldBoxes[chainID] = nil
        if let forward = outcome.forward, let right = context.rightNeighbour {
            out.append(.send(lockMessage(m, forward, body: .requestLock(rightDelta: forward.rightDelta)), to: right))
        }
        cleanupLock(chainID)
        if let right = context.rightNeighbour { out.append(.send(m, to: right)) }
    }

    private mutating func receiveAckCancel(_ m: ControlMessage, context: SessionContext, now: UInt64,
                                           _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
            leftAnchors[chainID]!.cancelAcked = true
            leftAnchorCancelProgress(chainID, now: now, &out)
        } else if m.leftAnchor != context.me, let left = context.leftNeighbour {
            out.append(.send(m, to: left))
        }
    }

    private func lockMessage(_ m: ControlMessage, _ request: LockRequest, body: ControlBody) -> ControlMessage {
        ControlMessage(identity: m.identity, requestID: request.requestID, session: m.session,
                       leftAnchor: request.leftAnchor, rightAnchor: request.rightAnchor, body: body)
    }

    private mutating func rememberRefusal(_ chainID: UInt64, _ requestID: UInt32) {
        if refusedRequests.count > 4096 { refusedRequests.removeAll(keepingCapacity: true) }
        refusedRequests[chainID, default: []].insert(requestID)
    }

    private mutating func endRequest(_ chainID: UInt64, _ requestID: UInt32) {
        if ended.count > 4096 { ended.removeAll(keepingCapacity: true) }
        ended[chainID, default: []].insert(requestID)
    }

    private mutating func cleanupLock(_ chainID: UInt64) {
        if locks[chainID]?.isUnlocked == true { locks[chainID] = nil }
    }

    // MARK: - New path (§3.1)

    private struct NewBox: Sendable {
        var requestID: UInt32
        var left: FiveTuple
        var right: FiveTuple?
        var next: IPv4Address
        var remaining: [IPv4Address]
        var message: ControlMessage
        var imported: (ok: Bool, reason: String, micros: UInt32)?
        var importing = false
        var oldBox: IPv4Address?
        /// The new path's answer (newPathSynAck) came back through this box: its session is on a path in use.
        var answered = false
    }

    private mutating func pathOpened(_ chainID: UInt64, subsession: FiveTuple, now: UInt64, _ out: inout [Action]) {
        if var l = leftAnchors[chainID], l.step == .newPath, l.cancelling == nil {
            l.newSubsession = subsession
            l.newPathSynSentAt = l.newPathSynSentAt ?? now
            l.outstanding = (l.message(.newPathSyn(subsession: subsession, remaining: Array(l.trigger.newPath.dropFirst()))),
                             l.trigger.newPath[0])
            leftAnchors[chainID] = l
            sendOutstanding(chainID, fresh: true, now: now, &out)
        } else if var n = newBoxes[chainID], n.right == nil {
            n.right = subsession
            newBoxes[chainID] = n
            out.append(.send(n.message.with(body: .newPathSyn(subsession: subsession, remaining: Array(n.remaining.dropFirst()))),
                             to: n.next))
        } else if var r = rightAnchors[chainID], let pending = r.pendingSyn {
            r.newLeft = subsession
            r.pendingSyn = nil
            rightAnchors[chainID] = r
            out.append(.send(pending.message.answer(.newPathSynAck(subsession: subsession)), to: pending.from))
        }
    }

    private mutating func pathRefused(_ chainID: UInt64, reason: String, now: UInt64, _ out: inout [Action]) {
        if let l = leftAnchors[chainID], l.step == .newPath {
            cancel(chainID, step: .newPath, reason: "new path: \(reason)", now: now, &out)
        } else if let n = newBoxes.removeValue(forKey: chainID) {
            // Say why (issue 20): the left anchor cancels at once instead of retransmitting until its deadline.
            out.append(.cancelTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline)))
            out.append(.send(n.message.answer(.newPathRefused(reason: "new box: \(reason)")), to: n.message.leftAnchor))
        } else if var r = rightAnchors[chainID] {
            if let pending = r.pendingSyn {
                out.append(.send(pending.message.answer(.newPathRefused(reason: "right anchor: \(reason)")),
                                 to: pending.message.leftAnchor))
            }
            r.pendingSyn = nil
            rightAnchors[chainID] = r
        }
    }

    private mutating func receiveNewPathSyn(_ m: ControlMessage, subsession: FiveTuple, remaining: [IPv4Address],
                                            from: IPv4Address, context: SessionContext?, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard subsession.srcAddr == from else { return }  // the sender names its own subsession
        func refuse(_ reason: String) {
            // Issue 20: a hop that cannot take the session says why, to the left anchor (which cancels at once).
            out.append(.send(m.answer(.newPathRefused(reason: reason)), to: m.leftAnchor))
        }
        if remaining.isEmpty {
            // The right anchor: the new path's last subsession ends here.
            guard m.rightAnchor == subsession.dstAddr else { return }
            guard var r = rightAnchors[chainID], r.requestID == m.requestID else {
                if ended[chainID]?.contains(m.requestID) == true { return }  // a late copy of a finished request
                refuse(context == nil ? "the right anchor does not know the session"
                                      : "the right anchor is not locked for request \(m.requestID)")
                return
            }
            if let installed = r.newLeft {
                if installed == subsession { out.append(.send(m.answer(.newPathSynAck(subsession: installed)), to: from)) }
                return
            }
            r.pendingSyn = (m, from)
            rightAnchors[chainID] = r
            out.append(.addPath(chainID: chainID, subsession: subsession))
            return
        }
        // A new middlebox.
        var halfMade = false
        if let n = newBoxes[chainID] {
            if n.requestID == m.requestID {
                guard n.left == subsession else { return }
                if let right = n.right {
                    out.append(.send(m.with(body: .newPathSyn(subsession: right, remaining: Array(remaining.dropFirst()))),
                                     to: remaining[0]))
                }
                return
            }
            if let context {
                // A left anchor runs one request per session at a time: another request of the same left anchor
                // means that one is over. If its new path was never answered through this box, or carried
                // nothing here but the anchors' probes (the left anchor gave up at its deadline, e.g. while this
                // box's agent was stopped: the late SYN made the session afterwards, or the cancel came too late
                // to be fresh), the half-made session carries nothing: it goes, and this request takes its place
                // (DrainTests (c): it refused the second drain for the new box's linger). A session that carried
                // data here is on a path in use: refused.
                guard !n.answered || !context.carried, n.message.leftAnchor == m.leftAnchor else {
                    refuse("this box is on the session's path already (new box of request \(n.requestID))")
                    return
                }
                halfMade = true
            }
            // Otherwise this box was the new box of an earlier request and has left the session since (it was
            // replaced in turn, or that request was cancelled): that role is over. Keeping it silenced every later
            // new path through this box for the new box's linger (issue 20: fw1 → fw2 → fw1 → fw2 cancelled at
            // new-path).
            newBoxes[chainID] = nil
            out.append(.cancelTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline)))
            if halfMade { out.append(.removeSession(chainID: chainID, deleteConntrack: false)) }
        }
        guard context == nil || halfMade else {
            refuse("this box is on the session's path already")
            return
        }
        newBoxes[chainID] = NewBox(requestID: m.requestID, left: subsession, right: nil, next: remaining[0],
                                   remaining: remaining, message: m)
        out.append(.setTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline), afterNanoseconds: settings.newBoxLinger))
        out.append(.createSession(m.identity, session: m.session, left: subsession, next: remaining[0]))
    }

    private mutating func receiveNewPathSynAck(_ m: ControlMessage, subsession: FiveTuple, context: SessionContext?,
                                               now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if var l = leftAnchors[chainID], l.requestID == m.requestID {
            guard l.step == .newPath, l.cancelling == nil, let mine = l.newSubsession else { return }
            _ = mine
            answered(chainID, now: now, &out)
            mark(chainID, now: now)
            l = leftAnchors[chainID]!
            l.step = .drain
            l.outstanding = (l.message(.drainStart(stateful: l.trigger.stateful)), l.rightAnchor)
            if !l.trigger.stateful { l.promoted = true }
            leftAnchors[chainID] = l
            if l.trigger.stateful {
                out.append(.setPhase(chainID: chainID, .buffering))
            } else {
                // Stateless (§3.5): new data on the new path from now on; old bytes stay on the old one.
                out.append(.promote(chainID: chainID))
                out.append(.setPhase(chainID: chainID, .released))
            }
            sendOutstanding(chainID, fresh: true, now: now, &out)
        } else if var n = newBoxes[chainID], n.requestID == m.requestID, subsession == n.right {
            n.answered = true
            newBoxes[chainID] = n
            out.append(.markEstablished(chainID: chainID))
            out.append(.send(m.answer(.newPathSynAck(subsession: n.left)), to: n.left.srcAddr))
        }
    }

    // MARK: - Right anchor

    private struct RightAnchor: Sendable {
        var requestID: UInt32
        var identity: SessionIdentity
        var session: FiveTuple
        var leftAnchor: IPv4Address
        var rightAnchor: IPv4Address
        var newLeft: FiveTuple?
        var pendingSyn: (message: ControlMessage, from: IPv4Address)?
        var drainRequested = false
        var stateful = true
        var drained = false
        var probesSeen = 0
        var released = false

        func reply(_ body: ControlBody) -> ControlMessage {
            ControlMessage(identity: identity, requestID: requestID, session: session, leftAnchor: leftAnchor,
                           rightAnchor: rightAnchor, body: body)
        }
    }

    private mutating func receiveDrainStart(_ m: ControlMessage, stateful: Bool, from: IPv4Address, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard var r = rightAnchors[chainID], r.requestID == m.requestID, r.newLeft != nil else { return }
        if !r.drainRequested {
            r.drainRequested = true
            r.stateful = stateful
            if stateful {
                out.append(.setPhase(chainID: chainID, .buffering))
            } else {
                out.append(.promote(chainID: chainID))
                out.append(.setPhase(chainID: chainID, .released))
                r.released = true
            }
        }
        rightAnchors[chainID] = r
        if r.drained { out.append(.send(r.reply(.drained), to: from)) }
    }

    private mutating func rightAnchorProbeSeen(_ chainID: UInt64, _ out: inout [Action]) {
        guard var r = rightAnchors[chainID], r.stateful, r.drainRequested, !r.released else { return }
        r.probesSeen += 1
        if r.probesSeen == 1 {
            // The left anchor's first probe: the state is installed. Switch egress and answer with our probe.
            out.append(.promote(chainID: chainID))
            out.append(.setPhase(chainID: chainID, .probing))
            out.append(.sendProbe(chainID: chainID))
        } else {
            // The left anchor saw our probe (its last probe or its data arrived): release our side.
            r.released = true
            out.append(.setPhase(chainID: chainID, .released))
            out.append(.releaseBuffer(chainID: chainID))
        }
        rightAnchors[chainID] = r
    }

    private mutating func receiveOldPathFin(_ m: ControlMessage, from: IPv4Address, context: SessionContext,
                                            _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if m.rightAnchor == context.me {
            endRequest(chainID, m.requestID)
            if var r = rightAnchors[chainID], r.requestID == m.requestID {
                if !r.released {
                    // Our probe's answer was lost, but the left anchor has released: so do we.
                    if r.probesSeen == 0 { out.append(.promote(chainID: chainID)) }
                    r.released = true
                    out.append(.setPhase(chainID: chainID, .released))
                    out.append(.releaseBuffer(chainID: chainID))
                }
                rightAnchors[chainID] = nil
                out.append(.cancelTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline)))
                out.append(.finishAnchor(chainID: chainID))
            }
            out.append(.send(m.answer(.oldPathFinAck), to: from))
            return
        }
        if let right = context.rightNeighbour { out.append(.send(m, to: right)) }
    }

    private mutating func receiveOldPathFinAck(_ m: ControlMessage, context: SessionContext, now: UInt64,
                                               _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if m.leftAnchor == context.me, let l = leftAnchors[chainID], l.requestID == m.requestID {
            guard l.step == .teardown else { return }
            mark(chainID, now: now)
            if var lock = locks[chainID] { _ = lock.release(m.requestID); locks[chainID] = lock }
            cleanupLock(chainID)
            out.append(.finishAnchor(chainID: chainID))
            let done = leftAnchors[chainID]!
            finishLeftAnchor(chainID, result: TriggerResult(outcome: .moved, reason: "", failedStep: nil,
                                                            phases: result(done, now: now)), &out)
            return
        }
        // An agent of the old path between the anchors: it leaves the session (its lock goes with it). Not the
        // left anchor itself (a duplicate after it finished): it stays on the session's (new) path.
        guard m.leftAnchor != context.me, let left = context.leftNeighbour else { return }
        locks[chainID] = nil
        oldBoxes[chainID] = nil
        if newBoxes.removeValue(forKey: chainID) != nil {
            // It joined the session as a new box of an earlier request: that role ends with the session here.
            out.append(.cancelTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline)))
        }
        out.append(.removeSession(chainID: chainID, deleteConntrack: true))
        out.append(.send(m, to: left))
    }

    // MARK: - State transfer (stateful, §3.5 last paragraph; §5.3)

    private struct OldBox: Sendable {
        var requestID: UInt32
        var leftAnchor: IPv4Address
        var newBox: IPv4Address
        var message: ControlMessage
        var document: [UInt8]?
        var exportMicros: UInt32 = 0
        var exporting = false
        var installed: (ok: Bool, reason: String)?
        var tries = 0
    }

    private mutating func receiveStateRequest(_ m: ControlMessage, newBox: IPv4Address, from: IPv4Address,
                                              context: SessionContext?, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard let context, from == m.leftAnchor, locks[chainID]?.owner == m.requestID else {
            out.append(.send(m.answer(.stateInstalled(ok: false, times: StateTimes(), reason: "stateRequest: this box is not locked for request \(m.requestID)")), to: from))
            return
        }
        _ = context
        if var o = oldBoxes[chainID], o.requestID == m.requestID {
            if let installed = o.installed {
                out.append(.send(m.answer(.stateInstalled(ok: installed.ok, times: StateTimes(exportMicroseconds: o.exportMicros), reason: installed.reason)), to: from))
            } else if let document = o.document {
                o.tries += 1
                oldBoxes[chainID] = o
                out.append(.send(m.with(body: .statePut(document: document)), to: o.newBox))
            }
            return
        }
        oldBoxes[chainID] = OldBox(requestID: m.requestID, leftAnchor: from, newBox: newBox, message: m, exporting: true)
        out.append(.exportState(chainID: chainID, requestID: m.requestID, session: m.session))
    }

    private mutating func stateExported(_ chainID: UInt64, requestID: UInt32, _ result: Result<[UInt8], StepFailure>,
                                        micros: UInt32, _ out: inout [Action]) {
        guard var o = oldBoxes[chainID], o.requestID == requestID, o.exporting else { return }
        o.exporting = false
        o.exportMicros = micros
        switch result {
        case .success(let document):
            o.document = document
            oldBoxes[chainID] = o
            out.append(.send(o.message.with(body: .statePut(document: document)), to: o.newBox))
        case .failure(let failure):
            o.installed = (false, "export at the old box failed: \(failure)")
            oldBoxes[chainID] = o
            out.append(.send(o.message.answer(.stateInstalled(ok: false, times: StateTimes(exportMicroseconds: micros), reason: o.installed!.reason)),
                             to: o.leftAnchor))
        }
    }

    private mutating func receiveStatePut(_ m: ControlMessage, document: [UInt8], from: IPv4Address, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard var n = newBoxes[chainID], n.requestID == m.requestID else {
            out.append(.send(m.answer(.stateInstalled(ok: false, times: StateTimes(), reason: "statePut: no new path of request \(m.requestID) at this box")), to: from))
            return
        }
        if let imported = n.imported {
            out.append(.send(m.answer(.stateInstalled(ok: imported.ok, times: StateTimes(importMicroseconds: imported.micros), reason: imported.reason)), to: from))
            return
        }
        n.oldBox = from
        guard !n.importing else { return }
        n.importing = true
        newBoxes[chainID] = n
        out.append(.importState(chainID: chainID, requestID: m.requestID, document: document))
    }

    private mutating func stateImported(_ chainID: UInt64, requestID: UInt32, _ result: Result<Void, StepFailure>,
                                        micros: UInt32, _ out: inout [Action]) {
        guard var n = newBoxes[chainID], n.requestID == requestID, n.importing, let oldBox = n.oldBox else { return }
        n.importing = false
        switch result {
        case .success: n.imported = (true, "", micros)
        case .failure(let failure): n.imported = (false, "import at the new box refused: \(failure)", micros)
        }
        newBoxes[chainID] = n
        let reply = n.message.answer(.stateInstalled(ok: n.imported!.ok, times: StateTimes(importMicroseconds: micros), reason: n.imported!.reason))
        out.append(.send(reply, to: oldBox))
    }

    private mutating func receiveStateInstalled(_ m: ControlMessage, ok: Bool, times: StateTimes, reason: String,
                                                from: IPv4Address, now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if var o = oldBoxes[chainID], o.requestID == m.requestID, from == o.newBox {
            // The new box answered the old one: pass it to the left anchor, with the export time.
            o.installed = (ok, reason)
            oldBoxes[chainID] = o
            let relayed = StateTimes(exportMicroseconds: o.exportMicros, importMicroseconds: times.importMicroseconds)
            out.append(.send(m.answer(.stateInstalled(ok: ok, times: relayed, reason: reason)),
                             to: o.leftAnchor))
            return
        }
        guard var l = leftAnchors[chainID], l.requestID == m.requestID, l.step == .state, l.cancelling == nil,
              from == l.trigger.oldBox else { return }
        let text = reason
        l.exportMicros = times.exportMicroseconds
        l.importMicros = times.importMicroseconds
        leftAnchors[chainID] = l
        answered(chainID, now: now, &out)
        guard ok else {
            cancel(chainID, step: .state, reason: text.isEmpty ? "state transfer failed" : text, now: now, &out)
            return
        }
        mark(chainID, now: now)
        l = leftAnchors[chainID]!
        l.step = .release
        l.promoted = true
        l.outstanding = nil
        leftAnchors[chainID] = l
        // Switch egress to the new path and open the new firewall's window tracking with a probe; our data
        // stays held until the right anchor's probe comes back (docs/ARCHITECTURE.md, "After the import").
        out.append(.promote(chainID: chainID))
        out.append(.setPhase(chainID: chainID, .probing))
        out.append(.sendProbe(chainID: chainID))
        let first = clock.timeout(settings, active: leftAnchors.count)
        out.append(.setTimer(TimerKey(chainID: chainID, role: .leftAnchor, kind: .retransmit), afterNanoseconds: first))
        leftAnchors[chainID]!.tries = 1
        leftAnchors[chainID]!.delay = clock.backoff(first, settings, active: leftAnchors.count)
    }

    // MARK: - Timers

    private mutating func timerFired(_ key: TimerKey, now: UInt64, _ out: inout [Action]) {
        let chainID = key.chainID
        switch (key.role, key.kind) {
        case (.newBox, _):
            newBoxes[chainID] = nil  // the session itself stays (it is on the new path, or expires by idleness)
        case (.rightAnchor, _):
            guard let r = rightAnchors[chainID] else { return }
            if r.released {
                out.append(.finishAnchor(chainID: chainID))  // data already flows on the new path
            } else {
                out.append(.cancelAnchor(chainID: chainID))
            }
            rightAnchors[chainID] = nil
        case (.controller, _):
            guard var c = controllers[chainID] else { return }
            if now >= c.giveUpAt {
                controllers[chainID] = nil
                out.append(.report(chainID: chainID, requestID: c.requestID, TriggerResult(
                    outcome: .cancelled, reason: "no result from the left anchor \(c.leftAnchor) within the deadline",
                    failedStep: .lock)))
                return
            }
            c.tries += 1
            out.append(.send(c.message, to: c.leftAnchor))
            out.append(.setTimer(key, afterNanoseconds: c.delay))
            // The left anchor answers only with the result: while it works, the trigger goes again at most
            // about four times per deadline.
            c.delay = min(c.delay * 2, max(settings.retransmitMax, c.deadline / 4))
            controllers[chainID] = c
        case (.leftAnchor, .deadline):
            guard let l = leftAnchors[chainID], l.cancelling == nil, !l.released else { return }
            var reason = "deadline of \(l.trigger.deadlineMilliseconds) ms passed during step \(l.step.rawValue)"
            if let (message, to) = l.outstanding {
                reason += ": no answer from \(to) to \(message.body.type) after \(l.tries) tries"
            } else if l.step == .release {
                reason += ": no probe came back on the new path after \(l.tries) probes"
            }
            cancel(chainID, step: l.step, reason: reason, now: now, &out)
        case (.leftAnchor, .retransmit):
            guard let l = leftAnchors[chainID] else { return }
            if l.step == .release, l.cancelling == nil, !l.released {
                // The probe (or the right anchor's answer to it) was lost, or could not be built yet (the anchor
                // is still eliciting its endpoint's numbers: issue 20): probe again until the deadline, which
                // cancels ("no probe came back on the new path after N probes").
                out.append(.sendProbe(chainID: chainID))
                out.append(.setTimer(key, afterNanoseconds: l.delay))
                leftAnchors[chainID]!.tries += 1
                leftAnchors[chainID]!.delay = clock.backoff(l.delay, settings, active: leftAnchors.count)
                return
            }
            guard let (message, to) = l.outstanding else { return }
            // Before the release the deadline decides when to give up (it cancels); after it, and while
            // cancelling, a bounded number of sends does.
            let bounded = l.cancelling != nil || l.step == .teardown
            if bounded, l.tries >= settings.maxTries {
                if l.cancelling != nil {
                    // The old path does not answer the cancel: the session is back on it here anyway.
                    leftAnchors[chainID]!.cancelAcked = true
                    leftAnchorCancelProgress(chainID, now: now, &out)
                } else if l.step == .teardown {
                    // Data already flows on the new path; the old path's agents expire the session by idleness.
                    if var lock = locks[chainID] { _ = lock.release(l.requestID); locks[chainID] = lock }
                    cleanupLock(chainID)
                    out.append(.finishAnchor(chainID: chainID))
                    finishLeftAnchor(chainID, result: TriggerResult(outcome: .moved, reason: "old path teardown unanswered by \(to)",
                                                                    failedStep: nil, phases: result(l, now: now)), &out)
                } else {
                    cancel(chainID, step: l.step, reason: "no answer from \(to) to \(message.body.type) after \(l.tries) tries", now: now, &out)
                }
                return
            }
            sendOutstanding(chainID, fresh: false, now: now, &out)
        default:
            break
        }
    }
}

extension ControlMessage {
    /// The same message with another body (forwarding along a path).
    public func with(body: ControlBody) -> ControlMessage {
        var copy = self
        copy.body = body
        return copy
    }

    /// An answer about the same request.
    public func answer(_ body: ControlBody) -> ControlMessage { with(body: body) }
}
