import ArgumentParser
import DyscoLab
import Foundation
import Logging

struct MeasureCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "measure",
        abstract: "Migration latency and goodput under live traffic (paper §5.3), with a report, CSVs and plots.",
        discussion: """
            Builds its own lab (--lab-name, default `measure`, on --subnet): clients client1…clientK → fw1 → \
            server1, with fw2 beside fw1. Starts --sessions long-lived downloads from a sender-paced HTTP server \
            (each --rate MiB/s for --seconds), spread over --bundles bundles: bundle k is the sessions of client k \
            (session i on client (i mod K) + 1). Halfway through it moves bundle 1 (client1's sessions) from fw1 to \
            fw2 with `dysco-migrate replace --lab NAME --old fw1 --new fw2 --match src=CLIENT1` while the other \
            bundles stay on fw1 (the paper's Fig. 15), then lets every download finish and checks each one's \
            sha256 against the served file.

            Reports: per-session migration latency p50/p90/p99/max (HdrHistogram) of the whole migration \
            (trigger → release), of the paper's measure (new-path SYN sent → new path first used) and of each \
            phase (lock, new path, drain, state = export + transfer + import, release, teardown); goodput per \
            bundle in 100 ms bins, measured at the receiver as the growth of each download's output file, \
            averaged before / during / after the migration window; the endpoints' TCP retransmissions (nstat) and \
            fw2's INVALID and policy drops during the window (the replace command) and outside it; bytes checked, \
            sessions reset, downloads failed (all expected 0). --both runs stateful (fw2 a strict conntrack \
            firewall; the state moves) and then stateless (fw2 open) in fresh labs of the same name, one after \
            the other. Then runs the prototype-style state transfer reference \
            (../shared/bench/state-transfer-prototype-ref.sh) for as many sessions as the bundle has and prints \
            the ratios.

            Writes into --output (default ./measure-YYYYmmdd-HHMMSS): report.json (what --json prints), \
            latency.csv (per session and phase, µs), phases.csv (percentiles, µs), goodput.csv (per bin and \
            bundle) and, rendered by scripts/plot-measure.py with matplotlib (python3-matplotlib, installed by \
            `make setup`), latency-cdf.png (stateful vs stateless), phases.png (per-phase breakdown) and \
            goodput.png (goodput time series with the migration marked). Needs root; removes its labs, also on \
            error or Ctrl-C. Exit status 1 (after writing every file) when a session of the bundle did not move, \
            a download is not byte-exact or a session was reset.

            --experiment removal reproduces the paper's middlebox deletion (§5, Figs. 12 and 13) instead: clients \
            client1…clientK → fw1 → server1 (no fw2), the same downloads and bundles, and at k/(K+1) of --seconds \
            (k = 1…K) it removes fw1 from bundle k with `dysco-migrate remove --lab NAME --box fw1 --match \
            src=CLIENTk`, so each bundle in turn goes client → server directly. fw1 is a plain forwarding box \
            (firewall profile open) or, with --proxy, the paper's session-terminating proxy (HAProxy in TCP mode); \
            a removal moves no state. Prints the shares of removals under 2 ms and 4 ms (the paper's measure, new-path SYN → \
            new path used) next to the paper's (80 %, 98.7 %), p50/p90/p99/max, each bundle's goodput before / \
            during / after its own removal, the retransmissions, RTOs and resets in the removal windows, and the \
            sha256 check of every download; also writes cdf.csv (measure, latency_us, fraction), and latency-cdf.png \
            becomes the removal-latency CDF with the paper's two points marked, goodput.png marks every removal. \
            --stateless, --both and --reference apply to the replacement only.

            Examples:
              dysco-migrate measure --both
              dysco-migrate measure --sessions 100 --bundles 4 --rate 1 --both --output /tmp/m100
            """
    )

    @Option(help: "replacement: bundle 1 moves fw1 → fw2 halfway; removal: fw1 is removed from each bundle in turn (paper §5, middlebox deletion).")
    var experiment: MeasureBenchmark.Experiment = .replacement
    @Option(help: "Live sessions in all bundles.") var sessions = 20
    @Option(help: "Bundles (one client host each, 1...20; default 2, with --experiment removal 4); bundle 1 is the one migrated (removal: each in turn).")
    var bundles: Int?
    @Flag(help: "Removal only: fw1 runs HAProxy in TCP mode with libdysco-splice.so (the paper's TCP proxy); the clients download through it and each removal takes the proxy out.")
    var proxy = false
    @Flag(help: "Stateless replacement only (fw2 open, no state moves).") var stateless = false
    @Flag(help: "Stateful, then stateless, in one invocation.") var both = false
    @Option(help: ArgumentHelp("Pace of each session, MiB/s.", valueName: "MiBps")) var rate = 2.0
    @Option(help: "Seconds each session transfers (size = rate × seconds); the migration starts halfway (removal: bundle k's at k/(K+1)).") var seconds = 8.0
    @Option(help: "Per-session migration deadline, ms (as `replace --deadline`).") var deadline: UInt32 = 3000
    @Option(help: ArgumentHelp("Directory for the report, the CSVs and the plots (default: ./measure-YYYYmmdd-HHMMSS).",
                               valueName: "dir")) var output: String?
    @Option(help: "Name of the lab to build (at most 12 characters; a lab of that name is removed first).")
    var labName = "measure"
    @Option(help: "The lab's subnet, 10.A.B.0/24.") var subnet = "10.79.94.0/24"
    @Option(help: "Reference script (default: ../shared/bench/state-transfer-prototype-ref.sh if found; 'none' to skip).")
    var reference: String?
    @Option(help: "Plot script (default: scripts/plot-measure.py here or in the binary's repository).") var plotScript: String?
    @Flag(help: "Write report.json and the CSVs only (no matplotlib needed).") var noPlots = false
    @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.MeasureReport>

    /// --bundles, or the experiment's default (the paper's deletion experiment has four client–server pairs).
    var bundleCount: Int { bundles ?? (experiment == .removal ? 4 : 2) }

    func validate() throws {
        guard (1...2000).contains(sessions) else { throw ValidationError("--sessions must be 1...2000") }
        guard LabSpec.hostCountRange.contains(bundleCount), bundleCount <= sessions else {
            throw ValidationError("--bundles must be 1...20 and at most --sessions")
        }
        guard rate > 0, seconds >= 2 else { throw ValidationError("--rate must be positive and --seconds at least 2") }
        guard !(stateless && both) else { throw ValidationError("--stateless and --both exclude each other") }
        guard experiment == .replacement || !(stateless || both) else {
            throw ValidationError("--stateless and --both apply to --experiment replacement only")
        }
        guard experiment == .removal || !proxy else { throw ValidationError("--proxy applies to --experiment removal only") }
        guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        guard LabSpec.isValidLabName(labName) else { throw ValidationError("--lab-name '\(labName)' is not a valid lab name") }
        do { _ = try LabSpec.parseSubnet(subnet) } catch { throw ValidationError("\(error)") }
    }

    func run() async throws {
        let logger = DyscoLog.logger("measure", level: .info)
        var script: String?
        if !noPlots {
            if let plotScript {
                script = plotScript
            } else {
                let (found, tried) = RepositoryFiles.find(MeasureBenchmark.plotScript)
                guard let found else {
                    throw ValidationError("no \(MeasureBenchmark.plotScript) (looked for \(tried.joined(separator: ", "))); "
                                          + "give --plot-script PATH or --no-plots")
                }
                script = found
            }
            if let problem = MeasureBenchmark.plottingProblem() { throw ValidationError(problem) }
        }
        var options = MeasureBenchmark.Options()
        options.sessions = sessions
        options.bundles = bundleCount
        options.rateMiBps = rate
        options.seconds = seconds
        options.modes = both ? [.stateful, .stateless] : stateless ? [.stateless] : [.stateful]
        options.deadlineMilliseconds = deadline
        options.labName = labName
        options.subnet = subnet
        options.agentArguments = agentArg
        options.experiment = experiment
        options.proxy = proxy
        (options.referenceScript, options.referenceMissing) = StateTransferReference.resolve(reference)
        let directory = output ?? Self.defaultOutput()
        let measured = try await MeasureBenchmark(options: options, logger: logger).run()
        let report = try MeasureBenchmark.write(measured, to: directory, plotScript: script)
        if jsonOutput.json {
            FileHandle.standardOutput.write(try Data(contentsOf: URL(fileURLWithPath: report.files["report"]!)))
            print()
        } else {
            print(report.text)
        }
        if !report.problems.isEmpty {
            FileHandle.standardError.write(Data("measure: \(report.problems.joined(separator: "; "))\n".utf8))
            throw ExitCode(1)
        }
    }

    static func defaultOutput() -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        return "./measure-\(formatter.string(from: Date()))"
    }
}

extension MeasureBenchmark.Experiment: ExpressibleByArgument {}
