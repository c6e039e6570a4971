/// Where in Netfilter a packet was queued.
public enum HookPoint: Sendable {
    /// raw PREROUTING: before conntrack; subsession → session.
    case ingress
    /// mangle OUTPUT (local packets) or mangle POSTROUTING (forwarded ones): session → subsession.
    case egress
}

/// What to do with a queued packet.
public enum Verdict: Equatable, Sendable {
    /// Accept as it came.
    case accept
    /// Accept with the first `length` bytes of the buffer (the rewritten packet).
    case acceptModified(length: Int)
    case drop
    /// Keep the packet: no verdict now (an anchor buffers a migrating session's new data, AnchorBuffer). The
    /// shell keeps a copy of the bytes as they are (untranslated) and gives them back to ``process`` at release.
    /// `chainID` names the session (its buffer).
    case hold(chainID: UInt64)
}

extension DataplaneCounters {
    /// Counts an IPv6 packet the processor passes untouched, by the reason its parse gave.
    mutating func countIPv6Passed(_ error: IPv6TCPPacket.ParseError) {
        switch error {
        case .extensionHeaders(.fragment): ipv6Fragment &+= 1
        case .extensionHeaders(.encrypted): ipv6Encrypted &+= 1
        case .extensionHeaders(.noNextHeader), .notTCP: ipv6NotTCP &+= 1
        case .extensionHeaders(.chainTooLong): ipv6LongChain &+= 1
        case .jumbogram: ipv6Jumbogram &+= 1
        case .truncated, .notIPv6, .badTCPHeaderLength, .extensionHeaders(.truncated): malformedPackets &+= 1
        }
    }
}

/// Counters an operator reads with `sessions --json` (and tests assert on).
public struct DataplaneCounters: Sendable, Codable, Equatable {
    public var packets: UInt64 = 0
    public var translatedIngress: UInt64 = 0
    public var translatedEgress: UInt64 = 0
    /// Packets that belong to no session and were accepted untouched (non-TCP is not even queued).
    public var passedThrough: UInt64 = 0
    /// Packets whose IPv4/TCP or IPv6/TCP headers do not parse (accepted untouched: the kernel judges them).
    public var malformedPackets: UInt64 = 0
    /// IPv6 packets that are not a session's segment by the extension-header rule (``IPv6ExtensionHeaders``), passed
    /// untouched: a Fragment header, ESP or AH, No Next Header or another upper layer, a chain past the walk's
    /// limits, a jumbogram.
    public var ipv6Fragment: UInt64 = 0
    public var ipv6Encrypted: UInt64 = 0
    public var ipv6NotTCP: UInt64 = 0
    public var ipv6LongChain: UInt64 = 0
    public var ipv6Jumbogram: UInt64 = 0
    /// SYNs whose Dysco trailer has the magic but does not decode for another reason than the three below
    /// (dropped).
    public var malformedDyscoSyn: UInt64 = 0
    /// SYNs with a version-1 (unauthenticated) Dysco trailer (dropped; paper §2.3).
    public var trailerVersionOneRefused: UInt64 = 0
    /// SYNs whose Dysco trailer's MAC is invalid: wrong key, altered, or replayed on another tuple (dropped).
    public var trailerBadMAC: UInt64 = 0
    /// SYNs whose authenticated trailer names a loopback, multicast, broadcast, unspecified or link-local
    /// address as session address or hop (dropped).
    public var trailerForbiddenAddress: UInt64 = 0
    /// Dysco SYNs or policy SYNs whose tuples collide with a live session (dropped; TCP retries).
    public var collisions: UInt64 = 0
    /// Policy SYNs dropped because the subsession port range is exhausted.
    public var portsExhausted: UInt64 = 0
    /// SYNs that could not grow by the trailer (no room in the buffer) — dropped.
    public var oversizedSyn: UInt64 = 0
    public var sessionsCreated: UInt64 = 0
    public var sessionsRemoved: UInt64 = 0
    /// Packets handed back with a full TCP checksum recomputed (CHECKSUM_PARTIAL or length change).
    public var fullChecksums: UInt64 = 0
    /// Sessions the kernel fast path took over (each hand-over counts, also after a release).
    public var fastPathInstalls: UInt64 = 0
    /// Packets an anchor held while a stateful reconfiguration drained the old path (released later, in order).
    public var anchorHeld: UInt64 = 0
    /// Late packets for a session this host left in a reconfiguration (dropped, see ``PacketProcessor/departed``).
    public var droppedAfterLeaving: UInt64 = 0
    /// Window-opening probes an anchor received on a new path and kept from its endpoint.
    public var probesReceived: UInt64 = 0
    /// Packets the kernel carried and reported (the BPF datapath's FIN, RST and ESTABLISHED events), and those of
    /// them no session took (gone, or the key reused meanwhile).
    public var kernelEvents: UInt64 = 0
    public var kernelEventsStale: UInt64 = 0
    /// Reports the kernel had no room for (a full ring buffer): their sessions' FIN/RST are recovered from the
    /// map's flags, anything else by idle expiry (docs/BPF.md, "Events").
    public var kernelEventsLost: UInt64 = 0
    /// FINs and RSTs of known sessions that came through NFQUEUE (slow path or observed): with the BPF datapath a
    /// kernel-carried session's FIN/RST no longer does.
    public var queuedTeardown: UInt64 = 0
    /// Queued packets that are SYNs without ACK (of `packets`): with the BPF datapath's install at SYN
    /// (``PacketProcessor/Settings/installAtSyn``) the only packets of a short connection the agent sees.
    public var queuedSyns: UInt64 = 0
    /// Sessions read back from the state file at start (a restarted agent).
    public var sessionsRestored: UInt64 = 0
    /// The slow path's verdicts (``count(_:)``, by the NFQUEUE shell under the lock it already holds): accepted as
    /// they came, accepted rewritten, dropped, held by an anchor (a held packet counts again when it is released).
    public var verdictAccept: UInt64 = 0
    public var verdictAcceptModified: UInt64 = 0
    public var verdictDrop: UInt64 = 0
    public var verdictHold: UInt64 = 0
    /// RSTs judged as RFC 5961 §3 prescribes (docs/ARCHITECTURE.md, "Forged resets"): dropped as provably
    /// outside the receiver's window; passed on provisionally (the endpoint and the firewall judge; the session
    /// leaves the kernel fast path); confirmed (seen leaving this host, or exact by tracking: the session goes
    /// after the reset linger unless refuted); refuted (a later packet crossed: the RST was false, the session
    /// carries on).
    public var resetsOutOfWindow: UInt64 = 0
    public var resetsProvisional: UInt64 = 0
    public var resetsConfirmed: UInt64 = 0
    public var resetsRefuted: UInt64 = 0
    /// Of the confirmed: provisional RSTs at an end host that the local stack took (its socket is gone), found by
    /// the shell's probe (``PacketProcessor/confirmProbedReset(_:now:)``).
    public var resetsConfirmedByProbe: UInt64 = 0
    /// SYNs refused because the table holds `--max-sessions` records, or the session's source address
    /// `--max-sessions-per-source` (dropped; TCP retries).
    public var sessionCapRefused: UInt64 = 0
    public var sourceCapRefused: UInt64 = 0
    /// SYN-only records (handshake never completed) removed after `--syn-timeout`.
    public var synTimeouts: UInt64 = 0
    /// A box that translates tuples (`agent --nat`, docs/ARCHITECTURE.md "Boxes that translate"): SYNs it sent on
    /// after the box's NAT (the kernel's report of the tagged SYN), and reports no waiting SYN took (its session
    /// gone or established meanwhile, or a report for a SYN this agent did not tag).
    public var natSyns: UInt64 = 0
    public var natSynsStale: UInt64 = 0
    /// New boxes whose imported conntrack entry translated the session: their right side took its tuple
    /// (``PacketProcessor/adoptTranslation(chainID:_:)``).
    public var translationsAdopted: UInt64 = 0

    public init() {}

    public mutating func count(_ verdict: Verdict) {
        switch verdict {
        case .accept: verdictAccept &+= 1
        case .acceptModified: verdictAcceptModified &+= 1
        case .drop: verdictDrop &+= 1
        case .hold: verdictHold &+= 1
        }
    }
}

extension DataplaneCounters {
    /// Read across releases (issue 19, rolling upgrade): a counter the sending agent does not have (an older
    /// release) reads as 0, and one this release does not know is ignored; a counter of the wrong type is still an
    /// error.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func read(_ key: CodingKeys) throws -> UInt64 { try c.decodeIfPresent(UInt64.self, forKey: key) ?? 0 }
        packets = try read(.packets)
        translatedIngress = try read(.translatedIngress)
        translatedEgress = try read(.translatedEgress)
        passedThrough = try read(.passedThrough)
        malformedPackets = try read(.malformedPackets)
        ipv6Fragment = try read(.ipv6Fragment)
        ipv6Encrypted = try read(.ipv6Encrypted)
        ipv6NotTCP = try read(.ipv6NotTCP)
        ipv6LongChain = try read(.ipv6LongChain)
        ipv6Jumbogram = try read(.ipv6Jumbogram)
        malformedDyscoSyn = try read(.malformedDyscoSyn)
        trailerVersionOneRefused = try read(.trailerVersionOneRefused)
        trailerBadMAC = try read(.trailerBadMAC)
        trailerForbiddenAddress = try read(.trailerForbiddenAddress)
        collisions = try read(.collisions)
        portsExhausted = try read(.portsExhausted)
        oversizedSyn = try read(.oversizedSyn)
        sessionsCreated = try read(.sessionsCreated)
        sessionsRemoved = try read(.sessionsRemoved)
        fullChecksums = try read(.fullChecksums)
        fastPathInstalls = try read(.fastPathInstalls)
        anchorHeld = try read(.anchorHeld)
        droppedAfterLeaving = try read(.droppedAfterLeaving)
        probesReceived = try read(.probesReceived)
        kernelEvents = try read(.kernelEvents)
        kernelEventsStale = try read(.kernelEventsStale)
        kernelEventsLost = try read(.kernelEventsLost)
        queuedTeardown = try read(.queuedTeardown)
        queuedSyns = try read(.queuedSyns)
        sessionsRestored = try read(.sessionsRestored)
        verdictAccept = try read(.verdictAccept)
        verdictAcceptModified = try read(.verdictAcceptModified)
        verdictDrop = try read(.verdictDrop)
        verdictHold = try read(.verdictHold)
        resetsOutOfWindow = try read(.resetsOutOfWindow)
        resetsProvisional = try read(.resetsProvisional)
        resetsConfirmed = try read(.resetsConfirmed)
        resetsRefuted = try read(.resetsRefuted)
        resetsConfirmedByProbe = try read(.resetsConfirmedByProbe)
        sessionCapRefused = try read(.sessionCapRefused)
        sourceCapRefused = try read(.sourceCapRefused)
        synTimeouts = try read(.synTimeouts)
        natSyns = try read(.natSyns)
        natSynsStale = try read(.natSynsStale)
        translationsAdopted = try read(.translationsAdopted)
    }
}

/// Work for the fast-path worker: put a session's translations into the kernel, or take them out.
public enum FastPathAction: Sendable, Equatable {
    case install(SessionTable.SessionID, [FastPath.Translation])
    case remove(SessionTable.SessionID, [FastPath.Translation])
    /// An install with the session's SYN (``PacketProcessor/Settings/installAtSyn``, the BPF datapath; issue 16
    /// item 2): the translations go to the kernel marked opening, before the SYN's verdict (nothing else of a new
    /// session waits in the queue, so it is committed at once: ``splitForFlush(_:)``), and the kernel reports the
    /// establishment. `syn`: the SYN this host sends on, when it does (left end, middlebox).
    case open(SessionTable.SessionID, [FastPath.Translation], syn: OpeningSyn?)

    /// The SYN a session was opened with, as it left this host: the facts the kernel judges the answer against
    /// (a SYN-ACK or an RST must acknowledge exactly `sequence` + 1; docs/BPF.md "Connection setup in the kernel").
    public struct OpeningSyn: Sendable, Equatable {
        /// The session tuple the SYN left with, before its rewrite: the key of the egress translation it took.
        public var tuple: FiveTuple
        public var sequence: UInt32
        public init(tuple: FiveTuple, sequence: UInt32) {
            self.tuple = tuple
            self.sequence = sequence
        }
    }

    /// The translations an install or an opening puts into the kernel (nil for a removal).
    public var installing: [FastPath.Translation]? {
        switch self {
        case .install(_, let translations), .open(_, let translations, _): translations
        case .remove: nil
        }
    }

    /// Drops an install that a later remove of the same session undoes within one batch (a session that
    /// closed before the kernel got it never reaches the kernel). A remove followed by an install (a hold
    /// released) is kept: order matters there.
    public static func coalesce(_ actions: [FastPathAction]) -> [FastPathAction] {
        var cancelled = Set<Int>()
        var openInstall: [SessionTable.SessionID: Int] = [:]
        for (index, action) in actions.enumerated() {
            switch action {
            case .install(let id, _), .open(let id, _, _): openInstall[id] = index
            case .remove(let id, _):
                if let install = openInstall.removeValue(forKey: id) { cancelled.formUnion([install, index]) }
            }
        }
        return actions.enumerated().filter { !cancelled.contains($0.offset) }.map(\.element)
    }

    public var session: SessionTable.SessionID {
        switch self {
        case .install(let id, _), .remove(let id, _), .open(let id, _, _): id
        }
    }

    /// Splits queued actions for a flush (a hold waiting, a session opened with its SYN): every action of a
    /// session that has a remove or an opening among them goes now, in order (taking a session off the kernel
    /// reorders nothing, and its earlier install goes with it, so each session's order is kept; an opening session
    /// has no packet but its SYN, whose verdict waits for the commit); the sessions that only go *to* the kernel
    /// wait for the packet thread's quiet point, where the hand-over cannot reorder their packets.
    public static func splitForFlush(_ actions: [FastPathAction]) -> (now: [FastPathAction], later: [FastPathAction]) {
        var removing = Set<SessionTable.SessionID>()
        for action in actions {
            switch action {
            case .remove(let id, _), .open(let id, _, _): removing.insert(id)
            case .install: break
            }
        }
        var now: [FastPathAction] = [], later: [FastPathAction] = []
        for action in actions {
            if removing.contains(action.session) { now.append(action) } else { later.append(action) }
        }
        return (now, later)
    }
}

/// Something the shell should log (kept out of the per-packet path's lock).
public enum DataplaneEvent: Sendable {
    case sessionCreated(SessionTable.Record)
    case sessionRemoved(SessionTable.Record, reason: String)
    case malformedDyscoSyn(FiveTuple, DyscoSynPayload.DecodeError)
    /// A Dysco SYN refused for trust (paper §2.3): version 1, bad MAC, or a forbidden address.
    case untrustedDyscoSyn(FiveTuple, DyscoSynPayload.DecodeError)
    case rejected(FiveTuple, reason: String)
}

/// What a call into ``PacketProcessor`` leaves for the shell besides its result: events to log, kernel fast-path
/// work, what anchors observed for the reconfiguration protocol, and whether the table was compacted (a good
/// moment to give freed memory back to the OS). Nothing in the common case: empty arrays allocate nothing.
/// The session table's changes for the state file are not here: they accumulate in the table
/// (``SessionTable/changed``) over a whole packet-thread turn and are written once.
public struct DataplaneEffects: Sendable {
    public var events: [DataplaneEvent] = []
    public var fastPath: [FastPathAction] = []
    public var anchor: [AnchorEvent] = []
    public var compacted = false

    public init() {}

    public var isEmpty: Bool { events.isEmpty && fastPath.isEmpty && anchor.isEmpty && !compacted }

    /// Appends `other`'s effects after these (tests and callers that gather several calls' effects).
    public mutating func append(_ other: DataplaneEffects) {
        events += other.events
        fastPath += other.fastPath
        anchor += other.anchor
        compacted = compacted || other.compacted
    }
}

/// What ``PacketProcessor/process(_:count:capacity:hook:checksum:now:)`` returns for one packet.
public struct PacketOutcome: Sendable {
    public var verdict: Verdict
    public var effects: DataplaneEffects
    /// Mark bits the verdict ORs into the packet's mark (0: the mark stays): the SYN tag of a box that translates
    /// tuples (``FastPath/natSynMark``).
    public var markBits: UInt32

    public init(verdict: Verdict, effects: DataplaneEffects = DataplaneEffects(), markBits: UInt32 = 0) {
        self.verdict = verdict
        self.effects = effects
        self.markBits = markBits
    }
}

/// The per-packet logic of the slow path: a pure state machine over the session table. It is given a
/// queued packet's bytes, rewrites them in place and returns the verdict with its effects (``PacketOutcome``).
/// No I/O, no clocks, no locks: the NFQUEUE shell (``DataplaneAgent``) owns it behind a mutex.
public struct PacketProcessor: Sendable {
    public struct Settings: Sendable {
        public var idleTimeout: UInt64 = 600 * 1_000_000_000
        /// How long a session's translations outlive its close (last ACK, retransmitted FINs).
        public var closeLinger: UInt64 = 10 * 1_000_000_000
        public var resetLinger: UInt64 = 1 * 1_000_000_000
        /// Hand sessions to the kernel datapath (BPF maps); false keeps everything in NFQUEUE.
        public var fastPath = false
        /// Packets a session must have carried through this agent before it is handed to the kernel: used for a session
        /// not taken with its SYN (``installAtSyn`` off, or one that went back to the slow path).
        public var fastPathAfterPackets: UInt64 = 8
        /// Hand a session to the kernel with its SYN (``FastPathAction/open(_:_:syn:)``, marked opening): the
        /// SYN-ACK, the ACK, the request, the response and the close never reach the agent, whose handshake facts
        /// then come from the kernel's `established` event (``observe(_:now:)``). Issue 16 item 2; set by the agent
        /// whenever the fast path is on. A session closed by FINs then keeps its entries until its close linger ends (its last
        /// ACK and retransmitted FINs stay in the kernel too); one an RST crossed leaves the kernel at once, as
        /// before. Needs ``fastPath``.
        public var installAtSyn = false
        /// A record whose handshake has not completed (SYN-only) goes this long after it was created
        /// (conntrack's SYN_SENT timeout, 120 s, is the reference).
        public var synTimeout: UInt64 = 120 * 1_000_000_000
        /// At most this many records in the table; a SYN that would create one more is dropped and counted.
        public var maxSessions = 131_072
        /// At most this many records per session source address (the client), for sessions that arrive from
        /// the left (middlebox, right end): one flooding host cannot take every subsession port.
        public var maxSessionsPerSource = 8_192
        /// This host's box translates tuples (a NAT'ing firewall; `agent --nat`): the Dysco SYNs it takes in are
        /// tagged and sent on after the box's NAT, in the tuple the NAT gave them (docs/ARCHITECTURE.md, "Boxes that
        /// translate"). Needs the BPF datapath (its egress program reports the tagged SYNs).
        public var natBox = false
        public init() {}
    }

    public var table: SessionTable
    public var config: AgentConfig
    /// Boxes new chains avoid (``Cordons``).
    public var cordons = Cordons()
    public var settings: Settings
    public var counters = DataplaneCounters()
    /// What the call in progress produced for the shell; every mutating entry point that can produce something
    /// hands it over in its return value (``takeEffects()``), so it is empty between calls.
    var pending = DataplaneEffects()
    /// Ingress keys of sessions this host left in a reconfiguration, until when late packets on them are dropped.
    public internal(set) var departed: [FiveTuple: UInt64] = [:]
    /// A spliced-out proxy's sockets, by the tuple of what they send (``SplicedOutSocket``).
    public internal(set) var splicedOut: [FiveTuple: SplicedOutSocket] = [:]
    /// End-host sessions an RST reached provisionally: the shell asks the local stack whether it took the RST
    /// (``resetProbes(limit:)``, PacketProcessor+ResetProbe.swift). Stale ids are dropped at the next look.
    public internal(set) var resetProbeIDs: Set<SessionTable.SessionID> = []
    /// Sessions whose held packets the shell is about to release (chain id → the segment's side): until it
    /// has (``endRelease(chainID:)``, on the packet thread), their later packets towards the segment are held
    /// too, so that none overtakes a held one.
    public internal(set) var releasing: [UInt64: SessionTable.Side] = [:]
    /// Sessions with anchor state (``SessionTable/Record/migration``); zero keeps the per-packet cost at one compare.
    public internal(set) var anchoring = 0
    /// The deployment's keys: Dysco SYN trailers are signed with the current one and accepted under either.
    public let trust: TrustGroup
    /// A box that translates tuples (``Settings/natBox``): the SYNs it tagged, by sequence number, until their
    /// session's right subsession is established (PacketProcessor+NAT.swift).
    public internal(set) var natSyns: [UInt32: NATSyn] = [:]
    /// Mark bits for the verdict of the packet in progress (``PacketOutcome/markBits``).
    var verdictMark: UInt32 = 0

    public init(config: AgentConfig, portRange: ClosedRange<UInt16>, trust: TrustGroup, settings: Settings = Settings()) {
        self.config = config
        self.trust = trust
        self.settings = settings
        table = SessionTable(portRange: portRange)
    }

    /// Processes one packet. `capacity` is how many bytes the buffer can hold (a SYN may grow by the
    /// Dysco trailer); `count` how many it holds. Returns the verdict and what the shell must do besides
    /// (usually nothing: the effects are then empty and cost no allocation).
    public mutating func process(_ base: UnsafeMutableRawPointer, count: Int, capacity: Int, hook: HookPoint,
                                 checksum: ChecksumState, now: UInt64) -> PacketOutcome {
        let verdict = decide(base, count: count, capacity: capacity, hook: hook, checksum: checksum, now: now)
        guard verdictMark == 0 else {
            defer { verdictMark = 0 }
            return PacketOutcome(verdict: verdict, effects: takeEffects(), markBits: verdictMark)
        }
        return PacketOutcome(verdict: verdict, effects: takeEffects())
    }

    /// Hands over what the call produced (``pending``); free when it is empty (the common case per packet).
    @inline(__always)
    public mutating func takeEffects() -> DataplaneEffects {
        var effects = DataplaneEffects()
        if !pending.isEmpty { swap(&effects, &pending) }
        return effects
    }

    /// Parses the packet as its version nibble says and runs the rules on it. An IPv6 packet that is not a session's
    /// segment by the extension-header rule (``IPv6ExtensionHeaders``) passes untouched, counted by its reason; one
    /// whose headers do not parse counts as malformed and passes like a malformed IPv4 packet (the kernel judges it).
    private mutating func decide(_ base: UnsafeMutableRawPointer, count: Int, capacity: Int, hook: HookPoint,
                                 checksum: ChecksumState, now: UInt64) -> Verdict {
        counters.packets &+= 1
        if count > 0, base.load(as: UInt8.self) >> 4 == 6 {
            switch IPv6TCPPacket.parse(base, count: count) {
            case .success(var packet):
                return decide(&packet, capacity: capacity, hook: hook, checksum: checksum, now: now)
            case .failure(let error):
                counters.countIPv6Passed(error)
                return .accept
            }
        }
        guard case .success(var packet) = IPv4TCPPacket.parse(base, count: count) else {
            counters.malformedPackets &+= 1
            return .accept
        }
        return decide(&packet, capacity: capacity, hook: hook, checksum: checksum, now: now)
    }

    private mutating func decide(_ packet: inout some TCPPacketView, capacity: Int, hook: HookPoint,
                                 checksum: ChecksumState, now: UInt64) -> Verdict {
        let key = packet.tuple
        let flags = packet.tcp.flags
        let isInitialSyn = flags.contains(.syn) && !flags.contains(.ack)
        if isInitialSyn { counters.queuedSyns &+= 1 }
        switch hook {
        case .ingress:
            if let translation = table.ingress[key] {
                if isInitialSyn, isClosing(translation.id) {
                    removeSession(translation.id, reason: "reused")
                    return ingressNewSyn(&packet, key: key, checksum: checksum, now: now)
                }
                var mode = checksum
                if isInitialSyn, hasTrailer(packet) {
                    // A retransmitted Dysco SYN: authenticated like the first one, and it must repeat the
                    // session and identity this subsession was created with; then strip the trailer again.
                    guard let decoded = verifiedTrailer(packet, key: key) else { return .drop }
                    guard let record = table.records[translation.id], decoded.0.session == record.session,
                          decoded.0.identity == record.identity else {
                        if table.records[translation.id]?.resetSeen == true {
                            // An RST crossed the session, and an authenticated SYN of a new session uses its tuple:
                            // the left neighbour's agent has started over, so the RST was genuine.
                            removeSession(translation.id, reason: "reused")
                            return ingressNewSyn(&packet, key: key, checksum: checksum, now: now)
                        }
                        counters.collisions &+= 1
                        pending.events.append(.rejected(key, reason: "retransmitted Dysco SYN names another session"))
                        return .drop
                    }
                    packet.truncate(to: packet.length - decoded.1)
                    mode = .partial
                    if settings.natBox { tagNATSyn(record, sequence: packet.tcp.sequenceNumber) }
                }
                // §3.4: from here on the packet is in the local endpoint's numbering (anchor rules, tracking).
                packet.applyIngressDelta(translation.seqDelta, timestamps: translation.tsDelta)
                if flags.contains(.rst), resetOutsideWindow(packet, translation: translation) { return .drop }
                if anchoring > 0, table.records[translation.id]?.migration != nil,
                   anchorIngress(&packet, translation: translation, flags: flags, now: now) == .drop {
                    return .drop
                }
                track(translation, packet: packet, hook: .ingress, now: now)
                packet.rewrite(to: translation.target, checksum: mode)
                if mode == .partial { counters.fullChecksums &+= 1 }
                counters.translatedIngress &+= 1
                return .acceptModified(length: packet.length)
            }
            if isInitialSyn, hasTrailer(packet) {
                return ingressNewSyn(&packet, key: key, checksum: checksum, now: now)
            }
            if !departed.isEmpty, departed[key] != nil {
                // A late packet of a session this host left in a reconfiguration: dropped (the sender's anchor
                // uses the new path), never handed to the local stack, which would answer it with a reset.
                counters.droppedAfterLeaving &+= 1
                return .drop
            }
        case .egress:
            if isInitialSyn, !natSyns.isEmpty, let waiting = natSyns[packet.tcp.sequenceNumber] {
                return natSynLeaving(packet, waiting)
            }
            if let translation = table.egress[key] {
                // A local (or already verified) SYN on the tuple of a closing session, or of one an RST crossed.
                if isInitialSyn, isClosing(translation.id) || table.records[translation.id]?.resetSeen == true {
                    removeSession(translation.id, reason: "reused")
                    return egressNewSyn(&packet, key: key, capacity: capacity, now: now) ?? pass()
                }
                var target = translation.target
                var seqDelta = translation.seqDelta
                var tsDelta = translation.tsDelta
                if !releasing.isEmpty, let record = table.records[translation.id],
                   let side = releasing[record.identity.chainID], (side == .right) == (translation.direction == .forward),
                   flags.isDisjoint(with: [.syn, .rst]) {
                    // The session's held packets are about to be released: later ones wait behind them (FIFO).
                    counters.anchorHeld &+= 1
                    return .hold(chainID: record.identity.chainID)
                }
                if anchoring > 0, table.records[translation.id]?.migration != nil {
                    switch anchorEgress(&packet, translation: translation, flags: flags, now: now) {
                    case .hold:
                        counters.anchorHeld &+= 1
                        return .hold(chainID: table.records[translation.id]!.identity.chainID)
                    case .target(let t, let d, let ts):
                        target = t
                        seqDelta = d
                        tsDelta = ts
                    }
                }
                track(translation, packet: packet, hook: .egress, now: now)
                counters.translatedEgress &+= 1
                if isInitialSyn, translation.direction == .forward, let record = table.records[translation.id],
                   !record.rightEstablished {
                    // SYN retransmission before the SYN-ACK: the trailer must travel again.
                    return sendSyn(&packet, record: record, capacity: capacity)
                }
                packet.applyEgressDelta(seqDelta, timestamps: tsDelta)
                packet.rewrite(to: target, checksum: checksum)
                if checksum == .partial { counters.fullChecksums &+= 1 }
                return .acceptModified(length: packet.length)
            }
            if isInitialSyn, let verdict = egressNewSyn(&packet, key: key, capacity: capacity, now: now) {
                return verdict
            }
            if !splicedOut.isEmpty, splicedOut[key] != nil {
                absorbSplicedOut(packet, key: key)
                return .drop
            }
        }
        return pass()
    }

    // MARK: - SYN handling (paper §2.1)

    /// The packet's trailer if it decodes and authenticates; otherwise counted (by reason) and nil (drop it).
    private mutating func verifiedTrailer(_ packet: some TCPPacketView, key: FiveTuple) -> (DyscoSynPayload, Int)? {
        switch decodeTrailer(packet, tuple: key) {
        case .success(let value): return value
        case .failure(let error):
            countTrailerError(error, key: key)
            return nil
        }
    }

    /// A Dysco SYN from the left: record the session, strip the trailer, deliver the session header.
    private mutating func ingressNewSyn(_ packet: inout some TCPPacketView, key: FiveTuple, checksum: ChecksumState,
                                        now: UInt64) -> Verdict {
        guard let (payload, trailerLength) = verifiedTrailer(packet, key: key) else { return .drop }
        // The session tuple of a closing session, or of one an RST crossed, reused by an authenticated SYN.
        if let existing = table.bySession[payload.session], isClosing(existing) || table.records[existing]?.resetSeen == true {
            removeSession(existing, reason: "reused")
        }
        guard admits(source: payload.session.srcAddr) else { return .drop }
        let id: SessionTable.SessionID
        do {
            id = try table.insertFromLeft(session: payload.session, left: key, remaining: payload.remaining,
                                          identity: payload.identity, renamedUpstream: payload.renamedUpstream, now: now)
        } catch {
            counters.collisions &+= 1
            pending.events.append(.rejected(key, reason: "\(error)"))
            return .drop
        }
        counters.sessionsCreated &+= 1
        if let record = table.records[id] { pending.events.append(.sessionCreated(record)) }
        packet.truncate(to: packet.length - trailerLength)
        packet.rewrite(to: payload.session, checksum: .partial)
        counters.fullChecksums &+= 1
        counters.translatedIngress &+= 1
        table.update(id) { $0.packets += 1; $0.bytes += UInt64(packet.length) }
        observeSyn(id, packet)
        // The right end has its whole record now (a middlebox opens its right side when the SYN leaves).
        if table.records[id]?.role == .rightEnd { openInKernel(id, syn: nil) }
        if settings.natBox, let record = table.records[id] { tagNATSyn(record, sequence: packet.tcp.sequenceNumber) }
        return .acceptModified(length: packet.length)
    }

    /// A SYN leaving with no translation: either a middlebox's pending session (its Dysco SYN came in
    /// earlier) or a local SYN that matches a policy. Nil: not ours.
    private mutating func egressNewSyn(_ packet: inout some TCPPacketView, key: FiveTuple, capacity: Int,
                                       now: UInt64) -> Verdict? {
        if let id = table.bySession[key], let record = table.records[id], record.role == .middlebox,
           record.right == nil, let next = record.remaining.first, let local = record.left?.dstAddr {
            do {
                try table.openRight(id, local: local, next: next)
                table.update(id) { $0.remaining.removeFirst() }
            } catch {
                countInsertError(error, key: key)
                return .drop
            }
            guard let updated = table.records[id] else { return .drop }
            counters.translatedEgress &+= 1
            openInKernel(id, syn: .init(tuple: key, sequence: packet.tcp.sequenceNumber))
            return sendSyn(&packet, record: updated, capacity: capacity)
        }
        guard let policy = config.policy(for: key) else { return nil }
        guard admits(source: nil) else { return .drop }
        let id: SessionTable.SessionID
        do {
            // The left end fixes the chain-wide identity (paper §2.3); every later agent learns it from the trailer.
            id = try table.insertLeftEnd(session: key, hops: cordons.apply(policy.chain) + [key.dstAddr],
                                         identity: .random(), now: now)
        } catch {
            countInsertError(error, key: key)
            return .drop
        }
        guard let record = table.records[id] else { return .drop }
        observeSyn(id, packet)
        counters.sessionsCreated &+= 1
        pending.events.append(.sessionCreated(record))
        counters.translatedEgress &+= 1
        openInKernel(id, syn: .init(tuple: key, sequence: packet.tcp.sequenceNumber))
        return sendSyn(&packet, record: record, capacity: capacity)
    }

    /// A new session's record is complete with its SYN: with ``Settings/installAtSyn`` its translations go to the
    /// kernel now, marked opening (``FastPathAction/open(_:_:syn:)``; the shell commits them before the SYN's
    /// verdict), so the rest of the connection stays in the kernel. Its handshake facts then come from the
    /// kernel's `established` event (``observe(_:now:)``); the fresh tracking ends here, as at any install.
    mutating func openInKernel(_ id: SessionTable.SessionID, syn: FastPathAction.OpeningSyn?) {
        guard settings.fastPath, settings.installAtSyn, let record = table.records[id], record.carrier == .slow,
              !record.fastPathFailed, !record.needsSlowPath else { return }
        table.update(id) {
            $0.carrier = .pending
            $0.sequence.invalidate()
        }
        pending.fastPath.append(.open(id, record.fastPathTranslations, syn: syn))
    }

    /// Rewrites a SYN to the record's right subsession and appends the Dysco trailer (v2: the record's
    /// identity, signed for the right subsession's tuple).
    mutating func sendSyn(_ packet: inout some TCPPacketView, record: SessionTable.Record, capacity: Int) -> Verdict {
        guard let right = record.right else { return .drop }
        let trailer = DyscoSynPayload(identity: record.identity, session: record.rightSession, remaining: record.remaining,
                                      renamedUpstream: record.renamedUpstream || record.translated != nil)
        guard packet.length + trailer.encodedLength <= capacity, packet.length + trailer.encodedLength <= 0xffff else {
            counters.oversizedSyn &+= 1
            return .drop
        }
        withUnsafeTemporaryAllocation(byteCount: trailer.encodedLength, alignment: 1) { scratch in
            trailer.encode(into: scratch, tuple: right, trust: trust)
            packet.append(UnsafeRawBufferPointer(scratch))
        }
        packet.rewrite(to: right, checksum: .partial)
        counters.fullChecksums &+= 1
        return .acceptModified(length: packet.length)
    }

    // MARK: - Teardown (FIN both ways, RST) and expiry

    /// Updates the record for one translated packet: counters, activity, handshake, sequence tracking,
    /// teardown (FIN both ways; an RST as docs/ARCHITECTURE.md "Forged resets" describes) and the fast path.
    mutating func track(_ translation: SessionTable.Translation, packet: some TCPPacketView, hook: HookPoint,
                                now: UInt64) {
        let segment = TrackedSegment(packet)
        if !segment.tcp.flags.isDisjoint(with: [.fin, .rst]) { counters.queuedTeardown &+= 1 }
        if let record = table.records[translation.id], record.spliced != nil, !record.clocks.complete {
            // A joined proxy learns its four timestamp clocks (``SessionTable/TimestampClocks``).
            let clock = SessionTable.TimestampClocks.Clock(direction: translation.direction, hook: hook)
            let value = packet.tcp.timestampValue
            table.update(translation.id) { $0.clocks.observe(clock, value: value, nowMillis: UInt32(truncatingIfNeeded: now / 1_000_000)) }
        }
        track(translation, segment: segment, hook: hook, now: now)
    }

    /// The bookkeeping of one segment of a session, whether the agent saw the packet (the slow path, an observed
    /// FIN/RST) or the kernel reported it (a BPF ring-buffer event, ``observe(_:now:)``).
    mutating func track(_ translation: SessionTable.Translation, segment packet: TrackedSegment, hook: HookPoint,
                                now: UInt64) {
        let settings = settings
        let flags = packet.tcp.flags
        let length = packet.length
        var install: [FastPath.Translation]?
        var uninstall: [FastPath.Translation]?
        var resetOutcome: (confirmed: Bool, refuted: Bool)?
        table.update(translation.id) { record in
            defer {
                // A closed session, or one an RST crossed, leaves the kernel at once (its last ACKs and
                // retransmitted FINs are few and the slow path still translates them during the linger; after an
                // RST the agent must see the packets that prove it false): the kernel holds live sessions only.
                // With installAtSyn (BPF: the close stays in the kernel) a closed session's entries stay until the
                // linger ends (``removeSession(_:reason:)``), so its last ACK never reaches the queue.
                if record.resetSeen || (record.closeDeadline != nil && !settings.installAtSyn),
                   record.carrier == .pending || record.carrier == .kernel {
                    record.carrier = .slow
                    uninstall = record.fastPathTranslations
                }
                // The handshake is complete through this agent once a plain segment goes forward with every
                // subsession of the record established: from then on the kernel can carry the session (once
                // it has carried `fastPathAfterPackets` packets).
                if settings.fastPath, record.carrier == .slow, !record.fastPathFailed, !record.needsSlowPath,
                   record.closeDeadline == nil,
                   !record.resetSeen, now >= record.fastPathNotBefore, record.packets >= settings.fastPathAfterPackets,
                   translation.direction == .forward, flags.isDisjoint(with: [.syn, .fin, .rst]),
                   record.right == nil || record.rightEstablished {
                    record.carrier = .pending
                    record.sequence.invalidate()
                    install = record.fastPathTranslations
                }
            }
            record.packets &+= 1
            record.bytes &+= UInt64(length)
            if translation.fromRight, flags.contains(.syn), flags.contains(.ack) { record.rightEstablished = true }
            if translation.direction == .reverse, flags.contains(.syn), flags.contains(.ack) { record.synAckSeen = true }
            if translation.direction == .forward, flags.contains(.ack), !flags.contains(.syn), record.synAckSeen {
                record.established = true
            }
            if record.carrier != .pending, record.carrier != .kernel {
                let tcp = packet.tcp
                record.sequence.observe(translation.direction, seq: tcp.sequenceNumber,
                                        ack: flags.contains(.ack) ? tcp.acknowledgmentNumber : nil, window: tcp.window,
                                        flags: flags, payloadLength: packet.payloadLength,
                                        windowScale: flags.contains(.syn) ? tcp.windowScaleOption : nil)
            }
            if flags.contains(.rst) {
                // RFC 5961 §3: an RST that passed the window check (resetOutsideWindow) is only provisional. It is
                // genuine when it leaves this host (the local stack sent it, or the firewall let it through) or
                // is exact by fresh tracking; only then can it remove the session, and a later packet still wins.
                // A joined proxy's tracking mixes its two sessions' numbers: it judges no RST exact.
                let exact = hook == .ingress && record.spliced == nil && record.sequence.judge(
                    translation.direction, seq: packet.tcp.sequenceNumber,
                    ack: flags.contains(.ack) ? packet.tcp.acknowledgmentNumber : nil) == .exact
                let confirmed = hook == .egress || exact
                record.resetSeen = true
                record.fastPathNotBefore = now &+ settings.resetLinger
                if confirmed {
                    record.reset = true
                    record.closeDeadline = min(record.closeDeadline ?? .max, now &+ settings.resetLinger)
                    record.lastActivity = now
                }
                resetOutcome = (confirmed, false)
                return
            }
            record.lastActivity = now
            if record.resetSeen {
                // A packet after the RST: the RST was false (a challenge ACK, more data); the session carries on.
                record.resetSeen = false
                if record.reset {
                    record.reset = false
                    record.closeDeadline = record.finForward && record.finReverse ? now &+ settings.closeLinger : nil
                }
                resetOutcome = (false, true)
            }
            if flags.contains(.fin) {
                if translation.direction == .forward { record.finForward = true } else { record.finReverse = true }
                if record.finForward, record.finReverse, record.closeDeadline == nil {
                    record.closeDeadline = now &+ settings.closeLinger
                }
            }
        }
        if let resetOutcome {
            if resetOutcome.refuted { counters.resetsRefuted &+= 1 }
            else if resetOutcome.confirmed { counters.resetsConfirmed &+= 1 }
            else {
                counters.resetsProvisional &+= 1
                if hook == .ingress { noteProvisionalReset(translation.id) }
            }
        }
        if let install { pending.fastPath.append(.install(translation.id, install)) }
        if let uninstall { pending.fastPath.append(.remove(translation.id, uninstall)) }
    }

    /// The SYN that created a record: its sequence number and window scale start the tracking.
    private mutating func observeSyn(_ id: SessionTable.SessionID, _ packet: some TCPPacketView) {
        let tcp = packet.tcp
        table.update(id) {
            $0.sequence.observe(.forward, seq: tcp.sequenceNumber, ack: nil, window: tcp.window, flags: tcp.flags,
                                payloadLength: packet.payloadLength, windowScale: tcp.windowScaleOption)
        }
    }

    /// An RST arriving on a session's tuple whose sequence number is provably outside the receiver's window by
    /// the agent's fresh tracking (RFC 5961 §3.2: "silently drop the segment"): counted, and true (drop it).
    private mutating func resetOutsideWindow(_ packet: some TCPPacketView, translation: SessionTable.Translation) -> Bool {
        guard let record = table.records[translation.id], record.carrier != .pending, record.carrier != .kernel,
              record.spliced == nil else {
            return false
        }
        let flags = packet.tcp.flags
        let judgement = record.sequence.judge(translation.direction, seq: packet.tcp.sequenceNumber,
                                              ack: flags.contains(.ack) ? packet.tcp.acknowledgmentNumber : nil)
        guard judgement == .outside else { return false }
        counters.resetsOutOfWindow &+= 1
        return true
    }

    /// Whether the table may take one more session (from `source`, for a session that arrived from the left);
    /// counted when not.
    private mutating func admits(source: IPAddress?) -> Bool {
        if table.count >= settings.maxSessions {
            counters.sessionCapRefused &+= 1
            return false
        }
        if let source, table.sessions(from: source) >= settings.maxSessionsPerSource {
            counters.sourceCapRefused &+= 1
            return false
        }
        return true
    }

    /// A session that is closing (or reset) when a fresh SYN with its tuple arrives: the tuple is reused.
    private func isClosing(_ id: SessionTable.SessionID) -> Bool {
        guard let record = table.records[id] else { return false }
        return record.closeDeadline != nil
    }

    /// Removes sessions past their close linger or idle timeout; returns how many, and the removals' effects
    /// (``DataplaneEffects/compacted`` when the table was rebuilt smaller).
    public mutating func expire(now: UInt64) -> (removed: Int, effects: DataplaneEffects) {
        if !departed.isEmpty { departed = departed.filter { $0.value > now } }
        if !splicedOut.isEmpty { splicedOut = splicedOut.filter { $0.value.until > now } }
        if !natSyns.isEmpty { expireNATSyns() }
        let due = table.expired(now: now, idleTimeout: settings.idleTimeout, synTimeout: settings.synTimeout)
        for id in due {
            guard let record = table.records[id] else { continue }
            let synOnly = record.closeDeadline == nil && !record.established
            if synOnly { counters.synTimeouts &+= 1 }
            removeSession(id, reason: record.reset ? "reset" : record.closeDeadline != nil ? "closed"
                          : synOnly ? "syn-timeout" : "idle")
        }
        if !due.isEmpty, table.compactIfSparse() { pending.compacted = true }
        return (due.count, takeEffects())
    }

    /// Removes a session from the table and, if the kernel has (or is getting) it, from the kernel.
    mutating func removeSession(_ id: SessionTable.SessionID, reason: String) {
        guard let record = table.records[id] else { return }
        table.remove(id)
        if record.carrier == .pending || record.carrier == .kernel {
            pending.fastPath.append(.remove(id, record.fastPathTranslations))
        }
        counters.sessionsRemoved &+= 1
        pending.events.append(.sessionRemoved(record, reason: reason))
    }

    // MARK: - Fast path bookkeeping (the worker reports back; migration holds and releases)

    /// The kernel now carries these sessions (unless they were held or removed meanwhile).
    public mutating func fastPathInstalled(_ ids: [SessionTable.SessionID]) {
        for id in ids {
            table.update(id) { if $0.carrier == .pending { $0.carrier = .kernel } }
            counters.fastPathInstalls &+= 1
        }
    }

    /// The kernel refused these sessions: they stay on the slow path for good.
    public mutating func fastPathFailed(_ ids: [SessionTable.SessionID]) {
        for id in ids {
            table.update(id) { record in
                if record.carrier == .pending { record.carrier = .slow }
                record.fastPathFailed = true
            }
        }
    }

    /// Kernel counters show packets for these sessions: they are not idle.
    public mutating func kernelActivity(_ ids: [SessionTable.SessionID], now: UInt64) {
        for id in ids { table.update(id) { $0.lastActivity = max($0.lastActivity, now) } }
    }

    /// Takes sessions back to the slow path (paper §3: a migrating session's packets must reach its agent).
    /// Returns the ids now held and the kernel work, which the caller must apply before relying on it.
    public mutating func hold(_ ids: [SessionTable.SessionID]) -> (held: [SessionTable.SessionID], effects: DataplaneEffects) {
        let held = holdSessions(ids)
        return (held, takeEffects())
    }

    mutating func holdSessions(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        var held: [SessionTable.SessionID] = []
        for id in ids {
            guard let record = table.records[id] else { continue }
            if record.carrier == .pending || record.carrier == .kernel {
                pending.fastPath.append(.remove(id, record.fastPathTranslations))
            }
            table.update(id) { $0.carrier = .held }
            held.append(id)
        }
        return held
    }

    /// Returns held sessions to the fast path (their current translations; a migration may have changed them).
    /// Returns the ids released and the kernel work.
    public mutating func release(_ ids: [SessionTable.SessionID]) -> (released: [SessionTable.SessionID], effects: DataplaneEffects) {
        let released = releaseSessions(ids)
        return (released, takeEffects())
    }

    mutating func releaseSessions(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        var released: [SessionTable.SessionID] = []
        for id in ids {
            guard let record = table.records[id], record.carrier == .held else { continue }
            let eligible = settings.fastPath && !record.fastPathFailed && !record.needsSlowPath && record.closeDeadline == nil
                && (record.right == nil || record.rightEstablished)
            table.update(id) { $0.carrier = eligible ? .pending : .slow }
            if eligible { pending.fastPath.append(.install(id, record.fastPathTranslations)) }
            released.append(id)
        }
        return released
    }

    // MARK: - Helpers

    mutating func pass() -> Verdict {
        counters.passedThrough &+= 1
        return .accept
    }

    mutating func countInsertError(_ error: SessionTable.InsertError, key: FiveTuple) {
        switch error {
        case .collision: counters.collisions &+= 1
        case .portsExhausted: counters.portsExhausted &+= 1
        }
        pending.events.append(.rejected(key, reason: "\(error)"))
    }

    private func payload(_ packet: some TCPPacketView) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: packet.base + packet.payloadOffset, count: packet.payloadLength)
    }

    private func hasTrailer(_ packet: some TCPPacketView) -> Bool {
        DyscoSynPayload.hasTrailer(payload(packet))
    }

    /// Decodes and authenticates the packet's trailer; `tuple` is the packet's tuple as it arrived.
    private func decodeTrailer(_ packet: some TCPPacketView, tuple: FiveTuple)
        -> Result<(DyscoSynPayload, Int), DyscoSynPayload.DecodeError> {
        Result { () throws(DyscoSynPayload.DecodeError) in
            try DyscoSynPayload.decode(trailerOf: payload(packet), tuple: tuple, trust: trust)
        }
    }

    /// Counts a Dysco SYN refused for its trailer (the caller drops it): trust failures in their own
    /// counters, everything else in `malformedDyscoSyn`.
    private mutating func countTrailerError(_ error: DyscoSynPayload.DecodeError, key: FiveTuple) {
        switch error {
        case .versionOneRefused: counters.trailerVersionOneRefused &+= 1
        case .badMAC: counters.trailerBadMAC &+= 1
        case .forbiddenAddress: counters.trailerForbiddenAddress &+= 1
        default:
            counters.malformedDyscoSyn &+= 1
            pending.events.append(.malformedDyscoSyn(key, error))
            return
        }
        pending.events.append(.untrustedDyscoSyn(key, error))
    }
}

