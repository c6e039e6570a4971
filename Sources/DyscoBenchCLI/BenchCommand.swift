import ArgumentParser
import ConntrackState
import DyscoBench
import DyscoCLI
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// `dysco-bench`: the benchmarks, apart from the product's `dysco-migrate` (which the labs' agents run). The
/// executable is only `@main extension BenchCommand {}`.
public struct BenchCommand: AsyncParsableCommand {
    public init() {}

    public static let configuration = CommandConfiguration(
        commandName: "dysco-bench",
        abstract: "Benchmarks of dysco-migrate that print figures (and assert nothing).",
        discussion: """
            Most build their own lab of network namespaces (needs root) whose agents run the `dysco-migrate` \
            beside this binary (or $DYSCO_BIN). `connect` and `sink` are the data-plane benchmark's own helpers \
            (hidden from this list).
            """,
        subcommands: [Dataplane.self, Replace.self, Reconfigure.self, DrainBench.self, SoakBench.self, FloodBench.self, Restore.self,
                      StateValidate.self, ConntrackBench.self, Connect.self, Sink.self]
    )

    /// Prints a benchmark's report: JSON (pretty, sorted keys) with --json, its text otherwise.
    static func output<Report: Encodable>(_ report: Report, json: Bool, text: @autoclosure () -> String) throws {
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(text())
        }
    }

    /// The benchmarks' logger: progress at info level on stderr.
    static func logger() -> Logger { DyscoLog.logger("bench", level: .info) }

    struct Dataplane: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Kernel forwarding vs the Dysco chain on the same lab topology, in one invocation.",
            discussion: """
                Builds lab bench-k (no agents, client→server routed through fw1), lab bench-d (agents with the \
                kernel fast path, policy chain through the middleboxes) and lab bench-s (agents with \
                --no-fastpath), one after the other, each with an iptables conntrack \
                firewall on the middleboxes, and measures iperf3 goodput with 1 and 8 flows and connect() \
                latency over --connections connections. Then runs the C NFQUEUE reference script (if found) \
                and prints the ratios. Needs root; removes its labs.
                """
        )

        @Option(help: "Seconds per iperf3 run.") var seconds = 4
        @Option(help: "iperf3 runs per goodput figure (the median is reported).") var repeats = 3
        @Option(help: "connect() calls for the latency percentiles.") var connections = 1000
        @Option(help: "Middleboxes in the chain (1 or 2).") var middleboxes = 1
        @Option(help: "C reference script (default: ../shared/bench/chain-nfqueue-ref.sh if present; 'none' to skip).")
        var reference: String?
        @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>
        @Flag(help: "Skip the --no-fastpath (NFQUEUE only) run.") var noSlowPath = false
        @Flag(help: "Skip the IPv6 runs (kernel forwarding and the chain over IPv6, in dual-stack labs).") var noIpv6 = false
        @Flag(inversion: .prefixedNo, help: ArgumentHelp("RPS on the labs' switch ports, as every lab has it (--no-flow-steering: off).",
                                 discussion: "RPS costs an inter-processor interrupt per steered packet (a VM exit here), which a chain with NFQUEUE verdicts pays at every reinjection and kernel forwarding far less often; without it, bulk flows may be reordered on the switch and 8-flow kernel forwarding spreads over the CPUs (docs/ARCHITECTURE.md, bench dataplane). 0d3b31d's benchmark had none."))
        var flowSteering = true
        @Flag(help: ArgumentHelp("Exit 1 when a fast-path figure falls below its floor (`make bench-check`).",
                                 discussion: "Floors, each against kernel forwarding in the same run: connect overhead per middlebox < 1 ms (p50), new sessions/s ≥ 0.2, bulk goodput (1 and 8 flows) ≥ 0.8."))
        var check = false

        func validate() throws {
            guard (1...2).contains(middleboxes) else { throw ValidationError("--middleboxes must be 1 or 2") }
            guard seconds > 0, connections > 0, repeats > 0 else {
                throw ValidationError("--seconds, --repeats and --connections must be positive")
            }
        }

        func run() async throws {
            let logger = BenchCommand.logger()
            var options = DataplaneBenchmark.Options()
            options.seconds = seconds
            options.repeats = repeats
            options.connections = connections
            options.chain = (1...middleboxes).map { "fw\($0)" }
            options.agentArguments = agentArg
            options.includeSlowPath = !noSlowPath
            options.includeIPv6 = !noIpv6
            options.flowSteering = flowSteering
            let defaultReference = FileManager.default.currentDirectoryPath + "/../shared/bench/chain-nfqueue-ref.sh"
            switch reference {
            case "none": options.referenceScript = nil
            case .some(let path): options.referenceScript = path
            case nil: options.referenceScript = FileManager.default.fileExists(atPath: defaultReference) ? defaultReference : nil
            }
            let report = try DataplaneBenchmark(options: options, logger: logger).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
            guard check else { return }
            let violations = DataplaneBenchmark.Floors().violations(report)
            if violations.isEmpty {
                FileHandle.standardError.write(Data("check: every fast-path figure is above its floor\n".utf8))
                return
            }
            FileHandle.standardError.write(Data(("check failed:\n" + violations.map { "  \($0)\n" }.joined()).utf8))
            throw ExitCode(1)
        }
    }

    struct StateValidate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "state-validate",
            abstract: "Peak memory and time to validate state documents: streaming reader vs whole-document decode.",
            discussion: """
                For each --entries count, writes a compact document of synthetic entries to a temporary file \
                (streamed, deleted afterwards) and validates it in a child process per method, so each peak RSS \
                (getrusage ru_maxrss) is that method's alone: whole (the old path: read the file, JSONDecoder over \
                the whole document, validate), stream (StateDocumentReader, validating only: `state validate`) and \
                stream-keep (the reader keeping the decoded entries, as `state import` does before its first \
                write). No limit is applied here. Needs no root.
                """
        )

        @Option(parsing: .upToNextOption, help: "Document sizes, in entries.") var entries: [Int] = [10_000, 100_000, 1_000_000]
        @Option(help: "Methods to run (whole, stream, stream-keep).") var modes: [String] = StateValidateBenchmark.Mode.allCases.map(\.rawValue)
        @Option(help: "Directory for the temporary documents.") var directory: String = NSTemporaryDirectory()
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Measurements>
        @Option(help: .hidden) var child: String?
        @Option(help: .hidden) var file: String?

        func validate() throws {
            guard !entries.isEmpty, entries.allSatisfy({ $0 > 0 && $0 <= 16_000_000 }) else {
                throw ValidationError("--entries must be 1...16000000")
            }
            for mode in modes where StateValidateBenchmark.Mode(rawValue: mode) == nil {
                throw ValidationError("unknown mode '\(mode)' (whole, stream, stream-keep)")
            }
        }

        func run() throws {
            if let child, let file, let mode = StateValidateBenchmark.Mode(rawValue: child) {
                let measurement = StateValidateBenchmark.measure(mode, path: file)
                print(String(decoding: try JSONEncoder().encode(measurement), as: UTF8.self))
                return
            }
            let json = jsonOutput.json
            let binary = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
            var results: [StateValidateBenchmark.Measurement] = []
            if !json {
                print("entries    MiB  method        valid  seconds  peak RSS MiB  (bytes/entry of RSS)")
            }
            for count in entries {
                let path = (directory as NSString).appendingPathComponent("dysco-state-bench-\(getpid())-\(count).json")
                defer { try? FileManager.default.removeItem(atPath: path) }
                try StateValidateBenchmark.generate(path: path, count: count)
                for mode in modes {
                    let output = try Command.run([binary, "state-validate", "--child", mode, "--file", path]).stdout
                    let measurement = try JSONDecoder().decode(StateValidateBenchmark.Measurement.self, from: Data(output.utf8))
                    results.append(measurement)
                    if !json {
                        let method = mode.padding(toLength: 12, withPad: " ", startingAt: 0)
                        let valid = (measurement.valid ? "yes" : "NO").padding(toLength: 5, withPad: " ", startingAt: 0)
                        print(String(format: "%9d  %5.0f  ", count, Double(measurement.bytes) / 1_048_576) + method + "  " + valid
                            + String(format: "  %7.2f  %12.1f  (%.0f)", measurement.seconds, Double(measurement.maxRSSKiB) / 1024,
                                     Double(measurement.maxRSSKiB) * 1024 / Double(count)))
                    }
                }
            }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(results), as: UTF8.self))
            }
        }
    }

    struct Replace: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Moves N live sessions fw1 → fw2 with `replace` and prints per-phase latency percentiles.",
            discussion: """
                Builds lab bench-rp (stateful: fw2 a strict conntrack firewall, 10.79.90.0/24) or bench-rps \
                (--stateless: fw2 open, 10.79.91.0/24) with one client per 25 sessions, starts --sessions \
                sender-paced downloads (--megabytes each at --rate MiB/s), waits until fw1 carries them all, asks \
                fw1's agent to replace fw1 with fw2 for all of them and prints: sessions moved, per-session total, \
                paper measure and phase latencies (p50/p90/p99/max), the batch's time and rate, the endpoints' TCP \
                retransmissions and fw2's INVALID drops during the window, and whether every download arrived \
                byte-exact (sha256). Then runs the prototype-style state transfer reference \
                (../shared/bench/state-transfer-prototype-ref.sh, looked up relative to the current directory and \
                to the binary's repository) and prints the ratios. --both runs stateful, then stateless. --nat \
                adds a stateful run between an HA pair of NAT'ing firewalls (lab bench-rpn, 10.79.97.0/24: fw1 and \
                fw2 translating sources to a shared address, `--firewall fwN=snat-shared`), beside the plain one. \
                Needs root; removes its labs (also on error or Ctrl-C).
                """
        )

        @Option(help: "Live sessions to move.") var sessions = 100
        @Flag(help: "Stateless replacement only (fw2 open, no state moves).") var stateless = false
        @Flag(help: "Stateful, then stateless, in one invocation (two labs one after the other).") var both = false
        @Flag(help: "Also a stateful run between an HA pair of NAT'ing firewalls (fw1, fw2 snat-shared), same invocation.")
        var nat = false

        @Flag(help: "Also a stateful run over IPv6 (a dual-stack lab; the kernel carries the IPv6 sessions as it does IPv4's), same invocation.")
        var ipv6 = false
        @Option(help: "MiB per download (with --rate: how long each session stays mid-transfer).") var megabytes = 12
        @Option(help: "Pace of each download, MiB/s.") var rate = 1.0
        @Option(help: "Per-session migration deadline, ms (as `replace --deadline`).") var deadline: UInt32 = 3000
        @Option(help: "Sessions per client host (one client per this many sessions, at most 20 clients).")
        var sessionsPerClient = 25
        @Option(help: "Reference script (default: ../shared/bench/state-transfer-prototype-ref.sh if found; 'none' to skip).")
        var reference: String?
        @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (1...2000).contains(sessions) else { throw ValidationError("--sessions must be 1...2000") }
            guard megabytes > 0, rate > 0 else { throw ValidationError("--megabytes and --rate must be positive") }
            guard !(stateless && both) else { throw ValidationError("--stateless and --both exclude each other") }
            guard sessionsPerClient > 0 else { throw ValidationError("--sessions-per-client must be positive") }
            guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        }

        func run() async throws {
            let logger = BenchCommand.logger()
            var options = ReplaceBenchmark.Options()
            options.sessions = sessions
            options.megabytes = megabytes
            options.rateMiBps = rate
            options.modes = both ? [.stateful, .stateless] : stateless ? [.stateless] : [.stateful]
            options.natPair = nat
            options.ipv6 = ipv6
            options.deadlineMilliseconds = deadline
            options.sessionsPerClient = sessionsPerClient
            options.agentArguments = agentArg
            (options.referenceScript, options.referenceMissing) = StateTransferReference.resolve(reference)
            let report = try await ReplaceBenchmark(options: options, logger: logger).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
        }
    }

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time for a restarted agent to restore N sessions from its state file and the kernel's map.",
            discussion: """
                In a scratch network namespace (bench-rs, lo only), writes a state file of N established middlebox \
                sessions and the pinned BPF session map a crashed predecessor would leave (all N in the kernel), \
                then starts a real agent (`dysco-migrate agent`, the binary beside this one or $DYSCO_BIN) on them \
                and prints: read + restore + reconcile, the map taken over, the queue rules, the whole start and \
                sessions/s. Needs root; removes the namespace, the bpffs and the files.
                """
        )

        @Option(help: "Sessions in the state file and the kernel (1...40000).") var sessions = 1000
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>
        @Flag(help: .hidden) var inside = false
        @Option(help: .hidden) var bpfObject: String?

        func validate() throws {
            guard (1...40000).contains(sessions) else { throw ValidationError("--sessions must be 1...40000") }
        }

        func run() async throws {
            var logger = BenchCommand.logger()
            if inside {
                logger.logLevel = .warning
                guard let bpfObject else { throw ValidationError("--inside needs --bpf-object") }
                let report = try RestoreBenchmark.runInside(sessions: sessions, bpfObject: bpfObject, logger: logger)
                print(String(decoding: try JSONEncoder().encode(report), as: UTF8.self))
                return
            }
            logger.info("restoring", metadata: ["bench.sessions": "\(sessions)", "bench.netns": "\(RestoreBenchmark.namespace)"])
            let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
            let report = try RestoreBenchmark.run(sessions: sessions, bench: executable, agent: try Lab.defaultAgentBinary(),
                                                  logger: logger)
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
        }
    }

    struct Connect: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "connect() latency percentiles to ADDRESS:PORT from this namespace (JSON).",
            discussion: "Used by `dysco-bench dataplane` inside the client namespace; handy on its own too.",
            shouldDisplay: false
        )

        @Option(help: "Server IPv4 address.") var address: String
        @Option(help: "Server TCP port.") var port: UInt16
        @Option(help: "Sequential connections.") var count = 1000

        func run() async throws {
            let result = ConnectLatency.measure(address: address, port: port, count: count)
            print(String(decoding: try JSONEncoder().encode(result), as: UTF8.self))
        }
    }

    struct Sink: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Accept and close TCP connections on ADDRESS:PORT until killed (the connect() benchmark's server).",
            shouldDisplay: false
        )

        @Option(help: "Local IPv4 address.") var address: String
        @Option(help: "TCP port.") var port: UInt16

        func run() async throws { try AcceptSink.run(address: address, port: port) }
    }
}

extension BenchCommand {
    struct Reconfigure: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Inserts a box into N live sessions and removes it again; prints insertion and removal latency percentiles.",
            discussion: """
                Builds lab bench-rc (10.79.95.0/24: --bundles clients → fw1 → server1, fw2 an open forwarding box) \
                and starts --sessions sender-paced downloads split evenly over the clients (--megabytes each at --rate \
                MiB/s). Per bundle (the sessions of one client, the paper's client–server pairs) it asks fw1's agent to \
                insert fw2 after fw1, then per bundle asks fw2's agent to remove itself, --interval ms apart. Prints \
                per operation: sessions moved, trigger → release and the paper's measure (new-path SYN → new path \
                used) as p50/p80/p90/p99/max/mean with the share under 2 ms and 4 ms next to the paper's middlebox-deletion \
                figures (80 % < 2 ms, 98.7 % < 4 ms for 600 sessions in bundles of 150), the phases' medians, the \
                endpoints' TCP retransmissions during the requests and whether every download arrived byte-exact \
                (sha256). Needs root; removes its lab (also on error or Ctrl-C).
                """
        )

        @Option(help: "Live sessions (the paper: 600).") var sessions = 100
        @Option(help: "Bundles = client hosts, the sessions split evenly (the paper: 4 client–server pairs; 1...20).") var bundles = 4
        @Flag(help: "Stateless: new data takes the new path at once (default: held, no byte on two paths).") var stateless = false
        @Option(help: "MiB per download (default: enough to outlive both operations at --rate).") var megabytes: Int?
        @Option(help: "Pace of each download, MiB/s.") var rate = 0.5
        @Option(help: "Milliseconds between two bundles' requests.") var interval = 250
        @Option(help: "Per-session deadline, ms (as `remove --deadline`).") var deadline: UInt32 = 3000
        @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (1...2000).contains(sessions) else { throw ValidationError("--sessions must be 1...2000") }
            guard (megabytes ?? 1) > 0, rate > 0 else { throw ValidationError("--megabytes and --rate must be positive") }
            guard (1...20).contains(bundles), bundles <= sessions else { throw ValidationError("--bundles must be 1...20 and at most --sessions") }
            guard (0...60_000).contains(interval) else { throw ValidationError("--interval must be 0...60000 ms") }
            guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        }

        func run() async throws {
            var options = ReconfigureBenchmark.Options()
            options.sessions = sessions
            options.bundles = bundles
            options.megabytes = megabytes
            options.rateMiBps = rate
            options.mode = stateless ? .stateless : .held
            options.intervalMilliseconds = interval
            options.deadlineMilliseconds = deadline
            options.agentArguments = agentArg
            let report = try await ReconfigureBenchmark(options: options, logger: BenchCommand.logger()).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
        }
    }
}
