import Testing
@testable import DyscoCore

@Suite("Rate-limited log lines (issue 9: a flood of dropped SYNs must not flood the log)")
struct LogRateLimiterTests {
    static let second: UInt64 = 1_000_000_000

    @Test("at most `burst` lines per kind and window; the rest are counted")
    func burstThenSuppress() {
        var limiter = LogRateLimiter(burst: 3, interval: 10 * Self.second)
        let decisions = (0..<10).map { limiter.admit("dropped SYN", now: UInt64($0)) }
        #expect(decisions.prefix(3).allSatisfy { $0 == .log(suppressedBefore: 0) })
        #expect(decisions.dropFirst(3).allSatisfy { $0 == .suppress })
        // Another kind has its own budget.
        #expect(limiter.admit("dropped untrusted Dysco SYN", now: 11) == .log(suppressedBefore: 0))
    }

    @Test("the next window's first line carries the count of lines suppressed before it")
    func countCarried() {
        var limiter = LogRateLimiter(burst: 1, interval: Self.second)
        #expect(limiter.admit("k", now: 0) == .log(suppressedBefore: 0))
        for t in 1...5 { #expect(limiter.admit("k", now: UInt64(t)) == .suppress) }
        #expect(limiter.admit("k", now: Self.second) == .log(suppressedBefore: 5))
        #expect(limiter.admit("k", now: Self.second + 1) == .suppress)
    }

    @Test("a flood that stops is reported once its window ends, and only once")
    func reportsAfterWindow() {
        var limiter = LogRateLimiter(burst: 2, interval: Self.second)
        for t in 0..<100 { _ = limiter.admit("k", now: UInt64(t)) }
        _ = limiter.admit("quiet", now: 0)
        #expect(limiter.takeReports(now: Self.second / 2).isEmpty, "window still open")
        let reports = limiter.takeReports(now: Self.second)
        #expect(reports.map(\.kind) == ["k"])
        #expect(reports.first?.suppressed == 98)
        #expect(limiter.takeReports(now: 3 * Self.second).isEmpty)
        #expect(limiter.admit("k", now: 3 * Self.second) == .log(suppressedBefore: 0), "reported lines are not carried again")
    }
}
