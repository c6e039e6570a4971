import ArgumentParser
import DyscoBench
import DyscoCLI
import DyscoLab
import Foundation
import Logging

extension BenchCommand {
    struct SoakBench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "soak",
            abstract: "Moves live sessions fw1 ⇄ fw2 many times under control-message loss; memory and tables sampled.",
            discussion: """
                Builds lab bench-soak (client1 → fw1 → server1, fw2 beside, both strict conntrack firewalls; \
                10.79.96.0/24), makes every host drop --loss of the control datagrams it sends (iptables statistic \
                match in OUTPUT) and keeps waves of --sessions sender-paced downloads running (--megabytes each at \
                --rate MiB/s; a wave starts through fw1; once one of its downloads has ended it is left to finish, \
                then the next starts). Each move asks the agent of the box that carries most of the wave's sessions \
                (as their client sends them) to replace itself with the other box for all of them (stateful: the \
                conntrack state moves too), --moves times. Prints the moves (sessions asked, matched, moved, not \
                moved and why, each request's time, the moved sessions' latency), every download's sha256 check, \
                sessions their client lost or sends elsewhere than a move's result says, the datagrams the loss rule \
                dropped, and every --sample-every moves each agent's RSS, open files, table size and stale records \
                (of sessions the box does not carry) and the firewalls' conntrack counts, with the least-squares RSS \
                slope (KiB per 1,000 moves; all samples and the second half) so a leak shows. At the end it waits up \
                to a minute for every agent's table to empty and lists what is left. Needs root; removes its lab \
                (also on error or Ctrl-C).
                """
        )

        @Option(help: "Moves (replace requests, alternating between the boxes).") var moves = 1000
        @Option(help: "Live downloads per wave.") var sessions = 10
        @Option(help: "Share of the control datagrams every host drops (0...0.9; 0: no loss).") var loss = 0.3
        @Option(help: "Sample the agents every this many moves.") var sampleEvery = 100
        @Option(help: "MiB per download (with --rate: how long a wave lasts).") var megabytes = 4
        @Option(help: "Pace of each download, MiB/s.") var rate = 0.5
        @Option(help: "Per-session migration deadline of each move, ms (as `replace --deadline`).") var deadline: UInt32 = 10_000
        @Option(help: "Extra argument for every agent (repeatable).") var agentArg: [String] = []
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (1...1_000_000).contains(moves) else { throw ValidationError("--moves must be 1...1000000") }
            guard (1...500).contains(sessions) else { throw ValidationError("--sessions must be 1...500") }
            guard (0...0.9).contains(loss) else { throw ValidationError("--loss must be 0...0.9") }
            guard sampleEvery > 0 else { throw ValidationError("--sample-every must be positive") }
            guard megabytes > 0, rate > 0 else { throw ValidationError("--megabytes and --rate must be positive") }
            guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        }

        func run() async throws {
            var options = SoakBenchmark.Options()
            options.moves = moves
            options.sessions = sessions
            options.lossProbability = loss
            options.sampleEvery = sampleEvery
            options.megabytes = megabytes
            options.rateMiBps = rate
            options.deadlineMilliseconds = deadline
            options.agentArguments = agentArg
            let report = try await SoakBenchmark(options: options, logger: BenchCommand.logger()).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
        }
    }
}
