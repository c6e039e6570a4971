/// What `dysco-migrate sessions` shows: the agent, its counters and every session it knows.
///
/// Read across releases (issue 19, rolling upgrade): a reader ignores fields it does not know (Foundation's
/// decoder does), a data-plane counter an older agent does not send reads as 0 (``DataplaneCounters``), and every
/// field added since 0.19 is optional.
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
        public var remaining: [IPAddress]
        /// "opening" (SYN-only: the handshake has not completed through this agent), "established", "closing"
        public var state: String
        /// The session's carrier: slow (NFQUEUE), pending (being handed to the kernel), kernel (BPF map entries), held
        /// (taken back). JSON key `path`, as before the rename.
        public var carrier: SessionTable.Carrier
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
        /// Sequence deltas (§3.4) the active left / right subsession applies (absent: none), and what the box on
        /// this host reported it does to the two streams (`dysco-migrate delta`; absent: nothing).
        public var leftDelta: Int32?
        public var rightDelta: Int32?
        public var boxDelta: SessionTable.BoxDelta?
        /// At a session-terminating proxy: its session with the server, joined to this one (`session`, the
        /// client's) when the proxy spliced their sockets (``SessionTable/Record/spliced``); its chain id.
        public var splicedTo: FiveTuple?
        public var splicedChainID: String?
        /// At a joined proxy: whether its four timestamp clocks are known (``SessionTable/TimestampClocks``); its
        /// removal waits for them.
        public var spliceClocksKnown: Bool? = nil
        /// At a box that translates tuples: the session as it leaves the box, after its NAT (the right subsession's
        /// session; ``SessionTable/Record/translated``). Absent when the box left the tuple as it was.
        public var translated: FiveTuple? = nil

        enum CodingKeys: String, CodingKey {
            case id, role, session, left, right, remaining, state, carrier = "path", packets, bytes, idleSeconds,
                 ageSeconds, migration, paths, chainID, leftDelta, rightDelta, boxDelta, splicedTo, splicedChainID, spliceClocksKnown,
                 translated
        }
    }

    /// The agent's release (``DyscoVersion``) and the control-protocol versions it takes (issue 19, rolling
    /// upgrade). Absent from an agent older than 0.20, whose reply is read all the same.
    public var agentVersion: String?
    public var wireVersions: [UInt8]?
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
    /// One page of the table (ids ascending): the agent answers at most ``pageLimit`` sessions per request.
    public var sessions: [Session]
    /// Sessions in the table when the page was taken (all pages together list about this many).
    public var total: Int?
    /// Ask for the next page with `after` = this id; nil when this page is the last.
    public var next: UInt64?

    /// Most sessions one `sessions` reply carries (a request may ask for fewer): building a page holds the
    /// packet lock for one pass over the table's ids plus this many rows, whatever the table's size.
    public static let pageLimit = 2_000

    public init(netns: String?, pid: Int32, queue: UInt16, fastPath: Bool, uptimeSeconds: Double,
                counters: DataplaneCounters, sessions: [Session]) {
        self.agentVersion = DyscoVersion.string
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
    /// One page of the table as a snapshot: sessions with an id greater than `after`, ascending, at most
    /// `limit`; `more` when sessions are left after the page. One pass over the ids, keeping the lowest
    /// `limit` (sorted and cut whenever twice that many are kept): O(n log limit), rows built only for the page.
    public func snapshotSessions(now: UInt64, after: UInt64? = nil, limit: Int = AgentSnapshot.pageLimit)
        -> (sessions: [AgentSnapshot.Session], more: Bool) {
        let limit = max(1, limit)
        var kept: [SessionTable.SessionID] = []
        var more = false
        kept.reserveCapacity(min(table.records.count, 2 * limit))
        for id in table.records.keys where after.map({ id > $0 }) ?? true {
            kept.append(id)
            if kept.count >= 2 * limit {
                kept.sort()
                kept.removeLast(kept.count - limit)
                more = true
            }
        }
        kept.sort()
        if kept.count > limit {
            kept.removeLast(kept.count - limit)
            more = true
        }
        return (kept.compactMap { table.records[$0].map { Self.row($0, now: now) } }, more)
    }

    /// What `sessions` shows of one record.
    static func row(_ record: SessionTable.Record, now: UInt64) -> AgentSnapshot.Session {
        let state = record.closeDeadline != nil ? "closing"
            // A new box of a reconfiguration is `established` at once (no handshake crosses it), but opening
            // until its new path's SYN is answered from the right (`markEstablished`).
            : record.established && (record.right == nil || record.rightEstablished) ? "established" : "opening"
        return AgentSnapshot.Session(
            id: record.id, role: record.role, session: record.session, left: record.left, right: record.right,
            remaining: record.remaining, state: state, carrier: record.carrier, packets: record.packets, bytes: record.bytes,
            idleSeconds: Double(now &- record.lastActivity) / 1e9, ageSeconds: Double(now &- record.createdAt) / 1e9,
            migration: record.migration.map { $0.phase.rawValue },
            paths: record.migration.map { m in
                m.phase == .released && !m.stateful ? "both" : m.promoted ? "new" : "old"
            }, chainID: String(record.identity.chainID, radix: 16),
            leftDelta: record.leftLink.flatMap { $0.active.seqDelta == 0 ? nil : $0.active.seqDelta },
            rightDelta: record.rightLink.flatMap { $0.active.seqDelta == 0 ? nil : $0.active.seqDelta },
            boxDelta: record.boxDelta == .zero ? nil : record.boxDelta,
            splicedTo: record.spliced?.session, splicedChainID: record.spliced.map { String($0.identity.chainID, radix: 16) },
            spliceClocksKnown: record.spliced.map { _ in record.clocks.deltas != nil }, translated: record.translated)
    }
}
