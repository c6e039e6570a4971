import DyscoAgent
import DyscoSystem
import Foundation

/// The files of a `measure` run: report.json, three CSVs and the PNGs scripts/plot-measure.py renders from them.
extension MeasureBenchmark {
    public static let plotScript = "scripts/plot-measure.py"
    public static let plotFiles = ["latencyCDF": "latency-cdf.png", "phasesPlot": "phases.png", "goodputPlot": "goodput.png"]
    public static let dataFiles = ["report": "report.json", "latency": "latency.csv", "phases": "phases.csv", "goodput": "goodput.csv"]
    /// The removal experiment's extra file.
    public static let removalFiles = ["cdf": "cdf.csv"]

    static let latencyMeasures = ["total", "paper"] + MigrationLatency.phaseOrder

    /// Per moved or failed session (of the migrated bundle; in a removal of every bundle, with mode `removal`):
    /// result and every phase, µs.
    public static func latencyCSV(_ runs: [Run], removal: RemovalRun? = nil) -> String {
        func rows(_ label: String, _ sessions: [SessionLatency], _ bundles: [Bundle]) -> [[String]] {
            sessions.map { s -> [String] in
                let host = bundles.first { $0.index == s.bundle }?.host ?? "?"
                let values = latencyMeasures.map { name in s.phases.flatMap { MigrationLatency.value($0, name) }.map(String.init) ?? "" }
                return [label, s.session, "\(s.bundle)", host, s.result] + values
            }
        }
        let all = runs.flatMap { rows($0.mode.rawValue, $0.perSession, $0.bundles) }
            + (removal.map { rows("removal", $0.perSession, $0.bundles) } ?? [])
        return CSV.render(header: ["mode", "session", "bundle", "host", "result"] + latencyMeasures.map { "\($0)_us" }, rows: all)
    }

    /// Per mode and measure (total, paper, each phase): count and percentiles, µs.
    public static func phasesCSV(_ runs: [Run], removal: RemovalRun? = nil) -> String {
        func rows(_ label: String, _ latency: MigrationLatency) -> [[String]] {
            latencyMeasures.compactMap { name -> [String]? in
                guard let p = name == "total" ? latency.total : name == "paper" ? latency.paper : latency.phases[name] else {
                    return nil
                }
                return [label, name, "\(p.count)", "\(p.p50)", "\(p.p90)", "\(p.p99)", "\(p.max)", String(format: "%.1f", p.mean)]
            }
        }
        let all = runs.flatMap { rows($0.mode.rawValue, $0.latency) } + (removal.map { rows("removal", $0.latency) } ?? [])
        return CSV.render(header: ["mode", "phase", "count", "p50_us", "p90_us", "p99_us", "max_us", "mean_us"], rows: all)
    }

    /// Per mode, 100 ms bin and bundle: bytes received and goodput, the bin's phase and the bundle's migration
    /// window (in a removal, each bundle's own removal).
    public static func goodputCSV(_ runs: [Run], removal: RemovalRun? = nil) -> String {
        func rows(_ label: String, _ bins: [Goodput.Bin], _ bundles: [Bundle], _ timeline: (Int) -> Goodput.Timeline) -> [[String]] {
            bins.flatMap { bin in
                bundles.map { bundle in
                    let t = timeline(bundle.index)
                    return [label, String(format: "%.3f", bin.start), String(format: "%.3f", bin.end), "\(bundle.index)",
                            bundle.host, bundle.migrated ? "1" : "0", t.phase(of: bin).rawValue, "\(bin.bytes[bundle.index])",
                            String(format: "%.3f", bin.mibps(bundle.index)), String(format: "%.3f", t.windowStart),
                            String(format: "%.3f", t.windowEnd)]
                }
            }
        }
        var all = runs.flatMap { run in rows(run.mode.rawValue, run.bins, run.bundles) { _ in run.timeline } }
        if let removal {
            all += rows("removal", removal.bins, removal.bundles) { b in
                removal.removals[b].timeline(steadyFrom: removal.steadyFrom, steadyUntil: removal.steadyUntil)
            }
        }
        return CSV.render(header: ["mode", "bin_start_s", "bin_end_s", "bundle", "host", "migrated", "phase", "bytes", "mib_per_s",
                                   "window_start_s", "window_end_s"], rows: all)
    }

    /// The removal-latency CDFs: per measure (paper: new-path SYN → new path used; total: trigger → release) one
    /// row per distinct latency with the fraction of moved sessions at or below it.
    public static func cdfCSV(_ removal: RemovalRun) -> String {
        let rows = [("paper", removal.paperCDF), ("total", removal.totalCDF)].flatMap { name, cdf in
            cdf.points.map { [name, "\($0.latencyMicroseconds)", String(format: "%.6f", $0.fraction)] }
        }
        return CSV.render(header: ["measure", "latency_us", "fraction"], rows: rows)
    }

    /// `python3 -c 'import matplotlib'` works (the plots need it): nil, or what is wrong and how to fix it.
    public static func plottingProblem(python: String = PacedHTTPServer.python) -> String? {
        let absentPath = python.hasPrefix("/") && !FileManager.default.isExecutableFile(atPath: python)
        guard !absentPath, let result = try? Command.run([python, "-c", "import matplotlib"], check: false),
              result.status != 127 else {
            return "python3 is missing: the plots need python3 with matplotlib (`apt-get install python3-matplotlib`, "
                + "or `make setup`); --no-plots skips them"
        }
        guard result.status == 0 else {
            return "\(python) has no matplotlib: the plots need it (`apt-get install python3-matplotlib`, or `make setup`); "
                + "--no-plots skips them (\(result.stderr.split(separator: "\n").last ?? ""))"
        }
        return nil
    }

    /// Writes report.json and the CSVs into `directory` (made if missing) and, with `plotScript`, runs it there;
    /// returns the report with its `files` filled in.
    public static func write(_ report: Report, to directory: String, plotScript: String?) throws -> Report {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let dir = URL(fileURLWithPath: directory).standardizedFileURL.path
        var report = report
        var files = dataFiles.mapValues { "\(dir)/\($0)" }
        if plotScript != nil { files.merge(plotFiles.mapValues { "\(dir)/\($0)" }) { a, _ in a } }
        if report.removal != nil { files.merge(removalFiles.mapValues { "\(dir)/\($0)" }) { a, _ in a } }
        report.files = files
        try latencyCSV(report.runs, removal: report.removal).write(toFile: files["latency"]!, atomically: true, encoding: .utf8)
        try phasesCSV(report.runs, removal: report.removal).write(toFile: files["phases"]!, atomically: true, encoding: .utf8)
        try goodputCSV(report.runs, removal: report.removal).write(toFile: files["goodput"]!, atomically: true, encoding: .utf8)
        if let removal = report.removal { try cdfCSV(removal).write(toFile: files["cdf"]!, atomically: true, encoding: .utf8) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(report).write(to: URL(fileURLWithPath: files["report"]!))
        if let plotScript {
            let result = try Command.run([PacedHTTPServer.python, plotScript, dir], check: false)
            guard result.status == 0 else {
                throw LabError.setupFailed("\(plotScript) failed (exit \(result.status)): \(result.stderr.suffix(800))")
            }
        }
        return report
    }
}

extension MeasureBenchmark.Report {
    /// What went wrong in the runs (a session of the bundle that did not move, a download that is not
    /// byte-exact or failed, a reset): empty when nothing did.
    public var problems: [String] {
        (removal?.problems ?? []) + runs.flatMap { run -> [String] in
            var found: [String] = []
            if run.moved < run.migratedSessions { found.append("\(run.mode): \(run.migratedSessions - run.moved) of \(run.migratedSessions) sessions did not move") }
            if run.downloadsIntact < run.sessions { found.append("\(run.mode): \(run.sessions - run.downloadsIntact) downloads not byte-exact") }
            if run.sessionsReset > 0 { found.append("\(run.mode): \(run.sessionsReset) sessions reset") }
            return found
        }
    }

    public var text: String {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        func f(_ v: Double) -> String { String(format: "%.2f", v) }
        func cell(_ s: String, _ width: Int) -> String {
            s.count >= width ? s + " " : String(repeating: " ", count: width - s.count) + s
        }
        var lines: [String] = []
        if let removal { lines += removal.lines(settings: settings) }
        for run in runs {
            let mib = Double(settings.bytesPerSession) / 1_048_576
            let bundles = run.bundles.map { "\($0.host) \($0.sessions)\($0.migrated ? " (migrated)" : "")" }.joined(separator: ", ")
            lines.append("measure, \(run.mode): \(run.sessions) sessions in \(run.bundles.count) bundles (\(bundles)), "
                         + String(format: "%.1f MiB each paced at %g MiB/s", mib, settings.rateMiBps)
                         + "; lab \(run.lab) \(run.subnet), fw2 \(run.fw2Profile)")
            lines.append("migration: `\(run.replaceCommand)` (exit \(run.replaceExitStatus)), window "
                         + String(format: "%.2f–%.2f s", run.timeline.windowStart, run.timeline.windowEnd)
                         + " after the downloads started")
            lines.append("sessions moved: \(run.moved)/\(run.migratedSessions) of the bundle (matched \(run.matched)); after the window "
                         + "fw1 carries \(run.fw1SessionsAfter), fw2 \(run.fw2SessionsAfter)")
            let rate = run.batchMicroseconds > 0 ? Double(run.moved) / (Double(run.batchMicroseconds) / 1e6) : 0
            lines.append("batch: \(ms(run.batchMicroseconds)) ms (agent), \(ms(run.requestMicroseconds)) ms (replace command); "
                         + String(format: "%.1f", rate) + " sessions/s")
            if run.moved > 0 {
                lines += run.latency.table(stateless: run.mode == .stateless)
            } else {
                lines.append("no session of the bundle moved: no latency figures (see \"sessions not moved\" below)")
            }
            lines.append("goodput per bundle, MiB/s (\(Int(run.binSeconds * 1000)) ms bins at the receiver; before "
                         + String(format: "%.1f–%.1f s, after %.1f–%.1f s", run.timeline.steadyFrom, run.timeline.windowStart,
                                  run.timeline.windowEnd, run.timeline.steadyUntil) + ")")
            lines.append("  bundle".padding(toLength: 22, withPad: " ", startingAt: 0) + cell("paced", 9) + cell("before", 9)
                         + cell("during", 9) + cell("after", 9))
            for g in run.goodput {
                lines.append("  \(g.host)\(g.migrated ? " (migrated)" : "")".padding(toLength: 22, withPad: " ", startingAt: 0)
                             + cell(f(g.pacedMiBps), 9) + cell(f(g.goodput.before), 9) + cell(f(g.goodput.during), 9)
                             + cell(f(g.goodput.after), 9))
            }
            let invalid = run.fw2Profile == "open" ? "n/a (open fw2 has no conntrack)" : "\(run.fw2InvalidDuring)"
            lines.append("migration window: TCP retransmissions \(run.lossDuring.retransmitted) (\(run.lossDuring.spurious) spurious by DSACK, "
                         + "\(run.lossDuring.timeouts) RTOs); fw2 INVALID drops \(invalid), policy drops \(run.fw2PolicyDroppedDuring)")
            lines.append("outside the window: retransmissions before \(run.lossBefore.retransmitted), after \(run.lossAfter.retransmitted) "
                         + "(\(run.lossAfter.spurious) spurious, \(run.lossAfter.timeouts) RTOs); fw2 INVALID after "
                         + "\(run.fw2Profile == "open" ? "n/a" : "\(run.fw2InvalidAfter)"), policy drops after \(run.fw2PolicyDroppedAfter)")
            lines.append("bytes checked: \(run.downloadsIntact)/\(run.sessions) downloads byte-exact (sha256), \(run.bytesChecked) bytes; "
                         + "sessions reset \(run.sessionsReset), downloads failed \(run.downloadsFailed)")
            lines += PacedDownloads.problemLines(run.downloadProblems) + MigrationFailure.lines(run.failures)
            lines.append("")
        }
        if experiment == .replacement { lines += StateTransferReference.text(reference, note: referenceNote, ratios: ratios) }
        if !files.isEmpty {
            lines.append("")
            lines.append("files:")
            for key in ["report", "latency", "phases", "goodput", "cdf", "latencyCDF", "phasesPlot", "goodputPlot"] {
                if let path = files[key] { lines.append("  \(path)") }
            }
        }
        return lines.joined(separator: "\n")
    }
}
