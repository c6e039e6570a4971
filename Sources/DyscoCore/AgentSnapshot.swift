/// What `dysco-migrate sessions` shows: the agent, its counters and every session it knows.
public struct AgentSnapshot: Codable, Sendable {
    public struct Session: Codable, Sendable {
        public var id: UInt64
        public var role: SessionTable.Role
        /// The session as applications and middleboxes see it (client → server).
        public var session: FiveTuple
        /// Subsession from the left neighbour to this host (nil at the left end).
        public var left: FiveTuple?
        /// Subsession from this host to the right neighbour (nil at the right end, or not yet sent).
        public var right: FiveTuple?
        /// Hops still to be told to the right neighbour (middlebox before its SYN leaves).
        public var remaining: [IPv4Address]
        /// "syn-sent", "established", "closing"
        public var state: String
        /// slow (NFQUEUE), pending (being handed to the kernel), kernel (nftables), held (taken back).
        public var path: SessionTable.DataPath
        public var packets: UInt64
        public var bytes: UInt64
        public var idleSeconds: Double
        public var ageSeconds: Double
        /// During a reconfiguration this host anchors: its phase (locked, buffering, probing, released) and
        /// which paths the session uses (old, new, both).
        public var migration: String?
        public var paths: String?
        /// The chain-wide session id (hex) that control messages name (the nonce is not shown).
        public var chainID: String?
    }

    public var netns: String?
    public var pid: Int32
    public var queue: UInt16
    /// Whether the agent mirrors established sessions into the kernel (false with --no-fastpath).
    public var fastPath: Bool
    public var uptimeSeconds: Double
    public var counters: DataplaneCounters
    /// The control protocol's counters: messages sent and received by type, dropped by reason
    /// (`dropped.<reason>`), migrations by result, probes.
    public var control: [String: UInt64]
    public var sessions: [Session]

    public init(netns: String?, pid: Int32, queue: UInt16, fastPath: Bool, uptimeSeconds: Double,
                counters: DataplaneCounters, sessions: [Session]) {
        self.netns = netns
        self.pid = pid
        self.queue = queue
        self.fastPath = fastPath
        self.uptimeSeconds = uptimeSeconds
        self.counters = counters
        self.control = [:]
        self.sessions = sessions
    }
}

extension PacketProcessor {
    /// The table as a snapshot, sessions ordered by id.
    public func snapshotSessions(now: UInt64) -> [AgentSnapshot.Session] {
        table.records.values.sorted { $0.id < $1.id }.map { record in
            let state = record.closeDeadline != nil ? "closing"
                : (record.right != nil && !record.rightEstablished) ? "syn-sent" : "established"
            return AgentSnapshot.Session(
                id: record.id, role: record.role, session: record.session, left: record.left, right: record.right,
                remaining: record.remaining, state: state, path: record.path, packets: record.packets, bytes: record.bytes,
                idleSeconds: Double(now &- record.lastActivity) / 1e9, ageSeconds: Double(now &- record.createdAt) / 1e9,
                migration: record.migration.map { $0.phase.rawValue },
                paths: record.migration.map { m in
                    m.phase == .released && !m.stateful ? "both" : m.promoted ? "new" : "old"
                }, chainID: String(record.identity.chainID, radix: 16))
        }
    }
}
