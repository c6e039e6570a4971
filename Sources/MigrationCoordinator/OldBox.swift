import DyscoCore

/// The old box of one stateful reconfiguration (paper §3.5, last paragraph; §5.3): the middlebox being replaced
/// exports the session's firewall state when the left anchor asks (stateRequest), sends it to the new box
/// (statePut), and relays the new box's answer (stateInstalled) to the left anchor with its export time.
struct OldBox: Sendable {
    enum State: Sendable {
        /// exportState asked of the shell.
        case exporting
        /// The document went to the new box; waiting for its stateInstalled.
        case sent(document: [UInt8], exportMicros: UInt32)
        /// The transfer's result is known (the new box's answer, or a failed export).
        case installed(ok: Bool, reason: String, exportMicros: UInt32)
    }

    let requestID: UInt32
    let leftAnchor: IPAddress
    let newBox: IPAddress
    /// The stateRequest (answers and statePut reuse its header).
    let message: ControlMessage
    private(set) var state: State = .exporting

    private var chainID: UInt64 { message.identity.chainID }

    /// A stateRequest of the request that locked this box: export.
    init(_ m: ControlMessage, newBox: IPAddress, from: IPAddress, _ out: inout [Action]) {
        requestID = m.requestID
        leftAnchor = from
        self.newBox = newBox
        message = m
        out.append(.exportState(chainID: m.identity.chainID, requestID: m.requestID, session: m.session))
    }

    /// A retransmitted stateRequest: answer again if the result is known, send the document again if it went.
    func stateRequestAgain(_ m: ControlMessage, from: IPAddress) -> [Action] {
        switch state {
        case .exporting:
            return []
        case .sent(let document, _):
            return [.send(m.with(body: .statePut(document: document)), to: newBox)]
        case .installed(let ok, let reason, let exportMicros):
            return [.send(m.answer(.stateInstalled(ok: ok, times: StateTimes(exportMicroseconds: exportMicros), reason: reason)),
                          to: from)]
        }
    }

    /// The shell's export result: the document goes to the new box, or the failure to the left anchor.
    mutating func stateExported(_ result: Result<[UInt8], StepFailure>, micros: UInt32) -> [Action] {
        guard case .exporting = state else { return [] }
        switch result {
        case .success(let document):
            state = .sent(document: document, exportMicros: micros)
            return [.send(message.with(body: .statePut(document: document)), to: newBox)]
        case .failure(let failure):
            let reason = "export at the old box failed: \(failure)"
            state = .installed(ok: false, reason: reason, exportMicros: micros)
            return [.send(message.answer(.stateInstalled(ok: false, times: StateTimes(exportMicroseconds: micros), reason: reason)),
                          to: leftAnchor)]
        }
    }

    /// The new box answered: pass it to the left anchor, with the export time.
    mutating func newBoxAnswered(_ m: ControlMessage, ok: Bool, times: StateTimes, reason: String) -> [Action] {
        let exportMicros: UInt32
        switch state {
        case .exporting: exportMicros = 0
        case .sent(_, let e), .installed(_, _, let e): exportMicros = e
        }
        state = .installed(ok: ok, reason: reason, exportMicros: exportMicros)
        let relayed = StateTimes(exportMicroseconds: exportMicros, importMicroseconds: times.importMicroseconds)
        return [.send(m.answer(.stateInstalled(ok: ok, times: relayed, reason: reason)), to: leftAnchor)]
    }
}
