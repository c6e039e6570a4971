import DyscoCore

/// What a restarted agent reads of its predecessor's pinned `dysco_sessions` (docs/BPF.md, "Restart via pinning"):
/// each entry is one translation of one session (its `session_id`). The BPF counterpart of ``FastPathListing``
/// (whose chains are the nftables path's translations). Pure.
public struct BPFSessionListing: Sendable, Equatable {
    /// The map's entries by key.
    public var entries: [BPFSessionKey: BPFSessionEntry]

    public init(_ entries: [(BPFSessionKey, BPFSessionEntry)]) {
        self.entries = Dictionary(entries, uniquingKeysWith: { _, last in last })
    }

    /// Sessions the kernel carries: those with an entry and none of their entries `HELD` (a session held by a
    /// migration when its agent stopped is on the slow path: its packets went to the queue).
    public var sessions: Set<SessionTable.SessionID> {
        var carried = Set<SessionTable.SessionID>(), held = Set<SessionTable.SessionID>()
        for entry in entries.values {
            if entry.flags.contains(.held) { held.insert(entry.sessionID) } else { carried.insert(entry.sessionID) }
        }
        return carried.subtracting(held)
    }

    /// The map's entries each of `carried` sessions has (``BPFSessionKey/entry(_:sessionID:flags:)``).
    public static func expected(_ carried: [(SessionTable.SessionID, [FastPath.Translation])])
        -> [BPFSessionKey: BPFSessionEntry] {
        var expected: [BPFSessionKey: BPFSessionEntry] = [:]
        for (id, translations) in carried {
            for translation in translations {
                let (key, entry) = BPFSessionKey.entry(translation, sessionID: id)
                expected[key] = entry
            }
        }
        return expected
    }

    /// Whether `present` (an entry in the map) already does what `wanted` asks: same target, delta and session, not
    /// held. Its counters, TCP facts and the FIN/RST flags the program set are the kernel's and stay.
    static func serves(_ present: BPFSessionEntry, _ wanted: BPFSessionEntry) -> Bool {
        present.target == wanted.target && present.seqDelta == wanted.seqDelta && present.sessionID == wanted.sessionID
            && !present.flags.contains(.held)
    }

    /// The map holds exactly `carried`'s translations (every key, with its target and session, none held, and no
    /// other entry): it is kept untouched. Otherwise ``rebuildPlan(_:)``.
    public func matches(_ carried: [(SessionTable.SessionID, [FastPath.Translation])]) -> Bool {
        let expected = Self.expected(carried)
        guard expected.count == entries.count else { return false }
        return expected.allSatisfy { key, wanted in entries[key].map { Self.serves($0, wanted) } ?? false }
    }

    /// How to bring the map to `carried`'s translations with the fewest writes: entries of no carried session (or
    /// keyed differently) are deleted; entries that already serve their translation stay (with their counters); the
    /// rest are written anew (missing, another target or session, or held).
    public func rebuildPlan(_ carried: [(SessionTable.SessionID, [FastPath.Translation])])
        -> (delete: [BPFSessionKey], write: [(BPFSessionKey, BPFSessionEntry)]) {
        let expected = Self.expected(carried)
        let delete = entries.keys.filter { expected[$0] == nil }
        let write = expected.filter { key, wanted in !(entries[key].map { Self.serves($0, wanted) } ?? false) }
        return (delete.sorted { $0.description < $1.description },
                write.map { ($0.key, $0.value) }.sorted { $0.0.description < $1.0.description })
    }

    /// Each session's keys in the map.
    public var keysBySession: [SessionTable.SessionID: [BPFSessionKey]] {
        var keys: [SessionTable.SessionID: [BPFSessionKey]] = [:]
        for (key, entry) in entries { keys[entry.sessionID, default: []].append(key) }
        return keys
    }

    /// Packets per session summed over its entries (the idle-expiry and metrics baseline).
    public var packetsBySession: [SessionTable.SessionID: UInt64] {
        var totals: [SessionTable.SessionID: UInt64] = [:]
        for entry in entries.values { totals[entry.sessionID, default: 0] &+= entry.packets }
        return totals
    }
}
