/// When the left anchor (and the controller) send again a control message that has no answer yet: the
/// estimator of RFC 6298 (SRTT, RTTVAR, RTO = SRTT + 4·RTTVAR) over answers to messages sent once (Karn's
/// rule), bounded below by `Settings.retransmitInitial`. Before the first sample the timeout grows with the
/// reconfigurations under way at this agent (`Settings.retransmitPerActive` each): a batch of 1,000
/// sessions takes its hops hundreds of milliseconds, and 20 ms timers would have every message sent again,
/// a load that delays the answers further (congestion collapse).
public struct RetransmitClock: Sendable, Equatable {
    public private(set) var smoothed: UInt64?
    public private(set) var variation: UInt64 = 0

    public init() {}

    /// An answer arrived `rtt` nanoseconds after the message, which was sent once.
    public mutating func sample(_ rtt: UInt64) {
        guard let srtt = smoothed else {
            smoothed = rtt
            variation = rtt / 2
            return
        }
        let delta = srtt > rtt ? srtt - rtt : rtt - srtt
        variation = (3 * variation + delta) / 4
        smoothed = (7 * srtt + rtt) / 8
    }

    /// The first timeout of a message sent now, with `active` reconfigurations under way here.
    public func timeout(_ settings: MigrationCoordinator.Settings, active: Int) -> UInt64 {
        let floor = settings.retransmitInitial
        guard let srtt = smoothed else {
            return min(floor &+ UInt64(max(0, active - 1)) &* settings.retransmitPerActive, settings.retransmitCeiling)
        }
        return min(max(floor, srtt &+ 4 &* variation), settings.retransmitCeiling)
    }

    /// The timeout after `current` expired (doubling), at most the larger of `retransmitMax` and 4 × the first.
    public func backoff(_ current: UInt64, _ settings: MigrationCoordinator.Settings, active: Int) -> UInt64 {
        min(current &* 2, max(settings.retransmitMax, 4 &* timeout(settings, active: active)))
    }
}
