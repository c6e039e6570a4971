import DyscoCore

/// One lock request travelling along the old path (paper §3.2: requestLock(leftAnchor, rightAnchor)).
public struct LockRequest: Sendable, Equatable {
    public var requestID: UInt32
    public var leftAnchor: IPAddress
    public var rightAnchor: IPAddress
    /// Sum of the deltas of the middleboxes passed so far (§3.4), carried as rightDelta.
    public var rightDelta: Int32
    /// The ackLock that locked it here, as it was passed on to the left (§3.4: its leftDelta sum): a repeated
    /// requestLock of the same request is answered with exactly these (found by the Spin model, issue 17).
    public var answer: (leftDelta: Int32, rightDelta: Int32)?
    public init(requestID: UInt32, leftAnchor: IPAddress, rightAnchor: IPAddress, rightDelta: Int32 = 0) {
        self.requestID = requestID
        self.leftAnchor = leftAnchor
        self.rightAnchor = rightAnchor
        self.rightDelta = rightDelta
    }

    /// The same request (its fields as the requestLock carried them); the answer it got here is not part of it.
    public static func == (a: LockRequest, b: LockRequest) -> Bool {
        a.requestID == b.requestID && a.leftAnchor == b.leftAnchor && a.rightAnchor == b.rightAnchor
            && a.rightDelta == b.rightDelta
    }
}

/// The lock of the subsession to the right of this agent, for one session (paper §3.2): the agent on the left
/// of each subsession keeps it. unlocked → lockPending(requestor) on a forwarded requestLock → locked on the
/// matching ackLock; nackLock, cancelLock and the end of a reconfiguration unlock it.
///
/// Contention (§3.2): a request that meets `lockPending` is *held*: if the pending request is acknowledged the
/// held one is refused (nackLock), if it is refused the held one is forwarded. A request that meets `locked`
/// is refused at once. At most one request is held; a third is refused. This cannot deadlock (the rightmost
/// pending request is never blocked, so it always gets an answer that unblocks the one to its left).
public struct SegmentLock: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        case unlocked
        case lockPending(LockRequest, held: LockRequest?)
        case locked(LockRequest)
    }

    public private(set) var state: State = .unlocked

    public init() {}

    /// What the agent does with the request it was given.
    public enum Decision: Sendable, Equatable {
        /// Forward it to the right (it is now pending here).
        case forward(LockRequest)
        /// The same request again (a retransmission): forward it again, change nothing.
        case forwardDuplicate(LockRequest)
        /// The same request is already locked here: answer ackLock again.
        case ackAgain(LockRequest)
        /// Held until the pending request is answered.
        case held
        /// Refuse it (nackLock, contention).
        case refuse(LockRequest)
    }

    /// A requestLock arriving from the left (or started here, by this agent as left anchor).
    public mutating func request(_ request: LockRequest) -> Decision {
        switch state {
        case .unlocked:
            state = .lockPending(request, held: nil)
            return .forward(request)
        case .lockPending(let pending, let held):
            if pending.requestID == request.requestID { return .forwardDuplicate(pending) }
            if held?.requestID == request.requestID { return .held }
            if held == nil {
                state = .lockPending(pending, held: request)
                return .held
            }
            return .refuse(request)
        case .locked(let locked):
            if locked.requestID == request.requestID { return .ackAgain(locked) }
            return .refuse(request)
        }
    }

    /// What follows an answer from the right.
    public struct Outcome: Sendable, Equatable {
        /// The answer concerned the pending (or already locked) request: pass it on to the left.
        public var matched: Bool
        /// A held request that must now be refused (nackLock to the left).
        public var refuse: LockRequest?
        /// A held request that must now be forwarded to the right (it is pending now).
        public var forward: LockRequest?
    }

    /// ackLock for `requestID` from the right, with the deltas it carries (kept for an ackAgain).
    public mutating func acknowledged(_ requestID: UInt32, leftDelta: Int32 = 0, rightDelta: Int32 = 0) -> Outcome {
        switch state {
        case .lockPending(var pending, let held) where pending.requestID == requestID:
            pending.answer = (leftDelta, rightDelta)
            state = .locked(pending)
            return Outcome(matched: true, refuse: held, forward: nil)
        case .locked(let locked) where locked.requestID == requestID:
            return Outcome(matched: true, refuse: nil, forward: nil)
        default:
            return Outcome(matched: false, refuse: nil, forward: nil)
        }
    }

    /// nackLock for `requestID` from the right (or a cancel/teardown that ends it).
    public mutating func refused(_ requestID: UInt32) -> Outcome {
        switch state {
        case .lockPending(let pending, let held) where pending.requestID == requestID:
            if let held {
                state = .lockPending(held, held: nil)
                return Outcome(matched: true, refuse: nil, forward: held)
            }
            state = .unlocked
            return Outcome(matched: true, refuse: nil, forward: nil)
        case .locked(let locked) where locked.requestID == requestID:
            state = .unlocked
            return Outcome(matched: true, refuse: nil, forward: nil)
        default:
            return Outcome(matched: false, refuse: nil, forward: nil)
        }
    }

    /// cancelLock, or the end of a successful reconfiguration (old path torn down): unlock.
    public mutating func release(_ requestID: UInt32) -> Outcome { refused(requestID) }

    /// A cancelled request that was only held here (it never went further right): forget it. True if it was.
    public mutating func withdraw(_ requestID: UInt32) -> Bool {
        guard case .lockPending(let pending, let held) = state, held?.requestID == requestID else { return false }
        state = .lockPending(pending, held: nil)
        return true
    }

    public var isUnlocked: Bool { state == .unlocked }

    public var owner: UInt32? {
        switch state {
        case .unlocked: nil
        case .lockPending(let r, _), .locked(let r): r.requestID
        }
    }
}
