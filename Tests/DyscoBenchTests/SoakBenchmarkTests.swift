@testable import DyscoBench
import DyscoLab
import Foundation
import Testing

/// `dysco-bench soak`: the pure parts (no root): the RSS slope, /proc/PID/status, the trends over the samples.
@Suite struct SoakBenchmarkTests {
    @Test func leastSquaresSlope() {
        #expect(SoakBenchmark.slope([]) == 0)
        #expect(SoakBenchmark.slope([(x: 0, y: 5)]) == 0)
        #expect(SoakBenchmark.slope([(x: 3, y: 5), (x: 3, y: 9)]) == 0, "no spread in x: no slope")
        #expect(SoakBenchmark.slope([(x: 0, y: 100), (x: 100, y: 100), (x: 200, y: 100)]) == 0, "flat")
        #expect(SoakBenchmark.slope([(x: 0, y: 1), (x: 1, y: 3), (x: 2, y: 5)]) == 2)
        // Noise around a line: the fit, not the end points.
        let s = SoakBenchmark.slope([(x: 0, y: 10), (x: 1, y: 12), (x: 2, y: 10), (x: 3, y: 12)])
        #expect(abs(s - 0.4) < 1e-9)
    }

    @Test func statusFields() {
        let status = "Name:\tdysco-migrate\nVmPeak:\t  912340 kB\nVmRSS:\t   23456 kB\nRssAnon:\t   10000 kB\nThreads:\t8\n"
        #expect(SoakBenchmark.statusField(status, "VmRSS") == 23456)
        #expect(SoakBenchmark.statusField(status, "Threads") == 8)
        #expect(SoakBenchmark.statusField(status, "VmSwap") == nil)
        #expect(SoakBenchmark.statusField(status, "Rss") == nil, "a field's whole name only")
    }

    @Test func trendsLeaveTheDrainSampleOut() {
        func sample(_ move: Int, _ rss: Int, note: String = "") -> SoakBenchmark.Sample {
            SoakBenchmark.Sample(move: move, wave: 1, seconds: 0, note: note,
                                 agents: [.init(host: "fw1", pid: 1, rssKiB: rss, fds: 9, table: 3, stale: 0),
                                          .init(host: "fw2", pid: 2, rssKiB: -1, fds: -1, table: -1, stale: -1)],
                                 conntrack: [:])
        }
        let trends = SoakBenchmark.trends([sample(0, 1000), sample(100, 1100), sample(200, 1200), sample(200, 5000, note: "end")])
        #expect(trends.count == 1, "fw2's RSS was never readable")
        let fw1 = trends[0]
        #expect(fw1.host == "fw1" && fw1.firstKiB == 1000 && fw1.lastKiB == 1200 && fw1.maxKiB == 1200)
        #expect(abs(fw1.slopeKiBPer1000Moves - 1000) < 1e-9)
        #expect(abs(fw1.secondHalfSlopeKiBPer1000Moves - 1000) < 1e-9, "samples at moves 100 and 200")
        #expect(fw1.endKiB == 5000 && fw1.endTable == 3)
    }

    @Test func lossRule() {
        let rule = ControlLoss(probability: 0.3, hosts: ["fw1"]).rule
        #expect(rule.contains("statistic") && rule.contains("0.3000") && rule.last == "DROP")
    }
}

extension SoakBenchmarkTests {
    @Test func failuresGroupedWithoutRequestIDs() throws {
        func failure(_ reason: String) throws -> MigrationFailure {
            let json = #"{"session": "s", "result": "cancelled", "failedStep": "new-path", "reason": "\#(reason)"}"#
            return try JSONDecoder().decode(MigrationFailure.self, from: Data(json.utf8))
        }
        let lines = SoakBenchmark.failureLines([
            try failure("new path refused by 10.0.0.2: this box is on the session's path already (new box of request 42)"),
            try failure("new path refused by 10.0.0.2: this box is on the session's path already (new box of request 7)"),
            try failure("new path refused by 10.0.0.2: new box: collision(10.0.0.1:1->10.0.0.2:80)"),
        ])
        #expect(lines == ["sessions not moved:",
                          "  2× cancelled at new-path: new path refused by 10.0.0.2: this box is on the session's path already",
                          "  1× cancelled at new-path: new path refused by 10.0.0.2: new box: collision(…)"])
    }
}
