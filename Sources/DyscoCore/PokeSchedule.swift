/// When an anchor pokes the far endpoint while its old path drains (paper §3.5: the old path goes only once every
/// byte sent on it is acknowledged; a poke — ``PacketProcessor/anchorPoke(chainID:into:)`` — makes the endpoint
/// acknowledge now rather than after its delayed-ACK timer). Pure: the migration engine asks it what to do after
/// each poke and how long to wait, and only runs the timer.
public struct PokeSchedule: Sendable, Equatable {
    /// Pokes per session at most: one on entering the drain, then one per ``interval(activeSessions:)``.
    public static let pokes = 50
    /// All sessions together are poked at most this often per second: a batch of 1,000 draining sessions pokes
    /// each every 50 ms, not every millisecond (which would swamp the loop that answers their messages).
    public static let pokesPerSecond = 20_000
    /// The shortest wait between two pokes of one session.
    public static let minimumIntervalMicroseconds = 1_000
    /// After this many pokes without the drain completing, the engine says so in its debug log.
    public static let slowAfter = 10

    /// What the engine does after a poke.
    public enum Next: Equatable, Sendable {
        /// Poke again after ``PokeSchedule/interval(activeSessions:)``, with `remaining` pokes left.
        case again(remaining: Int)
        /// The session is drained, gone, or out of pokes.
        case stop
    }

    /// The wait between two pokes of one session while `activeSessions` sessions are being poked.
    public static func interval(activeSessions: Int) -> Int {
        max(minimumIntervalMicroseconds, max(1, activeSessions) * 1_000_000 / pokesPerSecond)
    }

    /// What follows a poke attempt that left `remaining` pokes (counting this one) and gave `result`.
    public static func next(after result: PacketProcessor.PokeResult, remaining: Int) -> Next {
        guard remaining > 1 else { return .stop }
        switch result {
        case .stop: return .stop
        // The anchor does not know the number its endpoint acknowledged yet: wait for it (the elicit asks).
        case .unknownNumbers: return .again(remaining: remaining - 1)
        case .sent(_, _, let drained): return drained ? .stop : .again(remaining: remaining - 1)
        }
    }

    /// Whether the poke that left `remaining` pokes is the one after which the drain counts as slow.
    public static func isSlow(remaining: Int) -> Bool { remaining == pokes - slowAfter }
}
