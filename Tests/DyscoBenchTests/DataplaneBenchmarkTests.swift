@testable import DyscoBench
import Foundation
import Testing

/// DyscoBench's pure parts (no root): the data-plane benchmark's floors.
@Suite struct DataplaneBenchmarkTests {
    /// `dysco-bench dataplane --check` (issue 21): each floor fails on its own figure, and the figures issue 21 measured
    /// on 7135173 (connect +2,566 µs per box, 0.05 of kernel sessions/s) fail.
    @Test func dataplaneFloors() {
        func run(_ label: String, _ g1: Double, _ g8: Double, p50: Double, sessions: Double) -> DataplaneBenchmark.Run {
            .init(label: label, goodput1FlowGbps: g1, goodput8FlowsGbps: g8,
                  connect: .init(count: 1000, failures: 0, p50Microseconds: p50, p99Microseconds: p50 * 2, meanMicroseconds: p50),
                  sessionsPerSecond: sessions)
        }
        let kernel = run("kernel", 10, 15, p50: 64, sessions: 7182)
        func report(_ dysco: DataplaneBenchmark.Run) -> DataplaneBenchmark.Report {
            .init(seconds: 4, repeats: 3, middleboxes: 1, kernel: kernel, dysco: dysco, slowPath: nil,
                  referenceKernelGbps: nil, referenceChainGbps: nil)
        }
        let floors = DataplaneBenchmark.Floors()
        #expect(floors.violations(report(run("ok", 9, 13, p50: 400, sessions: 2000))).isEmpty)
        let regressed = floors.violations(report(run("7135173", 9, 13, p50: 2630, sessions: 334)))
        #expect(regressed.count == 2 && regressed[0].contains("connect overhead") && regressed[1].contains("sessions/s"))
        let slowBulk = floors.violations(report(run("bulk", 7.9, 13, p50: 400, sessions: 2000)))
        #expect(slowBulk.count == 1 && slowBulk[0].contains("1 flow"))
        #expect(floors.violations(report(run("nan", .nan, 13, p50: .nan, sessions: 2000))).count == 2, "NaN never passes")
    }
}
