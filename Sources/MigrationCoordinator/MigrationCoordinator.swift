import DyscoCore

/// The reconfiguration protocol of paper §3 at one agent, as pure state machines: events in (control messages,
/// data-plane observations, timers, results of actions), actions out. No I/O, no clock: the agent shell
/// (DyscoAgent.MigrationEngine) performs the actions and feeds their results back as events.
///
/// This type is only the router: it keeps, per session (chain id), one state machine per role this agent plays
/// (docs/ARCHITECTURE.md, "Reconfiguration"), dispatches each event to the role it concerns and collects the
/// actions they return. The roles, one file each:
/// - ``Controller``: asked locally (`replace`) to move a session; sends `trigger` to the left anchor (§3.1) and
///   waits for its result;
/// - ``LeftAnchor`` (§2.3): drives everything: lock (§3.2), new path (§3.1), drain (§3.5), state transfer
///   (stateful), release, teardown, or cancel (§3.6); it alone keeps deadlines and retransmits end to end;
/// - ``OldPathHop`` (between the anchors, around ``SegmentLock``): forwards lock messages, keeps its subsession
///   lock (§3.2), leaves the session at teardown;
/// - ``OldBox``: exports the firewall's state when it is the box being replaced (§3.5);
/// - ``NewBox`` (on the new path): creates the session from the new-path SYN, imports the state;
/// - ``RightAnchor``: answers the lock, installs the new path's last subsession, buffers its side (stateful),
///   answers drainStart with drained, releases after the probes, drops the old path at teardown.
///
/// What the router keeps besides the roles: the shared ``RetransmitClock`` and the bounded memories of
/// finished, ended and refused requests (for duplicates). Handlers are idempotent: a duplicate gets the same
/// answer and changes nothing.
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
        /// Sends of the teardown (oldPathFin) or of the cancel's cancelLock before the left anchor gives up. More than
        /// ``maxTries``: nothing waits on them (the session has moved, or the reconfiguration has failed), but a
        /// give-up leaves the old path's records (teardown) or the segment's locks (cancel) behind, and those go only
        /// by idleness (`--idle-timeout`) or silence (``hopLockSilence``), refusing the session's next moves until
        /// then. 40 sends at the retransmission cap (100 ms) take about 4 s; under 30 % loss of every datagram a
        /// one-box teardown (four datagrams a round, 0.24 of them answered) then fails about twice in 100,000 moves
        /// (7 sends: one in 7, 25 sends: one in 1,000; issue 19's soak).
        public var endTries = 40
        /// How long the controller waits for the left anchor's result beyond the deadline: longer than a teardown
        /// or a cancel can take after it (``endTries`` sends at the retransmission cap, about 4 s).
        public var controllerGrace: UInt64 = 5_000_000_000
        /// The controller sends the trigger again at least this often while it waits (a quarter of the deadline
        /// otherwise): the left anchor's result of a finished reconfiguration is its answer to a repeated trigger.
        public var controllerRetransmitCap: UInt64 = 500_000_000
        /// How long a new box keeps its part of a reconfiguration (for retransmitted newPathSyn / statePut)
        /// before forgetting it: nothing tells a new box that the reconfiguration ended well.
        public var newBoxLinger: UInt64 = 60_000_000_000
        /// A right anchor whose left anchor falls silent (crashed, partitioned) gives up after this long without
        /// a message of the reconfiguration: it goes back to the old path (and reopens its endpoint's window).
        public var rightAnchorSilence: UInt64 = 10_000_000_000
        /// An agent of the old path between the anchors whose right-subsession lock (§3.2) is pending or locked for
        /// a request gives it up after this long without a message of that request (the left anchor crashed or
        /// was partitioned, issue 19): the segment is free for the next reconfiguration. Longer than a
        /// reconfiguration's silence at such an agent can last: between ackLock and the teardown it hears nothing
        /// (deadline, 3 s by default, plus the teardown's retransmissions, about 4 s with the defaults).
        /// docs/CONTROL-PROTOCOL.md, "Timers".
        public var hopLockSilence: UInt64 = 30_000_000_000
        public init() {}
    }

    public var settings: Settings
    /// Round-trip times of the left anchor's messages (one estimator for all its peers: they share the load).
    public private(set) var clock = RetransmitClock()
    private var controllers: [UInt64: Controller] = [:]
    private var leftAnchors: [UInt64: LeftAnchor] = [:]
    /// The lock of this agent's right subsession, per session (only while not unlocked).
    private var hops: [UInt64: OldPathHop] = [:]
    private var oldBoxes: [UInt64: OldBox] = [:]
    private var newBoxes: [UInt64: NewBox] = [:]
    private var rightAnchors: [UInt64: RightAnchor] = [:]
    /// Results of finished reconfigurations this agent led, for duplicate triggers (bounded).
    private var finished: [UInt64: (UInt32, TriggerResult)] = [:]
    /// Requests that ended here (cancelled, or the old path torn down), per session (bounded): a late or
    /// duplicated requestLock of one of them must not lock the segment again for nobody.
    private var ended: [UInt64: Set<UInt32>] = [:]
    /// Requests refused here or further right (nackLock), per session (bounded): a late duplicate of one is
    /// refused again instead of locking the segment for a left anchor that has given up (found by the Spin
    /// model, docs/VERIFICATION.md).
    private var refusedRequests: [UInt64: Set<UInt32>] = [:]
    /// Requests whose newPathCancel this agent handled as a new middlebox, per session (bounded, like the others):
    /// a late newPathSyn of one is refused (newPathRefused) instead of making the session again (issue 19).
    private var cancelledNewPaths: [UInt64: Set<UInt32>] = [:]
    /// Sessions whose lock here is held for another agent's left anchor, with its silence timer armed.
    private var hopTimers: Set<UInt64> = []
    /// Sessions this agent left as an old-path agent between the anchors at their teardown (§3.5), with the request
    /// and its neighbours there (bounded, like the others): a retransmitted oldPathFin, or the answer to it, still
    /// passes once the record is gone. The answer this agent passed on can be lost on its way left; without this the
    /// left anchor's next oldPathFin stopped here and the teardown went unanswered (issue 19's soak).
    private var leftSessions: [UInt64: (requestID: UInt32, left: IPAddress, right: IPAddress?)] = [:]

    public init(settings: Settings = Settings()) { self.settings = settings }

    /// The lock of this agent's right subsession, per session (chain id); unlocked ones are not kept.
    public var locks: [UInt64: SegmentLock] { hops.mapValues(\.lock) }

    /// The roles this agent plays in the reconfiguration of a session (the shell shows them in `sessions`).
    /// The request that holds this agent's old-path lock of the session (nil: unlocked, or not an old-path hop here).
    public func hopLockOwner(of chainID: UInt64) -> UInt32? { hops[chainID]?.owner }

    public func role(of chainID: UInt64) -> [Role] {
        var roles: [Role] = []
        if controllers[chainID] != nil { roles.append(.controller) }
        if leftAnchors[chainID] != nil { roles.append(.leftAnchor) }
        if rightAnchors[chainID] != nil { roles.append(.rightAnchor) }
        if oldBoxes[chainID] != nil { roles.append(.oldBox) }
        if newBoxes[chainID] != nil { roles.append(.newBox) }
        return roles
    }

    /// Whether this agent takes `m`, sent to its address `to`, though it has no record of the session: the kinds
    /// that make or end a role without one (``acceptsWithoutSession(_:)``), and the teardown it can still act on
    /// (§3.5, issue 19's soak): an oldPathFin to its right anchor (the session closed on the new path and its
    /// record lingered out), the oldPathFinAck of its own left anchor's request, and either of a request whose old
    /// path it left at an earlier copy's answer. Anything else for an unknown session is dropped (`unknown-session`).
    public func acceptsWithoutSession(_ m: ControlMessage, to: IPAddress?) -> Bool {
        if Self.acceptsWithoutSession(m.body) { return true }
        let chainID = m.identity.chainID
        if leftSessions[chainID]?.requestID == m.requestID { return true }
        switch m.body {
        case .oldPathFin: return to != nil && m.rightAnchor == to
        case .oldPathFinAck: return to != nil && m.leftAnchor == to && leftAnchors[chainID]?.requestID == m.requestID
        default: return false
        }
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
        case .message(let message, let from, let context, let to):
            // Before (a newPathSynAck would put a stateless session on the new path) and after (a stateInstalled
            // starts the release) the message: a left anchor whose session began to close does not move it.
            checkEnding(message.identity.chainID, context, requestID: message.requestID, now: now, &out)
            receive(message, from: from, context: context, to: to, now: now, &out)
            checkEnding(message.identity.chainID, context, requestID: message.requestID, now: now, &out)
        case .timer(let key):
            timerFired(key, now: now, &out)
        case .drained(let chainID):
            if leftAnchors[chainID] != nil {
                withLeftAnchor(chainID, &out) { l, env in l.selfDrained(now: now, &env) }
            } else if rightAnchors[chainID] != nil {
                out += rightAnchors[chainID]?.selfDrained() ?? []
            }
        case .proxyOnSegment(let chainID, let requestID, let proxy):
            if leftAnchors[chainID]?.requestID == requestID { leftAnchors[chainID]?.proxyOnSegment(proxy) }
        case .newPathPacket(let chainID, let context):
            checkEnding(chainID, context, requestID: nil, now: now, &out)
            if leftAnchors[chainID] != nil {
                withLeftAnchor(chainID, &out) { l, env in l.probeSeen(now: now, &env) }
            } else if rightAnchors[chainID] != nil {
                out += rightAnchors[chainID]?.probeSeen() ?? []
            }
        case .bufferFull(let chainID):
            withLeftAnchor(chainID, &out) { l, env in l.bufferFull(now: now, &env) }
        case .pathOpened(let chainID, let subsession):
            if leftAnchors[chainID]?.waitsForPath == true {
                withLeftAnchor(chainID, &out) { l, env in l.pathOpened(subsession, now: now, &env) }
            } else if let n = newBoxes[chainID], n.right == nil {
                out += newBoxes[chainID]?.pathOpened(subsession) ?? []
            } else if rightAnchors[chainID]?.waitsForPath == true {
                out += rightAnchors[chainID]?.pathOpened(subsession) ?? []
            }
        case .pathRefused(let chainID, let reason):
            if leftAnchors[chainID]?.step == .newPath {
                withLeftAnchor(chainID, &out) { l, env in l.pathRefused(reason, now: now, &env) }
            } else if let n = newBoxes.removeValue(forKey: chainID) {
                out += n.pathRefused(reason)
            } else if rightAnchors[chainID] != nil {
                out += rightAnchors[chainID]?.pathRefused(reason) ?? []
            }
        case .stateExported(let chainID, let requestID, let result, let micros):
            guard oldBoxes[chainID]?.requestID == requestID else { break }
            out += oldBoxes[chainID]?.stateExported(result, micros: micros) ?? []
        case .stateImported(let chainID, let requestID, let result, let micros):
            guard newBoxes[chainID]?.requestID == requestID else { break }
            out += newBoxes[chainID]?.stateImported(result, micros: micros) ?? []
        }
        return out
    }

    private mutating func receive(_ m: ControlMessage, from: IPAddress, context: SessionContext?, to: IPAddress?,
                                  now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if let r = rightAnchors[chainID], r.requestID == m.requestID {
            // The left anchor is alive: the right anchor's silence timer starts again.
            out.append(.setTimer(TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline),
                                 afterNanoseconds: settings.rightAnchorSilence))
        }
        if hopTimers.contains(chainID), hops[chainID]?.owner == m.requestID {
            // A message of the request that holds the lock here: its left anchor is alive.
            out.append(.setTimer(hopKey(chainID), afterNanoseconds: settings.hopLockSilence))
        }
        switch m.body {
        case .trigger(let trigger):
            receiveTrigger(m, trigger: trigger, from: from, context: context, now: now, &out)
        case .triggerResult(let result):
            guard let output = controllers[chainID]?.resultArrived(result, requestID: m.requestID) else { return }
            out += output.actions
            if output.finished { controllers[chainID] = nil }
        case .requestLock(let rightDelta):
            guard let context else { return }
            receiveRequestLock(m, rightDelta: rightDelta, context: context, &out)
        case .ackLock(let leftDelta, _):
            guard let context, var hop = hops[chainID] else { return }
            let result = hop.ackLock(m, hop: context.hop, left: context.leftNeighbour)
            store(hop, chainID, &out)
            guard result.matched else { return }
            remember(result.refused, chainID)
            out += result.actions
            if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
                withLeftAnchor(chainID, &out) { l, env in l.locked(leftDelta: leftDelta, now: now, &env) }
            } else if let left = context.leftNeighbour {
                let (l, r) = result.passOn
                out.append(.send(m.with(body: .ackLock(leftDelta: l, rightDelta: r)), to: left))
            }
        case .nackLock(let reason):
            guard let context, var hop = hops[chainID] else { return }
            let result = hop.nackLock(m, hop: context.hop, right: context.rightNeighbour)
            store(hop, chainID, &out)
            guard result.matched else { return }
            remember(result.refused, chainID)
            out += result.actions
            if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
                withLeftAnchor(chainID, &out) { l, _ in l.lockRefused(reason, now: now) }
            } else if let left = context.leftNeighbour {
                out.append(.send(m, to: left))
            }
        case .cancelLock:
            guard let context else { return }
            receiveCancelLock(m, from: from, context: context, &out)
        case .ackCancel:
            guard let context else { return }
            if m.leftAnchor == context.me, leftAnchors[chainID]?.requestID == m.requestID {
                withLeftAnchor(chainID, &out) { l, _ in l.cancelAcknowledged() }
            } else if m.leftAnchor != context.me, let left = context.leftNeighbour {
                out.append(.send(m, to: left))
            }
        case .newPathSyn(let subsession, let remaining):
            receiveNewPathSyn(m, subsession: subsession, remaining: remaining, from: from, context: context, &out)
        case .newPathSynAck(let subsession):
            if let l = leftAnchors[chainID], l.requestID == m.requestID {
                withLeftAnchor(chainID, &out) { l, env in l.newPathAnswered(now: now, &env) }
            } else if newBoxes[chainID] != nil {
                out += newBoxes[chainID]?.newPathAnswered(m, subsession: subsession) ?? []
            }
        case .newPathCancel:
            // A duplicate or a retransmission (the left anchor sends it until answered) only gets the answer again.
            if let n = newBoxes[chainID], n.requestID == m.requestID {
                newBoxes[chainID] = nil
                out.append(.cancelTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline)))
                out.append(.removeSession(chainID: chainID, deleteConntrack: true))
            } else if newBoxes[chainID] == nil, context != nil, cancelledNewPaths[chainID]?.contains(m.requestID) != true {
                out.append(.removeSession(chainID: chainID, deleteConntrack: true))
            }
            rememberCancelled(m.requestID, chainID)
            out.append(.send(m.answer(.newPathCancelAck), to: from))
        case .newPathCancelAck:
            // The cancel (§3.6) ends when the old path (ackCancel) and every new middlebox have it.
            guard leftAnchors[chainID]?.requestID == m.requestID else { return }
            withLeftAnchor(chainID, &out) { l, _ in l.newPathCancelAcknowledged(by: from) }
        case .newPathRefused(let reason):
            // A hop of the new path cannot take the session (issue 20): cancel now, with its reason, instead of
            // retransmitting newPathSyn until the deadline.
            guard leftAnchors[chainID]?.requestID == m.requestID else { return }
            withLeftAnchor(chainID, &out) { l, env in l.newPathRefused(by: from, reason: reason, now: now, &env) }
        case .drainStart(let stateful):
            guard rightAnchors[chainID]?.requestID == m.requestID else { return }
            out += rightAnchors[chainID]?.drainStart(m, stateful: stateful, from: from) ?? []
        case .drained:
            guard let l = leftAnchors[chainID], l.requestID == m.requestID else { return }
            if l.awaitsProxy(from) {
                withLeftAnchor(chainID, &out) { l, env in l.proxyEmptied(now: now, &env) }
            } else if from != l.proxy {
                withLeftAnchor(chainID, &out) { l, env in l.peerDrained(now: now, &env) }
            }
        case .stateRequest(let newBox):
            receiveStateRequest(m, newBox: newBox, from: from, context: context, &out)
        case .statePut(let document):
            guard newBoxes[chainID]?.requestID == m.requestID else {
                out.append(.send(m.answer(.stateInstalled(ok: false, times: StateTimes(),
                                                          reason: "statePut: no new path of request \(m.requestID) at this box")),
                                 to: from))
                return
            }
            out += newBoxes[chainID]?.statePut(m, document: document, from: from) ?? []
        case .stateInstalled(let ok, let times, let reason):
            if let o = oldBoxes[chainID], o.requestID == m.requestID, from == o.newBox {
                // The new box answered the old one: pass it to the left anchor, with the export time.
                out += oldBoxes[chainID]?.newBoxAnswered(m, ok: ok, times: times, reason: reason) ?? []
                return
            }
            guard let l = leftAnchors[chainID], l.requestID == m.requestID, from == l.request.trigger.oldBox else { return }
            withLeftAnchor(chainID, &out) { l, env in l.stateInstalled(ok: ok, times: times, reason: reason, now: now, &env) }
        case .oldPathFin:
            if context == nil, let gone = leftSessions[chainID], gone.requestID == m.requestID {
                // This agent left the session at an earlier copy's answer: the copy still goes on to the right anchor.
                if let right = gone.right { out.append(.send(m, to: right)) }
                return
            }
            // Without a session here only the right anchor answers (its session ended first).
            guard let me = context?.me ?? to else { return }
            receiveOldPathFin(m, from: from, me: me, rightNeighbour: context?.rightNeighbour, &out)
        case .oldPathFinAck:
            if context == nil, let gone = leftSessions[chainID], gone.requestID == m.requestID {
                out.append(.send(m, to: gone.left))  // a later answer, after this agent left: passed on as the first
                return
            }
            guard let me = context?.me ?? to else { return }
            receiveOldPathFinAck(m, me: me, leftNeighbour: context?.leftNeighbour,
                                 rightNeighbour: context?.rightNeighbour, now: now, &out)
        case .splice:
            break  // the agent's engine takes it (a spliced-out proxy's timestamps and alias), never the protocol
        }
    }

    /// A left anchor whose session saw a FIN or an RST (`context.ending`, its record as the event found it) while
    /// nothing of it is on the new path cancels (issue 19's soak, docs/CONTROL-PROTOCOL.md "A session that closes
    /// during its move"); `requestID`: the event's request, when it names one.
    private mutating func checkEnding(_ chainID: UInt64, _ context: SessionContext?, requestID: UInt32?, now: UInt64,
                                      _ out: inout [Action]) {
        guard let context, context.ending, let l = leftAnchors[chainID], context.me == l.request.context.me,
              requestID == nil || requestID == l.requestID else { return }
        withLeftAnchor(chainID, &out) { l, env in l.sessionEnding(now: now, &env) }
    }

    // MARK: - Roles' lifetimes

    /// Runs an event of the session's left anchor with the shared clock, and forgets the anchor when it is done
    /// (its lock released, its result kept for duplicate triggers).
    private mutating func withLeftAnchor(_ chainID: UInt64, _ out: inout [Action],
                                         _ body: (inout LeftAnchor, inout LeftAnchor.Environment) -> LeftAnchor.Output) {
        // Moved out of the dictionary while it runs: its state is changed in place, never copied.
        guard var l = leftAnchors.removeValue(forKey: chainID) else { return }
        var env = LeftAnchor.Environment(settings: settings, clock: clock, active: leftAnchors.count + 1)
        let output = body(&l, &env)
        clock = env.clock
        out += output.actions
        guard let result = output.finished else {
            leftAnchors[chainID] = l
            return
        }
        if var hop = hops[chainID] {
            hop.releaseForLeftAnchor(l.requestID)
            store(hop, chainID, &out)
        }
        if oldBoxes[chainID]?.requestID == l.requestID { oldBoxes[chainID] = nil }  // the left anchor was the donor
        if finished.count > 4096 { finished.removeAll(keepingCapacity: true) }
        finished[chainID] = (l.requestID, result)
    }

    private mutating func store(_ hop: OldPathHop, _ chainID: UInt64, _ out: inout [Action]) {
        hops[chainID] = hop.isUnlocked ? nil : hop
        guard let owner = hop.owner, leftAnchors[chainID]?.requestID != owner else {
            // Unlocked, or locked by this agent's own left anchor (which has its deadline): no silence timer.
            if hopTimers.remove(chainID) != nil { out.append(.cancelTimer(hopKey(chainID))) }
            return
        }
        // Locked (or pending) for another agent's left anchor: given up if it falls silent (issue 19).
        hopTimers.insert(chainID)
        out.append(.setTimer(hopKey(chainID), afterNanoseconds: settings.hopLockSilence))
    }

    private func hopKey(_ chainID: UInt64) -> TimerKey { TimerKey(chainID: chainID, role: .oldPathHop, kind: .deadline) }

    /// The lock here was held for another agent's left anchor, which said nothing for `hopLockSilence`: release it
    /// (a request held behind it is dropped too: its left anchor retransmits requestLock, which finds the
    /// subsession unlocked). The request counts as ended here (a late requestLock of it does not lock again).
    private mutating func hopSilent(_ chainID: UInt64, _ out: inout [Action]) {
        guard hopTimers.remove(chainID) != nil, var hop = hops[chainID], let owner = hop.owner,
              leftAnchors[chainID]?.requestID != owner else { return }
        hop.expire()
        hops[chainID] = nil
        endRequest(chainID, owner)
        if oldBoxes[chainID]?.requestID == owner { oldBoxes[chainID] = nil }
    }

    private mutating func remember(_ refused: [UInt32], _ chainID: UInt64) {
        for requestID in refused {
            if refusedRequests.count > 4096 { refusedRequests.removeAll(keepingCapacity: true) }
            refusedRequests[chainID, default: []].insert(requestID)
        }
    }

    private mutating func rememberCancelled(_ requestID: UInt32, _ chainID: UInt64) {
        if cancelledNewPaths.count > 4096 { cancelledNewPaths.removeAll(keepingCapacity: true) }
        cancelledNewPaths[chainID, default: []].insert(requestID)
    }

    private mutating func endRequest(_ chainID: UInt64, _ requestID: UInt32) {
        if ended.count > 4096 { ended.removeAll(keepingCapacity: true) }
        ended[chainID, default: []].insert(requestID)
    }

    // MARK: - Controller (§3.1: the trigger)

    private mutating func startController(_ context: SessionContext, trigger: Trigger, leftAnchor: IPAddress,
                                          requestID: UInt32, now: UInt64, _ out: inout [Action]) {
        let chainID = context.identity.chainID
        if let existing = controllers[chainID] {
            // A reconfiguration this agent already asked for is under way: refuse the second one here.
            out.append(.report(chainID: chainID, requestID: requestID, TriggerResult(
                outcome: .refused, reason: "a reconfiguration of this session (request \(existing.requestID)) is already under way from this agent",
                failedStep: .lock)))
            return
        }
        let first = 2 * clock.timeout(settings, active: controllers.count + 1)
        controllers[chainID] = Controller(context: context, trigger: trigger, leftAnchor: leftAnchor, requestID: requestID,
                                          now: now, firstTimeout: first, settings: settings, &out)
    }

    // MARK: - Left anchor (§3.1: the trigger arrives)

    private mutating func receiveTrigger(_ m: ControlMessage, trigger: Trigger, from: IPAddress,
                                         context: SessionContext?, now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        func refuse(_ reason: String, step: MigrationStep = .lock) {
            out.append(.send(m.answer(.triggerResult(TriggerResult(outcome: .refused, reason: reason, failedStep: step))),
                             to: from))
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
        guard !context.translates else { refuse(SessionContext.translatingBoxRefusal); return }
        guard let oldRight = context.rightNeighbour else { refuse("this agent has no right subsession to reconfigure"); return }
        guard let rightAnchor = trigger.newPath.last, !trigger.newPath.contains(context.me),
              !trigger.newPath.dropLast().contains(oldRight) else {
            refuse("the new path \(trigger.newPath) is not a replacement of the old one")
            return
        }
        var hop = hops[chainID] ?? OldPathHop()
        guard hop.lockForLeftAnchor(LockRequest(requestID: m.requestID, leftAnchor: context.me, rightAnchor: rightAnchor)) else {
            refuse("the segment is locked by another reconfiguration (§3.2)")
            return
        }
        let request = LeftAnchor.Request(requestID: m.requestID, context: context, trigger: trigger, controller: from,
                                         oldRight: oldRight, rightAnchor: rightAnchor, startedAt: now)
        var env = LeftAnchor.Environment(settings: settings, clock: clock, active: leftAnchors.count + 1)
        leftAnchors[chainID] = LeftAnchor(request: request, now: now, &env, &out)
        clock = env.clock
        store(hop, chainID, &out)  // after the left anchor: its own lock has no silence timer
    }

    // MARK: - Lock messages along the old path (§3.2, §3.6)

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
            if let r = rightAnchors[chainID], r.requestID != m.requestID {
                // A different request while one is under way: refuse it (its left anchor retries later).
                out.append(.send(m.answer(.nackLock(reason: .contention)), to: left))
                return
            }
            if rightAnchors[chainID] == nil {
                rightAnchors[chainID] = RightAnchor(m, me: context.me, rightDelta: rightDelta,
                                                    silence: settings.rightAnchorSilence, &out)
            }
            out.append(.send(m.answer(.ackLock(leftDelta: 0, rightDelta: rightDelta)), to: left))
            return
        }
        guard let right = context.rightNeighbour else {
            out.append(.send(m.answer(.nackLock(reason: .notOnPath)), to: left))
            return
        }
        var hop = hops[chainID] ?? OldPathHop()
        let result = hop.requestLock(m, rightDelta: rightDelta, hop: context.hop, left: left, right: right)
        store(hop, chainID, &out)
        remember(result.refused, chainID)
        out += result.actions
    }

    private mutating func receiveCancelLock(_ m: ControlMessage, from: IPAddress, context: SessionContext,
                                            _ out: inout [Action]) {
        let chainID = m.identity.chainID
        endRequest(chainID, m.requestID)
        if m.rightAnchor == context.me {
            if let r = rightAnchors[chainID], r.requestID == m.requestID {
                rightAnchors[chainID] = nil
                out += r.cancelled()
            }
            if oldBoxes[chainID]?.requestID == m.requestID { oldBoxes[chainID] = nil }  // it was the donor
            out.append(.send(m.answer(.ackCancel), to: from))
            return
        }
        var hop = hops[chainID] ?? OldPathHop()
        let result = hop.cancelLock(m, hop: context.hop, from: from, right: context.rightNeighbour)
        store(hop, chainID, &out)
        if result.released { oldBoxes[chainID] = nil }
        out += result.actions
    }

    // MARK: - New path (§3.1, §3.3)

    private mutating func receiveNewPathSyn(_ m: ControlMessage, subsession: FiveTuple, remaining: [IPAddress],
                                            from: IPAddress, context: SessionContext?, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        guard subsession.srcAddr == from else { return }  // the sender names its own subsession
        func refuse(_ reason: String) {
            // Issue 20: a hop that cannot take the session says why, to the left anchor (which cancels at once).
            out.append(.send(m.answer(.newPathRefused(reason: reason)), to: m.leftAnchor))
        }
        guard let next = remaining.first else {
            // The right anchor: the new path's last subsession ends here.
            guard m.rightAnchor == subsession.dstAddr else { return }
            guard let r = rightAnchors[chainID], r.requestID == m.requestID else {
                if ended[chainID]?.contains(m.requestID) == true { return }  // a late copy of a finished request
                refuse(context == nil ? "the right anchor does not know the session"
                                      : "the right anchor is not locked for request \(m.requestID)")
                return
            }
            _ = r
            if context?.translatesDestination == true {
                refuse(SessionContext.translatingRightAnchorRefusal)  // the left anchor cancels, releasing this lock
                return
            }
            out += rightAnchors[chainID]?.newPathSyn(m, subsession: subsession, from: from) ?? []
            return
        }
        // A new middlebox.
        if cancelledNewPaths[chainID]?.contains(m.requestID) == true {
            // A late newPathSyn (reordered, duplicated, or a retransmission overtaken by the cancel): the request
            // was cancelled here; making the session again would leave an orphan on no path (issue 19, §3.6).
            refuse("request \(m.requestID) was cancelled at this box (newPathCancel)")
            return
        }
        var halfMade = false
        if let n = newBoxes[chainID] {
            if n.requestID == m.requestID {
                out += n.newPathSynAgain(m, subsession: subsession, remaining: remaining)
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
                guard !n.isAnswered || !context.carried, n.message.leftAnchor == m.leftAnchor else {
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
        newBoxes[chainID] = NewBox(m, left: subsession, remaining: remaining, next: next,
                                   linger: settings.newBoxLinger, &out)
    }

    // MARK: - State transfer (stateful, §3.5 last paragraph; §5.3)

    private mutating func receiveStateRequest(_ m: ControlMessage, newBox: IPAddress, from: IPAddress,
                                              context: SessionContext?, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        // The box being replaced is locked for the request (§3.2); a donor of an insertion (issue 17) is one of the
        // anchors: the left anchor (its own lock) or the right anchor of the request.
        let lockedHere = hops[chainID]?.owner == m.requestID
        let rightAnchorHere = rightAnchors[chainID]?.requestID == m.requestID
        guard context != nil, from == m.leftAnchor, lockedHere || rightAnchorHere else {
            out.append(.send(m.answer(.stateInstalled(ok: false, times: StateTimes(),
                                                      reason: "stateRequest: this box is not locked for request \(m.requestID)")),
                             to: from))
            return
        }
        if let o = oldBoxes[chainID], o.requestID == m.requestID {
            out += o.stateRequestAgain(m, from: from)
            return
        }
        oldBoxes[chainID] = OldBox(m, newBox: newBox, from: from, &out)
    }

    // MARK: - Teardown (§3.3, §3.5)

    /// oldPathFin (§3.5): the right anchor ends its request and answers; an agent between the anchors passes it on.
    /// The right anchor answers even when its session has ended (it closed on the new path and its record lingered
    /// out before the teardown, delayed by lost datagrams, came): the old path's agents leave the session only at
    /// the answer, so an unanswered one would leave their records behind (issue 19's soak).
    private mutating func receiveOldPathFin(_ m: ControlMessage, from: IPAddress, me: IPAddress,
                                            rightNeighbour: IPAddress?, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if m.rightAnchor == me {
            endRequest(chainID, m.requestID)
            if let r = rightAnchors[chainID], r.requestID == m.requestID {
                rightAnchors[chainID] = nil
                out += r.oldPathFin()
            }
            if oldBoxes[chainID]?.requestID == m.requestID { oldBoxes[chainID] = nil }  // it was the donor
            out.append(.send(m.answer(.oldPathFinAck), to: from))
            return
        }
        if let rightNeighbour { out.append(.send(m, to: rightNeighbour)) }
    }

    /// oldPathFinAck (§3.5): the left anchor's teardown is done (also when its own session has ended meanwhile);
    /// an agent of the old path between the anchors leaves the session and passes it on.
    private mutating func receiveOldPathFinAck(_ m: ControlMessage, me: IPAddress, leftNeighbour: IPAddress?,
                                               rightNeighbour: IPAddress?, now: UInt64, _ out: inout [Action]) {
        let chainID = m.identity.chainID
        if m.leftAnchor == me, let l = leftAnchors[chainID], l.requestID == m.requestID {
            withLeftAnchor(chainID, &out) { l, _ in l.oldPathGone(now: now) }
            return
        }
        // An agent of the old path between the anchors: it leaves the session (its lock goes with it). Not the
        // left anchor itself (a duplicate after it finished): it stays on the session's (new) path.
        guard m.leftAnchor != me, let left = leftNeighbour else { return }
        hops[chainID] = nil
        if hopTimers.remove(chainID) != nil { out.append(.cancelTimer(hopKey(chainID))) }
        oldBoxes[chainID] = nil
        if newBoxes.removeValue(forKey: chainID) != nil {
            // It joined the session as a new box of an earlier request: that role ends with the session here.
            out.append(.cancelTimer(TimerKey(chainID: chainID, role: .newBox, kind: .deadline)))
        }
        out.append(.removeSession(chainID: chainID, deleteConntrack: true))
        out.append(.send(m, to: left))
        if leftSessions.count > 4096 { leftSessions.removeAll(keepingCapacity: true) }
        leftSessions[chainID] = (m.requestID, left, rightNeighbour)
    }

    // MARK: - Timers

    private mutating func timerFired(_ key: TimerKey, now: UInt64, _ out: inout [Action]) {
        let chainID = key.chainID
        switch (key.role, key.kind) {
        case (.newBox, _):
            newBoxes[chainID] = nil  // the session itself stays (it is on the new path, or expires by idleness)
        case (.rightAnchor, _):
            guard let r = rightAnchors.removeValue(forKey: chainID) else { return }
            if oldBoxes[chainID]?.requestID == r.requestID { oldBoxes[chainID] = nil }
            out += r.silenceTimerFired()
        case (.controller, _):
            guard let output = controllers[chainID]?.timerFired(now: now, settings: settings) else { return }
            out += output.actions
            if output.finished { controllers[chainID] = nil }
        case (.leftAnchor, .deadline):
            withLeftAnchor(chainID, &out) { l, env in l.deadlinePassed(now: now, &env) }
        case (.leftAnchor, .retransmit):
            withLeftAnchor(chainID, &out) { l, env in l.retransmitTimerFired(now: now, &env) }
        case (.oldPathHop, _):
            hopSilent(chainID, &out)
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
