import ArgumentParser
import DyscoBench
import DyscoCLI
import DyscoLab
import Foundation

extension BenchCommand {
    struct FloodBench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "flood",
            abstract: "Floods fw1 with SYNs and prints its agent's RSS before, at the peak and after the records expire.",
            discussion: """
                Builds lab at-bflood (10.79.89.0/24: client1, client2, fw1, server1; agents with --syn-timeout \
                and --metrics 127.0.0.1:9464), then sends --syns SYNs from client2, a host of the deployment gone \
                bad: half plain SYNs to server1:80 through its own agent (random source ports, its replies dropped, \
                so every SYN leaves a SYN-only record at client2, fw1 and server1), half Dysco SYNs with forged \
                trailers straight at fw1 (no key: refused by the MAC). Meanwhile client1 keeps connecting to \
                server1:80. Prints the flood rate, fw1's agent VmRSS before, at the peak during, and after the \
                flood's records expired (plus 12 s for the agent to give memory back), fw1's records at the peak, \
                what its caps refused, and how many legitimate connections succeeded during and after. Needs root \
                and python3; removes its lab (also on error or Ctrl-C). Asserts nothing. With --ipv6 the lab is dual stack and \
                the flood, the forged trailers (family 6) and the legitimate connections are IPv6.
                """
        )

        @Option(help: "SYNs in all from client2 (half plain via its agent, half forged Dysco SYNs at fw1).")
        var syns = 100_000
        @Option(help: "The agents' --syn-timeout, seconds.") var synTimeout = 10.0
        @Option(help: "SYNs per second of each of the two flood processes (0: as fast as Python sends).") var rate = 0.0
        @Option(help: "Extra argument for every agent (repeatable), e.g. --agent-arg=--max-sessions-per-source=4096.")
        var agentArg: [String] = []
        @Flag(help: "Flood over IPv6 (a dual-stack lab; IPv6 SYNs and family-6 forged trailers).") var ipv6 = false
        @OptionGroup var bpfCheck: BenchBPFCheck
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

        func validate() throws {
            guard (2...1_000_000).contains(syns) else { throw ValidationError("--syns must be 2...1000000") }
            guard synTimeout > 0, synTimeout <= 600 else { throw ValidationError("--syn-timeout must be in (0, 600] s") }
            guard rate >= 0 else { throw ValidationError("--rate must be 0 (unlimited) or positive") }
        }

        func run() async throws {
            var options = FloodBenchmark.Options()
            options.syns = syns
            options.synTimeout = synTimeout
            options.rate = rate
            options.agentArguments = agentArg
            options.family = ipv6 ? .ipv6 : .ipv4
            let report = try await FloodBenchmark(options: options, logger: BenchCommand.logger()).run()
            try BenchCommand.output(report, json: jsonOutput.json, text: report.text)
        }
    }
}
