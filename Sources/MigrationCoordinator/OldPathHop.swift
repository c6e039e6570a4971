import DyscoCore

/// This agent's part of the old path of one session (paper §3.2): the lock of its right subsession
/// (``SegmentLock``), and what it does with the lock messages that travel along the old path — forward a
/// requestLock to the right, pass ackLock / nackLock back to the left, release at cancelLock. The left anchor's
/// own lock is the lock of its right subsession too: the router hands it the answers that are for it.
///
/// The lock's states (unlocked, lockPending, locked) are ``SegmentLock/State``; this type adds the messages.
struct OldPathHop: Sendable {
    /// What one lock message makes this hop do.
    struct Output: Sendable {
        var actions: [Action] = []
        /// The answer was for the request pending or locked here (else it changed nothing).
        var matched = false
        /// Requests refused here (nackLock sent to the left): a late duplicate is refused again.
        var refused: [UInt32] = []
        /// The lock of the request was released here (cancelLock).
        var released = false
        /// ackLock: the deltas to pass on to the left.
        var passOn: (leftDelta: Int32, rightDelta: Int32) = (0, 0)
    }

    private(set) var lock = SegmentLock()

    /// What this agent adds to the two byte streams between its subsessions (§3.4: its box's delta plus the deltas
    /// its own subsessions apply, ``SessionTable/Record/hopDelta``), and its address: the requests of another left
    /// anchor get the sums with this hop's delta added; the left anchor's own request does not (its own
    /// subsessions' deltas carry over to the new path, ``SessionTable/Subsession/seqDelta``).
    struct Hop: Sendable {
        var me: IPAddress
        var delta: SessionTable.BoxDelta
        func forward(_ request: LockRequest) -> Int32 {
            request.leftAnchor == me ? request.rightDelta : request.rightDelta &+ delta.forward
        }
        func reverse(_ leftDelta: Int32, leftAnchor: IPAddress) -> Int32 {
            leftAnchor == me ? leftDelta : leftDelta &+ delta.reverse
        }
    }

    var isUnlocked: Bool { lock.isUnlocked }
    var owner: UInt32? { lock.owner }

    /// The left anchor locks its own right subsession first (§3.2). False if the segment is busy.
    mutating func lockForLeftAnchor(_ request: LockRequest) -> Bool {
        guard case .forward = lock.request(request) else { return false }
        return true
    }

    /// The end of the left anchor's request (teardown done, or cancel): unlock.
    mutating func releaseForLeftAnchor(_ requestID: UInt32) { _ = lock.release(requestID) }

    /// The left anchor of the request locked (or pending) here fell silent (issue 19): unlock, and forget a held
    /// request too (its left anchor's retransmission finds the subsession unlocked).
    mutating func expire() { lock = SegmentLock() }

    /// requestLock from the left at an agent between the anchors (`right` is its right neighbour).
    mutating func requestLock(_ m: ControlMessage, rightDelta: Int32, hop: Hop, left: IPAddress,
                              right: IPAddress) -> Output {
        var out = Output()
        let request = LockRequest(requestID: m.requestID, leftAnchor: m.leftAnchor, rightAnchor: m.rightAnchor,
                                  rightDelta: rightDelta)
        switch lock.request(request) {
        case .forward, .forwardDuplicate:
            // §3.4: this hop adds its delta to the sum for the boxes to the right.
            out.actions.append(.send(m.with(body: .requestLock(rightDelta: hop.forward(request))), to: right))
        case .ackAgain(let locked):
            // The same answer as the ackLock passed on when it locked (§3.4: the leftDelta sum of the boxes to the
            // right; 0 there loses a removed box's delta at the left anchor — found by the Spin model, issue 17).
            let answer = locked.answer ?? (leftDelta: 0, rightDelta: rightDelta)
            out.actions.append(.send(m.answer(.ackLock(leftDelta: answer.leftDelta, rightDelta: answer.rightDelta)), to: left))
        case .held:
            break
        case .refuse:
            out.refused.append(m.requestID)
            out.actions.append(.send(m.answer(.nackLock(reason: .contention)), to: left))
        }
        return out
    }

    /// ackLock from the right: locked; a request held here is refused now (§3.2). The caller passes the
    /// ackLock on to the left (with `passOn`'s deltas: this hop's added to the leftDelta sum, §3.4), or to its own
    /// left anchor, when `matched`.
    mutating func ackLock(_ m: ControlMessage, hop: Hop, left: IPAddress?) -> Output {
        var out = Output()
        var deltas: (Int32, Int32) = (0, 0)
        if case .ackLock(let l, let r) = m.body { deltas = (hop.reverse(l, leftAnchor: m.leftAnchor), r) }
        let outcome = lock.acknowledged(m.requestID, leftDelta: deltas.0, rightDelta: deltas.1)
        guard outcome.matched else { return out }
        out.matched = true
        out.passOn = deltas
        if let refused = outcome.refuse, let left {
            out.refused.append(refused.requestID)
            out.actions.append(.send(Self.lockMessage(m, refused, body: .nackLock(reason: .contention)), to: left))
        }
        return out
    }

    /// nackLock from the right: unlocked, or the request held here goes on to the right now (§3.2). The caller
    /// passes the nackLock on to the left, or to its own left anchor, when `matched`.
    mutating func nackLock(_ m: ControlMessage, hop: Hop, right: IPAddress?) -> Output {
        var out = Output()
        let outcome = lock.refused(m.requestID)
        guard outcome.matched else { return out }
        out.matched = true
        out.refused.append(m.requestID)
        if let forward = outcome.forward, let right {
            out.actions.append(.send(Self.lockMessage(m, forward, body: .requestLock(rightDelta: hop.forward(forward))),
                                     to: right))
        }
        return out
    }

    /// cancelLock from the left at an agent between the anchors (§3.6).
    mutating func cancelLock(_ m: ControlMessage, hop: Hop, from: IPAddress, right: IPAddress?) -> Output {
        var out = Output()
        if lock.withdraw(m.requestID) {
            // The request waited here (§3.2) and went no further: the cancel ends here too.
            out.actions.append(.send(m.answer(.ackCancel), to: from))
            return out
        }
        guard lock.owner == m.requestID else {
            // The request never reached this agent, or its cancel passed here already and was lost further
            // right: pass it on, only the right anchor's ackCancel shows that every agent has it (§3.6).
            if let right { out.actions.append(.send(m, to: right)) }
            else { out.actions.append(.send(m.answer(.ackCancel), to: from)) }
            return out
        }
        let outcome = lock.release(m.requestID)
        out.released = true
        if let forward = outcome.forward, let right {
            out.actions.append(.send(Self.lockMessage(m, forward, body: .requestLock(rightDelta: hop.forward(forward))),
                                     to: right))
        }
        if let right { out.actions.append(.send(m, to: right)) }
        return out
    }

    /// A lock message about another request than `m`'s (held here), with `m`'s session.
    private static func lockMessage(_ m: ControlMessage, _ request: LockRequest, body: ControlBody) -> ControlMessage {
        ControlMessage(identity: m.identity, requestID: request.requestID, session: m.session,
                       leftAnchor: request.leftAnchor, rightAnchor: request.rightAnchor, body: body)
    }
}
