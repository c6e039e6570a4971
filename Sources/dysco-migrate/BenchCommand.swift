import ArgumentParser
import DyscoLab
import Foundation
import Logging

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks that print figures (and assert nothing).",
        subcommands: [Dataplane.self, Connect.self, Sink.self]
    )

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
        @Flag(help: "Print the report as JSON.") var json = false
        @Flag(help: "Skip the --no-fastpath (NFQUEUE only) run.") var noSlowPath = false

        func validate() throws {
            guard (1...2).contains(middleboxes) else { throw ValidationError("--middleboxes must be 1 or 2") }
            guard seconds > 0, connections > 0, repeats > 0 else {
                throw ValidationError("--seconds, --repeats and --connections must be positive")
            }
        }

        func run() async throws {
            var logger = Logger(label: "dysco-migrate.bench")
            logger.logLevel = .info
            var options = DataplaneBenchmark.Options()
            options.seconds = seconds
            options.repeats = repeats
            options.connections = connections
            options.chain = (1...middleboxes).map { "fw\($0)" }
            options.agentArguments = agentArg
            options.includeSlowPath = !noSlowPath
            let defaultReference = FileManager.default.currentDirectoryPath + "/../shared/bench/chain-nfqueue-ref.sh"
            switch reference {
            case "none": options.referenceScript = nil
            case .some(let path): options.referenceScript = path
            case nil: options.referenceScript = FileManager.default.fileExists(atPath: defaultReference) ? defaultReference : nil
            }
            let report = try DataplaneBenchmark(options: options, logger: logger).run()
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(report), as: UTF8.self))
            } else {
                print(report.text)
            }
        }
    }

    struct Connect: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "connect() latency percentiles to ADDRESS:PORT from this namespace (JSON).",
            discussion: "Used by `bench dataplane` inside the client namespace; handy on its own too."
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
            abstract: "Accept and close TCP connections on ADDRESS:PORT until killed (the connect() benchmark's server)."
        )

        @Option(help: "Local IPv4 address.") var address: String
        @Option(help: "TCP port.") var port: UInt16

        func run() async throws { try AcceptSink.run(address: address, port: port) }
    }
}
