/// The agent's session table: the single source of truth for every session this host takes part in, and
/// the two translation maps derived from it (paper §2.1, docs/ARCHITECTURE.md "Session table").
///
/// A host sees a session S (client→server, as applications and middleboxes see it) and up to two
/// subsessions: `left` (from its left neighbour to it) and `right` (from it to its right neighbour), both
/// written in the session's direction. The translations follow from these alone:
///
/// | map     | key      | rewrite to | exists when        |
/// |---------|----------|------------|--------------------|
/// | ingress | L        | S          | left != nil        |
/// | ingress | rev(R)   | rev(S)     | right != nil       |
/// | egress  | S        | R          | right != nil       |
/// | egress  | rev(S)   | rev(L)     | left != nil        |
///
/// Ingress runs before conntrack (raw PREROUTING), egress after routing and filtering (mangle OUTPUT for
/// local packets, mangle POSTROUTING for forwarded ones), so the host's stack and firewall see S only.
public struct SessionTable: Sendable {
    public typealias SessionID = UInt64

    public enum Role: String, Sendable, Codable {
        /// The chain starts here (a local client's SYN matched a policy).
        case leftEnd = "left-end"
        /// A middlebox host: the session enters from the left and leaves to the right.
        case middlebox
        /// The chain ends here: the session is delivered to a local server.
        case rightEnd = "right-end"
    }

    /// Which data path carries a session's established packets (docs/ARCHITECTURE.md, "Kernel fast path").
    public enum DataPath: String, Sendable, Codable {
        /// NFQUEUE, this agent (handshake not complete, fast path off, or it failed).
        case slow
        /// Handed to the fast-path worker; still the slow path until the kernel has it.
        case pending
        /// nftables rewrites it; only SYN/FIN/RST reach the agent.
        case kernel
        /// Taken back to the slow path on request (migration) until released.
        case held
    }

    /// Direction of a packet relative to the session: forward = client→server.
    public enum Direction: Sendable { case forward, reverse }

    public struct Record: Sendable {
        public let id: SessionID
        public let role: Role
        public let session: FiveTuple
        public var left: FiveTuple?
        public var right: FiveTuple?
        /// Hops after the right neighbour, carried in the SYN we send (middlebox: until it is sent).
        public var remaining: [IPv4Address]
        /// The right subsession saw its SYN-ACK: stop appending the Dysco trailer to SYNs.
        public var rightEstablished = false
        public var finForward = false
        public var finReverse = false
        public var reset = false
        /// Set when the session is over (both FINs or an RST): removed once this deadline passes.
        public var closeDeadline: UInt64?
        public let createdAt: UInt64
        public var lastActivity: UInt64
        /// Port this agent allocated for the right subsession, returned at removal.
        public var allocatedPort: UInt16?
        public var packets: UInt64 = 0
        public var bytes: UInt64 = 0
        public var path: DataPath = .slow
        /// The kernel refused this session's translations once: it stays on the slow path.
        public var fastPathFailed = false
    }

    /// A map entry: which session, where to rewrite to, and which way the packet goes.
    public struct Translation: Sendable {
        public let id: SessionID
        public let target: FiveTuple
        public let direction: Direction
        /// True for ingress rev(R): packets from the right neighbour on our right subsession.
        public let fromRight: Bool
    }

    public private(set) var records: [SessionID: Record] = [:]
    public private(set) var ingress: [FiveTuple: Translation] = [:]
    public private(set) var egress: [FiveTuple: Translation] = [:]
    /// Session tuple → id, for matching a middlebox's egress SYN with the ingress SYN that created it.
    public private(set) var bySession: [FiveTuple: SessionID] = [:]
    public var ports: PortAllocator
    private var nextID: SessionID = 1

    public init(portRange: ClosedRange<UInt16>) {
        ports = PortAllocator(range: portRange)
    }

    public var count: Int { records.count }

    public enum InsertError: Error, Equatable, Sendable {
        /// A key this session needs already belongs to another live session.
        case collision(FiveTuple)
        case portsExhausted
    }

    /// Inserts a session whose left subsession arrived in a Dysco SYN (middlebox or right end).
    public mutating func insertFromLeft(session: FiveTuple, left: FiveTuple, remaining: [IPv4Address],
                                        now: UInt64) throws(InsertError) -> SessionID {
        let role: Role = remaining.isEmpty ? .rightEnd : .middlebox
        for key in [left] where ingress[key] != nil { throw .collision(key) }
        if egress[session.reversed] != nil { throw .collision(session.reversed) }
        if bySession[session] != nil { throw .collision(session) }
        let id = takeID()
        records[id] = Record(id: id, role: role, session: session, left: left, right: nil, remaining: remaining,
                             createdAt: now, lastActivity: now)
        ingress[left] = Translation(id: id, target: session, direction: .forward, fromRight: false)
        egress[session.reversed] = Translation(id: id, target: left.reversed, direction: .reverse, fromRight: false)
        bySession[session] = id
        return id
    }

    /// Starts a chain here: a local SYN matched a policy; `hops` = middleboxes then the session's right end.
    public mutating func insertLeftEnd(session: FiveTuple, hops: [IPv4Address], now: UInt64) throws(InsertError)
        -> SessionID {
        precondition(!hops.isEmpty)
        if egress[session] != nil || bySession[session] != nil { throw .collision(session) }
        let id = takeID()
        records[id] = Record(id: id, role: .leftEnd, session: session, left: nil, right: nil,
                             remaining: Array(hops.dropFirst()), createdAt: now, lastActivity: now)
        bySession[session] = id
        do {
            try openRight(id, local: session.srcAddr, next: hops[0])
        } catch {
            remove(id)
            throw error
        }
        return id
    }

    /// Creates the right subsession of `id` from `local` to `next` with a freshly allocated port, and its
    /// two translations. The remaining list then holds what the next hop must learn.
    public mutating func openRight(_ id: SessionID, local: IPv4Address, next: IPv4Address) throws(InsertError) {
        guard var record = records[id], record.right == nil else { return }
        guard let port = ports.allocate() else { throw .portsExhausted }
        let right = FiveTuple(srcAddr: local, srcPort: port, dstAddr: next, dstPort: record.session.dstPort)
        if ingress[right.reversed] != nil || egress[record.session] != nil {
            ports.release(port)
            throw .collision(right.reversed)
        }
        record.right = right
        record.allocatedPort = port
        records[id] = record
        egress[record.session] = Translation(id: id, target: right, direction: .forward, fromRight: false)
        ingress[right.reversed] = Translation(id: id, target: record.session.reversed, direction: .reverse,
                                              fromRight: true)
    }

    /// Removes a session, its translations and its port.
    public mutating func remove(_ id: SessionID) {
        guard let record = records.removeValue(forKey: id) else { return }
        if let left = record.left {
            ingress.removeValue(forKey: left)
            egress.removeValue(forKey: record.session.reversed)
        }
        if let right = record.right {
            egress.removeValue(forKey: record.session)
            ingress.removeValue(forKey: right.reversed)
        }
        if bySession[record.session] == id { bySession.removeValue(forKey: record.session) }
        if let port = record.allocatedPort { ports.release(port) }
    }

    public mutating func update(_ id: SessionID, _ body: (inout Record) -> Void) {
        guard var record = records[id] else { return }
        body(&record)
        records[id] = record
    }

    /// Sessions due for removal at `now`: closed past their linger deadline, or idle for `idleTimeout`.
    public func expired(now: UInt64, idleTimeout: UInt64) -> [SessionID] {
        records.values.compactMap { record in
            if let deadline = record.closeDeadline, deadline <= now { return record.id }
            if now >= record.lastActivity, now - record.lastActivity >= idleTimeout { return record.id }
            return nil
        }
    }

    private mutating func takeID() -> SessionID {
        defer { nextID += 1 }
        return nextID
    }
}
