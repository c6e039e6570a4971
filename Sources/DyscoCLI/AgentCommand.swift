import ArgumentParser
import ConntrackState
import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation
import Logging

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the Dysco agent of this host (inside its network namespace) until SIGINT/SIGTERM.",
        discussion: """
            The agent binds NFQUEUE --queue and installs its iptables rules (raw PREROUTING → chain DYSCO-IN, \
            mangle OUTPUT → DYSCO-OUT, mangle POSTROUTING → DYSCO-FWD-OUT, all TCP, --queue-bypass except for \
            packets of known sessions, which fail closed). It removes them on exit unless sessions live (see \
            "Restart"). A local SYN matching a policy of --config starts a chain; Dysco SYNs from other agents \
            are relayed (middlebox) or delivered (right end). Non-TCP traffic and TCP outside any session are \
            not touched.

            Config (JSON): {"version": 1, "policies": [{"name": "web", "match": {"src": "10.77.0.0/24", \
            "dst": "10.77.0.201/32", "dport": ["80", "8000-8080"]}, "chain": ["10.77.0.101"]}]}
            Omitted match fields match anything. A host that only relays or terminates needs no policies \
            (omit --config).

            Trust (paper §2.3): every agent of a deployment shares one key, --trust-key FILE (hex text, at \
            least 32 hex digits, mode 0600: a key file its group or others may read is refused; make one with \
            `dysco-migrate key generate --path FILE`; `dysco-migrate lab up` writes one per lab). Dysco SYN \
            trailers (version 2) carry an HMAC under it over the trailer and the \
            packet's tuple; a SYN whose trailer is version 1, has an invalid MAC or names a loopback, multicast, \
            broadcast, unspecified or link-local address is dropped and counted (trailerVersionOneRefused, \
            trailerBadMAC, trailerForbiddenAddress in `sessions --json`).

            Key rotation: an agent signs with --trust-key and accepts both --trust-key and \
            --trust-key-previous. (1) Give every agent the new key as --trust-key-previous NEW (keeping \
            --trust-key OLD), one at a time: all still sign with OLD, and each now also accepts NEW. (2) Then \
            restart each with --trust-key NEW --trust-key-previous OLD: it signs with NEW, which every agent \
            accepts after step 1, and still accepts OLD from agents not yet switched. (3) Once all sign with \
            NEW, drop --trust-key-previous. No SYN is refused at any step.

            Policy at run time: SIGHUP (or `dysco-migrate policy reload`) reads --config again; new sessions \
            follow it, existing ones keep their chains; a file that does not load leaves the old policy in force. \
            `dysco-migrate policy cordon ADDR --to ADDR[,...]` makes new sessions avoid a box (what `drain` does \
            first); `policy show` prints both.

            Restart: the agent journals its session table to --state-file. After a crash (kill -9) or a planned \
            stop (SIGTERM/SIGINT with live sessions: the rules, the BPF programs and maps and the state file stay), an agent \
            started with the same command line reads it back, keeps the kernel's sessions there and carries on: an \
            upgrade is SIGTERM, new binary, start. While no agent runs, sessions on the kernel fast path keep \
            flowing (their FIN/RST too); packets of other known sessions are dropped (TCP retransmits them once \
            the agent is back); TCP of no session passes. The kernel's state is the tc programs and the maps pinned \
            under --bpf-fs (give the same --bpf-fs to the next agent and to --purge). To take \
            the agent away for good: --cleanup-on-exit, or SIGTERM then `dysco-migrate agent --purge` (same \
            --netns/--queue/--control-socket); --fresh starts empty.

            Inspect it with `dysco-migrate sessions` (same namespace) or `dysco-migrate sessions --netns NAME`.

            Metrics: --metrics 127.0.0.1:9464 serves Prometheus metrics at http://127.0.0.1:9464/metrics in the \
            agent's namespace (dysco_packets_total, dysco_sessions, dysco_migrations_total, \
            dysco_migration_phase_duration_seconds, dysco_control_messages_total, …; README.md "Metrics").
            """
    )

    @Option(help: "Policy file (JSON, see above). Without it the agent starts no chains of its own.")
    var config: String?

    @Option(help: ArgumentHelp(
        "The deployment's shared key (required): hex text, mode 0600 (`dysco-migrate key generate`). Signs and verifies Dysco SYNs.",
        valueName: "file"))
    var trustKey: String?

    @Option(help: ArgumentHelp(
        "A second accepted key, never used to sign: the other key of a rotation (see \"Key rotation\" above).",
        valueName: "file"))
    var trustKeyPrevious: String?

    @Option(help: "NFQUEUE number (per network namespace).")
    var queue: UInt16 = 7

    @Option(help: "Local ports for subsessions, LOW-HIGH; keep it outside net.ipv4.ip_local_port_range.")
    var portRange: String = "10000-29999"

    @Option(help: "Seconds without packets after which a session is forgotten.")
    var idleTimeout: Int = 600

    @Option(help: ArgumentHelp("""
        Seconds after its first SYN at which a session whose handshake never completed (SYN-only) is forgotten \
        (conntrack's SYN_SENT timeout, 120 s, is the reference). Keeps a SYN flood's records from staying for \
        --idle-timeout.
        """, valueName: "seconds"))
    var synTimeout: Double = 120

    @Option(help: ArgumentHelp("""
        At most this many sessions in the agent's table; a SYN that would create one more is dropped (TCP \
        retries) and counted (sessionCapRefused in `sessions --json`, dysco_syn_dropped_total{reason="session_cap"}).
        """, valueName: "n"))
    var maxSessions: Int = 131_072

    @Option(help: ArgumentHelp("""
        At most this many sessions per client (session source) address among those arriving from other agents \
        (middlebox, right end), so that one flooding host cannot take every subsession port of --port-range \
        (sourceCapRefused, reason="source_cap").
        """, valueName: "n"))
    var maxSessionsPerSource: Int = 8_192

    @Option(help: "Enter this named network namespace (`ip netns`) first, as `ip netns exec` would.")
    var netns: String?

    @Option(help: "Control socket path (default /run/dysco-migrate/agent-<netns>.sock).")
    var controlSocket: String?

    @Flag(help: "Keep every packet in NFQUEUE: no kernel fast path (debugging, comparison); the BPF programs are still loaded, for the owned keys only (fail closed while no agent runs; without them: a warning, no owned keys).")
    var noFastpath = false

    @Flag(help: ArgumentHelp("""
        Carry IPv6 sessions too: the same queue rules in ip6tables, the policies' IPv6 chains, the BPF datapath's \
        IPv6 maps, control messages over IPv6 (port 7411 on [::]); replace and drain move IPv6 sessions \
        (docs/ARCHITECTURE.md, "IPv6 sessions"). Without it IPv6 passes untouched, outside every chain.
        """))
    var ipv6 = false

    @Flag(help: ArgumentHelp("""
        This host's middlebox translates tuples (SNAT, masquerade, DNAT): each Dysco SYN is tagged at ingress and sent \
        on after the box's NAT, in the tuple the NAT gave it; the next hops and the right end see that tuple \
        (docs/ARCHITECTURE.md, "Boxes that translate"). Needs the kernel fast path.
        """))
    var nat = false

    @Option(help: ArgumentHelp("""
        The session table's journal, read back at start (default: the control socket's path with .state for \
        .sock, /run/dysco-migrate/agent-<netns>.state). See "Restart" above.
        """, valueName: "path"))
    var stateFile: String?

    @Flag(help: "Start empty: discard the state file and the kernel maps a previous agent left (its sessions are lost).")
    var fresh = false

    @Flag(help: "At exit remove the rules, the BPF programs and maps and the state file even with live sessions (they are lost).")
    var cleanupOnExit = false

    @Flag(help: ArgumentHelp("""
        Do not run: remove what a stopped agent left for its successor (NFQUEUE rules, BPF programs and pins, state file) \
        and print what was removed as JSON. Refused while an agent runs on --queue in this namespace.
        """))
    var purge = false

    @Option(help: "Packets a session carries through the agent before the kernel takes it back, for a session the kernel did not take with its SYN (one that went back to the agent after an RST, or restored without its entries).")
    var fastpathAfter: UInt64 = 8

    @Option(help: "Seconds a closed session's translations linger (last ACK, retransmitted FINs).")
    var closeLinger: Double = 10

    @Option(help: "UDP port of the agents' control protocol (the same on every agent; docs/CONTROL-PROTOCOL.md).")
    var controlPort: UInt16 = ControlMessage.port

    enum YesNo: String, ExpressibleByArgument, CaseIterable { case yes, no }

    @Option(help: ArgumentHelp("Accept firewall state migrated to this box by `replace` (no: every import is refused and such migrations are cancelled).",
                               valueName: "yes|no"))
    var acceptState: YesNo = .yes

    enum SpliceAction: String, ExpressibleByArgument, CaseIterable { case remove, join }

    @Option(help: ArgumentHelp("""
        What a splice reported by a proxy on this host (libdysco-splice.so) does: remove (default) joins the proxy's \
        two sessions and takes the proxy out of the session at once; join only joins them, and `dysco-migrate remove \
        --box THIS-HOST` takes it out later.
        """, valueName: "remove|join"))
    var splice: SpliceAction = .remove

    @Option(help: ArgumentHelp("""
        Refuse a migrated state document larger than this many bytes, before parsing (default and most useful \
        maximum: 60000, the largest document a statePut carries).
        """, valueName: "bytes"))
    var stateMaxBytes: Int = ConntrackStateStore.defaultMaxBytes

    @Option(help: ArgumentHelp("""
        Endpoint rule for migrated state: basic (default) refuses entries naming a loopback, multicast, broadcast, \
        unspecified or link-local address; routes also requires one endpoint of each entry to be an address of \
        this host or on one of its routes (not the default route); off keeps only the format's checks.
        """, valueName: "off|basic|routes"))
    var stateOnlyLocal: EndpointPolicy.Rule = .basic

    @Option(help: ArgumentHelp("""
        Serve Prometheus metrics at http://ADDR:PORT/metrics in the agent's namespace (off by default; \
        0.0.0.0 listens on every address). Names and labels: README.md, "Metrics".
        """, valueName: "addr:port"))
    var metrics: String?

    @OptionGroup var datapath: DatapathOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        guard parsedPortRange != nil else {
            throw ValidationError("--port-range must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got '\(portRange)'")
        }
        guard stateMaxBytes > 0 else { throw ValidationError("--state-max-bytes must be positive") }
        if !noFastpath, !purge, datapath.resolvedObject() == nil {
            throw ValidationError("no dysco.bpf.o found for the kernel datapath (build it with `make bpf`, give --bpf-object, or run with --no-fastpath)")
        }
        if nat, noFastpath {
            throw ValidationError("--nat needs the kernel fast path: its egress program, after the box's NAT, reports the translated SYNs (drop --no-fastpath)")
        }
        guard idleTimeout > 0 else { throw ValidationError("--idle-timeout must be positive") }
        guard synTimeout > 0, synTimeout <= 3600 else { throw ValidationError("--syn-timeout must be in (0, 3600] s") }
        guard maxSessions > 0 else { throw ValidationError("--max-sessions must be positive") }
        guard maxSessionsPerSource > 0 else { throw ValidationError("--max-sessions-per-source must be positive") }
        guard closeLinger >= 0, closeLinger <= 600 else { throw ValidationError("--close-linger must be 0...600 s") }
        if let netns, !NetworkNamespace.isValidName(netns) {
            throw ValidationError("--netns '\(netns)' is not a valid namespace name")
        }
        _ = try parsedMetrics()
        if purge { return }
        _ = try loadTrust()  // a missing or bad key is a usage error, reported before anything starts
    }

    /// Loads --trust-key and --trust-key-previous; a missing or bad file is an error naming its flag.
    func loadTrust() throws -> TrustGroup {
        func load(_ path: String, flag: String) throws -> TrustKey {
            do throws(TrustKey.LoadError) { return try TrustKey.load(path: path) } catch {
                let hint = switch error {
                case .notHex, .tooOpen: ""
                default: " (make a key with `dysco-migrate key generate --path FILE`)"
                }
                throw ValidationError("\(flag): \(error)\(hint)")
            }
        }
        guard let trustKey else {
            throw ValidationError("""
                --trust-key FILE is required: every agent of a deployment shares one key (paper §2.3). Make one \
                with `dysco-migrate key generate --path FILE` (mode 0600) and give the same file to every agent.
                """)
        }
        let current = try load(trustKey, flag: "--trust-key")
        let previous = try trustKeyPrevious.map { try load($0, flag: "--trust-key-previous") }
        return TrustGroup(current: current, previous: previous)
    }

    /// --metrics as an endpoint (nil without it); a bad value is a usage error naming the flag.
    func parsedMetrics() throws -> MetricsEndpoint? {
        guard let metrics else { return nil }
        do throws(MetricsEndpoint.ParseError) { return try MetricsEndpoint.parse(metrics) } catch {
            throw ValidationError("--metrics: \(error)")
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
        let logger = logging.logger("agent")
        let socketPath = controlSocket ?? AgentControlPaths.socketPath(netns: NetworkNamespace.currentName())
        if purge {
            let report = try DataplaneAgent.purge(
                queue: queue, logger: logger, stateFile: stateFile ?? AgentControlPaths.statePath(socketPath: socketPath),
                bpfPinDirectory: datapath.bpfFs + "/dysco-\(NetworkNamespace.currentName() ?? "host")-q\(queue)")
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(["purged": report]), as: UTF8.self))
            return
        }
        let trust = try loadTrust()
        let agentConfig: AgentConfig
        if let config {
            do { agentConfig = try AgentConfig.load(path: config) } catch {
                throw ValidationError("cannot use --config \(config): \(error)")
            }
        } else {
            agentConfig = AgentConfig()
        }
        var options = DataplaneAgent.Options(netns: NetworkNamespace.currentName(), controlSocketPath: controlSocket,
                                             trust: trust)
        options.queue = queue
        if let stateFile { options.stateFile = stateFile }
        options.fresh = fresh
        options.cleanupOnExit = cleanupOnExit
        options.configPath = config.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        options.controlPort = controlPort
        options.acceptState = acceptState == .yes
        options.spliceRemoves = splice == .remove
        options.metrics = try parsedMetrics()
        options.stateStore = ConntrackStateStore(logger: logger, limits: StateDocumentLimits(maxBytes: stateMaxBytes),
                                                 endpoints: stateOnlyLocal)
        options.portRange = parsedPortRange!
        options.settings.idleTimeout = UInt64(idleTimeout) * 1_000_000_000
        options.settings.closeLinger = UInt64(closeLinger * 1e9)
        options.settings.synTimeout = UInt64(synTimeout * 1e9)
        options.settings.maxSessions = maxSessions
        options.settings.maxSessionsPerSource = maxSessionsPerSource
        options.fastPath = !noFastpath
        options.ipv6 = ipv6
        options.settings.natBox = nat
        // --no-fastpath loads the BPF programs too, for the owned keys only (docs/BPF.md "Owned keys").
        options.bpfObject = datapath.resolvedObject() ?? ""
        options.bpffs = datapath.bpfFs
        // Four translations per two-sided session (a middlebox's).
        options.bpfMaxEntries = UInt32(min(maxSessions * 4, Int(UInt32.max)))
        options.bpfRingBytes = datapath.bpfRingBytes
        options.settings.fastPathAfterPackets = fastpathAfter
        let agent = try DataplaneAgent(config: agentConfig, options: options, logger: logger)
        do { try agent.start() } catch {
            agent.stop()
            throw error
        }
        Signals.onHangup { agent.reloadConfig() }
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
