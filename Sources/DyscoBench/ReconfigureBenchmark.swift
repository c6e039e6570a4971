import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// The insertion and removal benchmark (issue 17; paper §5, "Middlebox deletion": 600 sessions in bundles of 150, one
/// removal per bundle, 80 % of removals under 2 ms and 98.7 % under 4 ms). Builds its own lab (client1…clientK → fw1 →
/// server1, fw2 beside it an open, forwarding box), starts N sender-paced downloads, then per bundle (the sessions of
/// one client, as the paper's client–server pairs) asks fw1's agent to insert fw2 after fw1, and after all bundles
/// asks fw2's agent to remove itself, bundle by bundle with a pause between bundles. Prints the per-session latency
/// of each (trigger → release and the paper's measure, new-path SYN → new path used) as percentiles with the share
/// under 2 ms and 4 ms next to the paper's, the endpoints' retransmissions during the windows, and whether every
/// download arrived byte-exact. Prints figures; asserts nothing.
public struct ReconfigureBenchmark: Sendable {
    public struct Options: Sendable {
        public var sessions = 100
        /// Bundles = client hosts (the paper: four client–server pairs of 150 sessions).
        public var bundles = 4
        /// MiB per download; nil: enough for the downloads to outlive every bundle's insertion and removal.
        public var megabytes: Int?
        public var rateMiBps = 0.5
        public var mode: TransferMode = .held
        /// Pause between two bundles' requests (the paper: 20 s; here the downloads must outlive every bundle).
        public var intervalMilliseconds = 250
        public var deadlineMilliseconds: UInt32 = 3000
        public var agentBinary: String?
        public var agentArguments: [String] = []
        public init() {}
    }

    /// One operation over all bundles.
    public struct Operation: Codable, Sendable {
        public var name: String
        public var bundles: Int
        public var matched: Int
        public var moved: Int
        public var failures: [MigrationFailure]
        /// Trigger → release, and the paper's measure (new-path SYN → new path used), per moved session.
        public var total: Percentiles
        public var paper: Percentiles
        /// Share of moved sessions whose paper measure is under 2 ms and under 4 ms (the paper: 0.80 and 0.987).
        public var under2ms: Double
        public var under4ms: Double
        public var phases: [String: Percentiles]
        /// Each bundle's request round trip (the controller's batch), µs.
        public var bundleMicroseconds: [UInt64]
        /// TcpRetransSegs of the clients and server1 during this operation's requests.
        public var retransmissionsDuring: UInt64
    }

    public struct Report: Codable, Sendable {
        public var lab: String
        public var sessions: Int
        public var clients: Int
        public var mode: String
        public var megabytes: Int
        public var rateMiBps: Double
        public var insertion: Operation
        public var removal: Operation
        public var retransmissionsOutside: UInt64
        public var downloadsIntact: Int
        public var downloadProblems: [String]
        public var finishedBeforeEnd: Int
    }

    public var options: Options
    public var logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public func run() async throws -> Report {
        let binary = try options.agentBinary ?? Lab.defaultAgentBinary()
        let clients = min(max(1, options.bundles), LabSpec.hostCountRange.upperBound, options.sessions)
        let spec = LabSpec(name: "bench-rc", clients: clients, middleboxes: ["fw1", "fw2"], chain: ["fw1"], subnet: "10.79.95.0/24",
                           policyPorts: [PacedLab.port], agentArguments: options.agentArguments, agentBinary: binary,
                           firewallProfiles: ["fw2": .open])
        return try await Lab.withBenchmarkLab(spec, logger: logger) { lab in try await measure(lab) }
    }

    /// MiB per download: the given size, or what lasts (at the rate) through both operations with a margin.
    var megabytes: Int {
        options.megabytes ?? max(8, Int((Double(2 * options.bundles * options.intervalMilliseconds) / 1000 + 20) * options.rateMiBps))
    }

    private func measure(_ lab: Lab) async throws -> Report {
        let megabytes = self.megabytes
        let clients = lab.hosts(.client).map(\.name)
        let endpoints = clients + ["server1"]
        let file = "blob"
        let original = "\(lab.httpRoot)/\(file)"
        try Command.run(["dd", "if=/dev/urandom", "of=\(original)", "bs=1M", "count=\(megabytes)", "status=none"])
        let expected = try PacedLab.sha256(original)
        try PacedHTTPServer.start(lab, port: PacedLab.port, bytesPerSecond: options.rateMiBps * 1_048_576)
        let transferSeconds = Double(megabytes) / max(options.rateMiBps, 0.001)
        let start = try retransmissions(lab, endpoints)
        let downloads = try PacedDownloads(lab, clients: clients, port: PacedLab.port, file: file, count: options.sessions,
                                           timeout: Int(transferSeconds) + 60)
        try await PacedLab.waitForSessions(lab, on: "fw1", count: options.sessions, downloads: downloads, timeout: 30)
        try await Task.sleep(for: .milliseconds(500))

        // Bundles: the sessions of one client (the paper's client–server pairs), by chain id.
        var bundles: [IPAddress: Set<UInt64>] = [:]
        for s in try await PacedLab.pacedSessions(lab, "fw1") {
            if let chain = s.chainID.flatMap({ UInt64($0, radix: 16) }) { bundles[s.session.srcAddr, default: []].insert(chain) }
        }
        let ordered = bundles.sorted { $0.key.value < $1.key.value }.map(\.value)
        let fw2 = lab.address(of: "fw2")
        logger.info("inserting fw2 after fw1", metadata: ["bench.bundles": "\(ordered.count)"])
        let insertion = try await operation("insertion", lab: lab, at: "fw1", bundles: ordered, endpoints: endpoints) { chains in
            ReplaceRequest(predicate: SessionPredicate(), newBoxes: [fw2], mode: options.mode,
                           deadlineMilliseconds: options.deadlineMilliseconds, chains: chains, insertHere: true)
        }
        logger.info("removing fw2", metadata: ["bench.moved": "\(insertion.moved)"])
        let removal = try await operation("removal", lab: lab, at: "fw2", bundles: ordered, endpoints: endpoints) { chains in
            ReplaceRequest(predicate: SessionPredicate(), newBoxes: [], mode: options.mode,
                           deadlineMilliseconds: options.deadlineMilliseconds, chains: chains)
        }
        let finishedEarly = downloads.finishedCount()
        let finished = await downloads.wait(timeout: transferSeconds + 70)
        let end = try retransmissions(lab, endpoints)
        let (intact, problems) = downloads.check(expected: expected, finished: finished)
        return Report(lab: lab.name, sessions: options.sessions, clients: clients.count, mode: "\(options.mode)",
                      megabytes: megabytes, rateMiBps: options.rateMiBps, insertion: insertion, removal: removal,
                      retransmissionsOutside: (end &- start) &- insertion.retransmissionsDuring &- removal.retransmissionsDuring,
                      downloadsIntact: intact, downloadProblems: problems, finishedBeforeEnd: finishedEarly)
    }

    /// One request per bundle at `host`'s agent, `intervalMilliseconds` apart.
    private func operation(_ name: String, lab: Lab, at host: String, bundles: [Set<UInt64>], endpoints: [String],
                           request: (Set<UInt64>) -> ReplaceRequest) async throws -> Operation {
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: host))
        var sessions: [ReplaceReport.Session] = []
        var matched = 0
        var bundleTimes: [UInt64] = []
        var retransmitted: UInt64 = 0
        for (i, chains) in bundles.enumerated() {
            if i > 0 { try await Task.sleep(for: .milliseconds(options.intervalMilliseconds)) }
            let before = try retransmissions(lab, endpoints)
            let data = try await ControlClient.request(ControlRequest(.replace, replace: request(chains)), path: socket)
            retransmitted += try retransmissions(lab, endpoints) &- before
            guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
                throw LabError.setupFailed("\(host)'s agent answered the \(name) with: \(String(decoding: data.prefix(500), as: UTF8.self))")
            }
            matched += report.matched
            sessions += report.sessions
            bundleTimes.append(report.elapsedMicroseconds)
        }
        let moved = sessions.filter { $0.result == "moved" }
        let latency = MigrationLatency(moved.compactMap(\.phases))
        let paper = moved.compactMap { $0.phases?.paper }
        func share(under micros: UInt32) -> Double { LatencyCDF.share(paper, under: micros) }
        return Operation(name: name, bundles: bundles.count, matched: matched, moved: moved.count,
                         failures: sessions.filter { $0.result != "moved" }.map(MigrationFailure.init),
                         total: latency.total, paper: latency.paper, under2ms: share(under: 2000), under4ms: share(under: 4000),
                         phases: latency.phases, bundleMicroseconds: bundleTimes, retransmissionsDuring: retransmitted)
    }

    private func retransmissions(_ lab: Lab, _ hosts: [String]) throws -> UInt64 {
        try hosts.reduce(0) { $0 + (try lab.tcpRetransmissions($1)) }
    }
}

extension ReconfigureBenchmark.Report {
    public var text: String {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        var lines = ["reconfigure benchmark (\(mode)): \(sessions) sessions (\(megabytes) MiB each, paced at "
                     + "\(String(format: "%g", rateMiBps)) MiB/s) from \(clients) client(s), one bundle per client; "
                     + "client → fw1 → server, fw2 (open, forwarding) inserted after fw1, then removed; lab \(lab)"]
        func pad(_ cells: [String]) -> String {
            zip(cells, [18, 9, 9, 9, 9, 9, 9, 9, 8, 8]).enumerated().map { i, pair in
                i == 0 ? pair.0.padding(toLength: pair.1, withPad: " ", startingAt: 0)
                       : String(repeating: " ", count: max(0, pair.1 - pair.0.count)) + pair.0
            }.joined(separator: " ")
        }
        lines.append(pad(["operation", "moved", "p50 ms", "p80 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "< 2 ms", "< 4 ms"]))
        for op in [insertion, removal] {
            for (label, p) in [("total", op.total), ("paper", op.paper)] {
                let f = { (v: Double) in String(format: "%.2f", v / 1000) }
                lines.append(pad(["\(op.name) \(label)", "\(op.moved)/\(op.matched)", f(Double(p.p50)), f(Double(p.p80)), f(Double(p.p90)),
                                  f(Double(p.p99)), f(Double(p.max)), f(p.mean),
                                  label == "paper" ? String(format: "%.1f%%", op.under2ms * 100) : "",
                                  label == "paper" ? String(format: "%.1f%%", op.under4ms * 100) : ""]))
            }
        }
        lines.append(String(format: "the paper (§5, middlebox deletion, 600 sessions in bundles of 150): %.0f%% under 2 ms, %.1f%% under 4 ms",
                            PaperDeletion.under2ms * 100, PaperDeletion.under4ms * 100))
        for op in [insertion, removal] {
            lines.append("\(op.name): \(op.bundles) bundle(s), per bundle " + op.bundleMicroseconds.map { "\(ms($0)) ms" }.joined(separator: ", ")
                         + "; phases p50 " + MigrationLatency.phaseOrder.compactMap { name in
                             op.phases[name].map { "\(name) \(ms($0.p50))" } }.joined(separator: ", ") + " ms")
            lines += MigrationFailure.lines(op.failures)
        }
        lines.append("TCP retransmissions (clients + server1): during the insertions \(insertion.retransmissionsDuring), "
                     + "during the removals \(removal.retransmissionsDuring), outside them \(retransmissionsOutside)")
        lines.append("downloads byte-exact (sha256): \(downloadsIntact)/\(sessions); finished before the last removal: \(finishedBeforeEnd)")
        lines += PacedDownloads.problemLines(downloadProblems)
        return lines.joined(separator: "\n")
    }
}
