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

    /// The IPv6 rows (issue 18): printed after the IPv4 ones, their ratio against IPv6 kernel forwarding, and carried
    /// through the JSON; a report without them (an older one, or `--no-ipv6`) reads back without them.
    @Test func ipv6Rows() throws {
        func run(_ label: String, _ g: Double, p50: Double) -> DataplaneBenchmark.Run {
            .init(label: label, goodput1FlowGbps: g, goodput8FlowsGbps: g, connect: .init(count: 10, failures: 0,
                  p50Microseconds: p50, p99Microseconds: p50, meanMicroseconds: p50), sessionsPerSecond: 100)
        }
        var report = DataplaneBenchmark.Report(seconds: 4, repeats: 3, middleboxes: 1, kernel: run("kernel forwarding", 20, p50: 40),
                                               dysco: run("dysco, BPF datapath", 18, p50: 300), slowPath: nil,
                                               referenceKernelGbps: nil, referenceChainGbps: nil)
        #expect(report.ipv6Ratio1Flow == nil && !report.text.contains("IPv6"))
        let plain = try JSONDecoder().decode(DataplaneBenchmark.Report.self, from: JSONEncoder().encode(report))
        #expect(plain.dyscoIPv6 == nil)
        report.kernelIPv6 = run("kernel forwarding, IPv6", 16, p50: 30)
        report.dyscoIPv6 = run("dysco, BPF datapath, IPv6", 4, p50: 430)
        #expect(report.ipv6Ratio1Flow == 0.25 && report.ipv6ConnectOverheadPerMiddleboxMicroseconds == 400)
        let lines = report.text.split(separator: "\n").map(String.init)
        #expect(lines[2].hasPrefix("kernel forwarding ") && lines[3].hasPrefix("dysco, BPF datapath"))
        #expect(lines[4].hasPrefix("kernel forwarding, IPv6") && lines[5].hasPrefix("dysco, BPF datapath, IPv6"))
        #expect(lines.contains { $0.hasPrefix("IPv6 chain (BPF) / IPv6 kernel forwarding: 1 flow 0.25") })
        let back = try JSONDecoder().decode(DataplaneBenchmark.Report.self, from: JSONEncoder().encode(report))
        #expect(back.dyscoIPv6?.goodput1FlowGbps == 4 && back.ipv6Ratio8Flows == 0.25)
    }
}
