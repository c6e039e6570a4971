import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// The replacement benchmark (paper §5.3): builds its own lab (client1…clientK → fw1 → server1, fw2 beside),
/// starts N sender-paced downloads so that fw1 carries N live sessions mid-transfer, asks fw1's agent to
/// `replace` all of them with fw2 (through its control socket), and reports the per-session latency of every
/// phase (HdrHistogram percentiles), the batch's rate, the endpoints' TCP retransmissions and fw2's INVALID
/// drops during the window, and whether every download arrived byte-exact. The reference — one session's
/// firewall state moved the original prototype's way (shared/bench/state-transfer-prototype-ref.sh) — is run
/// in the same invocation and the ratios printed. Prints figures; asserts nothing.
public struct ReplaceBenchmark: Sendable {
    public typealias Mode = MigrationMode
    public typealias Failure = MigrationFailure
    public typealias Ratios = ReferenceRatios

    public struct Options: Sendable {
        public var sessions = 100
        /// Size of each download, MiB.
        public var megabytes = 12
        /// Pace of each download, MiB/s.
        public var rateMiBps = 1.0
        public var modes: [Mode] = [.stateful]
        /// After the modes: a stateful run between an HA pair of NAT'ing firewalls (fw1 and fw2 `snat-shared`).
        public var natPair = false
        /// Also a stateful run over IPv6 (a dual-stack lab; its sessions in the BPF datapath's IPv6 maps), beside IPv4's.
        public var ipv6 = false
        /// Per-session deadline of the migration (the `replace` default).
        public var deadlineMilliseconds: UInt32 = 3000
        /// Sessions per client host (the lab has ceil(sessions ÷ this) clients, at most 20).
        public var sessionsPerClient = 25
        public var referenceScript: String?
        /// Why there is no reference script (printed instead of the ratios).
        public var referenceMissing: String?
        public var agentBinary: String?
        public var agentArguments: [String] = []
        public init() {}
    }

    public typealias Percentiles = DyscoLab.Percentiles
    public typealias Reference = StateTransferReference

    public struct Run: Codable, Sendable {
        public var mode: Mode
        public var lab: String
        public var clients: Int
        public var fw2Profile: String
        public var sessions: Int
        public var megabytes: Int
        public var rateMiBps: Double
        /// Sessions fw1's agent matched, and those that moved.
        public var matched: Int
        public var moved: Int
        public var failures: [Failure]
        /// Trigger → release, per moved session.
        public var total: Percentiles
        /// The paper's measure (§5.3): new-path SYN sent → new path first used.
        public var paper: Percentiles
        /// Per phase (lock, newPath, drain, state, export, transfer, import, release, teardown).
        public var phases: [String: Percentiles]
        /// The agent's batch time (first trigger → last report) and our control request's round trip.
        public var batchElapsedMicroseconds: UInt64
        public var requestMicroseconds: UInt64
        public var sessionsPerSecond: Double
        /// TcpRetransSegs of every client and server1: from the downloads' start to the window, during the
        /// window (the replace request), and from the window to the end of the downloads.
        public var retransmissionsBefore: UInt64
        public var retransmissionsDuring: UInt64
        public var retransmissionsAfter: UInt64
        /// fw2's firewall during the window and after it (INVALID is always 0 on an open fw2: no conntrack).
        public var fw2InvalidDuring: UInt64
        public var fw2InvalidAfter: UInt64
        public var fw2PolicyDroppedDuring: UInt64
        public var fw2PolicyDroppedAfter: UInt64
        /// Established paced sessions each middlebox's agent carries right after the window.
        public var fw1SessionsAfter: Int
        public var fw2SessionsAfter: Int
        /// Downloads already complete when the replace returned (they would not have been mid-transfer).
        public var finishedBeforeWindowEnd: Int
        /// Downloads that ended with curl status 0 and the served file's sha256.
        public var downloadsIntact: Int
        /// Downloads that did not: "sN: curl status X" / "sN: sha256 mismatch".
        public var downloadProblems: [String]
        /// The agents' `dropped.*` control counters and fw1's `migrations.*` (product diagnostics).
        public var agentCounters: [String: [String: UInt64]]
        /// The sessions were IPv6 (absent in older reports: IPv4).
        public var ipv6: Bool? = nil
    }

    public struct Report: Codable, Sendable {
        public var runs: [Run]
        public var reference: Reference?
        /// Why the reference is missing, if it is.
        public var referenceNote: String?
        public var ratios: [Ratios]
    }

    public static let pacedPort = PacedLab.port
    public static let referenceScriptName = StateTransferReference.scriptName

    public var options: Options
    public var logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public func run() async throws -> Report {
        let binary = try options.agentBinary ?? Lab.defaultAgentBinary()
        var runs: [Run] = []
        for mode in options.modes {
            runs.append(try await measure(mode, natPair: false, binary: binary))
        }
        if options.natPair { runs.append(try await measure(.stateful, natPair: true, binary: binary)) }
        if options.ipv6 { runs.append(try await measure(.stateful, natPair: false, ipv6: true, binary: binary)) }
        let (reference, note) = StateTransferReference.run(options.referenceScript, sessions: options.sessions,
                                                           missing: options.referenceMissing, logger: logger)
        let ratios = runs.map { run in
            reference?.ratios(mode: run.mode, latency: MigrationLatency(total: run.total, paper: run.paper, phases: run.phases),
                              moved: run.moved, batchMicroseconds: run.batchElapsedMicroseconds) ?? Ratios(mode: run.mode)
        }
        return Report(runs: runs, reference: reference, referenceNote: note, ratios: ratios)
    }

    // MARK: - One lab

    private func spec(_ mode: Mode, natPair: Bool, ipv6: Bool = false, binary: String) -> LabSpec {
        let clients = min(max(1, (options.sessions + options.sessionsPerClient - 1) / options.sessionsPerClient),
                          LabSpec.hostCountRange.upperBound)
        let (name, subnet) = natPair ? ("bench-rpn", "10.79.97.0/24") : ipv6 ? ("bench-rp6", "10.79.98.0/24")
            : mode == .stateful ? ("bench-rp", "10.79.90.0/24") : ("bench-rps", "10.79.91.0/24")
        var spec = LabSpec.replacement(name: name, clients: clients, subnet: subnet, mode: mode, natPair: natPair,
                                       agentArguments: options.agentArguments, agentBinary: binary)
        spec.ipv6 = ipv6
        return spec
    }

    private func measure(_ mode: Mode, natPair: Bool, ipv6: Bool = false, binary: String) async throws -> Run {
        try await Lab.withBenchmarkLab(spec(mode, natPair: natPair, ipv6: ipv6, binary: binary), logger: logger) { lab in
            try await measure(mode, lab: lab, ipv6: ipv6)
        }
    }

    private func measure(_ mode: Mode, lab: Lab, ipv6: Bool) async throws -> Run {
        let family: AddressFamily = ipv6 ? .ipv6 : .ipv4
        let clients = lab.hosts(.client).map(\.name)
        let endpoints = clients + ["server1"]
        let file = "blob"
        let original = "\(lab.httpRoot)/\(file)"
        try Command.run(["dd", "if=/dev/urandom", "of=\(original)", "bs=1M", "count=\(options.megabytes)", "status=none"])
        let expected = try PacedLab.sha256(original)
        try PacedHTTPServer.start(lab, port: Self.pacedPort, bytesPerSecond: options.rateMiBps * 1_048_576, ipv6: ipv6)

        let transferSeconds = Double(options.megabytes) / max(options.rateMiBps, 0.001)
        let retransStart = try retransmissions(lab, endpoints)
        let downloads = try PacedDownloads(lab, clients: clients, port: Self.pacedPort, file: file, count: options.sessions,
                                      timeout: Int(transferSeconds) + 60, host: ipv6 ? lab.ipv6Address(of: "server1") : nil)
        logger.info("downloads started; waiting until fw1 carries them", metadata: ["bench.sessions": "\(options.sessions)"])
        try await PacedLab.waitForSessions(lab, on: "fw1", count: options.sessions, downloads: downloads, timeout: 30)
        try await Task.sleep(for: .milliseconds(500))

        // The window: the replace request of all sessions, with the counters read right before and after.
        let fw2Address = lab.address(of: "fw2")
        let request = ReplaceRequest(predicate: SessionPredicate(dport: [PortRange(lower: Self.pacedPort, upper: Self.pacedPort)]),
                                     newBoxes: [fw2Address] + (lab.ipv6Address(of: "fw2").map { [$0] } ?? []),
                                     stateful: mode == .stateful,
                                     deadlineMilliseconds: options.deadlineMilliseconds)
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1"))
        let retransBefore = try retransmissions(lab, endpoints)
        let fw2Before = try lab.firewallCounters("fw2", family: family)
        logger.info("replacing fw1 with fw2", metadata: ["bench.mode": "\(mode)"])
        let started = ContinuousClock.now
        let data = try await ControlClient.request(ControlRequest(.replace, replace: request), path: socket)
        let requestTime = ContinuousClock.now - started
        let fw2During = try lab.firewallCounters("fw2", family: family)
        let retransDuring = try retransmissions(lab, endpoints)
        let finishedEarly = downloads.finishedCount()
        guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
            throw LabError.setupFailed("fw1's agent answered the replace with: \(String(decoding: data.prefix(500), as: UTF8.self))")
        }
        let fw1After = try await PacedLab.pacedSessions(lab, "fw1").count
        let fw2After = try await PacedLab.pacedSessions(lab, "fw2").count

        logger.info("waiting for the downloads to finish", metadata: ["bench.moved": "\(report.sessions.filter { $0.result == "moved" }.count)"])
        let finished = await downloads.wait(timeout: transferSeconds + 70)
        let retransEnd = try retransmissions(lab, endpoints)
        let fw2End = try lab.firewallCounters("fw2", family: family)
        let (intact, problems) = downloads.check(expected: expected, finished: finished)
        if !problems.isEmpty {
            let log = clients.map { ProcessInspector.tail(of: downloads.logPath($0), lines: 5) }.joined(separator: "\n")
            logger.warning("downloads with problems", metadata: ["bench.problems": "\(problems.prefix(10))", "bench.curl": "\(log)"])
        }
        let agentCounters = await PacedLab.agentCounters(lab)

        let moved = report.sessions.filter { $0.result == "moved" }
        let latency = MigrationLatency(moved.compactMap(\.phases))
        let batch = report.elapsedMicroseconds
        return Run(
            mode: mode, lab: lab.name, clients: clients.count, fw2Profile: lab.firewallProfile(of: "fw2").rawValue,
            sessions: options.sessions, megabytes: options.megabytes, rateMiBps: options.rateMiBps,
            matched: report.matched, moved: moved.count,
            failures: report.sessions.filter { $0.result != "moved" }.map(MigrationFailure.init),
            total: latency.total, paper: latency.paper, phases: latency.phases,
            batchElapsedMicroseconds: batch, requestMicroseconds: PacedLab.micros(requestTime),
            sessionsPerSecond: batch > 0 ? Double(moved.count) / (Double(batch) / 1e6) : 0,
            retransmissionsBefore: retransBefore &- retransStart, retransmissionsDuring: retransDuring &- retransBefore,
            retransmissionsAfter: retransEnd &- retransDuring,
            fw2InvalidDuring: fw2During.invalidDropped.packets &- fw2Before.invalidDropped.packets,
            fw2InvalidAfter: fw2End.invalidDropped.packets &- fw2During.invalidDropped.packets,
            fw2PolicyDroppedDuring: fw2During.policyDropped.packets &- fw2Before.policyDropped.packets,
            fw2PolicyDroppedAfter: fw2End.policyDropped.packets &- fw2During.policyDropped.packets,
            fw1SessionsAfter: fw1After, fw2SessionsAfter: fw2After, finishedBeforeWindowEnd: finishedEarly,
            downloadsIntact: intact, downloadProblems: problems, agentCounters: agentCounters, ipv6: ipv6 ? true : nil)
    }

    private func retransmissions(_ lab: Lab, _ hosts: [String]) throws -> UInt64 {
        try hosts.reduce(0) { $0 + (try lab.tcpRetransmissions($1)) }
    }

    /// Where the reference script is (see ``StateTransferReference/find(_:currentDirectory:)``).
    public static func findReferenceScript(_ name: String = referenceScriptName,
                                           currentDirectory: String = FileManager.default.currentDirectoryPath) -> (String?, [String]) {
        StateTransferReference.find(name, currentDirectory: currentDirectory)
    }
}

extension ReplaceBenchmark.Report {
    public var text: String {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        var lines: [String] = []
        for run in runs {
            let perClient = (run.sessions + run.clients - 1) / run.clients
            lines.append("replace benchmark, \(run.mode)\(run.ipv6 == true ? ", IPv6" : ""): \(run.sessions) sessions (\(run.megabytes) MiB each, paced at "
                         + "\(String(format: "%g", run.rateMiBps)) MiB/s) from \(run.clients) client(s) (≤ \(perClient) each) "
                         + "through fw1 → fw2 (\(run.fw2Profile == FirewallProfile.snatShared.rawValue ? "an HA pair, both" : "fw2") "
                         + "\(run.fw2Profile)), lab \(run.lab)")
            lines.append("sessions moved: \(run.moved)/\(run.sessions) (matched \(run.matched)); after the window fw1 carries "
                         + "\(run.fw1SessionsAfter), fw2 \(run.fw2SessionsAfter)")
            lines.append("batch: \(ms(run.batchElapsedMicroseconds)) ms (agent), \(ms(run.requestMicroseconds)) ms (request round trip); "
                         + String(format: "%.1f", run.sessionsPerSecond) + " sessions/s")
            lines += MigrationLatency(total: run.total, paper: run.paper, phases: run.phases).table(stateless: run.mode == .stateless)
            lines.append("TCP retransmissions (clients + server1): during the window \(run.retransmissionsDuring); "
                         + "before it \(run.retransmissionsBefore), after it \(run.retransmissionsAfter)")
            let invalid = run.fw2Profile == "open" ? "n/a (open fw2 has no conntrack)" : "\(run.fw2InvalidDuring) (after: \(run.fw2InvalidAfter))"
            lines.append("fw2 INVALID drops during the window: \(invalid); fw2 policy drops \(run.fw2PolicyDroppedDuring) "
                         + "(after: \(run.fw2PolicyDroppedAfter))")
            lines.append("downloads byte-exact (sha256): \(run.downloadsIntact)/\(run.sessions); finished before the window "
                         + "closed: \(run.finishedBeforeWindowEnd)")
            lines += PacedDownloads.problemLines(run.downloadProblems) + ReplaceBenchmark.Failure.lines(run.failures)
            let diagnostics = run.agentCounters.sorted { $0.key < $1.key }.map { host, counters in
                "\(host) " + counters.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            }
            if !diagnostics.isEmpty { lines.append("agent counters: " + diagnostics.joined(separator: "; ")) }
            lines.append("")
        }
        lines += StateTransferReference.text(reference, note: referenceNote, ratios: ratios)
        return lines.joined(separator: "\n")
    }
}
