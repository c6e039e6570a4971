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

    /// What carries a session's established packets, its carrier: the agent (slow) or the kernel
    /// (docs/ARCHITECTURE.md, "Kernel fast path"). Not to be confused with a subsession's path tag.
    public enum Carrier: String, Sendable, Codable {
        /// NFQUEUE, this agent (handshake not complete, fast path off, or it failed).
        case slow
        /// Handed to the kernel path; still the slow path until the kernel has it.
        case pending
        /// The kernel's map entries rewrite it; its FIN/RST reach the agent as ring-buffer events.
        case kernel
        /// Taken back to the slow path on request (migration) until released.
        case held
    }

    /// Direction of a packet relative to the session: forward = client→server.
    public enum Direction: Sendable { case forward, reverse }

    /// Which side of this host a subsession is on.
    public enum Side: String, Sendable, Codable { case left, right }

    /// One subsession (paper §2.1) on one side of this host, tagged with the path it belongs to: path 0 is the
    /// one the session was set up on; each reconfiguration (§3) that replaces this side's path adds one.
    public struct Subsession: Sendable, Equatable {
        public var tuple: FiveTuple
        /// Port this agent allocated for it (the subsessions it opened to its right), returned when it goes.
        public var allocatedPort: UInt16?
        /// The path tag (0, 1, 2 …): which path of the session this subsession belongs to.
        public var pathTag: UInt8
        /// Sequence-number delta (paper §3.4) of the stream arriving on this subsession: added to the sequence
        /// number of every packet that arrives on it, subtracted from the acknowledgment number and the SACK
        /// blocks of every packet that leaves on it. Nonzero once a reconfiguration removed (or replaced) boxes
        /// that changed the byte stream; it lives as long as the subsession (docs/ARCHITECTURE.md, "Sequence deltas").
        public var seqDelta: Int32 = 0
        /// Timestamp delta (§4, "Differences in TCP options for two spliced TCP sessions"): added to the TSval of
        /// every packet that arrives on it, subtracted from the TSecr of every packet that leaves on it. Nonzero
        /// once a reconfiguration removed a session-terminating proxy (its two sessions' timestamp clocks differ).
        public var tsDelta: Int32 = 0

        public init(tuple: FiveTuple, allocatedPort: UInt16?, pathTag: UInt8, seqDelta: Int32 = 0, tsDelta: Int32 = 0) {
            self.tuple = tuple
            self.allocatedPort = allocatedPort
            self.pathTag = pathTag
            self.seqDelta = seqDelta
            self.tsDelta = tsDelta
        }
    }

    /// A side's subsessions: `active` carries this host's egress; during a reconfiguration `other` is the
    /// second path (§3.5: "both old and new paths exist"). Ingress is accepted on both.
    public struct Link: Sendable, Equatable {
        public fileprivate(set) var active: Subsession
        public fileprivate(set) var other: Subsession?
        var all: [Subsession] { [active] + (other.map { [$0] } ?? []) }
    }

    public struct Record: Sendable {
        public let id: SessionID
        public let role: Role
        public let session: FiveTuple
        /// Chain-wide session id and nonce (trailer v2, control messages; paper §2.3).
        public let identity: SessionIdentity
        /// The subsessions: only ``SessionTable`` changes them (the maps are derived from them).
        public fileprivate(set) var leftLink: Link?
        public fileprivate(set) var rightLink: Link?
        /// Subsession from the left neighbour to this host on the active path (nil at the left end).
        public var left: FiveTuple? { leftLink?.active.tuple }
        /// Subsession from this host to the right neighbour on the active path (nil at the right end).
        public var right: FiveTuple? { rightLink?.active.tuple }
        /// Hops after the right neighbour, carried in the SYN we send (middlebox: until it is sent).
        public var remaining: [IPAddress]
        /// The right subsession saw its SYN-ACK: stop appending the Dysco trailer to SYNs.
        public var rightEstablished = false
        public var finForward = false
        public var finReverse = false
        /// An RST confirmed genuine (seen leaving this host, or exact by tracking): the session goes at
        /// `closeDeadline` unless a later packet proves the RST false (docs/ARCHITECTURE.md, "Forged resets").
        public var reset = false
        /// An RST passed and no later packet has crossed yet: provisional until one does (the RST was false).
        public var resetSeen = false
        /// The three-way handshake completed through this agent (a SYN-ACK back, then an ACK forward); until
        /// then the record is SYN-only and expires after ``PacketProcessor/Settings/synTimeout``.
        public var established = false
        public var synAckSeen = false
        /// Per-direction sequence numbers the slow path saw (RFC 5961 §3 checks of an RST).
        public var sequence = SequenceTracking()
        /// After an RST the session stays on the slow path until then (one reset linger): its tracking is fresh,
        /// so an RST spray is judged (and mostly dropped) per packet instead of costing two map
        /// changes per RST.
        public var fastPathNotBefore: UInt64 = 0
        /// Set when the session is over (both FINs or a confirmed RST): removed once this deadline passes.
        public var closeDeadline: UInt64?
        public let createdAt: UInt64
        public var lastActivity: UInt64
        public var packets: UInt64 = 0
        public var bytes: UInt64 = 0
        public var carrier: Carrier = .slow
        /// The kernel refused this session's translations once: it stays on the slow path.
        public var fastPathFailed = false
        /// Data-plane state of a reconfiguration this host anchors (nil otherwise).
        public var migration: AnchorState?
        /// What the middlebox on this host does to the session's byte streams (§3.4, reported by the box:
        /// ``PacketProcessor/setBoxDelta(session:_:)``): an old-path hop adds it to the lock messages' sums.
        public var boxDelta = BoxDelta.zero
        /// A session-terminating proxy's second session (§2.2, §4; ``SessionTable/join(_:_:boxDelta:)``): the
        /// record joins the proxy's session with its client (`session`, `identity`, the left subsessions) and its
        /// session with the server (this, the right subsessions). Nil for every other record.
        public fileprivate(set) var spliced: Splice?
        /// The name the other half of a spliced-out proxy's chain has for this session (``ChainAlias``): control
        /// messages with that identity are this session's, and those to `alias.peer` carry it. Set at a right
        /// anchor by the proxy's `splice` message (the new path's left anchor knows the session by the client's
        /// chain). Not in the state file.
        public fileprivate(set) var alias: ChainAlias?
        /// A joined proxy's four timestamp clocks, learnt from the packets the agent sees after the join.
        public var clocks = TimestampClocks()

        /// The kernel datapath translates sequence numbers, not timestamps: a session whose subsessions shift
        /// timestamps, or a joined proxy still learning its clocks, stays with the agent.
        public var needsSlowPath: Bool {
            if spliced != nil, !clocks.complete { return true }
            for link in [leftLink, rightLink] { if let link, link.all.contains(where: { $0.tsDelta != 0 }) { return true } }
            return false
        }
        /// The session as it leaves a box that translates tuples (a NAT'ing firewall, paper §2.1 "Middleboxes that
        /// modify the five-tuple"): learnt from the box's own SYN after its NAT (``SessionTable/setTranslated(_:_:)``).
        /// Nil when the box left the tuple as it was.
        public fileprivate(set) var translated: FiveTuple?
        /// A box before this host translated the session's tuple (the SYN's trailer said so,
        /// ``DyscoSynPayload/renamedUpstream``): `session` is the tuple as that box made it, and the chain's left end
        /// knows the session by another. Its reconfiguration messages name it the left end's way; they are accepted
        /// on the chain's identity (docs/CONTROL-PROTOCOL.md, "Sessions a box renamed").
        public var renamedUpstream = false
        /// The session tuple the right subsessions carry: `session`, but the proxy's second session at a joined proxy
        /// and the translated tuple at a box that changed it.
        public var rightSession: FiveTuple { spliced?.session ?? translated ?? session }

        /// What this host adds to each byte stream between its left and right subsessions (§3.4): the box's delta
        /// plus the delta its active subsession on the stream's incoming side applies. An old-path hop adds it to
        /// the lock messages' sums.
        public var hopDelta: BoxDelta {
            BoxDelta(forward: (leftLink?.active.seqDelta ?? 0) &+ boxDelta.forward,
                     reverse: (rightLink?.active.seqDelta ?? 0) &+ boxDelta.reverse)
        }

        public func link(_ side: Side) -> Link? { side == .left ? leftLink : rightLink }
        /// The left neighbour's address (nil at the left end).
        public var leftNeighbour: IPAddress? { left?.srcAddr }
        /// The right neighbour's address (nil at the right end, or before the right subsession exists).
        public var rightNeighbour: IPAddress? { right?.dstAddr }
    }

    /// The proxy's session towards the server, joined to its session with the client (``Record/spliced``).
    public struct Splice: Sendable, Equatable {
        /// The session as the proxy's socket towards the server sees it (proxy → server).
        public var session: FiveTuple
        /// That session's chain identity (its own chain, from the proxy to the server).
        public var identity: SessionIdentity
        /// The four initial sequence numbers: the client's, the proxy's to the client, the proxy's to the server, the
        /// server's (nil after a restart: the state file does not keep them). The proxy's sockets are closed with them
        /// once it is out of the session (``PacketProcessor/SplicedOutSocket``).
        public var initialNumbers: [UInt32]?
        /// The bytes the proxy reported adding to each stream (`dysco_splice`'s delta; 0 for a TCP-mode proxy): part of
        /// the box delta, and of the proxy's emptiness test (``Record/boxDelta``). Not in the state file either.
        public var bytesDelta = BoxDelta.zero
        public init(session: FiveTuple, identity: SessionIdentity, initialNumbers: [UInt32]? = nil) {
            self.session = session
            self.identity = identity
            self.initialNumbers = initialNumbers
        }
    }

    /// A session-terminating proxy's two sessions run four timestamp clocks (RFC 7323; Linux: milliseconds plus a
    /// random offset per connection): the client's and the proxy's towards the server (forward), the server's and
    /// the proxy's towards the client (reverse). Once the proxy is spliced out, the anchors shift each stream's
    /// TSval onto the clock its receiver knows, and each TSecr back (paper §4, ``Subsession/tsDelta``). Each clock's
    /// offset from the agent's own millisecond clock is estimated as TSval − now; the largest estimate is the
    /// nearest (a packet is seen after it was stamped). A few packets without the option mean no timestamps.
    public struct TimestampClocks: Sendable, Equatable {
        public enum Clock: Int, Sendable {
            case client, proxyToServer, server, proxyToClient
            /// The clock that stamped a packet of a joined record, by its direction and where the agent saw it.
            public init(direction: Direction, hook: HookPoint) {
                switch (direction, hook) {
                case (.forward, .ingress): self = .client
                case (.forward, .egress): self = .proxyToServer
                case (.reverse, .ingress): self = .server
                case (.reverse, .egress): self = .proxyToClient
                }
            }
        }
        /// TSval − now (ms, modulo 2³²) per clock, the largest seen.
        public private(set) var offsets: [UInt32?] = [nil, nil, nil, nil]
        /// Packets seen without the option.
        public private(set) var without = 0
        public init() {}

        public var complete: Bool { !offsets.contains(where: { $0 == nil }) || (without >= Self.noTimestampsAfter && offsets.allSatisfy { $0 == nil }) }
        static let noTimestampsAfter = 16
        /// Added to each delta: a shifted TSval must not fall behind the one its receiver saw last (PAWS accepts one
        /// tick behind, RFC 7323 §5), and each estimate is off by up to the agent's coarse clock tick plus the time a
        /// packet waited for the agent (tens of milliseconds when many sessions join at once). Ahead is harmless:
        /// the echo is shifted back exactly, and a receiver only compares TSvals with each other. The old path's
        /// TSvals are shifted by the margin too from the anchor's notice on (``PacketProcessor/spliceNotice``), so a
        /// late packet on it does not fall behind the new path's.
        public static let margin: Int32 = 1000

        public mutating func observe(_ clock: Clock, value: UInt32?, nowMillis: UInt32) {
            guard let value else { without += 1; return }
            let offset = value &- nowMillis
            if let old = offsets[clock.rawValue], Int32(bitPattern: offset &- old) <= 0 { return }
            offsets[clock.rawValue] = offset
        }

        /// The timestamp deltas once complete: forward (the client's TSval onto the proxy's clock towards the
        /// server), reverse (the server's onto the proxy's towards the client); zero without timestamps.
        public var deltas: BoxDelta? {
            guard complete else { return nil }
            guard let c = offsets[0], let p2 = offsets[1], let s = offsets[2], let p1 = offsets[3] else { return .zero }
            return BoxDelta(forward: Int32(bitPattern: p2 &- c) &+ Self.margin, reverse: Int32(bitPattern: p1 &- s) &+ Self.margin)
        }
    }

    /// Another identity of this session: the client's chain's, at the server's agent after the proxy between them
    /// is spliced out (``Record/alias``).
    public struct ChainAlias: Sendable, Equatable {
        public var identity: SessionIdentity
        public var session: FiveTuple
        /// The agent that uses this identity (the left anchor of the proxy's removal).
        public var peer: IPAddress
        public init(identity: SessionIdentity, session: FiveTuple, peer: IPAddress) {
            self.identity = identity
            self.session = session
            self.peer = peer
        }
    }

    /// A spliced proxy's second report of the same pair, with the bytes it added to the other stream (the paper's
    /// `dysco_splice` is called per direction): added to the box delta while no reconfiguration has started.
    @discardableResult
    public mutating func addSpliceBytes(_ id: SessionID, forward: Int32, reverse: Int32) -> Bool {
        guard let old = records[id], var splice = old.spliced, old.migration == nil else { return false }
        splice.bytesDelta.forward &+= forward
        splice.bytesDelta.reverse &+= reverse
        var new = old
        new.spliced = splice
        new.boxDelta.forward &+= forward
        new.boxDelta.reverse &+= reverse
        try? store(new, replacing: old)  // same keys
        return true
    }

    /// Gives `id` an alias (replacing an earlier one); false if the alias's chain id is another session's.
    @discardableResult
    public mutating func setAlias(_ id: SessionID, _ alias: ChainAlias) -> Bool {
        guard let old = records[id] else { return false }
        if let other = byChain[alias.identity.chainID], other != id { return false }
        if let previous = old.alias, byChain[previous.identity.chainID] == id { byChain.removeValue(forKey: previous.identity.chainID) }
        var new = old
        new.alias = alias
        try? store(new, replacing: old)  // same keys
        return true
    }

    /// A map entry: which session, where to rewrite to, and which way the packet goes.
    public struct Translation: Sendable {
        public let id: SessionID
        public let target: FiveTuple
        public let direction: Direction
        /// True for ingress rev(R): packets from the right neighbour on our right subsession.
        public let fromRight: Bool
        /// The path tag of the subsession this key belongs to (``Subsession/pathTag``).
        public let pathTag: UInt8
        /// That subsession's ``Subsession/seqDelta``: ingress adds it to the sequence number, egress subtracts
        /// it from the acknowledgment number and SACK blocks.
        public var seqDelta: Int32 = 0
        /// That subsession's ``Subsession/tsDelta`` (TSval in, TSecr out).
        public var tsDelta: Int32 = 0
    }

    /// A middlebox's change to a session's two byte streams (§3.4): bytes it added (negative: removed) to the
    /// client→server stream and to the server→client stream, as sequence-number offsets.
    public struct BoxDelta: Sendable, Equatable, Codable {
        public var forward: Int32
        public var reverse: Int32
        public init(forward: Int32, reverse: Int32) {
            self.forward = forward
            self.reverse = reverse
        }
        public static let zero = BoxDelta(forward: 0, reverse: 0)
    }

    public private(set) var records: [SessionID: Record] = [:]
    public private(set) var ingress: [FiveTuple: Translation] = [:]
    public private(set) var egress: [FiveTuple: Translation] = [:]
    /// Session tuple → id, for matching a middlebox's egress SYN with the ingress SYN that created it.
    public private(set) var bySession: [FiveTuple: SessionID] = [:]
    /// Chain id (``SessionIdentity/chainID``) → id, for control messages.
    public private(set) var byChain: [UInt64: SessionID] = [:]
    /// Sessions per session source address (the client), for the per-source cap.
    public private(set) var bySource: [IPAddress: Int] = [:]
    public var ports: PortAllocator
    private var nextID: SessionID = 1
    /// Ids whose persisted fields changed since the agent last wrote its state file (nil: not tracked, e.g. in unit
    /// tests). SessionTable+Persistence.swift has the codec; the agent's journal takes these (``takeChanged()``).
    public var changed: Set<SessionID>?
    /// Ids whose owned keys may have changed (``KernelOwnership/desired(_:in:)``: subsessions, handshake, closing,
    /// path) since the agent last took them; nil: not tracked.
    public var ownershipChanged: Set<SessionID>?

    public init(portRange: ClosedRange<UInt16>) {
        ports = PortAllocator(range: portRange)
    }

    public var count: Int { records.count }

    public enum InsertError: Error, Equatable, Sendable {
        /// A key this session needs already belongs to another live session.
        case collision(FiveTuple)
        case portsExhausted
    }

    // MARK: - The derived maps (the only code that writes them)

    /// Every key a record owns: ingress from each subsession of each side (both paths), egress towards each
    /// side's active subsession (docs/ARCHITECTURE.md, "Session table").
    private static func keys(of record: Record) -> (ingress: [(FiveTuple, Translation)], egress: [(FiveTuple, Translation)]) {
        var ingress: [(FiveTuple, Translation)] = []
        var egress: [(FiveTuple, Translation)] = []
        let s = record.session
        if let link = record.leftLink {
            for sub in link.all {
                ingress.append((sub.tuple, Translation(id: record.id, target: s, direction: .forward, fromRight: false,
                                                       pathTag: sub.pathTag, seqDelta: sub.seqDelta, tsDelta: sub.tsDelta)))
            }
            egress.append((s.reversed, Translation(id: record.id, target: link.active.tuple.reversed, direction: .reverse,
                                                   fromRight: false, pathTag: link.active.pathTag,
                                                   seqDelta: link.active.seqDelta, tsDelta: link.active.tsDelta)))
        }
        if let link = record.rightLink {
            let s = record.rightSession
            for sub in link.all {
                ingress.append((sub.tuple.reversed, Translation(id: record.id, target: s.reversed, direction: .reverse,
                                                                fromRight: true, pathTag: sub.pathTag,
                                                                seqDelta: sub.seqDelta, tsDelta: sub.tsDelta)))
            }
            egress.append((s, Translation(id: record.id, target: link.active.tuple, direction: .forward, fromRight: false,
                                          pathTag: link.active.pathTag, seqDelta: link.active.seqDelta,
                                          tsDelta: link.active.tsDelta)))
        }
        return (ingress, egress)
    }

    /// Replaces `old`'s keys by `new`'s (either may be nil), after checking that no key of `new` belongs to
    /// another session. The record is stored as `new`.
    private mutating func store(_ new: Record?, replacing old: Record?) throws(InsertError) {
        let newKeys = new.map(Self.keys) ?? (ingress: [], egress: [])
        if let new {
            for (key, _) in newKeys.ingress where ingress[key].map({ $0.id != new.id }) ?? false { throw .collision(key) }
            for (key, _) in newKeys.egress where egress[key].map({ $0.id != new.id }) ?? false { throw .collision(key) }
            if let other = bySession[new.session], other != new.id { throw .collision(new.session) }
            if let splice = new.spliced, let other = bySession[splice.session], other != new.id { throw .collision(splice.session) }
            if let translated = new.translated, let other = bySession[translated], other != new.id { throw .collision(translated) }
        }
        if let old {
            let oldKeys = Self.keys(of: old)
            for (key, t) in oldKeys.ingress where ingress[key]?.id == t.id { ingress.removeValue(forKey: key) }
            for (key, t) in oldKeys.egress where egress[key]?.id == t.id { egress.removeValue(forKey: key) }
        }
        guard let new else { return }
        if old == nil { bySource[new.session.srcAddr, default: 0] += 1 }
        for (key, t) in newKeys.ingress { ingress[key] = t }
        for (key, t) in newKeys.egress { egress[key] = t }
        records[new.id] = new
        bySession[new.session] = new.id
        byChain[new.identity.chainID] = new.id
        if let splice = new.spliced {
            bySession[splice.session] = new.id
            byChain[splice.identity.chainID] = new.id
        }
        if let translated = new.translated { bySession[translated] = new.id }
        if let alias = new.alias { byChain[alias.identity.chainID] = new.id }
        changed?.insert(new.id)
        ownershipChanged?.insert(new.id)
    }

    /// The ingress keys a record owns (both paths).
    public func ingressKeys(of record: Record) -> [FiveTuple] { Self.keys(of: record).ingress.map(\.0) }

    // MARK: - Inserting sessions (paper §2.1)

    /// Inserts a session whose left subsession arrived in a Dysco SYN (middlebox or right end).
    public mutating func insertFromLeft(session: FiveTuple, left: FiveTuple, remaining: [IPAddress],
                                        identity: SessionIdentity = .random(), renamedUpstream: Bool = false,
                                        now: UInt64) throws(InsertError) -> SessionID {
        let role: Role = remaining.isEmpty ? .rightEnd : .middlebox
        if bySession[session] != nil { throw .collision(session) }
        if byChain[identity.chainID] != nil { throw .collision(session) }
        var record = Record(id: nextID, role: role, session: session, identity: identity, remaining: remaining,
                            createdAt: now, lastActivity: now)
        record.leftLink = Link(active: Subsession(tuple: left, allocatedPort: nil, pathTag: 0))
        record.renamedUpstream = renamedUpstream
        try store(record, replacing: nil)
        nextID += 1
        return record.id
    }

    /// Starts a chain here: a local SYN matched a policy; `hops` = middleboxes then the session's right end.
    public mutating func insertLeftEnd(session: FiveTuple, hops: [IPAddress], identity: SessionIdentity = .random(),
                                       now: UInt64) throws(InsertError) -> SessionID {
        precondition(!hops.isEmpty)
        if bySession[session] != nil || egress[session] != nil { throw .collision(session) }
        if byChain[identity.chainID] != nil { throw .collision(session) }
        let record = Record(id: nextID, role: .leftEnd, session: session, identity: identity,
                            remaining: Array(hops.dropFirst()), createdAt: now, lastActivity: now)
        try store(record, replacing: nil)
        nextID += 1
        do {
            try openRight(record.id, local: session.srcAddr, next: hops[0])
        } catch {
            remove(record.id)
            throw error
        }
        return record.id
    }

    /// Records the tuple a box's NAT gave the session (``Record/translated``): the right side's translations then
    /// carry it (docs/ARCHITECTURE.md, "Boxes that translate"). The same tuple as the session clears it. Before the
    /// right subsession exists (the box's own SYN), or with it (a new box whose imported conntrack entry carries a
    /// NAT binding: its right subsession stays, its translations re-key).
    public mutating func setTranslated(_ id: SessionID, _ tuple: FiveTuple) throws(InsertError) {
        guard let old = records[id], old.spliced == nil else { return }
        var new = old
        new.translated = tuple == old.session ? nil : tuple
        try store(new, replacing: old)
    }

    /// Creates the right subsession of `id` from `local` to `next` with a freshly allocated port, and its
    /// two translations. The remaining list then holds what the next hop must learn.
    public mutating func openRight(_ id: SessionID, local: IPAddress, next: IPAddress) throws(InsertError) {
        guard let old = records[id], old.rightLink == nil else { return }
        let sub = try allocateSubsession(for: old, local: local, next: next, pathTag: 0)
        var new = old
        new.rightLink = Link(active: sub)
        do { try store(new, replacing: old) } catch {
            ports.release(sub.allocatedPort!)
            throw error
        }
    }

    // MARK: - A second path on one side (paper §3.1, §3.5)

    /// Opens a new-path subsession to the right (this host is the left anchor of a reconfiguration): a
    /// fresh port from this host to `next`. Returns it; the active path is unchanged until ``promote(_:_:)``.
    @discardableResult
    public mutating func openOtherRight(_ id: SessionID, local: IPAddress, next: IPAddress) throws(InsertError)
        -> Subsession {
        guard let old = records[id], let link = old.rightLink else { throw .collision(records[id]?.session ?? .zero) }
        if let existing = link.other, existing.tuple.dstAddr == next { return existing }
        var sub = try allocateSubsession(for: old, local: local, next: next, pathTag: link.active.pathTag &+ 1)
        (sub.seqDelta, sub.tsDelta) = Self.newPathDeltas(old, .right)
        var new = old
        if let stale = link.other, let port = stale.allocatedPort { ports.release(port) }
        new.rightLink?.other = sub
        do { try store(new, replacing: old) } catch {
            ports.release(sub.allocatedPort!)
            throw error
        }
        return sub
    }

    /// Adds a new-path subsession from the left (this host is the right anchor): `tuple` as the left
    /// neighbour on the new path chose it.
    @discardableResult
    public mutating func addOtherLeft(_ id: SessionID, tuple: FiveTuple) throws(InsertError) -> Subsession {
        guard let old = records[id], let link = old.leftLink else { throw .collision(tuple) }
        if let existing = link.other, existing.tuple == tuple { return existing }
        let deltas = Self.newPathDeltas(old, .left)
        let sub = Subsession(tuple: tuple, allocatedPort: nil, pathTag: link.active.pathTag &+ 1,
                             seqDelta: deltas.seq, tsDelta: deltas.ts)
        var new = old
        new.leftLink?.other = sub
        try store(new, replacing: old)
        return sub
    }

    /// The delta a new-path subsession on `side` gets (§3.4): the old path's own (what this host already applies
    /// there) plus the reconfiguration's sum over the boxes it removes (``AnchorState/delta``).
    /// The timestamp delta likewise: the old path's plus the removed proxy's (``AnchorState/tsDelta``).
    static func newPathDeltas(_ record: Record, _ side: Side) -> (seq: Int32, ts: Int32) {
        guard let link = record.link(side) else { return (0, 0) }
        let old = record.migration?.promoted == true ? (link.other ?? link.active) : link.active
        guard let m = record.migration, m.side == side else { return (old.seqDelta, old.tsDelta) }
        return (old.seqDelta &+ m.delta, old.tsDelta &+ m.tsDelta)
    }

    /// Sets the delta of `side`'s new-path subsession once the reconfiguration learns its sum (the lock messages
    /// carry it, §3.4); a no-op before that subsession exists (it gets the delta when it is created).
    public mutating func updateNewPathDelta(_ id: SessionID, _ side: Side) {
        guard let old = records[id], let link = old.link(side), link.other != nil, let m = old.migration else { return }
        let delta = Self.newPathDeltas(old, side)
        var new = old
        var updated = link
        if m.promoted { (updated.active.seqDelta, updated.active.tsDelta) = delta } else { (updated.other!.seqDelta, updated.other!.tsDelta) = delta }
        if side == .left { new.leftLink = updated } else { new.rightLink = updated }
        try? store(new, replacing: old)  // same keys: cannot collide
    }

    /// Sets the timestamp delta of `side`'s old-path subsession (a spliced-out proxy's margin, ``TimestampClocks/margin``).
    public mutating func setOldPathTimestampDelta(_ id: SessionID, _ side: Side, _ delta: Int32) {
        guard let old = records[id], let link = old.link(side), let m = old.migration else { return }
        var updated = link
        if m.promoted { updated.other?.tsDelta = delta } else { updated.active.tsDelta = delta }
        var new = old
        if side == .left { new.leftLink = updated } else { new.rightLink = updated }
        try? store(new, replacing: old)  // same keys
    }

    /// Swaps a side's paths: egress now uses the other subsession (the old one still takes ingress).
    public mutating func promote(_ id: SessionID, _ side: Side) {
        guard let old = records[id], let link = old.link(side), let other = link.other else { return }
        var new = old
        let swapped = Link(active: other, other: link.active)
        if side == .left { new.leftLink = swapped } else { new.rightLink = swapped }
        try? store(new, replacing: old)  // same keys, other targets: cannot collide
    }

    /// Removes a side's other subsession (the old path after teardown, or the new one after a cancel) and
    /// frees its port.
    public mutating func dropOther(_ id: SessionID, _ side: Side) {
        guard let old = records[id], let link = old.link(side), let other = link.other else { return }
        var new = old
        if side == .left { new.leftLink?.other = nil } else { new.rightLink?.other = nil }
        try? store(new, replacing: old)  // fewer keys: cannot collide
        if let port = other.allocatedPort { ports.release(port) }
    }

    private mutating func allocateSubsession(for record: Record, local: IPAddress, next: IPAddress,
                                             pathTag: UInt8) throws(InsertError) -> Subsession {
        guard let port = ports.allocate() else { throw .portsExhausted }
        // The destination port of the session as it leaves this host (a box's destination NAT may change it).
        let tuple = FiveTuple(srcAddr: local, srcPort: port, dstAddr: next,
                              dstPort: (record.translated ?? record.session).dstPort)
        if let t = ingress[tuple.reversed], t.id != record.id {
            ports.release(port)
            throw .collision(tuple.reversed)
        }
        return Subsession(tuple: tuple, allocatedPort: port, pathTag: pathTag)
    }

    // MARK: - A session-terminating proxy (paper §2.2, §3.4, §4)

    public enum JoinError: Error, Equatable, Sendable, CustomStringConvertible {
        /// `client` is not a session delivered here (a right end), or `server` not one started here (a left end).
        case notProxySessions(String)
        /// A handshake's initial numbers are not known (yet: the kernel's report of the handshake may still be on its
        /// way; or never: a session from before the agent's restart).
        case handshakeUnseen
        public var description: String {
            switch self {
            case .notProxySessions(let why): why
            case .handshakeUnseen: "the agent did not see both handshakes (a session from before its restart?)"
            }
        }
    }

    /// Joins a proxy's two sessions into one middlebox record, as the paper's agent presents them (§2.2: "a
    /// service chain that includes a session-terminating proxy would encompass two TCP sessions"): `client`, the
    /// right end of the client's chain (delivered to the proxy), keeps its id, session and identity and gets the
    /// right subsession of `server`, the left end of the proxy's own chain to the server, whose record goes (its
    /// port moves along). `boxDelta`: the proxy's sequence-number deltas between the two sessions (§3.4). From
    /// then on the host is an ordinary old-path hop whose box has a delta, so the reconfiguration protocol can
    /// take it out: the left neighbour of the client's chain and the right neighbour of the server's chain
    /// become the anchors.
    public mutating func join(_ client: SessionID, _ server: SessionID, boxDelta: BoxDelta,
                              bytesDelta: BoxDelta = .zero) throws(JoinError) {
        guard let c = records[client], c.role == .rightEnd, c.leftLink != nil, c.spliced == nil else {
            throw .notProxySessions("the client's session is not delivered to this host")
        }
        guard let s = records[server], s.role == .leftEnd, let rightLink = s.rightLink, s.spliced == nil else {
            throw .notProxySessions("the server's session does not start at this host")
        }
        guard c.migration == nil, s.migration == nil else {
            throw .notProxySessions("a reconfiguration of one of the sessions is under way")
        }
        var joined = Record(id: c.id, role: .middlebox, session: c.session, identity: c.identity, remaining: [],
                            createdAt: c.createdAt, lastActivity: max(c.lastActivity, s.lastActivity))
        joined.leftLink = c.leftLink
        joined.rightLink = rightLink
        let isns = [c.sequence.forward.isn, c.sequence.reverse.isn, s.sequence.forward.isn, s.sequence.reverse.isn]
        joined.spliced = Splice(session: s.session, identity: s.identity,
                                initialNumbers: isns.contains(nil) ? nil : isns.compactMap { $0 })
        joined.spliced?.bytesDelta = bytesDelta
        joined.rightEstablished = s.rightEstablished
        joined.established = c.established && s.established
        joined.synAckSeen = c.synAckSeen
        joined.finForward = c.finForward || s.finForward
        joined.finReverse = c.finReverse || s.finReverse
        joined.packets = c.packets &+ s.packets
        joined.bytes = c.bytes &+ s.bytes
        joined.sequence = c.sequence
        joined.boxDelta = boxDelta
        joined.fastPathNotBefore = max(c.fastPathNotBefore, s.fastPathNotBefore)
        // The server's record goes without giving back its port (the joined record owns it now).
        try? store(nil, replacing: s)
        records.removeValue(forKey: s.id)
        if bySession[s.session] == s.id { bySession.removeValue(forKey: s.session) }
        if byChain[s.identity.chainID] == s.id { byChain.removeValue(forKey: s.identity.chainID) }
        if let n = bySource[s.session.srcAddr] {
            if n <= 1 { bySource.removeValue(forKey: s.session.srcAddr) } else { bySource[s.session.srcAddr] = n - 1 }
        }
        changed?.insert(s.id)
        ownershipChanged?.insert(s.id)
        try? store(joined, replacing: c)  // the union of the two records' keys: they were distinct
    }

    // MARK: - Removal and other fields

    /// Removes a session, its translations and its ports.
    public mutating func remove(_ id: SessionID) {
        guard let record = records.removeValue(forKey: id) else { return }
        changed?.insert(id)
        ownershipChanged?.insert(id)
        try? store(nil, replacing: record)
        if bySession[record.session] == id { bySession.removeValue(forKey: record.session) }
        if byChain[record.identity.chainID] == id { byChain.removeValue(forKey: record.identity.chainID) }
        if let splice = record.spliced {
            if bySession[splice.session] == id { bySession.removeValue(forKey: splice.session) }
            if byChain[splice.identity.chainID] == id { byChain.removeValue(forKey: splice.identity.chainID) }
        }
        if let alias = record.alias, byChain[alias.identity.chainID] == id { byChain.removeValue(forKey: alias.identity.chainID) }
        if let translated = record.translated, bySession[translated] == id { bySession.removeValue(forKey: translated) }
        if let n = bySource[record.session.srcAddr] {
            if n <= 1 { bySource.removeValue(forKey: record.session.srcAddr) } else { bySource[record.session.srcAddr] = n - 1 }
        }
        for link in [record.leftLink, record.rightLink].compactMap({ $0 }) {
            for sub in link.all { if let port = sub.allocatedPort { ports.release(port) } }
        }
    }

    /// Changes a record's other fields (the subsessions, and so the maps, only change through the methods above).
    public mutating func update(_ id: SessionID, _ body: (inout Record) -> Void) {
        guard var record = records[id] else { return }
        body(&record)  // cannot touch leftLink/rightLink: they are fileprivate(set)
        if changed != nil || ownershipChanged != nil, let old = records[id] {
            if old.persistedState != record.persistedState { changed?.insert(id) }
            if old.ownershipState != record.ownershipState { ownershipChanged?.insert(id) }
        }
        records[id] = record
    }

    /// Sessions due for removal at `now`: closed past their linger deadline, idle for `idleTimeout`, or still
    /// SYN-only (handshake not complete) `synTimeout` after they were created.
    public func expired(now: UInt64, idleTimeout: UInt64, synTimeout: UInt64 = .max) -> [SessionID] {
        records.values.compactMap { record in
            if let deadline = record.closeDeadline, deadline <= now { return record.id }
            guard record.migration == nil else { return nil }
            if now >= record.lastActivity, now - record.lastActivity >= idleTimeout { return record.id }
            // SYN-only: from its creation (a SYN-ACK the server retransmits to a flooder that never answers does
            // not keep it; a client's retransmitted SYN carries the trailer and creates it again).
            if !record.established, now >= record.createdAt, now - record.createdAt >= synTimeout { return record.id }
            return nil
        }
    }

    /// Sessions whose source (client) address is `source`.
    public func sessions(from source: IPAddress) -> Int { bySource[source] ?? 0 }

    /// Rebuilds the dictionaries when they are mostly empty (a flood's records expired): a Swift dictionary
    /// keeps its capacity after removals. True if it did (the shell may then give memory back to the OS).
    @discardableResult
    public mutating func compactIfSparse(minimumCapacity: Int = 1024) -> Bool {
        guard records.capacity >= minimumCapacity, records.count * 8 <= records.capacity else { return false }
        func rebuilt<K, V>(_ d: [K: V]) -> [K: V] {
            var copy = [K: V](minimumCapacity: d.count)
            for (k, v) in d { copy[k] = v }
            return copy
        }
        records = rebuilt(records)
        ingress = rebuilt(ingress)
        egress = rebuilt(egress)
        bySession = rebuilt(bySession)
        byChain = rebuilt(byChain)
        bySource = rebuilt(bySource)
        return true
    }
}

extension SessionTable {
    /// Puts back a record read from the state file (SessionTable+Persistence.swift), with its subsessions and
    /// their ports (reserved again); later ids follow it. Throws on a key or port another record already has.
    public mutating func restore(_ p: PersistedRecord, now: UInt64) throws(InsertError) {
        var record = Record(id: p.id, role: p.role, session: p.session, identity: p.identity, remaining: p.remaining,
                            createdAt: now, lastActivity: now)
        record.leftLink = p.left.map { Link(active: $0.active.subsession, other: $0.other?.subsession) }
        record.rightLink = p.right.map { Link(active: $0.active.subsession, other: $0.other?.subsession) }
        p.applyFlags(to: &record)
        record.spliced = p.splice
        record.translated = p.translated
        if records[p.id] != nil || byChain[p.identity.chainID] != nil { throw .collision(p.session) }
        if let splice = p.splice, byChain[splice.identity.chainID] != nil { throw .collision(splice.session) }
        var reserved: [UInt16] = []
        for port in p.ports where ports.range.contains(port) {
            guard ports.reserve(port) else {
                reserved.forEach { ports.release($0) }
                throw .collision(p.session)
            }
            reserved.append(port)
        }
        do { try store(record, replacing: nil) } catch {
            reserved.forEach { ports.release($0) }
            throw error
        }
        nextID = max(nextID, p.id &+ 1)
    }
}

extension FiveTuple {
    static let zero = FiveTuple(srcAddr: IPAddress(0), srcPort: 0, dstAddr: IPAddress(0), dstPort: 0)
}
