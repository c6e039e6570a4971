import DyscoCore

/// The right anchor of one session's reconfiguration (paper §2.3, §3): it answers the lock (§3.2), installs
/// the new path's last subsession (§3.3), buffers its side (stateful), answers drainStart with drained (§3.5),
/// releases after the window-opening probes, and drops the old path at teardown. A left anchor that falls
/// silent is given up after `Settings.rightAnchorSilence` (the router re-arms that timer on every message of
/// the request).
struct RightAnchor: Sendable {
    /// Whether this anchor's data plane reported its side drained (§3.5); it is answered once asked.
    enum Drain: Sendable {
        case pending, drained
    }

    /// A newPathSyn waiting for the shell's addPath.
    struct PendingSyn: Sendable {
        var message: ControlMessage
        var from: IPAddress
    }

    enum State: Sendable {
        /// Locked (ackLock sent); the new path is not installed here yet (or its addPath is pending).
        case awaitingPath(PendingSyn?, Drain)
        /// The new path's last subsession is installed; no drainStart yet.
        case pathInstalled(newLeft: FiveTuple, Drain)
        /// Stateful drainStart: buffering our side until the left anchor's probe.
        case buffering(newLeft: FiveTuple, Drain)
        /// The left anchor's first probe came: egress on the new path, our probe sent; still buffering.
        case probing(newLeft: FiveTuple, Drain)
        /// Released on the new path (stateless at drainStart, stateful after the second probe).
        case released(newLeft: FiveTuple, Drain)
    }

    let requestID: UInt32
    let identity: SessionIdentity
    let session: FiveTuple
    let leftAnchor: IPAddress
    let me: IPAddress
    private(set) var state: State = .awaitingPath(nil, .pending)

    private var chainID: UInt64 { identity.chainID }
    private var deadlineKey: TimerKey { TimerKey(chainID: chainID, role: .rightAnchor, kind: .deadline) }

    var isReleased: Bool { if case .released = state { true } else { false } }

    var newLeft: FiveTuple? {
        switch state {
        case .awaitingPath: nil
        case .pathInstalled(let l, _), .buffering(let l, _), .probing(let l, _), .released(let l, _): l
        }
    }

    private var drain: Drain {
        switch state {
        case .awaitingPath(_, let d), .pathInstalled(_, let d), .buffering(_, let d), .probing(_, let d),
             .released(_, let d): d
        }
    }

    private func reply(_ body: ControlBody) -> ControlMessage {
        ControlMessage(identity: identity, requestID: requestID, session: session, leftAnchor: leftAnchor,
                       rightAnchor: me, body: body)
    }

    /// requestLock reached the right anchor (§3.1, §3.2): nothing to lock to its right; it takes part from now.
    init(_ m: ControlMessage, me: IPAddress, rightDelta: Int32, silence: UInt64, _ out: inout [Action]) {
        requestID = m.requestID
        identity = m.identity
        session = m.session
        leftAnchor = m.leftAnchor
        self.me = me
        out.append(.hold(chainID: m.identity.chainID, side: .left, stateful: true))
        out.append(.commitKernel)  // the hold is in the kernel before ackLock leaves (§3.2, §3.5)
        out.append(.setTimer(TimerKey(chainID: m.identity.chainID, role: .rightAnchor, kind: .deadline),
                             afterNanoseconds: silence))
        if rightDelta != 0 { out.append(.setDelta(chainID: m.identity.chainID, rightDelta)) }
    }

    /// newPathSyn of our request whose remaining hops are none (§3.3): install the new path's last subsession.
    mutating func newPathSyn(_ m: ControlMessage, subsession: FiveTuple, from: IPAddress) -> [Action] {
        switch state {
        case .awaitingPath(_, let drain):
            state = .awaitingPath(PendingSyn(message: m, from: from), drain)
            return [.addPath(chainID: chainID, subsession: subsession)]
        default:
            guard let installed = newLeft, installed == subsession else { return [] }
            return [.send(m.answer(.newPathSynAck(subsession: installed)), to: from)]
        }
    }

    /// Whether the shell's path result is ours: an addPath is pending.
    var waitsForPath: Bool {
        if case .awaitingPath(.some, _) = state { true } else { false }
    }

    /// The shell installed the subsession: answer newPathSynAck.
    mutating func pathOpened(_ subsession: FiveTuple) -> [Action] {
        guard case .awaitingPath(.some(let pending), let drain) = state else { return [] }
        state = .pathInstalled(newLeft: subsession, drain)
        return [.send(pending.message.answer(.newPathSynAck(subsession: subsession)), to: pending.from)]
    }

    /// The shell could not install it: say why to the left anchor (issue 20).
    mutating func pathRefused(_ reason: String) -> [Action] {
        guard case .awaitingPath(let pending, let drain) = state else { return [] }
        state = .awaitingPath(nil, drain)
        guard let pending else { return [] }
        return [.send(pending.message.answer(.newPathRefused(reason: "right anchor: \(reason)")),
                      to: pending.message.leftAnchor)]
    }

    /// drainStart (§3.5): stateful, buffer our side; stateless, switch to the new path at once.
    mutating func drainStart(_ m: ControlMessage, stateful: Bool, from: IPAddress) -> [Action] {
        var out: [Action] = []
        switch state {
        case .awaitingPath:
            return out  // no new path here yet
        case .pathInstalled(let newLeft, let drain):
            if stateful {
                out.append(.setPhase(chainID: chainID, .buffering))
                state = .buffering(newLeft: newLeft, drain)
            } else {
                out.append(.promote(chainID: chainID))
                out.append(.setPhase(chainID: chainID, .released))
                state = .released(newLeft: newLeft, drain)
            }
        case .buffering, .probing, .released:
            break  // a retransmission: answer again
        }
        if case .drained = drain { out.append(.send(reply(.drained), to: from)) }
        return out
    }

    /// The data plane: our side is drained (§3.5); answered if drainStart came.
    mutating func selfDrained() -> [Action] {
        switch state {
        case .awaitingPath(let pending, _): state = .awaitingPath(pending, .drained)
        case .pathInstalled(let newLeft, _): state = .pathInstalled(newLeft: newLeft, .drained)
        case .buffering(let newLeft, _):
            state = .buffering(newLeft: newLeft, .drained)
            return [.send(reply(.drained), to: leftAnchor)]
        case .probing(let newLeft, _):
            state = .probing(newLeft: newLeft, .drained)
            return [.send(reply(.drained), to: leftAnchor)]
        case .released(let newLeft, _):
            state = .released(newLeft: newLeft, .drained)
            return [.send(reply(.drained), to: leftAnchor)]
        }
        return []
    }

    /// A packet of the session arrived on the new path (stateful): the left anchor's first probe (the state is
    /// installed: switch egress and answer with our probe), then its last probe or data (release our side).
    mutating func probeSeen() -> [Action] {
        switch state {
        case .buffering(let newLeft, let drain):
            state = .probing(newLeft: newLeft, drain)
            return [.promote(chainID: chainID), .setPhase(chainID: chainID, .probing), .sendProbe(chainID: chainID)]
        case .probing(let newLeft, let drain):
            state = .released(newLeft: newLeft, drain)
            return [.setPhase(chainID: chainID, .released), .releaseBuffer(chainID: chainID)]
        default:
            return []
        }
    }

    /// oldPathFin of our request: the left anchor has released; so do we (if our probe's answer was lost), and
    /// the old path goes. The router forgets this anchor.
    func oldPathFin() -> [Action] {
        var out: [Action] = []
        switch state {
        case .released:
            break
        case .probing:
            out.append(.setPhase(chainID: chainID, .released))
            out.append(.releaseBuffer(chainID: chainID))
        case .awaitingPath, .pathInstalled, .buffering:
            out.append(.promote(chainID: chainID))
            out.append(.setPhase(chainID: chainID, .released))
            out.append(.releaseBuffer(chainID: chainID))
        }
        out.append(.cancelTimer(deadlineKey))
        out.append(.finishAnchor(chainID: chainID))
        return out
    }

    /// cancelLock of our request (§3.6): back on the old path. The router forgets this anchor.
    func cancelled() -> [Action] {
        [.cancelTimer(deadlineKey), .cancelAnchor(chainID: chainID)]
    }

    /// The left anchor fell silent: keep the new path if data already flows on it, else go back to the old one.
    /// The router forgets this anchor.
    func silenceTimerFired() -> [Action] {
        isReleased ? [.finishAnchor(chainID: chainID)] : [.cancelAnchor(chainID: chainID)]
    }
}
