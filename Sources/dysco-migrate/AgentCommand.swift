import ArgumentParser
import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation
import Logging

/// Options every command that logs shares.
struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    func makeLogger(_ label: String) -> Logger {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: label)
        logger.logLevel = logLevel
        return logger
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the Dysco agent of this host (inside its network namespace) until SIGINT/SIGTERM.",
        discussion: """
            The agent binds NFQUEUE --queue and installs its iptables rules (raw PREROUTING → chain DYSCO-IN, \
            mangle OUTPUT → DYSCO-OUT, mangle POSTROUTING → DYSCO-FWD-OUT, all TCP, --queue-bypass). It removes \
            them on exit. A local SYN matching a policy of --config starts a chain; Dysco SYNs from other agents \
            are relayed (middlebox) or delivered (right end). Non-TCP traffic and TCP outside any session are \
            not touched.

            Config (JSON): {"version": 1, "policies": [{"name": "web", "match": {"src": "10.77.0.0/24", \
            "dst": "10.77.0.201/32", "dport": ["80", "8000-8080"]}, "chain": ["10.77.0.101"]}]}
            Omitted match fields match anything. A host that only relays or terminates needs no policies \
            (omit --config).

            Inspect it with `dysco-migrate sessions` (same namespace) or `dysco-migrate sessions --netns NAME`.
            """
    )

    @Option(help: "Policy file (JSON, see above). Without it the agent starts no chains of its own.")
    var config: String?

    @Option(help: "NFQUEUE number (per network namespace).")
    var queue: UInt16 = 7

    @Option(help: "Local ports for subsessions, LOW-HIGH; keep it outside net.ipv4.ip_local_port_range.")
    var portRange: String = "10000-29999"

    @Option(help: "Seconds without packets after which a session is forgotten.")
    var idleTimeout: Int = 600

    @Option(help: "Enter this named network namespace (`ip netns`) first, as `ip netns exec` would.")
    var netns: String?

    @Option(help: "Control socket path (default /run/dysco-migrate/agent-<netns>.sock).")
    var controlSocket: String?

    @Flag(help: "Keep every packet in NFQUEUE: no kernel fast path (debugging, comparison).")
    var noFastpath = false

    enum Reroute: String, ExpressibleByArgument, CaseIterable { case auto, always, never }

    @Option(help: ArgumentHelp("""
        Re-route local packets the fast path rewrote (auto: only when this namespace has routes via a gateway; \
        on-link next hops need no re-routing, which saves a route lookup per packet).
        """, valueName: "auto|always|never"))
    var fastpathReroute: Reroute = .auto

    @Option(help: "Packets a session carries through the agent before the kernel takes it over (short exchanges stay).")
    var fastpathAfter: UInt64 = 8

    @Option(help: "Seconds a closed session's translations linger (last ACK, retransmitted FINs).")
    var closeLinger: Double = 10

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        guard parsedPortRange != nil else {
            throw ValidationError("--port-range must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got '\(portRange)'")
        }
        guard idleTimeout > 0 else { throw ValidationError("--idle-timeout must be positive") }
        guard closeLinger >= 0, closeLinger <= 600 else { throw ValidationError("--close-linger must be 0...600 s") }
        if let netns, !NetworkNamespace.isValidName(netns) {
            throw ValidationError("--netns '\(netns)' is not a valid namespace name")
        }
    }

    var parsedPortRange: ClosedRange<UInt16>? {
        guard let range = PortRange(portRange), range.lower >= 1, range != .any else { return nil }
        return range.lower...range.upper
    }

    func run() async throws {
        if let netns {
            // setns() binds only the calling thread; re-executing under `ip netns exec` puts the whole process
            // (and the iptables it runs) into the namespace.
            try NetworkNamespace.reexec(into: netns, arguments: CommandLine.arguments.removingOption("--netns"))
        }
        let logger = logging.makeLogger("dysco.agent")
        let agentConfig: AgentConfig
        if let config {
            do { agentConfig = try AgentConfig.load(path: config) } catch {
                throw ValidationError("cannot use --config \(config): \(error)")
            }
        } else {
            agentConfig = AgentConfig()
        }
        var options = DataplaneAgent.Options(netns: NetworkNamespace.currentName(), controlSocketPath: controlSocket)
        options.queue = queue
        options.portRange = parsedPortRange!
        options.settings.idleTimeout = UInt64(idleTimeout) * 1_000_000_000
        options.settings.closeLinger = UInt64(closeLinger * 1e9)
        options.fastPath = !noFastpath
        options.settings.fastPathAfterPackets = fastpathAfter
        options.fastPathReroute = switch fastpathReroute {
        case .auto: nil
        case .always: true
        case .never: false
        }
        let agent = try DataplaneAgent(config: agentConfig, options: options, logger: logger)
        do { try agent.start() } catch {
            agent.stop()
            throw error
        }
        let signal = await Signals.waitForTermination()
        logger.info("stopping", metadata: ["signal": "\(signal)"])
        agent.stop()
    }
}

extension [String] {
    /// The arguments without `--name VALUE` / `--name=VALUE`.
    func removingOption(_ name: String) -> [String] {
        var result: [String] = []
        var skipNext = false
        for argument in self {
            if skipNext { skipNext = false; continue }
            if argument == name { skipNext = true; continue }
            if argument.hasPrefix(name + "=") { continue }
            result.append(argument)
        }
        return result
    }
}
