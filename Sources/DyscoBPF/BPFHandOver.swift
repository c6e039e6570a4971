import CLibbpf

/// The agent's side of the hand-over rule (docs/BPF.md, "Hand-over without reordering"): per held translation, the
/// count of its packets the agent verdicted (`dysco_seen`), against the program's count of those it passed to the
/// queue while the translation was `HELD` (`dysco_passed`). A release does not clear `HELD`: it writes the agent's
/// count and sets `RELEASING`; the program takes the translation over when the two counts meet (no packet of it
/// still waits in NFQUEUE or in an anchor's buffer), and until then queues its packets behind the earlier ones.
/// Pure state with mutating transitions returning the map writes to perform (``BPFKernelPath`` performs them, in
/// order); `now` in nanoseconds of CLOCK_MONOTONIC.
public struct BPFHandOver: Sendable {
    /// How long a release may wait for the counts to meet before the agent clears `HELD` itself: a packet the
    /// program counted never reached the queue (dropped on the way), so the counts would never meet.
    public static let releaseBoundNanoseconds: UInt64 = 100_000_000
    /// The mark the ingress program ORs into a held translation's packet it counted (``DYSCO_COUNTED_MARK``).
    public static let countedMark: UInt32 = DYSCO_COUNTED_MARK

    public enum Action: Equatable, Sendable {
        /// Delete both counts of the key (= 0): before its `HELD` is written, and once the hand-over is over.
        case clearCounts(BPFSessionKey)
        /// Write the agent's count to `dysco_seen` (only after the verdicts it counts went out).
        case writeSeen(BPFSessionKey, UInt64)
        /// Clear `HELD`/`RELEASING` from user space: the counts are equal but no packet came to let the program take
        /// over (an idle direction). Safe: with equal counts the program queues nothing, it would take over itself.
        case takeOver(BPFSessionKey)
        /// Clear `HELD`/`RELEASING` from user space (the counts did not meet within the bound; the agent's count).
        case forceRelease(BPFSessionKey, seen: UInt64)
        /// Set `RELEASING` on the (`HELD`) entry of a new key, after its ``writeSeen(_:_:)``: from now on the
        /// program takes it over when the counts meet.
        case setReleasing(BPFSessionKey)
    }

    struct Track: Equatable {
        var seen: UInt64 = 0
        var releasingSince: UInt64?
        /// A key new at its install (written `HELD`, counts zeroed): the barrier after which every packet that
        /// missed the entry has reached the queue; released once the queue was seen empty after that barrier.
        var barrier: UInt64?
    }

    private var tracks: [BPFSessionKey: Track] = [:]
    /// Releases the program completed (the counts met), as the agent observed them.
    public private(set) var releasedInOrder: UInt64 = 0
    /// Releases the agent forced after ``releaseBoundNanoseconds`` (a metric: each may have let a packet overtake).
    public private(set) var forcedReleases: UInt64 = 0

    public init() {}

    /// No translation is held or releasing (the packet thread then computes no keys).
    public var isEmpty: Bool { tracks.isEmpty }
    public func isTracked(_ key: BPFSessionKey) -> Bool { tracks[key] != nil }
    public func seen(_ key: BPFSessionKey) -> UInt64? { tracks[key]?.seen }
    /// The translations released but not yet known to be taken over (to be ``observed(_:held:passed:now:)``).
    public var releasing: [BPFSessionKey] { tracks.compactMap { $0.value.releasingSince == nil ? nil : $0.key } }

    /// A hold of `key`: counting starts from zero (the returned write goes before `HELD` is set). A key held again
    /// while releasing (a second migration) starts over too.
    public mutating func hold(_ key: BPFSessionKey) -> [Action] {
        tracks[key] = Track()
        return [.clearCounts(key)]
    }

    /// A key new at its install (docs/BPF.md "New keys"): the caller writes its entry `HELD` after the returned
    /// write and then requests RCU barrier number `barrier`. Packets of the key that reached the tc hook before the
    /// entry existed go to the queue uncounted; from the entry on, the program counts what it queues (and at
    /// ingress marks it, ``DYSCO_COUNTED_MARK``). A key already tracked (held, releasing) is left alone (nil).
    public mutating func fresh(_ key: BPFSessionKey, barrier: UInt64) -> Action? {
        guard tracks[key] == nil else { return nil }
        tracks[key] = Track(barrier: barrier)
        return .clearCounts(key)
    }

    /// New keys waiting for the queue to be seen empty after their barrier.
    public var awaitingDrain: Int { tracks.values.reduce(0) { $0 + ($1.barrier == nil ? 0 : 1) } }

    /// The packet thread found the queue empty with a read that began after barrier `barrier` had returned: every
    /// packet that missed a new key's entry before that barrier was in the queue then, so it has been verdicted.
    /// Each new key with an earlier or equal barrier is released by the hand-over rule. Ingress: the agent's count
    /// of verdicted packets that carried the program's mark (the program counted exactly those). Egress (a
    /// middlebox's new keys; the socket filter cannot mark): the program's count read now (`passed`); exact
    /// because the egress key's paired ingress key is new too and still `HELD`, so every egress packet of the key
    /// is one of this agent's reinjected verdicts: with the queue empty and the packet thread here, none is on its
    /// way. After this the agent counts each verdict of the key.
    ///
    /// `queueEmpty` false: the packet thread has verdicted every packet the queue had taken when the barrier
    /// returned (its last packet id), but later ones may wait. That suffices for ingress keys (their count is
    /// of marked packets); an install with an egress key (a middlebox's) waits for an empty queue, all its keys
    /// together (the egress argument needs the ingress keys still `HELD` and nothing queued). Each install has
    /// its own barrier number, so its keys share it.
    public mutating func drained(through barrier: UInt64, queueEmpty: Bool = true, now: UInt64,
                                 passed: (BPFSessionKey) -> UInt64) -> [Action] {
        var actions: [Action] = []
        let waitForEmpty: Set<UInt64> = queueEmpty ? [] : Set(tracks.compactMap { $0.key.hook == .egress ? $0.value.barrier : nil })
        for (key, var track) in tracks {
            guard let wanted = track.barrier, wanted <= barrier, !waitForEmpty.contains(wanted) else { continue }
            track.barrier = nil
            if key.hook == .egress { track.seen = passed(key) }
            track.releasingSince = now
            tracks[key] = track
            actions.append(contentsOf: [.writeSeen(key, track.seen), .setReleasing(key)])
        }
        return actions
    }

    /// A packet of `key` got its verdict (sent). While releasing, the new count goes to the map. `counted`: at
    /// ingress, whether the packet carried the program's mark (it was counted in `dysco_passed`); at egress true.
    /// An uncounted packet does not count (a new key's packet queued before its entry existed).
    public mutating func verdicted(_ key: BPFSessionKey, counted: Bool = true) -> Action? {
        guard counted, var track = tracks[key] else { return nil }
        track.seen += 1
        tracks[key] = track
        return track.releasingSince == nil ? nil : .writeSeen(key, track.seen)
    }

    /// The release of a held `key`: the agent's count goes to the map, after which the caller writes the entry with
    /// `HELD|RELEASING`. nil: the key was not held (the caller writes it unheld: the quiet-point rule).
    public mutating func release(_ key: BPFSessionKey, now: UInt64) -> Action? {
        guard var track = tracks[key] else { return nil }
        if track.releasingSince == nil { track.releasingSince = now }
        tracks[key] = track
        return .writeSeen(key, track.seen)
    }

    /// The entry's flags and the program's count read back after a release: no longer held means the program took
    /// it over; still held with the counts equal (no packet came since), the agent takes it over; still held past
    /// the bound with the counts apart, the agent forces it.
    public mutating func observed(_ key: BPFSessionKey, held: Bool, passed: UInt64, now: UInt64) -> [Action] {
        guard let track = tracks[key], let since = track.releasingSince else { return [] }
        if !held || passed == track.seen {
            tracks[key] = nil
            releasedInOrder += 1
            return held ? [.takeOver(key), .clearCounts(key)] : [.clearCounts(key)]
        }
        guard now &- since >= Self.releaseBoundNanoseconds else { return [] }
        tracks[key] = nil
        forcedReleases += 1
        return [.forceRelease(key, seen: track.seen), .clearCounts(key)]
    }

    /// The key's entry is gone (session removed, or a key the migration replaced): counting stops.
    public mutating func drop(_ key: BPFSessionKey) -> Action? {
        guard tracks.removeValue(forKey: key) != nil else { return nil }
        return .clearCounts(key)
    }

    /// Everything forgotten (a restart's reset or rebuild).
    public mutating func reset() { tracks = [:] }
}
