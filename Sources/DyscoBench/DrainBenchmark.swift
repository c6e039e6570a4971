import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

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
        public init() {}
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
    }

    public let options: Options
    private let logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    static let port: UInt16 = 8091

    public func run() async throws -> Report {
        let clients = min(max(1, (options.sessions + options.sessionsPerClient - 1) / options.sessionsPerClient),
                          LabSpec.hostCountRange.upperBound)
        let spec = LabSpec(name: "bench-dr", clients: clients, middleboxes: ["fw1", "fw2"], chain: ["fw1"],
                           subnet: "10.79.92.0/24", policyPorts: [Self.port],
                           agentArguments: ["--port-range", "10000-59999"],
                           agentBinary: try options.agentBinary ?? Lab.defaultAgentBinary())
        return try await Lab.withBenchmarkLab(spec, logger: logger) { lab in try await measure(lab) }
    }

    private func measure(_ lab: Lab) async throws -> Report {
        let clientNames = lab.hosts(.client).map(\.name)
        let perClient = (0..<clientNames.count).map { i in
            options.sessions / clientNames.count + (i < options.sessions % clientNames.count ? 1 : 0)
        }
        // Long enough to set up, drain and finish: the server closes every stream after this.
        let holdSeconds = 30 + options.sessions / 40
        let server = try TrickleTraffic.startServer(lab, port: Self.port, seconds: holdSeconds)
        defer { server.terminate() }
        var clientProcesses: [(Process, String)] = []
        for (name, count) in zip(clientNames, perClient) where count > 0 {
            let out = "\(lab.directory)/trickle-\(name).json"
            clientProcesses.append((try TrickleTraffic.startClient(lab, on: name, server: lab.address(of: "server1"), port: Self.port,
                                                                   connections: count, resultPath: out), out))
        }
        logger.info("waiting for the sessions on fw1", metadata: ["bench.sessions": "\(options.sessions)"])
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1"))
        let deadline = Date().addingTimeInterval(Double(30 + options.sessions / 40))
        while true {
            let snapshot = try await ControlClient.snapshot(path: socket)
            let established = snapshot.sessions.filter { $0.state == "established" && $0.session.dstPort == Self.port }.count
            if established >= options.sessions { break }
            guard Date() < deadline else {
                throw LabError.setupFailed("only \(established) of \(options.sessions) sessions through fw1")
            }
            // A snapshot of 10,000 sessions is large: look every few seconds.
            try await Task.sleep(for: .seconds(options.sessions > 2000 ? 5 : 1))
        }
        try await Task.sleep(for: .seconds(1))

        let invalidBefore = try lab.firewallCounters("fw2").invalidDropped.packets
        var drainOptions = Evacuation.Options(old: lab.address(of: "fw1"), targets: [lab.address(of: "fw2")], oldSocket: socket,
                                         cordonSockets: lab.hosts(.client).map { AgentControlPaths.socketPath(netns: $0.namespace) })
        drainOptions.concurrency = options.concurrency
        drainOptions.stateful = options.stateful
        drainOptions.deadlineMilliseconds = options.deadlineMilliseconds
        logger.info("draining fw1 → fw2", metadata: ["bench.sessions": "\(options.sessions)"])
        let summary = try await Evacuation(options: drainOptions, logger: logger).run(progress: { _ in }, stop: { false })
        let invalidAfter = try lab.firewallCounters("fw2").invalidDropped.packets

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
                      failures: summary.failures.prefix(10).map { "\($0.session) \($0.failedStep): \($0.reason)" })
    }

    public static func render(_ r: Report) -> String {
        """
        drain benchmark (\(r.stateful ? "stateful" : "stateless")): \(r.sessions) live sessions from \(r.clients) client(s), fw1 → fw2, concurrency \(r.concurrency)
        moved \(r.moved)/\(r.sessions) in \(String(format: "%.3f", r.drainSeconds)) s (\(String(format: "%.0f", r.sessionsPerSecond)) sessions/s), \(r.batches) batch(es); not moved \(r.failed); left on fw1 \(r.remainingOnOld)
        streams byte-exact at the clients: \(r.streamsIntact)/\(r.sessions) (\(r.streamsBroken) broken, \(r.bytesChecked) bytes checked); fw2 INVALID drops \(r.fw2InvalidDrops)
        \(r.failures.isEmpty ? "" : "first failures:\n  " + r.failures.joined(separator: "\n  "))
        """
    }
}

/// Many long-lived TCP sessions with a checked trickle: the server (Python asyncio) writes to every connection
/// 64 bytes every second, byte k of a stream being k mod 251, for a fixed time, then closes; the client opens
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

    static func startServer(_ lab: Lab, port: UInt16, seconds: Int) throws -> Process {
        let process = try lab.spawn("server1", [PacedHTTPServer.python, try server(), "\(lab.address(of: "server1"))", "\(port)", "\(seconds)"],
                                    logPath: "\(lab.directory)/trickle-server.log")
        usleep(500_000)
        return process
    }

    static func startClient(_ lab: Lab, on host: String, server: IPv4Address, port: UInt16, connections: Int,
                            resultPath: String) throws -> Process {
        try lab.spawn(host, [PacedHTTPServer.python, try client(), "\(server)", "\(port)", "\(connections)", resultPath],
                      logPath: "\(lab.directory)/trickle-\(host).log")
    }
}
