import DyscoCore

/// The owned keys as `dysco_owned` holds them (docs/BPF.md, "Owned keys"): each ingress key with hook ingress, each
/// egress key with hook egress, as `dysco_sessions` keys its translations. Pure: the conversions and differences
/// the agent's BPF path writes to the map.
public enum BPFOwnedKeys {
    /// The map keys of `owned`.
    public static func keys(_ owned: KernelOwnership.Keys) -> [BPFSessionKey] {
        owned.ingress.map { BPFSessionKey($0, hook: .ingress) } + owned.egress.map { BPFSessionKey($0, hook: .egress) }
    }

    /// What to write and what to delete so that a map holding `present` holds exactly `wanted` (a restart's
    /// ``KernelOwnership`` of the restored sessions): keys already there are not written again.
    public static func plan(present: some Sequence<BPFSessionKey>, wanted: KernelOwnership.Keys)
        -> (add: [BPFSessionKey], remove: [BPFSessionKey]) {
        let present = Set(present)
        var seen = Set<BPFSessionKey>()
        let add = keys(wanted).filter { seen.insert($0).inserted && !present.contains($0) }
        let remove = present.filter { !seen.contains($0) }.map { $0 }
        return (add, remove)
    }

    /// The net change of folded owned-key changes (``OwnershipDelta``) against the keys the map holds (`ingress`,
    /// `egress`, updated): a key added and removed within the fold costs nothing; only keys whose membership
    /// changes are written or deleted.
    public static func changes(_ delta: OwnershipDelta, ingress: inout Set<FiveTuple>, egress: inout Set<FiveTuple>)
        -> (add: [BPFSessionKey], remove: [BPFSessionKey]) {
        let inward = delta.ingress.diff(against: &ingress), outward = delta.egress.diff(against: &egress)
        return (inward.add.map { BPFSessionKey($0, hook: .ingress) } + outward.add.map { BPFSessionKey($0, hook: .egress) },
                inward.remove.map { BPFSessionKey($0, hook: .ingress) } + outward.remove.map { BPFSessionKey($0, hook: .egress) })
    }
}
