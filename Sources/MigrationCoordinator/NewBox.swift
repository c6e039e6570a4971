import DyscoCore

/// A middlebox on the new path of one session's reconfiguration (paper §3.1, §3.3): it creates the session
/// from the new-path SYN (newPathSyn), opens its right subsession, passes the answer back, and, stateful, imports
/// the firewall state the old box sends (statePut, §3.5; the import side of the transfer). Nothing tells a new
/// box that the reconfiguration ended well: it forgets its part after `Settings.newBoxLinger`.
struct NewBox: Sendable {
    /// The import of the state document (§3.5), orthogonal to the path's progress.
    enum Import: Sendable {
        case notStarted
        case importing(oldBox: IPAddress)
        case done(ok: Bool, reason: String, micros: UInt32, oldBox: IPAddress)
    }

    enum State: Sendable {
        /// createSession asked of the shell; the right subsession is not open yet.
        case creatingSession(Import)
        /// newPathSyn forwarded to the next hop with our right subsession.
        case forwarded(right: FiveTuple, Import)
        /// The new path's answer (newPathSynAck) came back through this box: its session is on a path in use.
        case answered(right: FiveTuple, Import)
    }

    let requestID: UInt32
    /// The new path's subsession from the left to this box.
    let left: FiveTuple
    let next: IPAddress
    let remaining: [IPAddress]
    /// The newPathSyn that made this box (answers reuse its header).
    let message: ControlMessage
    private(set) var state: State = .creatingSession(.notStarted)

    private var chainID: UInt64 { message.identity.chainID }
    private var deadlineKey: TimerKey { TimerKey(chainID: chainID, role: .newBox, kind: .deadline) }

    var right: FiveTuple? {
        switch state {
        case .forwarded(let r, _), .answered(let r, _): r
        case .creatingSession: nil
        }
    }

    var isAnswered: Bool { if case .answered = state { true } else { false } }

    private var importState: Import {
        switch state {
        case .creatingSession(let i), .forwarded(_, let i), .answered(_, let i): i
        }
    }

    private mutating func setImport(_ i: Import) {
        switch state {
        case .creatingSession: state = .creatingSession(i)
        case .forwarded(let r, _): state = .forwarded(right: r, i)
        case .answered(let r, _): state = .answered(right: r, i)
        }
    }

    /// A newPathSyn naming this box as a middlebox of the new path: create the session.
    init(_ m: ControlMessage, left: FiveTuple, remaining: [IPAddress], next: IPAddress, linger: UInt64,
         _ out: inout [Action]) {
        requestID = m.requestID
        self.left = left
        self.next = next
        self.remaining = remaining
        message = m
        out.append(.setTimer(TimerKey(chainID: m.identity.chainID, role: .newBox, kind: .deadline), afterNanoseconds: linger))
        out.append(.createSession(m.identity, session: m.session, left: left, next: next))
    }

    /// A retransmitted newPathSyn of our request: forward it again once our right subsession is open.
    func newPathSynAgain(_ m: ControlMessage, subsession: FiveTuple, remaining: [IPAddress]) -> [Action] {
        guard subsession == left, let right, let next = remaining.first else { return [] }
        return [.send(m.with(body: .newPathSyn(subsession: right, remaining: Array(remaining.dropFirst()))), to: next)]
    }

    /// The shell created the session and its right subsession: pass newPathSyn on (§3.3).
    mutating func pathOpened(_ subsession: FiveTuple) -> [Action] {
        guard case .creatingSession(let i) = state else { return [] }
        state = .forwarded(right: subsession, i)
        return [.send(message.with(body: .newPathSyn(subsession: subsession, remaining: Array(remaining.dropFirst()))),
                      to: next)]
    }

    /// The shell could not create the session: say why to the left anchor (issue 20). The router forgets this box.
    func pathRefused(_ reason: String) -> [Action] {
        [.cancelTimer(deadlineKey),
         .send(message.answer(.newPathRefused(reason: "new box: \(reason)")), to: message.leftAnchor)]
    }

    /// newPathSynAck from the right for our subsession: mark it established, answer to the left.
    mutating func newPathAnswered(_ m: ControlMessage, subsession: FiveTuple) -> [Action] {
        guard m.requestID == requestID, let right, subsession == right else { return [] }
        state = .answered(right: right, importState)
        return [.markEstablished(chainID: chainID), .send(m.answer(.newPathSynAck(subsession: left)), to: left.srcAddr)]
    }

    /// statePut from the old box (§3.5): import the document (once), or answer again with the import's result.
    mutating func statePut(_ m: ControlMessage, document: [UInt8], from: IPAddress) -> [Action] {
        switch importState {
        case .done(let ok, let reason, let micros, _):
            return [.send(m.answer(.stateInstalled(ok: ok, times: StateTimes(importMicroseconds: micros), reason: reason)),
                          to: from)]
        case .importing:
            return []
        case .notStarted:
            setImport(.importing(oldBox: from))
            return [.importState(chainID: chainID, requestID: m.requestID, document: document)]
        }
    }

    /// The shell's import result: answer the old box with it and the import's duration. An entry whose NAT binding
    /// translates the session re-keys this box's right side first (paper §2.1; docs/ARCHITECTURE.md, "Boxes that
    /// translate"), in force before the answer leaves.
    mutating func stateImported(_ result: Result<FiveTuple?, StepFailure>, micros: UInt32) -> [Action] {
        guard case .importing(let oldBox) = importState else { return [] }
        let ok: Bool, reason: String
        var out: [Action] = []
        switch result {
        case .success(let translated):
            (ok, reason) = (true, "")
            if let translated { out += [.translate(chainID: chainID, translated), .commitKernel] }
        case .failure(let failure): (ok, reason) = (false, "import at the new box refused: \(failure)")
        }
        setImport(.done(ok: ok, reason: reason, micros: micros, oldBox: oldBox))
        return out + [.send(message.answer(.stateInstalled(ok: ok, times: StateTimes(importMicroseconds: micros), reason: reason)),
                      to: oldBox)]
    }
}
