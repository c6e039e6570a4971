import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// `bench drain`: how long draining N live sessions off one box takes (batched). Builds lab `bench-dr`
/// (client1…clientK → fw1 → server1, fw2 beside, strict firewalls), opens N long-lived TCP sessions that each
/// carry a trickle of checked bytes (``TrickleTraffic``), drains fw1 → fw2 with ``Drain`` and reports the
/// time, sessions/s, batches, the sessions that did not move, and whether every byte arrived (the client
/// checks every stream byte against its pattern). Prints figures; asserts nothing.
public struct DrainBenchmark: Sendable {
    public struct Options: Sendable {
        public var sessions = 1000
        public var sessionsPerClient = 5000
        public var concurrency = 1000
        public var stateful = true
        public var deadlineMilliseconds: UInt32 = 10_000
        public var agentBinary: String?
        /// Extra arguments for every agent (after the benchmark's own).
        public var agentArguments: [String] = []
        /// Seconds the streams go on after the drain before the server closes them all (their last bytes then
        /// came over fw2).
        public var afterDrainSeconds = 3
        public init() {}
    }

    /// The agents' `--port-range`: every box allocates one local port per subsession it carries from one range
    /// (`PortAllocator`, per agent, not per peer), so no box carries more sessions than the range has ports (the
    /// agent's default, 10000–29999, has 20,000). The same range for every agent of the lab.
    public static let portRange = 10_000...59_999

    /// Most sessions the lab can carry through fw1: one port each of ``portRange`` (50,000).
    public static var maxSessions: Int { portRange.count }

    /// Most sessions one client host opens: its ephemeral ports towards the one server address and port
    /// (Linux's default ip_local_port_range 32768–60999 is 28,232 ports), with room to spare.
    public static let maxSessionsPerClient = 28_000

    /// Client hosts for `sessions` at most `perClient` each (the lab has at most ``LabSpec/hostCountRange`` of them).
    public static func clientCount(sessions: Int, perClient: Int) -> Int {
        min(max(1, (sessions + perClient - 1) / max(1, perClient)), LabSpec.hostCountRange.upperBound)
    }

    /// Sessions of each of `clients` client hosts (the first ones take the remainder).
    public static func sessionsPerClient(sessions: Int, clients: Int) -> [Int] {
        (0..<clients).map { i in sessions / clients + (i < sessions % clients ? 1 : 0) }
    }

    /// What every agent of the lab is given for `sessions` sessions from clients of at most `perClient` each,
    /// beyond its defaults: `--max-sessions` (default 131,072; fw1 holds them all, and sizes its BPF map from
    /// it) and `--max-sessions-per-source` (default 8,192: each client is one source) with a quarter to spare,
    /// only where the defaults are too small.
    public static func sizingArguments(sessions: Int, perClient: Int) -> [String] {
        var arguments: [String] = []
        let total = sessions + sessions / 4
        if total > 131_072 { arguments += ["--max-sessions", "\(total)"] }
        let perSource = perClient + perClient / 4
        if perSource > 8_192 { arguments += ["--max-sessions-per-source", "\(perSource)"] }
        return arguments
    }

    /// The open-file limit one trickle server would need (one socket per session, plus its own): it and the
    /// clients inherit this process's limit (and raise their soft limit to the hard one).
    public static func fileLimit(sessions: Int) -> rlim_t { rlim_t(sessions + 4_096) }

    /// Trickle server processes (SO_REUSEPORT on one port) for `sessions` under an open-file limit of `limit`:
    /// the kernel spreads the connections over them by hash, so each is given room for half as many again as
    /// its share. One where the limit allows all (root with CAP_SYS_RESOURCE raises it; a container may not).
    public static func serverProcesses(sessions: Int, fileLimit limit: rlim_t) -> Int {
        let room = max(1, Int(min(limit, rlim_t(Int.max))) - 256)
        if sessions + 4_096 <= Int(min(limit, rlim_t(Int.max))) { return 1 }
        return max(1, (sessions * 3 / 2 + room - 1) / room)
    }

    public struct Report: Codable, Sendable {
        public var sessions: Int
        public var clients: Int
        public var stateful: Bool
        public var concurrency: Int
        public var moved: Int
        public var failed: Int
        public var batches: Int
        public var remainingOnOld: Int
        public var drainSeconds: Double
        public var sessionsPerSecond: Double
        /// The sessions' byte streams at the end: every byte checked at the client.
        public var streamsIntact: Int
        public var streamsBroken: Int
        public var bytesChecked: UInt64
        public var fw2InvalidDrops: UInt64
        public var failures: [String]
        /// Opening the sessions until fw1's agent carries them all (established), seconds.
        public var setupSeconds: Double
        /// One snapshot of fw1's sessions (the control request the drain pages through at each look), seconds.
        public var snapshotSeconds: Double
        /// Per moved session, as `replace` reports it: trigger → release and each phase (µs).
        public var latency: MigrationLatency
        /// Per batch: the `replace` request's round trip (the drain's own view) and the agent's batch time.
        public var batchRoundTrip: Percentiles
        public var batchAgent: Percentiles
        /// Control messages sent during the drain (the agents' `sent.<type>` counters), by host, and by type over
        /// every agent of the lab.
        public var controlSentByHost: [String: UInt64]
        public var controlSentByType: [String: UInt64]
    }

    /// The `sent.<type>` control counters of every agent of `lab` (one page of one session: the counters only).
    static func controlSent(_ lab: Lab) async -> [String: [String: UInt64]] {
        var sent: [String: [String: UInt64]] = [:]
        for host in lab.hosts(.client).map(\.name) + ["fw1", "fw2", "server1"] {
            let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: host))
            guard let snapshot = try? await ControlClient.snapshot(path: socket, limit: 1) else { continue }
            sent[host] = snapshot.control.filter { $0.key.hasPrefix("sent.") }
        }
        return sent
    }

    /// `after` − `before` of ``controlSent(_:)``: (by host, by type).
    static func controlDelta(_ before: [String: [String: UInt64]], _ after: [String: [String: UInt64]])
        -> (byHost: [String: UInt64], byType: [String: UInt64]) {
        var byHost: [String: UInt64] = [:], byType: [String: UInt64] = [:]
        for (host, counters) in after {
            for (key, value) in counters {
                let delta = value &- min(value, before[host]?[key] ?? 0)
                guard delta > 0 else { continue }
                byHost[host, default: 0] += delta
                byType[String(key.dropFirst("sent.".count)), default: 0] += delta
            }
        }
        return (byHost, byType)
    }

    public let options: Options
    private let logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    static let port: UInt16 = 8091

    public func run() async throws -> Report {
        let clients = Self.clientCount(sessions: options.sessions, perClient: options.sessionsPerClient)
        let perClient = Self.sessionsPerClient(sessions: options.sessions, clients: clients).max() ?? 0
        let fileLimit = Self.raiseFileLimit(to: Self.fileLimit(sessions: options.sessions), logger: logger)
        let spec = LabSpec(name: "bench-dr", clients: clients, middleboxes: ["fw1", "fw2"], chain: ["fw1"],
                           subnet: "10.79.92.0/24", policyPorts: [Self.port],
                           agentArguments: ["--port-range", "\(Self.portRange.lowerBound)-\(Self.portRange.upperBound)"]
                               + Self.sizingArguments(sessions: options.sessions, perClient: perClient) + options.agentArguments,
                           agentBinary: try options.agentBinary ?? Lab.defaultAgentBinary())
        let servers = Self.serverProcesses(sessions: options.sessions, fileLimit: fileLimit)
        return try await Lab.withBenchmarkLab(spec, logger: logger) { lab in try await measure(lab, servers: servers) }
    }

    private func measure(_ lab: Lab, servers serverCount: Int) async throws -> Report {
        let clientNames = lab.hosts(.client).map(\.name)
        let perClient = Self.sessionsPerClient(sessions: options.sessions, clients: clientNames.count)
        let setupStarted = ContinuousClock.now
        // Long enough to set up, drain and finish: the server closes every stream after this.
        let holdSeconds = 30 + options.sessions / 40
        let servers = try (0..<serverCount).map { index in
            try TrickleTraffic.startServer(lab, port: Self.port, seconds: holdSeconds,
                                           interval: TrickleTraffic.interval(sessions: options.sessions), index: index)
        }
        defer { servers.forEach { $0.terminate() } }
        var clientProcesses: [(Process, String)] = []
        for (name, count) in zip(clientNames, perClient) where count > 0 {
            let out = "\(lab.directory)/trickle-\(name).json"
            clientProcesses.append((try TrickleTraffic.startClient(lab, on: name, server: lab.address(of: "server1"), port: Self.port,
                                                                   connections: count, resultPath: out), out))
        }
        logger.info("waiting for the sessions on fw1", metadata: ["bench.sessions": "\(options.sessions)"])
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1"))
        let deadline = Date().addingTimeInterval(Double(30 + options.sessions / 40))
        var snapshotSeconds = 0.0
        var most = 0, progressed = ContinuousClock.now
        while true {
            let looked = ContinuousClock.now
            let snapshot = try await ControlClient.snapshot(path: socket)
            snapshotSeconds = Self.seconds(ContinuousClock.now - looked)
            let established = snapshot.sessions.filter { $0.state == "established" && $0.session.dstPort == Self.port }.count
            if established >= options.sessions { break }
            if established > most { most = established; progressed = ContinuousClock.now }
            // No new session for a minute: something caps them (a box's --port-range, a client's ephemeral ports,
            // the table bounds); say so now rather than at the deadline.
            guard ContinuousClock.now - progressed < .seconds(60) else {
                throw LabError.setupFailed("only \(established) of \(options.sessions) sessions through fw1, none more for 60 s "
                                           + "(each box allocates one port per session from --port-range; the agents' logs are in \(lab.directory))")
            }
            guard Date() < deadline else {
                throw LabError.setupFailed("only \(established) of \(options.sessions) sessions through fw1")
            }
            // A snapshot of 10,000 sessions is large: look every few seconds.
            try await Task.sleep(for: .seconds(options.sessions > 2000 ? 5 : 1))
        }
        let setupSeconds = Self.seconds(ContinuousClock.now - setupStarted)
        logger.info("sessions established", metadata: ["bench.setupSeconds": "\(String(format: "%.1f", setupSeconds))"])
        try await Task.sleep(for: .seconds(1))

        let invalidBefore = try lab.firewallCounters("fw2").invalidDropped.packets
        var drainOptions = Evacuation.Options(old: lab.address(of: "fw1"), targets: [lab.address(of: "fw2")], oldSocket: socket,
                                         cordonSockets: lab.hosts(.client).map { AgentControlPaths.socketPath(netns: $0.namespace) })
        drainOptions.concurrency = options.concurrency
        drainOptions.stateful = options.stateful
        drainOptions.deadlineMilliseconds = options.deadlineMilliseconds
        logger.info("draining fw1 → fw2", metadata: ["bench.sessions": "\(options.sessions)"])
        let controlBefore = await Self.controlSent(lab)
        let batches = Mutex<[Evacuation.BatchOutcome]>([])
        let summary = try await Evacuation(options: drainOptions, logger: logger).run(
            progress: { _ in }, stop: { false }, batchDone: { outcome in batches.withLock { $0.append(outcome) } })
        let invalidAfter = try lab.firewallCounters("fw2").invalidDropped.packets
        let outcomes = batches.withLock { $0 }
        let control = Self.controlDelta(controlBefore, await Self.controlSent(lab))
        let moved = outcomes.flatMap { $0.report?.sessions ?? [] }.filter { $0.result == "moved" }.compactMap(\.phases)
        // Let the streams go on over fw2 for a moment, then end them all (the server's SIGUSR1), instead of
        // waiting out its hold time.
        logger.info("drained; streams go on, then the server closes them",
                    metadata: ["bench.seconds": "\(String(format: "%.2f", Double(summary.elapsedMicroseconds) / 1e6))"])
        try await Task.sleep(for: .seconds(options.afterDrainSeconds))
        for server in servers { kill(server.processIdentifier, SIGUSR1) }

        var intact = 0, broken = 0
        var bytes: UInt64 = 0
        for (process, out) in clientProcesses {
            process.waitUntilExit()
            let result = try TrickleTraffic.Result.read(out)
            intact += result.intact
            broken += result.broken
            bytes += result.bytes
        }
        return Report(sessions: options.sessions, clients: clientNames.count, stateful: options.stateful,
                      concurrency: options.concurrency, moved: summary.moved, failed: summary.failures.count,
                      batches: summary.batches, remainingOnOld: summary.remaining,
                      drainSeconds: Double(summary.elapsedMicroseconds) / 1e6, sessionsPerSecond: summary.sessionsPerSecond,
                      streamsIntact: intact, streamsBroken: broken, bytesChecked: bytes,
                      fw2InvalidDrops: invalidAfter &- invalidBefore,
                      failures: summary.failures.prefix(10).map { "\($0.session) \($0.failedStep): \($0.reason)" },
                      setupSeconds: setupSeconds, snapshotSeconds: snapshotSeconds, latency: MigrationLatency(moved),
                      batchRoundTrip: Percentiles(outcomes.map { UInt32(clamping: $0.roundTripMicroseconds) }),
                      batchAgent: Percentiles(outcomes.compactMap { $0.report.map { UInt32(clamping: $0.elapsedMicroseconds) } }),
                      controlSentByHost: control.byHost, controlSentByType: control.byType)
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// Raises this process's open-file limit (soft and hard) to at least `wanted` (root with CAP_SYS_RESOURCE
    /// may raise the hard limit up to fs.nr_open), else the soft one to the hard one; returns the limit in force.
    /// The lab's trickle servers and clients inherit it.
    static func raiseFileLimit(to wanted: rlim_t, logger: Logger) -> rlim_t {
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        var limit = rlimit()
        guard getrlimit(resource, &limit) == 0 else { return 1024 }
        if limit.rlim_cur >= wanted { return limit.rlim_cur }
        var raised = rlimit(rlim_cur: wanted, rlim_max: max(limit.rlim_max, wanted))
        if setrlimit(resource, &raised) == 0 { return wanted }
        logger.info("cannot raise the open-file hard limit; the sessions are spread over several trickle servers",
                    metadata: ["bench.wanted": "\(wanted)", "bench.hard": "\(limit.rlim_max)",
                               "bench.error": "\(String(cString: strerror(errno)))"])
        var soft = rlimit(rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max)
        return setrlimit(resource, &soft) == 0 ? limit.rlim_max : limit.rlim_cur
    }

    static func controlLine(_ r: Report) -> String {
        let total = r.controlSentByHost.values.reduce(0, +)
        let perSession = String(format: "%.1f", Double(total) / Double(max(r.moved, 1)))
        let hosts = r.controlSentByHost.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let types = r.controlSentByType.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        return "\(total) (\(perSession) per moved session; \(hosts)); by type: \(types)"
    }

    public static func render(_ r: Report) -> String {
        func ms(_ us: UInt64) -> String { String(format: "%.1f", Double(us) / 1000) }
        return """
        drain benchmark (\(r.stateful ? "stateful" : "stateless")): \(r.sessions) live sessions from \(r.clients) client(s), fw1 → fw2, concurrency \(r.concurrency)
        setup: sessions established on fw1 in \(String(format: "%.1f", r.setupSeconds)) s; one snapshot of fw1's sessions \(String(format: "%.3f", r.snapshotSeconds)) s
        moved \(r.moved)/\(r.sessions) in \(String(format: "%.3f", r.drainSeconds)) s (\(String(format: "%.0f", r.sessionsPerSecond)) sessions/s), \(r.batches) batch(es); not moved \(r.failed); left on fw1 \(r.remainingOnOld)
        streams byte-exact at the clients: \(r.streamsIntact)/\(r.sessions) (\(r.streamsBroken) broken, \(r.bytesChecked) bytes checked); fw2 INVALID drops \(r.fw2InvalidDrops)
        per batch, ms: request round trip p50 \(ms(r.batchRoundTrip.p50)) max \(ms(r.batchRoundTrip.max)); agent's batch time p50 \(ms(r.batchAgent.p50)) max \(ms(r.batchAgent.max)) (\(r.batchRoundTrip.count) batches)
        \(r.latency.table(stateless: !r.stateful).joined(separator: "\n"))
        control messages sent during the drain: \(controlLine(r))
        \(r.failures.isEmpty ? "" : "first failures:\n  " + r.failures.joined(separator: "\n  "))
        """
    }
}

/// Many long-lived TCP sessions with a checked trickle: the server (Python asyncio) writes to every connection
/// 64 bytes every ``interval(sessions:)`` seconds, byte k of a stream being k mod 251, for a fixed time or until
/// SIGUSR1 (then one last chunk to each), then closes; the client opens
/// the connections and checks every byte it reads against the pattern, writing a JSON result.
public enum TrickleTraffic {
    /// The server (Resources/trickle-server.py): `python3 trickle-server.py ADDRESS PORT SECONDS`.
    static func server() throws -> String { try LabResources.path("trickle-server.py", in: .module) }

    /// The client (Resources/trickle-client.py): `python3 trickle-client.py SERVER PORT CONNECTIONS RESULT_PATH`.
    static func client() throws -> String { try LabResources.path("trickle-client.py", in: .module) }

    public struct Result: Codable, Sendable {
        public var intact: Int
        public var broken: Int
        public var bytes: UInt64
        public var errors: [String]
        static func read(_ path: String) throws -> Result {
            try JSONDecoder().decode(Result.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        }
    }

    /// Seconds between two chunks of one stream for `sessions` streams: 1, and longer from 2,500 streams on
    /// (about 2,500 writes a second in all), so the Python server does not take a core from the agents.
    public static func interval(sessions: Int) -> Double { max(1, Double(sessions) / 2_500) }

    /// One server process; several may share the port (SO_REUSEPORT), the kernel spreading the connections.
    static func startServer(_ lab: Lab, port: UInt16, seconds: Int, interval: Double, index: Int = 0) throws -> Process {
        let process = try lab.spawn("server1", [PacedHTTPServer.python, try server(), "\(lab.address(of: "server1"))", "\(port)",
                                                "\(seconds)", "\(interval)"],
                                    logPath: "\(lab.directory)/trickle-server\(index == 0 ? "" : "-\(index)").log")
        usleep(500_000)
        return process
    }

    static func startClient(_ lab: Lab, on host: String, server: IPAddress, port: UInt16, connections: Int,
                            resultPath: String) throws -> Process {
        try lab.spawn(host, [PacedHTTPServer.python, try client(), "\(server)", "\(port)", "\(connections)", resultPath],
                      logPath: "\(lab.directory)/trickle-\(host).log")
    }
}
