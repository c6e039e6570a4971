import CLibbpf
import DyscoBPF
import DyscoCore
import Testing

/// The owned keys as `dysco_owned` holds them (docs/BPF.md, "Owned keys"): the keys, a restart's plan, the net
/// change of folded changes.
@Suite struct BPFOwnedKeysTests {
    static func tuple(_ last: UInt8, _ sport: UInt16) -> FiveTuple {
        FiveTuple(srcAddr: IPAddress(10, 0, 0, last), srcPort: sport, dstAddr: IPAddress(10, 0, 1, last), dstPort: 80)
    }

    @Test("ingress keys get hook ingress, egress keys hook egress (the same tuple under both hooks is two keys)")
    func keys() {
        let a = Self.tuple(1, 1000), b = Self.tuple(2, 2000)
        let keys = BPFOwnedKeys.keys(KernelOwnership.Keys(ingress: [a], egress: [a, b]))
        #expect(keys == [BPFSessionKey(a, hook: .ingress), BPFSessionKey(a, hook: .egress), BPFSessionKey(b, hook: .egress)])
        #expect(BPFSessionKey(a, hook: .ingress).raw.hook == UInt8(DYSCO_HOOK_INGRESS))
        #expect(BPFSessionKey(a, hook: .egress).raw.hook == UInt8(DYSCO_HOOK_EGRESS))
    }

    @Test("a restart's plan: strays go, missing keys are written, present ones are left alone, duplicates once")
    func plan() {
        let a = Self.tuple(1, 1000), b = Self.tuple(2, 2000), stray = Self.tuple(3, 3000)
        let present = [BPFSessionKey(a, hook: .ingress), BPFSessionKey(stray, hook: .egress), BPFSessionKey(b, hook: .ingress)]
        let wanted = KernelOwnership.Keys(ingress: [a, a], egress: [b])
        let plan = BPFOwnedKeys.plan(present: present, wanted: wanted)
        #expect(plan.add == [BPFSessionKey(b, hook: .egress)])
        #expect(Set(plan.remove) == [BPFSessionKey(stray, hook: .egress), BPFSessionKey(b, hook: .ingress)])
        let empty = BPFOwnedKeys.plan(present: present, wanted: KernelOwnership.Keys())
        #expect(empty.add.isEmpty && Set(empty.remove) == Set(present), "reset: every key goes")
    }

    @Test("folded changes: a key added and removed within the fold costs nothing; only membership changes are written")
    func changes() {
        let a = Self.tuple(1, 1000), b = Self.tuple(2, 2000), c = Self.tuple(3, 3000)
        var ingress: Set<FiveTuple> = [a], egress: Set<FiveTuple> = []
        var delta = OwnershipDelta()
        delta.apply((add: KernelOwnership.Keys(ingress: [b], egress: [c]), remove: KernelOwnership.Keys()))
        delta.apply((add: KernelOwnership.Keys(), remove: KernelOwnership.Keys(ingress: [b, a])))
        delta.apply((add: KernelOwnership.Keys(ingress: [a]), remove: KernelOwnership.Keys()))
        let net = BPFOwnedKeys.changes(delta, ingress: &ingress, egress: &egress)
        #expect(net.add == [BPFSessionKey(c, hook: .egress)])
        #expect(net.remove.isEmpty, "a was re-added, b never reached the map")
        #expect(ingress == [a] && egress == [c])
        var removal = OwnershipDelta()
        removal.apply((add: KernelOwnership.Keys(), remove: KernelOwnership.Keys(ingress: [a], egress: [c, b])))
        let gone = BPFOwnedKeys.changes(removal, ingress: &ingress, egress: &egress)
        #expect(gone.add.isEmpty && Set(gone.remove) == [BPFSessionKey(a, hook: .ingress), BPFSessionKey(c, hook: .egress)])
        #expect(ingress.isEmpty && egress.isEmpty)
    }
}
