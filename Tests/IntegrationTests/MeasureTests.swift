import DyscoAgent
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// (d) of issue 8: `dysco-migrate measure --sessions 20 --both` through the built binary ($DYSCO_BIN), in its
/// own lab `ms1` on 10.79.20.0/24 (the command builds and removes it; stateful, then stateless).
@Suite(.serialized) struct MeasureTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[measure-tests] \(line)\n".utf8))
    }

    /// Width and height from a PNG's signature and IHDR chunk (nil: not a PNG).
    static func pngSize(_ data: Data) -> (width: UInt32, height: UInt32)? {
        let bytes = [UInt8](data.prefix(24))
        guard bytes.count == 24, bytes[0..<8] == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A][...],
              bytes[12..<16] == Array("IHDR".utf8)[...] else { return nil }
        func be(_ i: Int) -> UInt32 { bytes[i..<i + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        return (be(16), be(20))
    }

    @Test("(d) measure --sessions 20 --both writes report.json, the CSVs and three PNG plots; latency counts equal the bundle's sessions; no reset, RTO or INVALID in the window; no retransmission but tail-loss probes and no reordering at the receivers in the window beyond the stretch before it")
    func measureBoth() throws {
        try measureBoth(name: "ms1", subnet: "10.79.20.0/24")
    }

    /// `measure --sessions 20 --both` in lab `name`. The hand-over rule (docs/BPF.md) makes it strict: the window's
    /// retransmissions other than tail-loss probes, and the receivers' reordering signs, must not exceed those of
    /// the seconds before it (`lossBefore`: longer than the window, the report has no same-length stretch).
    func measureBoth(name: String, subnet: String, agentArguments: [String] = []) throws {
        let output = "/tmp/\(name)-measure-\(getpid())"
        try? FileManager.default.removeItem(atPath: output)
        defer { try? FileManager.default.removeItem(atPath: output) }
        // 20 sessions at 512 KiB/s (10 MiB/s in all): at the default 2 MiB/s each the lab's own baseline (the
        // seconds before the window, no migration) already shows reordering retransmissions on a loaded 2-core
        // machine, and a zero in the window would say nothing.
        let result = try Command.run([try TestSupport.dyscoBinary(), "measure", "--sessions", "20", "--both", "--rate", "0.5",
                                      "--output", output, "--lab-name", name, "--subnet", subnet, "--json"] + agentArguments,
                                     check: false)
        defer { _ = try? Lab.down(name: name, force: true, logger: TestSupport.logger) }
        #expect(result.status == 0, "measure exited \(result.status): \(result.stderr.suffix(2000))")
        let reportData = try Data(contentsOf: URL(fileURLWithPath: "\(output)/report.json"))
        let report = try JSONDecoder().decode(MeasureBenchmark.Report.self, from: reportData)
        // --json prints the same report.
        let printed = try JSONDecoder().decode(MeasureBenchmark.Report.self, from: Data(result.stdout.utf8))
        #expect(printed.runs.count == report.runs.count)

        for name in ["report.json", "latency.csv", "phases.csv", "goodput.csv"] {
            let size = (try FileManager.default.attributesOfItem(atPath: "\(output)/\(name)")[.size] as? Int) ?? 0
            #expect(size > 0, "\(name) is empty or missing")
        }
        for name in ["latency-cdf.png", "phases.png", "goodput.png"] {
            let data = try Data(contentsOf: URL(fileURLWithPath: "\(output)/\(name)"))
            let size = try #require(Self.pngSize(data), "\(name) is not a PNG")
            #expect(size.width >= 400 && size.height >= 300, "\(name): \(size.width)×\(size.height)")
            #expect(data.count > 10_000, "\(name): only \(data.count) bytes")
            #expect(report.files.values.contains("\(URL(fileURLWithPath: output).standardizedFileURL.path)/\(name)"))
        }

        #expect(report.runs.map(\.mode) == [.stateful, .stateless])
        // The prototype-style reference runs whenever its script is where the project's checkout finds it
        // (../shared/bench next to the repository); a clone elsewhere gets a note naming where it looked.
        if StateTransferReference.find().0 != nil {
            #expect(report.reference != nil, "reference: \(report.referenceNote ?? "")")
        } else {
            #expect(report.reference == nil && report.referenceNote?.contains(StateTransferReference.scriptName) == true,
                    "reference note: \(report.referenceNote ?? "none")")
        }
        for run in report.runs {
            let bundleSessions = run.bundles.first { $0.migrated }?.sessions
            #expect(run.migratedSessions == 10 && bundleSessions == 10, "\(run.mode): \(run.bundles)")
            #expect(run.matched == run.migratedSessions && run.moved == run.migratedSessions,
                    "\(run.mode): matched \(run.matched), moved \(run.moved): \(run.failures.map { "\($0.failedStep): \($0.reason)" })")
            #expect(run.replaceExitStatus == 0)
            #expect(run.latency.total.count == run.migratedSessions && run.latency.paper.count == run.migratedSessions)
            for (phase, p) in run.latency.phases { #expect(p.count == run.migratedSessions, "\(run.mode) \(phase): \(p.count)") }
            #expect(run.latency.total.p50 > 0 && run.latency.total.max >= run.latency.total.p99)
            #expect(run.perSession.allSatisfy { $0.bundle == run.migratedBundle })
            // After the window fw2 carries the migrated bundle and fw1 the rest.
            #expect(run.fw2SessionsAfter == run.migratedSessions && run.fw1SessionsAfter == run.sessions - run.migratedSessions)

            // Byte-exact, nothing reset, nothing lost or dropped in the migration window.
            #expect(run.downloadsIntact == run.sessions && run.downloadsFailed == 0, "\(run.mode): \(run.downloadProblems)")
            #expect(run.bytesChecked == Int64(run.sessions) * report.settings.bytesPerSession)
            #expect(run.sessionsReset == 0, "\(run.mode): \(run.sessionsReset) resets")
            // No RTO or reset; no retransmission caused by the migration (strict).
            #expect(run.lossDuring.timeouts == 0 && run.lossDuring.establishedResets == 0, "\(run.mode) window: \(run.lossDuring)")
            Self.record("\(name) \(run.mode): window \(run.lossDuring); before it \(run.lossBefore)")
            let (w, b) = (MigrationLab.StrictWindow.reordering(run.lossDuring), MigrationLab.StrictWindow.reordering(run.lossBefore))
            #expect(w.retransmitted - b.retransmitted <= 0 && w.signs - b.signs <= 0,
                    "\(run.mode): reordering caused by the migration: window \(run.lossDuring), before it \(run.lossBefore)")
            #expect(run.fw2InvalidDuring == 0 && run.fw2PolicyDroppedDuring == 0,
                    "\(run.mode): fw2 INVALID \(run.fw2InvalidDuring), policy \(run.fw2PolicyDroppedDuring)")
            // Recorded, not asserted: TCP outside the window (fast-path hand-over reordering, see issue 7's note).
            Self.record("\(run.mode): latency p50 \(run.latency.total.p50) µs p99 \(run.latency.total.p99) µs; "
                        + "after the window \(run.lossAfter); fw2 INVALID after \(run.fw2InvalidAfter)")

            // The goodput measure itself: before the migration every bundle gets its paced rate (±25 %).
            #expect(!run.bins.isEmpty)
            for g in run.goodput {
                #expect(g.goodput.binsBefore >= 10 && g.goodput.binsDuring >= 1 && g.goodput.binsAfter >= 10, "\(run.mode) \(g.host): \(g.goodput)")
                #expect(abs(g.goodput.before - g.pacedMiBps) <= 0.25 * g.pacedMiBps, "\(run.mode) \(g.host): \(g.goodput)")
            }
        }

        // The CSVs: one latency row per session of the migrated bundle and mode, phases for both modes.
        let latency = try String(contentsOfFile: "\(output)/latency.csv", encoding: .utf8).split(separator: "\n")
        #expect(latency.first?.hasPrefix("mode,session,bundle,host,result,total_us,paper_us,lock_us") == true)
        #expect(latency.count == 1 + report.runs.map(\.migratedSessions).reduce(0, +))
        let phases = try String(contentsOfFile: "\(output)/phases.csv", encoding: .utf8)
        #expect(phases.contains("\nstateful,state,10,") && phases.contains("\nstateless,total,10,"))
        let goodput = try String(contentsOfFile: "\(output)/goodput.csv", encoding: .utf8).split(separator: "\n")
        #expect(goodput.count == 1 + report.runs.map { $0.bins.count * $0.bundles.count }.reduce(0, +))
        #expect(goodput.contains { $0.contains(",during,") })
        #expect(!LabPaths.existingLabs().contains(name), "measure left its lab behind")
        #expect(!(try Command.run(["ip", "netns", "list"]).stdout.contains("\(name)-")), "measure left namespaces behind")
    }

    @Test("(e) measure --experiment removal: every bundle removed, byte-exact")
    func measureRemoval() throws {
        let name = "mrm1", subnet = "10.78.130.0/24"
        let output = "/tmp/\(name)-measure-\(getpid())"
        try? FileManager.default.removeItem(atPath: output)
        defer { try? FileManager.default.removeItem(atPath: output) }
        let result = try Command.run([try TestSupport.dyscoBinary(), "measure", "--experiment", "removal", "--sessions", "8",
                                      "--bundles", "2", "--rate", "1", "--seconds", "6", "--no-plots", "--output", output,
                                      "--lab-name", name, "--subnet", subnet], check: false)
        defer { _ = try? Lab.down(name: name, force: true, logger: TestSupport.logger) }
        Self.record("removal: \(result.stdout)")
        #expect(result.status == 0, "measure exited \(result.status): \(result.stderr.suffix(2000))")
        #expect(result.stdout.contains("removals under 2 ms: ") && result.stdout.contains("(paper 80 %)")
                && result.stdout.contains("(paper 98.7 %)") && result.stdout.contains("forwarding box"))
        let report = try JSONDecoder().decode(MeasureBenchmark.Report.self,
                                              from: Data(contentsOf: URL(fileURLWithPath: "\(output)/report.json")))
        #expect(report.experiment == .removal && report.runs.isEmpty)
        let run = try #require(report.removal)
        // Every bundle removed in turn, in schedule order, each of its sessions off fw1.
        #expect(run.removals.count == 2 && run.removals.map(\.sessions) == [4, 4])
        for r in run.removals {
            #expect(r.exitStatus == 0 && r.matched == r.sessions && r.moved == r.sessions,
                    "\(r.host): matched \(r.matched), moved \(r.moved): \(r.failures.map { "\($0.failedStep): \($0.reason)" })")
            #expect(r.lossDuring.timeouts == 0 && r.lossDuring.establishedResets == 0, "\(r.host): \(r.lossDuring)")
            #expect(r.goodput.binsBefore >= 3 && r.goodput.binsAfter >= 5, "\(r.host): \(r.goodput)")
            #expect(r.goodput.after > 0.5 * r.pacedMiBps, "\(r.host): goodput after its removal \(r.goodput)")
        }
        #expect(run.removals[0].windowEnd <= run.removals[1].windowStart)
        #expect(run.moved == 8 && run.fw1SessionsAfter == 0)
        #expect(run.latency.paper.count == 8 && run.paperCDF.count == 8 && run.totalCDF.count == 8)
        #expect(run.paperCDF.points.last?.fraction == 1 && run.latency.total.max >= run.latency.total.p50)
        // Byte-exact, nothing reset.
        #expect(run.downloadsIntact == 8 && run.downloadsFailed == 0, "\(run.downloadProblems)")
        #expect(run.bytesChecked == 8 * report.settings.bytesPerSession && run.sessionsReset == 0)
        // cdf.csv: a header and a row per distinct latency of each measure, the last of each at fraction 1.
        let cdf = try String(contentsOfFile: "\(output)/cdf.csv", encoding: .utf8).split(separator: "\n")
        #expect(cdf.first == "measure,latency_us,fraction")
        #expect(cdf.count == 1 + run.paperCDF.points.count + run.totalCDF.points.count && cdf.count >= 3)
        #expect(cdf.filter { $0.hasSuffix(",1.000000") }.count == 2)
        let latency = try String(contentsOfFile: "\(output)/latency.csv", encoding: .utf8).split(separator: "\n")
        #expect(latency.count == 1 + 8 && latency.dropFirst().allSatisfy { $0.hasPrefix("removal,") })
        let goodput = try String(contentsOfFile: "\(output)/goodput.csv", encoding: .utf8).split(separator: "\n")
        #expect(goodput.count == 1 + run.bins.count * 2)
        #expect(!LabPaths.existingLabs().contains(name), "measure left its lab behind")
    }
}
