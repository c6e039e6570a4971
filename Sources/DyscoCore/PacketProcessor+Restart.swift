import Foundation

/// What a restart needs from the state machine (docs/ARCHITECTURE.md, "Agent crash and restart"): the FIN/RST
/// the kernel rewrote and marked to be observed, and which keys the kernel must fail closed for.
extension PacketProcessor {
    /// A FIN or RST the kernel already rewrote (mark ``FastPathScript/observeIngressMark`` or
    /// ``FastPathScript/observeEgressMark``): only the teardown bookkeeping is done; the caller accepts the packet
    /// unchanged. Its tuple is the rewritten one: at ingress the session's (S or rev(S)), at egress a
    /// subsession's (R or rev(L)). Returns whether a session took it, and the effects.
    public mutating func observe(_ base: UnsafeMutableRawPointer, count: Int, hook: HookPoint, now: UInt64)
        -> (taken: Bool, effects: DataplaneEffects) {
        let taken = observed(base, count: count, hook: hook, now: now)
        return (taken, takeEffects())
    }

    private mutating func observed(_ base: UnsafeMutableRawPointer, count: Int, hook: HookPoint, now: UInt64) -> Bool {
        counters.packets &+= 1
        counters.kernelObserved &+= 1
        guard case .success(let packet) = IPv4TCPPacket.parse(base, count: count) else {
            counters.malformedPackets &+= 1
            return false
        }
        let tuple = packet.tuple
        let found: (SessionTable.SessionID, SessionTable.Direction)?
        switch hook {
        case .ingress:
            if let id = table.bySession[tuple] { found = (id, .forward) }
            else if let id = table.bySession[tuple.reversed] { found = (id, .reverse) }
            else { found = nil }
        case .egress:
            // R is the reverse of ingress key rev(R) (a reverse translation), rev(L) of ingress key L (forward).
            found = table.ingress[tuple.reversed].map { ($0.id, $0.direction == .forward ? .reverse : .forward) }
        }
        guard let (id, direction) = found else {
            counters.passedThrough &+= 1
            return false
        }
        track(SessionTable.Translation(id: id, target: tuple, direction: direction, fromRight: false, pathTag: 0),
              packet: packet, hook: hook, now: now)
        return true
    }
}

/// The session keys the kernel fails closed for (sets `owned_in`/`owned_out` of ``FastPathScript``): those of every
/// session past its handshake (``SessionTable/Record/established``: from then on its keys are owned in the kernel (fail closed while no agent runs), and not before, so that a SYN flood costs the kernel nothing), until it is removed. Pure; the agent
/// updates it for the ids whose persisted fields changed and hands the differences to the fast-path worker.
public struct KernelOwnership: Sendable, Equatable {
    public struct Keys: Sendable, Equatable {
        public var ingress: [FiveTuple] = []
        public var egress: [FiveTuple] = []
        public init(ingress: [FiveTuple] = [], egress: [FiveTuple] = []) {
            self.ingress = ingress
            self.egress = egress
        }
        public var isEmpty: Bool { ingress.isEmpty && egress.isEmpty }
    }

    /// Keys owned per session, as last handed to the kernel.
    public private(set) var owned: [SessionTable.SessionID: Keys] = [:]

    public init() {}

    /// The keys `record` should own: every ingress key (both paths) and its egress keys, once past its handshake,
    /// while the agent alone translates it. Not while the kernel carries it (its map entries rewrite it with no
    /// agent: owning it too would cost a set change per hand-over), nor once it is closing (only its last ACKs
    /// are left). So a short connection, or one the kernel takes within a batch (``OwnershipDelta``), never costs
    /// the kernel an owned-key change (issue 21).
    public static func desired(_ record: SessionTable.Record, in table: SessionTable) -> Keys {
        guard record.ownershipState.owned else { return Keys() }
        return Keys(ingress: table.ingressKeys(of: record),
                    egress: record.fastPathTranslations.filter { $0.hook == .egress }.map(\.key))
    }

    /// Brings the ids' keys up to date; returns what to add to and remove from the kernel's sets.
    public mutating func update(_ ids: some Sequence<SessionTable.SessionID>, table: SessionTable)
        -> (add: Keys, remove: Keys) {
        var add = Keys(), remove = Keys()
        for id in ids {
            let old = owned[id] ?? Keys()
            let new = table.records[id].map { Self.desired($0, in: table) } ?? Keys()
            guard old != new else { continue }
            let oldIn = Set(old.ingress), newIn = Set(new.ingress), oldOut = Set(old.egress), newOut = Set(new.egress)
            add.ingress += new.ingress.filter { !oldIn.contains($0) }
            add.egress += new.egress.filter { !oldOut.contains($0) }
            remove.ingress += old.ingress.filter { !newIn.contains($0) }
            remove.egress += old.egress.filter { !newOut.contains($0) }
            owned[id] = new.isEmpty ? nil : new
        }
        return (add, remove)
    }
}

/// Owned-key changes (``KernelOwnership/update(_:table:)``) folded in the order they happened, so that a batch
/// sends the kernel only the net difference: a key added and removed within one batch (a short connection)
/// costs nothing. O(changed keys), whatever the sets' size.
public struct OwnershipDelta: Sendable, Equatable {
    public struct Membership: Sendable, Equatable {
        /// The membership each changed key should end with (the last change wins).
        public private(set) var wanted: [FiveTuple: Bool] = [:]
        public init() {}

        mutating func apply(remove: [FiveTuple], add: [FiveTuple]) {
            for key in remove { wanted[key] = false }
            for key in add { wanted[key] = true }
        }

        /// What to add to and remove from `kernel` (the keys it has) for the wanted membership; `kernel` is updated.
        public func diff(against kernel: inout Set<FiveTuple>) -> (add: [FiveTuple], remove: [FiveTuple]) {
            var add: [FiveTuple] = [], remove: [FiveTuple] = []
            for (key, member) in wanted {
                if member, kernel.insert(key).inserted { add.append(key) }
                if !member, kernel.remove(key) != nil { remove.append(key) }
            }
            return (add, remove)
        }
    }

    public private(set) var ingress = Membership()
    public private(set) var egress = Membership()
    public init() {}

    public var isEmpty: Bool { ingress.wanted.isEmpty && egress.wanted.isEmpty }

    /// One change: its removals, then its additions.
    public mutating func apply(_ change: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)) {
        ingress.apply(remove: change.remove.ingress, add: change.add.ingress)
        egress.apply(remove: change.remove.egress, add: change.add.egress)
    }
}

/// What a restarted agent reads of the kernel: which chains and sets the fast-path table has (`nft -j list chains
/// ip`, `nft -j list sets ip`: names only, cheap however many sessions the table carries).
public struct FastPathListing: Sendable, Equatable {
    public var chains: Set<String> = []
    public var sets: Set<String> = []
    public init(chains: Set<String> = [], sets: Set<String> = []) {
        self.chains = chains
        self.sets = sets
    }

    /// Parses the two listings (objects of other tables are ignored).
    public init(chainsJSON: Data, setsJSON: Data) {
        chains = Self.names("chain", chainsJSON)
        sets = Self.names("set", setsJSON)
    }

    private static func names(_ kind: String, _ json: Data) -> Set<String> {
        guard let root = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
              let objects = root["nftables"] as? [[String: Any]] else { return [] }
        return Set(objects.compactMap { object in
            guard let item = object[kind] as? [String: Any], item["table"] as? String == FastPathScript.table else { return nil }
            return item["name"] as? String
        })
    }

    /// Whether a `nft -j list tables ip` listing has the fast-path table.
    public static func hasTable(json: Data) -> Bool {
        guard let root = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
              let objects = root["nftables"] as? [[String: Any]] else { return false }
        return objects.contains { ($0["table"] as? [String: Any])?["name"] as? String == FastPathScript.table }
    }

    /// Sessions with chains in the table.
    public var sessions: Set<SessionTable.SessionID> { Set(chains.compactMap(FastPathScript.session(ofChain:))) }

    /// The kernel already holds exactly `carried` in the current format (the owned sets exist, every session chain
    /// is one of theirs and each of theirs is there): the table can stay as it is, only the owned keys are set
    /// again. Otherwise it is rebuilt (``FastPathScript/rebuild(reroute:sessions:ownedIngress:ownedEgress:)``).
    public func matches(_ carried: [(SessionTable.SessionID, [FastPathScript.Translation])]) -> Bool {
        guard sets.isSuperset(of: ["owned_in", "owned_out"]) else { return false }
        var expected = Set<String>()
        for (id, translations) in carried {
            for index in translations.indices { expected.insert(FastPathScript.chainName(session: id, index: index)) }
        }
        return chains.filter { FastPathScript.session(ofChain: $0) != nil } == expected
    }
}
