/// Rate limit for log lines an attacker can trigger (a dropped SYN, a refused trailer): per kind, at most
/// `burst` lines in each `interval`; the lines beyond are counted, and the count is reported with the
/// kind's next admitted line, or by ``takeReports(now:)`` once the window ends (so a flood that stops is
/// still accounted for). Pure: the shell keeps it behind a lock and passes the clock.
public struct LogRateLimiter: Sendable {
    public enum Decision: Equatable, Sendable {
        /// Write the line; `suppressedBefore` lines of this kind were dropped since the last one written.
        case log(suppressedBefore: UInt64)
        case suppress
    }

    struct Window {
        var start: UInt64
        var logged: Int
        var suppressed: UInt64
    }

    public let burst: Int
    public let interval: UInt64
    var windows: [String: Window] = [:]

    /// Defaults: 10 lines per kind every 10 s.
    public init(burst: Int = 10, interval: UInt64 = 10 * 1_000_000_000) {
        self.burst = max(1, burst)
        self.interval = max(1, interval)
    }

    /// Whether a line of `kind` may be written now. Kinds are a fixed, small set (the message, never a
    /// packet's tuple), so the table stays bounded.
    public mutating func admit(_ kind: String, now: UInt64) -> Decision {
        var window = windows[kind] ?? Window(start: now, logged: 0, suppressed: 0)
        var carried: UInt64 = 0
        if now &- window.start >= interval {
            carried = window.suppressed
            window = Window(start: now, logged: 0, suppressed: 0)
        }
        defer { windows[kind] = window }
        guard window.logged < burst else {
            window.suppressed &+= 1
            return .suppress
        }
        window.logged += 1
        return .log(suppressedBefore: carried)
    }

    /// Kinds whose window has ended with lines suppressed, and how many: each is reported once.
    public mutating func takeReports(now: UInt64) -> [(kind: String, suppressed: UInt64)] {
        var reports: [(kind: String, suppressed: UInt64)] = []
        for (kind, window) in windows where window.suppressed > 0 && now &- window.start >= interval {
            reports.append((kind, window.suppressed))
            windows[kind] = Window(start: now, logged: 0, suppressed: 0)
        }
        return reports.sorted { $0.kind < $1.kind }
    }
}
