import DyscoCore

extension BPFEvent {
    /// What the agent's processor takes (``KernelEvent``); nil for an event this build does not know (a newer
    /// object's type, a key it cannot decode): counted by the caller and ignored.
    public var kernelEvent: KernelEvent? {
        guard let key else { return nil }
        let kind: KernelEvent.Kind
        switch self.kind {
        case .fin: kind = .fin
        case .rst: kind = .reset
        case .established: kind = .established
        case .natSyn: kind = .natSyn
        case .unknown: return nil
        }
        return KernelEvent(kind: kind, sessionID: sessionID, hook: key.hook == .ingress ? .ingress : .egress,
                           key: key.tuple, sequenceNumber: sequence, acknowledgmentNumber: acknowledgment,
                           flags: TCPFlags(rawValue: tcpFlags & 0x3f))
    }
}

extension KernelEvent {
    /// The events an entry's flags say the program reported (`FIN_SEEN`, `RST_SEEN`), for a consumer that lost
    /// events (a full ring, docs/BPF.md): rebuilt from the entry's facts of its last packet. The sequence number
    /// is that packet's (`seq_end` less the FIN's 1) only when the last packet was the FIN or RST itself; only
    /// an ingress RST's judging reads it, and the agent's tracking of a kernel-carried session is stale anyway.
    /// An entry that carried packets and is not `OPENING` (any more) reports `ESTABLISHED` too: a session opened
    /// with its SYN whose report was lost would otherwise go at the SYN timeout (the processor ignores it for a
    /// session already established).
    public static func reported(by key: BPFSessionKey, _ entry: BPFSessionEntry) -> [KernelEvent] {
        var events: [KernelEvent] = []
        if !entry.flags.contains(.opening), entry.packets > 0 {
            events.append(KernelEvent(kind: .established, sessionID: entry.sessionID,
                                      hook: key.hook == .ingress ? .ingress : .egress, key: key.tuple, sequenceNumber: 0,
                                      acknowledgmentNumber: entry.tcp.acknowledgment, flags: [.ack]))
        }
        let last = TCPFlags(rawValue: entry.tcp.tcpFlags & 0x3f)
        let hook: HookPoint = key.hook == .ingress ? .ingress : .egress
        func event(_ kind: Kind, _ flag: TCPFlags) -> KernelEvent {
            let seq = entry.tcp.sequenceEnd &- (last.contains(.fin) ? 1 : 0)
            return KernelEvent(kind: kind, sessionID: entry.sessionID, hook: hook, key: key.tuple,
                               sequenceNumber: last.contains(flag) ? seq : 0, acknowledgmentNumber: entry.tcp.acknowledgment,
                               flags: last.contains(flag) ? last : [flag, .ack])
        }
        if entry.flags.contains(.finSeen) { events.append(event(.fin, .fin)) }
        if entry.flags.contains(.rstSeen) { events.append(event(.reset, .rst)) }
        return events
    }
}
