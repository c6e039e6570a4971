import DyscoBPF
import DyscoCore
import Testing

/// A restarted agent's reading of its predecessor's pinned session map (docs/BPF.md, "Restart via pinning"): which
/// sessions the kernel carries, whether the map is kept untouched, and the rebuild's writes.
@Suite struct BPFSessionListingTests {
    static func tuple(_ last: UInt8, _ sport: UInt16, _ dport: UInt16) -> FiveTuple {
        FiveTuple(srcAddr: IPAddress(10, 0, 0, last), srcPort: sport, dstAddr: IPAddress(10, 0, 1, last), dstPort: dport)
    }

    /// A two-sided session's four translations (a middlebox's), distinct per `n`.
    static func translations(_ n: UInt8) -> [FastPath.Translation] {
        let session = tuple(n, 1000 + UInt16(n), 80), left = tuple(n, 2000 + UInt16(n), 81)
        let right = tuple(n, 3000 + UInt16(n), 82)
        return [
            .init(hook: .ingress, key: left, target: session),
            .init(hook: .ingress, key: right.reversed, target: session.reversed),
            .init(hook: .egress, key: session, target: right),
            .init(hook: .egress, key: session.reversed, target: left.reversed),
        ]
    }

    static func entries(_ carried: [(UInt64, [FastPath.Translation])], packets: UInt64 = 7)
        -> [(BPFSessionKey, BPFSessionEntry)] {
        carried.flatMap { id, translations in
            translations.map { t in
                var (key, entry) = BPFSessionKey.entry(t, sessionID: id)
                entry.packets = packets
                entry.tcp.sequenceEnd = 42
                return (key, entry)
            }
        }
    }

    @Test("the predecessor's map as it left it: every session carried, kept untouched, nothing to write")
    func unchanged() {
        let carried: [(UInt64, [FastPath.Translation])] = [(1, Self.translations(1)), (2, Self.translations(2))]
        var listing = BPFSessionListing(Self.entries(carried))
        #expect(listing.sessions == [1, 2])
        #expect(listing.matches(carried))
        let plan = listing.rebuildPlan(carried)
        #expect(plan.delete.isEmpty && plan.write.isEmpty)
        #expect(listing.keysBySession[1]?.count == 4 && listing.packetsBySession == [1: 28, 2: 28])
        // A FIN the program saw while no agent ran does not make the entry another translation.
        let key = BPFSessionKey.entry(Self.translations(1)[0], sessionID: 1).key
        listing.entries[key]?.flags.insert(.finSeen)
        #expect(listing.matches(carried))
    }

    @Test("a held session is not carried; held, stray, missing or retargeted entries make a rebuild that keeps the rest")
    func rebuild() {
        let all: [(UInt64, [FastPath.Translation])] = [(1, Self.translations(1)), (2, Self.translations(2)),
                                                             (3, Self.translations(3))]
        var entries = Self.entries(all)
        // Session 2 was held by a migration when its agent stopped.
        for index in entries.indices where entries[index].1.sessionID == 2 { entries[index].1.flags.insert(.held) }
        // Session 3 lost one translation; a stray entry of a session without a record.
        entries.removeAll { $0.1.sessionID == 3 && $0.0.hook == .ingress && $0.0.tuple == Self.translations(3)[0].key }
        entries += Self.entries([(9, Self.translations(9))]).prefix(1)
        let listing = BPFSessionListing(entries)
        #expect(listing.sessions == [1, 3, 9])
        // The restored table: 1 and 3 back in the kernel (2 is on the slow path; 9 has no record).
        let carried: [(UInt64, [FastPath.Translation])] = [(1, Self.translations(1)), (3, Self.translations(3))]
        #expect(!listing.matches(carried))
        let plan = listing.rebuildPlan(carried)
        let session2 = Set(Self.entries([(2, Self.translations(2))]).map(\.0))
        let stray = Self.entries([(9, Self.translations(9))])[0].0
        #expect(Set(plan.delete) == session2.union([stray]))
        #expect(plan.write.map(\.0) == [BPFSessionKey.entry(Self.translations(3)[0], sessionID: 3).key])
        #expect(plan.write.allSatisfy { $0.1.packets == 0 && $0.1.flags.isEmpty && $0.1.sessionID == 3 })

        // A translation whose target or session differs from the record's is written anew.
        var moved = Self.entries([(1, Self.translations(1))])
        moved[0].1.target = Self.tuple(99, 1, 1)
        moved[1].1.sessionID = 5
        let again = BPFSessionListing(moved).rebuildPlan([(1, Self.translations(1))])
        #expect(again.delete.isEmpty && Set(again.write.map(\.0)) == Set([moved[0].0, moved[1].0]))
        #expect(!BPFSessionListing(moved).matches([(UInt64(1), Self.translations(1))]))
    }

    @Test("an empty map (every session was on the slow path): no session carried; matches only nothing")
    func empty() {
        let listing = BPFSessionListing([])
        #expect(listing.sessions.isEmpty && listing.matches([]))
        #expect(!listing.matches([(UInt64(1), Self.translations(1))]))
        #expect(listing.rebuildPlan([(1, Self.translations(1))]).write.count == 4)
    }
}
