import ArgumentParser
import DyscoBench
import DyscoCLI
import DyscoLab
import Foundation
import Logging

extension BenchCommand {
    struct DrainBench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "drain",
            abstract: "Time to drain N live sessions off one box (batched), every stream byte checked.",
            discussion: """
                Builds lab bench-dr (clients → fw1 → server1, fw2 beside, strict firewalls; 10.79.92.0/24), opens \
                --sessions long-lived TCP sessions that each carry 64 checked bytes a second (every N/2500 seconds \
                from 2,500 sessions on), drains fw1 → fw2 and \
                prints the drain time, sessions/s, batches, failures, where the time went (setup, one snapshot of \
                fw1's sessions, each batch's round trip, the moved sessions' phase percentiles) and the byte check: \
                the streams go on for --after-drain seconds, then the server writes a last chunk to each and closes \
                them, and every byte is checked. Raises the open-file limit for the server (one socket per session) \
                where it may, else spreads the sessions over several servers (SO_REUSEPORT), and gives the agents \
                --max-sessions and --max-sessions-per-source beyond their defaults. Needs root; removes its lab.
                """
        )
        @Option(help: ArgumentHelp("Live sessions to drain (1...50000).",
                                   discussion: "At most one per port of the agents' --port-range 10000-59999: each box allocates one local port per session it carries from that range (PortAllocator, one per agent), so 100,000 sessions through one box need a per-peer allocator."))
        var sessions = 1000
        @Option(help: "Sessions at most per client host (≤ 28000: its ephemeral ports; at most 20 clients).") var sessionsPerClient = 5000
        @Option(help: "drain --concurrency.") var concurrency = 1000
        @Option(help: "Milliseconds per session's migration before it is cancelled.") var deadline: UInt32 = 10_000
        @Flag(help: "Without the state transfer (fw2 strict: those sessions would then be dropped; for comparison only).")
        var stateless = false
        @Option(help: "Seconds the streams go on after the drain before the server closes them.") var afterDrain = 3
        @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (1...DrainBenchmark.maxSessions).contains(sessions) else {
                throw ValidationError("--sessions must be 1...\(DrainBenchmark.maxSessions) (one port each of the agents' --port-range per box)")
            }
            guard sessionsPerClient > 0, concurrency > 0 else { throw ValidationError("--sessions-per-client and --concurrency must be positive") }
            let clients = DrainBenchmark.clientCount(sessions: sessions, perClient: sessionsPerClient)
            let most = DrainBenchmark.sessionsPerClient(sessions: sessions, clients: clients).max() ?? 0
            guard most <= DrainBenchmark.maxSessionsPerClient else {
                throw ValidationError("\(most) sessions per client (\(clients) clients at most) exceed its \(DrainBenchmark.maxSessionsPerClient) ephemeral ports: lower --sessions-per-client or --sessions")
            }
            guard afterDrain >= 0 else { throw ValidationError("--after-drain must not be negative") }
        }

        func run() async throws {
            let logger = BenchCommand.logger()
            var options = DrainBenchmark.Options()
            options.sessions = sessions
            options.sessionsPerClient = sessionsPerClient
            options.concurrency = concurrency
            options.deadlineMilliseconds = deadline
            options.stateful = !stateless
            options.afterDrainSeconds = afterDrain
            options.agentArguments = agentArg
            let report = try await DrainBenchmark(options: options, logger: logger).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: DrainBenchmark.render(report))
        }
    }
}
