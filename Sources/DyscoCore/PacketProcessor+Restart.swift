import Foundation

/// The session keys the kernel fails closed for (the BPF datapath's `dysco_owned` map, docs/BPF.md): those of every
/// session past its handshake (``SessionTable/Record/established``: from then on its keys are owned in the kernel (fail closed while no agent runs), and not before, so that a SYN flood costs the kernel nothing), until it is removed. Pure; the agent
/// updates it for the ids whose persisted fields changed and hands the differences to the kernel path.
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

