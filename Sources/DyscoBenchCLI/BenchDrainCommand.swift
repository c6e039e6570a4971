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
                --sessions long-lived TCP sessions that each carry 64 checked bytes a second, drains fw1 → fw2 and \
                prints the drain time, sessions/s, batches, failures and the byte check. Needs root; removes its lab.
                """
        )
        @Option(help: "Live sessions to drain.") var sessions = 1000
        @Option(help: "Sessions at most per client host.") var sessionsPerClient = 5000
        @Option(help: "drain --concurrency.") var concurrency = 1000
        @Option(help: "Milliseconds per session's migration before it is cancelled.") var deadline: UInt32 = 10_000
        @Flag(help: "Without the state transfer (fw2 strict: those sessions would then be dropped; for comparison only).")
        var stateless = false
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (1...40_000).contains(sessions) else { throw ValidationError("--sessions must be 1...40000") }
            guard sessionsPerClient > 0, concurrency > 0 else { throw ValidationError("--sessions-per-client and --concurrency must be positive") }
        }

        func run() async throws {
            let logger = BenchCommand.logger()
            var options = DrainBenchmark.Options()
            options.sessions = sessions
            options.sessionsPerClient = sessionsPerClient
            options.concurrency = concurrency
            options.deadlineMilliseconds = deadline
            options.stateful = !stateless
            let report = try await DrainBenchmark(options: options, logger: logger).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: DrainBenchmark.render(report))
        }
    }
}
