import DyscoAgent
import DyscoLab
import Foundation
import Logging
import Testing

/// The pure parts of `measure` (no root): goodput bins and phases, percentiles, CSV text, session plan.
@Suite struct MeasureUnitTests {
    @Test func binsSumEachBundlesGrowthBetweenSamples() {
        // Sessions 0 and 2 in bundle 0, session 1 in bundle 1.
        let samples = [
            Goodput.Sample(seconds: 0.0, bytes: [0, 0, 0]),
            Goodput.Sample(seconds: 0.1, bytes: [100, 50, 10]),
            Goodput.Sample(seconds: 0.25, bytes: [300, 50, 10]),
        ]
        let bins = Goodput.bins(samples, bundleOf: [0, 1, 0], bundles: 2)
        #expect(bins == [Goodput.Bin(start: 0, end: 0.1, bytes: [110, 50]), Goodput.Bin(start: 0.1, end: 0.25, bytes: [200, 0])])
        #expect(abs(bins[1].mibps(0) - 200 / 1_048_576 / 0.15) < 1e-12)
        #expect(bins[1].mibps(1) == 0)
        #expect(Goodput.bins(Array(samples.prefix(1)), bundleOf: [0, 1, 0], bundles: 2).isEmpty)
    }

    @Test func aShrinkingOrMissingFileCountsNothing() {
        let samples = [Goodput.Sample(seconds: 0, bytes: [500]), Goodput.Sample(seconds: 0.1, bytes: [0])]
        #expect(Goodput.bins(samples, bundleOf: [0], bundles: 1).first?.bytes == [0])
    }

    @Test func phasesOfBinsAroundTheWindow() {
        let t = Goodput.Timeline(steadyFrom: 0.5, windowStart: 2.05, windowEnd: 2.12, steadyUntil: 4.0)
        func phase(_ a: Double, _ b: Double) -> Goodput.Phase { t.phase(of: Goodput.Bin(start: a, end: b, bytes: [0])) }
        #expect(phase(0.3, 0.4) == .ramp)
        #expect(phase(0.4, 0.6) == .ramp)
        #expect(phase(0.5, 0.6) == .before)
        #expect(phase(1.95, 2.05) == .before)
        #expect(phase(2.0, 2.1) == .during)
        #expect(phase(2.1, 2.2) == .during)
        #expect(phase(2.12, 2.2) == .after)
        #expect(phase(3.9, 4.0) == .after)
        #expect(phase(3.95, 4.05) == .tail)
    }

    @Test func meansPerPhaseWeighByTime() {
        let mib: Int64 = 1_048_576
        let t = Goodput.Timeline(steadyFrom: 0, windowStart: 1.0, windowEnd: 1.05, steadyUntil: 3)
        let bins = [
            Goodput.Bin(start: 0.0, end: 0.5, bytes: [mib]),       // before: 2 MiB/s
            Goodput.Bin(start: 0.5, end: 1.0, bytes: [2 * mib]),   // before: 4 MiB/s
            Goodput.Bin(start: 1.0, end: 1.1, bytes: [0]),         // during
            Goodput.Bin(start: 1.1, end: 2.1, bytes: [3 * mib]),   // after
            Goodput.Bin(start: 2.9, end: 3.1, bytes: [9 * mib]),   // tail: not counted
        ]
        let m = Goodput.means(bins, bundle: 0, timeline: t)
        #expect(abs(m.before - 3) < 1e-9)
        #expect(m.during == 0 && m.binsDuring == 1)
        #expect(abs(m.after - 3) < 1e-9 && m.binsAfter == 1 && m.binsBefore == 2)
        #expect(Goodput.firstCompletion([Goodput.Sample(seconds: 1, bytes: [5, 9]), Goodput.Sample(seconds: 2, bytes: [10, 9])],
                                        complete: 10) == 2)
        #expect(Goodput.firstCompletion([Goodput.Sample(seconds: 1, bytes: [5])], complete: 10) == nil)
    }

    @Test func percentilesOfKnownValues() {
        let p = Percentiles(Array(1...100))
        #expect(p.count == 100 && p.p50 == 50 && p.p90 == 90 && p.p99 == 99 && p.max == 100)
        #expect(abs(p.mean - 50.5) < 0.01)
        let empty = Percentiles([])
        #expect(empty.count == 0 && empty.p50 == 0 && empty.max == 0)
        // 3 significant digits: 123 456 µs is kept to within 0.1 %.
        let big = Percentiles([123_456])
        #expect(abs(Double(big.p50) - 123_456) <= 123.456)
    }

    @Test func csvQuotesOnlyWhatNeedsIt() {
        #expect(CSV.field("plain") == "plain")
        #expect(CSV.field("a,b") == "\"a,b\"")
        #expect(CSV.field("say \"hi\"") == "\"say \"\"hi\"\"\"")
        #expect(CSV.field("two\nlines") == "\"two\nlines\"")
        #expect(CSV.render(header: ["x", "y"], rows: [["1", "a,b"], ["2", ""]]) == "x,y\n1,\"a,b\"\n2,\n")
    }

    @Test func sessionPlanAndSizes() {
        var o = MeasureBenchmark.Options()
        o.sessions = 21
        o.bundles = 4
        #expect((0..<4).map(o.sessions(inBundle:)) == [6, 5, 5, 5])
        o.rateMiBps = 2
        o.seconds = 8
        #expect(o.bytesPerSession == 16 * 1_048_576)
        o.rateMiBps = 0.01
        o.seconds = 2
        #expect(o.bytesPerSession == 65_536)
        let measure = MeasureBenchmark(options: o, logger: Logger(label: "measure-unit"))
        let spec = measure.spec(.stateless, binary: nil)
        #expect(spec.clients == 4 && spec.name == "measure" && spec.firewallProfile(of: "fw2") == .open)
        #expect(measure.spec(.stateful, binary: nil).firewallProfile(of: "fw2") == .strict)
    }

    @Test func phasesCSVHasEveryMeasurePerMode() throws {
        let json = """
            {"lock":1,"newPath":2,"drain":3,"state":4,"release":5,"teardown":6,"export":7,"transfer":8,"import":9,"total":10,"paper":11}
            """
        let phases = try JSONDecoder().decode(ReplaceReport.Phases.self, from: Data(json.utf8))
        let latency = MigrationLatency([phases, phases])
        #expect(latency.total.count == 2 && latency.total.p50 == 10 && latency.paper.p50 == 11)
        #expect(latency.phases["import"]?.p50 == 9 && latency.phases.count == MigrationLatency.phaseOrder.count)
        #expect(latency.table(stateless: false).count == 12)
    }

    @Test func removalLatencyCDFAndSharesUnderTheirPaperThresholds() {
        let cdf = LatencyCDF([2500, 1500, 500, 5000, 1500, 2000, 3999, 4000, 1999, 100])
        #expect(cdf.count == 10)
        #expect(cdf.points.map(\.latencyMicroseconds) == [100, 500, 1500, 1999, 2000, 2500, 3999, 4000, 5000])
        #expect(cdf.points.map(\.fraction) == [0.1, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
        // Strictly under: 2000 µs is not under 2 ms, 4000 µs not under 4 ms.
        #expect(cdf.under2ms == 0.5 && cdf.under4ms == 0.8)
        #expect(LatencyCDF.share([1000, 3000], under: 2000) == 0.5)
        let empty = LatencyCDF([])
        #expect(empty.count == 0 && empty.points.isEmpty && empty.under2ms == 0 && empty.under4ms == 0)
        // The paper's figures (§5, Fig. 13), one definition for `measure` and `dysco-bench reconfigure`.
        #expect(PaperDeletion.under2ms == 0.80 && PaperDeletion.under4ms == 0.987)
    }

    @Test func removalScheduleSpreadsTheBundlesEvenly() {
        #expect(MeasureBenchmark.removalSchedule(bundles: 4, seconds: 10) == [2, 4, 6, 8])
        #expect(MeasureBenchmark.removalSchedule(bundles: 2, seconds: 6) == [2, 4])
        #expect(MeasureBenchmark.removalSchedule(bundles: 1, seconds: 8) == [4])
        // None before every session is steady: an early removal waits, the later ones keep their times.
        #expect(MeasureBenchmark.removalSchedule(bundles: 2, seconds: 6, notBefore: 2.5) == [2.5, 4])
        #expect(MeasureBenchmark.removalSchedule(bundles: 0, seconds: 6).isEmpty)
        var o = MeasureBenchmark.Options()
        o.bundles = 3
        o.labName = "mrmx"
        o.experiment = .removal
        let spec = MeasureBenchmark(options: o, logger: Logger(label: "measure-unit")).removalSpec(binary: nil)
        #expect(spec.clients == 3 && spec.chain == ["fw1"] && spec.middleboxes == ["fw1"] && spec.firewallProfile(of: "fw1") == .open)
    }

    @Test func aRemovalsGoodputTimelineIsItsOwnWindow() {
        // Bundle 1's removal at 2.0–2.1 s: its bins before count as before, those after as after.
        let t = Goodput.Timeline(steadyFrom: 0.5, windowStart: 2.0, windowEnd: 2.1, steadyUntil: 5)
        let bins = [Goodput.Bin(start: 1.8, end: 1.9, bytes: [104_858, 0]), Goodput.Bin(start: 1.9, end: 2.0, bytes: [104_858, 0]),
                    Goodput.Bin(start: 2.0, end: 2.1, bytes: [0, 0]), Goodput.Bin(start: 2.1, end: 2.2, bytes: [209_716, 0])]
        let means = Goodput.means(bins, bundle: 0, timeline: t)
        #expect(means.binsBefore == 2 && means.binsDuring == 1 && means.binsAfter == 1)
        #expect(abs(means.before - 1) < 0.01 && means.during == 0 && abs(means.after - 2) < 0.01)
    }

    @Test func plottingProblemsNameTheFix() throws {
        let missing = try #require(MeasureBenchmark.plottingProblem(python: "/nonexistent/python3"))
        #expect(missing.contains("python3 is missing") && missing.contains("python3-matplotlib") && missing.contains("--no-plots"))
        let noModule = try #require(MeasureBenchmark.plottingProblem(python: "/bin/false"))
        #expect(noModule.contains("has no matplotlib") && noModule.contains("python3-matplotlib"))
    }
}
