/// Settling a provisional RST at the end host that receives it (issue 19 item 4.4; docs/ARCHITECTURE.md "Forged
/// resets"). An RST arriving at an end host is provisional (RFC 5961 §3: the agent cannot tell a genuine one from a
/// forged one in the window, least of all for a kernel-carried session, whose tracking is not fresh), and nothing
/// leaves that host afterwards to confirm it. But the endpoint itself judges it, with its exact state: Linux takes a
/// genuine RST and destroys the socket, and answers anything else with a challenge ACK or drops it, keeping the
/// socket. So the shell asks the local stack (sock_diag) about the session's socket: gone (or closed) → the RST was
/// genuine, confirmed now (the session goes after the reset linger, as at the other hosts); still there → nothing
/// changes (a challenge ACK refutes it as before, or it stays provisional until a packet or the idle timeout).
extension PacketProcessor {
    /// A session's local socket, as the stack names it: local address and port first.
    public struct ResetProbe: Sendable, Equatable {
        public var id: SessionTable.SessionID
        public var local: FiveTuple
        public init(id: SessionTable.SessionID, local: FiveTuple) {
            self.id = id
            self.local = local
        }
    }

    /// An RST passed provisionally at ingress: probe the local socket if this host is the session's end.
    mutating func noteProvisionalReset(_ id: SessionTable.SessionID) {
        guard let record = table.records[id], record.role != .middlebox, record.spliced == nil else { return }
        resetProbeIDs.insert(id)
    }

    /// The end-host sessions whose RST is still provisional, with the local socket to look at (at most `limit`,
    /// the rest at the next look); ids no longer provisional (refuted, confirmed, removed) are forgotten.
    public mutating func resetProbes(limit: Int) -> [ResetProbe] {
        guard !resetProbeIDs.isEmpty else { return [] }
        var probes: [ResetProbe] = []
        for id in resetProbeIDs {
            guard let record = table.records[id], record.resetSeen, !record.reset else {
                resetProbeIDs.remove(id)
                continue
            }
            guard probes.count < limit else { break }
            // At the left end the local application is the client (the session's source), at the right end the server.
            probes.append(ResetProbe(id: id, local: record.role == .leftEnd ? record.session : record.session.reversed))
        }
        return probes
    }

    /// The probe found no socket of the session (or a closed one): the endpoint took the RST, which was genuine.
    /// Confirmed as an RST seen leaving this host would be: the session goes after the reset linger, unless a later
    /// packet still refutes it. Returns whether it was still provisional.
    @discardableResult
    public mutating func confirmProbedReset(_ id: SessionTable.SessionID, now: UInt64) -> Bool {
        resetProbeIDs.remove(id)
        guard let record = table.records[id], record.resetSeen, !record.reset else { return false }
        let linger = settings.resetLinger
        table.update(id) { record in
            record.reset = true
            record.closeDeadline = min(record.closeDeadline ?? .max, now &+ linger)
            record.lastActivity = now
        }
        counters.resetsConfirmed &+= 1
        counters.resetsConfirmedByProbe &+= 1
        return true
    }
}
