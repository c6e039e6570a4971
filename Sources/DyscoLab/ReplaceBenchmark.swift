import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// A sender-paced HTTP file server (Python, threaded, listen backlog 1024): each response is written in 32 KiB
/// chunks no faster than `bytesPerSecond`, so a download stays mid-transfer for size ÷ rate seconds and the
/// receiver never overruns (a clean baseline of zero retransmissions). Used by `bench replace` and the
/// `replace` integration tests.
public enum PacedHTTPServer {
    /// The server: `python3 -c script ROOT ADDRESS PORT BYTES_PER_SECOND`; serves the files of ROOT.
    public static let script = """
        import http.server, os, socketserver, sys, time
        root, addr, port, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = os.path.join(root, self.path.lstrip('/'))
                size = os.path.getsize(path)
                self.send_response(200)
                self.send_header('Content-Length', str(size))
                self.end_headers()
                start, sent = time.monotonic(), 0
                with open(path, 'rb') as f:
                    while True:
                        chunk = f.read(32768)
                        if not chunk: break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        ahead = sent / rate - (time.monotonic() - start)
                        if ahead > 0: time.sleep(ahead)
            def log_message(self, *args): pass
        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 1024
        Server((addr, port), Handler).serve_forever()
        """

    /// Starts the server on `host` (serving the lab's HTTP root on `port`) and returns once `probeFrom` can
    /// fetch `index.html` from it (at most 10 s).
    @discardableResult
    public static func start(_ lab: Lab, on host: String = "server1", port: UInt16, bytesPerSecond: Double,
                             probeFrom: String = "client1") throws -> Process {
        let address = lab.address(of: host)
        let process = try lab.spawn(host, [python, "-c", script, lab.httpRoot, "\(address)", "\(port)", "\(bytesPerSecond)"],
                                    logPath: "\(lab.directory)/paced-\(host)-\(port).log")
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? lab.exec(probeFrom, ["curl", "-sS", "-o", "/dev/null", "--max-time", "2",
                                          "http://\(address):\(port)/index.html"], check: true)) != nil { return process }
            if !process.isRunning { break }
            usleep(100_000)
        }
        throw LabError.serviceFailed(host: host, service: "paced HTTP server", reason: "did not answer on port \(port)",
                                     logTail: ProcessInspector.tail(of: "\(lab.directory)/paced-\(host)-\(port).log"))
    }

    /// Debian's python3 (the one the setup installs), else whatever `python3` is on PATH.
    public static var python: String {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "python3"
    }
}

/// The replacement benchmark (paper §5.3): builds its own lab (client1…clientK → fw1 → server1, fw2 beside),
/// starts N sender-paced downloads so that fw1 carries N live sessions mid-transfer, asks fw1's agent to
/// `replace` all of them with fw2 (through its control socket), and reports the per-session latency of every
/// phase (HdrHistogram percentiles), the batch's rate, the endpoints' TCP retransmissions and fw2's INVALID
/// drops during the window, and whether every download arrived byte-exact. The reference — one session's
/// firewall state moved the original prototype's way (shared/bench/state-transfer-prototype-ref.sh) — is run
/// in the same invocation and the ratios printed. Prints figures; asserts nothing.
public struct ReplaceBenchmark: Sendable {
    public enum Mode: String, Codable, Sendable, CaseIterable {
        /// fw2 strict (conntrack firewall): the firewall state moves with each session.
        case stateful
        /// fw2 open (no conntrack): no state moves, no data is held (the two-path rules only).
        case stateless
    }

    public struct Options: Sendable {
        public var sessions = 100
        /// Size of each download, MiB.
        public var megabytes = 12
        /// Pace of each download, MiB/s.
        public var rateMiBps = 1.0
        public var modes: [Mode] = [.stateful]
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

    /// A session that did not move: its tuple, result, step and reason (as the agent reported).
    public struct Failure: Codable, Sendable {
        public var session: String
        public var result: String
        public var failedStep: String
        public var reason: String

        init(_ session: ReplaceReport.Session) {
            self.session = session.session.description
            result = session.result
            failedStep = session.failedStep
            reason = session.reason
        }

        /// The report's lines for the sessions that did not move, grouped by what happened.
        static func lines(_ failures: [Failure]) -> [String] {
            guard !failures.isEmpty else { return [] }
            var grouped: [String: Int] = [:]
            for f in failures { grouped["\(f.result) at \(f.failedStep): \(f.reason)", default: 0] += 1 }
            return ["sessions not moved:"] + grouped.sorted { $0.value > $1.value }.map { "  \($0.value)× \($0.key)" }
        }
    }

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
    }

    /// The prototype's per-session state move over ours.
    public struct Ratios: Codable, Sendable {
        public var mode: Mode
        /// ÷ our per-session total (p50).
        public var overTotalP50: Double?
        /// ÷ our state phase (p50; stateful only).
        public var overStateP50: Double?
        /// ÷ our batch time per moved session (what a batch costs per session).
        public var overBatchPerSession: Double?
    }

    public struct Report: Codable, Sendable {
        public var runs: [Run]
        public var reference: Reference?
        /// Why the reference is missing, if it is.
        public var referenceNote: String?
        public var ratios: [Ratios]
    }

    public static let pacedPort: UInt16 = 8090
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
            runs.append(try await measure(mode, binary: binary))
        }
        let (reference, note) = StateTransferReference.run(options.referenceScript, sessions: options.sessions,
                                                           missing: options.referenceMissing, logger: logger)
        let ratios = runs.map { run in
            reference?.ratios(mode: run.mode, latency: MigrationLatency(total: run.total, paper: run.paper, phases: run.phases),
                              moved: run.moved, batchMicroseconds: run.batchElapsedMicroseconds) ?? Ratios(mode: run.mode)
        }
        return Report(runs: runs, reference: reference, referenceNote: note, ratios: ratios)
    }

    // MARK: - One lab

    private func spec(_ mode: Mode, binary: String) -> LabSpec {
        let clients = min(max(1, (options.sessions + options.sessionsPerClient - 1) / options.sessionsPerClient),
                          LabSpec.hostCountRange.upperBound)
        let (name, subnet) = mode == .stateful ? ("bench-rp", "10.79.90.0/24") : ("bench-rps", "10.79.91.0/24")
        return .replacement(name: name, clients: clients, subnet: subnet, mode: mode, agentArguments: options.agentArguments,
                            agentBinary: binary)
    }

    private func measure(_ mode: Mode, binary: String) async throws -> Run {
        try await Lab.withBenchmarkLab(spec(mode, binary: binary), logger: logger) { lab in
            try await measure(mode, lab: lab)
        }
    }

    private func measure(_ mode: Mode, lab: Lab) async throws -> Run {
        let clients = lab.hosts(.client).map(\.name)
        let endpoints = clients + ["server1"]
        let file = "blob"
        let original = "\(lab.httpRoot)/\(file)"
        try Command.run(["dd", "if=/dev/urandom", "of=\(original)", "bs=1M", "count=\(options.megabytes)", "status=none"])
        let expected = try Self.sha256(original)
        try PacedHTTPServer.start(lab, port: Self.pacedPort, bytesPerSecond: options.rateMiBps * 1_048_576)

        let transferSeconds = Double(options.megabytes) / max(options.rateMiBps, 0.001)
        let retransStart = try retransmissions(lab, endpoints)
        let downloads = try PacedDownloads(lab, clients: clients, port: Self.pacedPort, file: file, count: options.sessions,
                                      timeout: Int(transferSeconds) + 60)
        logger.info("downloads started; waiting until fw1 carries them", metadata: ["bench.sessions": "\(options.sessions)"])
        try await Self.waitForSessions(lab, on: "fw1", count: options.sessions, downloads: downloads, timeout: 30)
        try await Task.sleep(for: .milliseconds(500))

        // The window: the replace request of all sessions, with the counters read right before and after.
        let fw2Address = lab.address(of: "fw2")
        let request = ReplaceRequest(predicate: SessionPredicate(dport: [PortRange(lower: Self.pacedPort, upper: Self.pacedPort)]),
                                     newBoxes: [fw2Address], stateful: mode == .stateful,
                                     deadlineMilliseconds: options.deadlineMilliseconds)
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1"))
        let retransBefore = try retransmissions(lab, endpoints)
        let fw2Before = try lab.firewallCounters("fw2")
        logger.info("replacing fw1 with fw2", metadata: ["bench.mode": "\(mode)"])
        let started = ContinuousClock.now
        let data = try await ControlClient.request(ControlRequest(.replace, replace: request), path: socket)
        let requestTime = ContinuousClock.now - started
        let fw2During = try lab.firewallCounters("fw2")
        let retransDuring = try retransmissions(lab, endpoints)
        let finishedEarly = downloads.finishedCount()
        guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
            throw LabError.setupFailed("fw1's agent answered the replace with: \(String(decoding: data.prefix(500), as: UTF8.self))")
        }
        let fw1After = try await Self.pacedSessions(lab, "fw1").count
        let fw2After = try await Self.pacedSessions(lab, "fw2").count

        logger.info("waiting for the downloads to finish", metadata: ["bench.moved": "\(report.sessions.filter { $0.result == "moved" }.count)"])
        let finished = await downloads.wait(timeout: transferSeconds + 70)
        let retransEnd = try retransmissions(lab, endpoints)
        let fw2End = try lab.firewallCounters("fw2")
        let (intact, problems) = downloads.check(expected: expected, finished: finished)
        if !problems.isEmpty {
            let log = clients.map { ProcessInspector.tail(of: downloads.logPath($0), lines: 5) }.joined(separator: "\n")
            logger.warning("downloads with problems", metadata: ["bench.problems": "\(problems.prefix(10))", "bench.curl": "\(log)"])
        }
        let agentCounters = await Self.agentCounters(lab)

        let moved = report.sessions.filter { $0.result == "moved" }
        let latency = MigrationLatency(moved.compactMap(\.phases))
        let batch = report.elapsedMicroseconds
        return Run(
            mode: mode, lab: lab.name, clients: clients.count, fw2Profile: lab.firewallProfile(of: "fw2").rawValue,
            sessions: options.sessions, megabytes: options.megabytes, rateMiBps: options.rateMiBps,
            matched: report.matched, moved: moved.count,
            failures: report.sessions.filter { $0.result != "moved" }.map(Failure.init),
            total: latency.total, paper: latency.paper, phases: latency.phases,
            batchElapsedMicroseconds: batch, requestMicroseconds: Self.micros(requestTime),
            sessionsPerSecond: batch > 0 ? Double(moved.count) / (Double(batch) / 1e6) : 0,
            retransmissionsBefore: retransBefore &- retransStart, retransmissionsDuring: retransDuring &- retransBefore,
            retransmissionsAfter: retransEnd &- retransDuring,
            fw2InvalidDuring: fw2During.invalidDropped.packets &- fw2Before.invalidDropped.packets,
            fw2InvalidAfter: fw2End.invalidDropped.packets &- fw2During.invalidDropped.packets,
            fw2PolicyDroppedDuring: fw2During.policyDropped.packets &- fw2Before.policyDropped.packets,
            fw2PolicyDroppedAfter: fw2End.policyDropped.packets &- fw2During.policyDropped.packets,
            fw1SessionsAfter: fw1After, fw2SessionsAfter: fw2After, finishedBeforeWindowEnd: finishedEarly,
            downloadsIntact: intact, downloadProblems: problems, agentCounters: agentCounters)
    }

    private func retransmissions(_ lab: Lab, _ hosts: [String]) throws -> UInt64 {
        try hosts.reduce(0) { $0 + (try lab.tcpRetransmissions($1)) }
    }

    /// The agents' `dropped.*` control counters and fw1's `migrations.*` (product diagnostics).
    static func agentCounters(_ lab: Lab) async -> [String: [String: UInt64]] {
        var agentCounters: [String: [String: UInt64]] = [:]
        for host in ["fw1", "fw2", "client1", "server1"] {
            guard let snapshot = try? await Self.snapshot(lab, host) else { continue }
            let picked = snapshot.control.filter { $0.key.hasPrefix("dropped.") || (host == "fw1" && $0.key.hasPrefix("migrations.")) }
            if !picked.isEmpty { agentCounters[host] = picked }
        }
        return agentCounters
    }

    static func snapshot(_ lab: Lab, _ host: String) async throws -> AgentSnapshot {
        try await ControlClient.snapshot(path: AgentControlPaths.socketPath(netns: lab.namespace(of: host)))
    }

    /// Established middlebox sessions of `host`'s agent to the paced server.
    static func pacedSessions(_ lab: Lab, _ host: String) async throws -> [AgentSnapshot.Session] {
        try await snapshot(lab, host).sessions.filter {
            $0.role == .middlebox && $0.session.dstPort == Self.pacedPort && $0.state == "established"
        }
    }

    static func waitForSessions(_ lab: Lab, on host: String, count: Int, downloads: PacedDownloads, timeout: TimeInterval) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        var seen = 0
        while Date() < deadline {
            seen = try await Self.pacedSessions(lab, host).count
            if seen >= count { return }
            if downloads.finishedCount() > 0 {
                throw LabError.setupFailed("a download ended before fw1 carried all \(count) sessions (\(seen) so far); "
                                           + "curl: \(ProcessInspector.tail(of: downloads.logPath(lab.hosts(.client)[0].name), lines: 5))")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw LabError.setupFailed("fw1 carries only \(seen) of \(count) sessions after \(Int(timeout)) s")
    }

    static func sha256(_ path: String) throws -> String {
        String(try Command.run(["sha256sum", path]).stdout.split(separator: " ").first ?? "")
    }

    static func micros(_ duration: Duration) -> UInt64 {
        UInt64(max(0, duration.components.seconds)) * 1_000_000 + UInt64(max(0, duration.components.attoseconds) / 1_000_000_000_000)
    }

    /// Where the reference script is (see ``StateTransferReference/find(_:currentDirectory:)``).
    public static func findReferenceScript(_ name: String = referenceScriptName,
                                           currentDirectory: String = FileManager.default.currentDirectoryPath) -> (String?, [String]) {
        StateTransferReference.find(name, currentDirectory: currentDirectory)
    }
}

/// N downloads spread over the lab's clients (session i on client i mod K): per session one `curl` piped into
/// `sha256sum`, so every byte is checked without storing the files; or, with `toFiles`, written to `sI.out` (whose
/// growing size shows the session's progress: `measure`'s goodput) and hashed when complete. Session i writes
/// `sI.sha` and then `sI.rc` (curl's exit status) into the download directory when it ends.
final class PacedDownloads: @unchecked Sendable {
    let directory: String
    let count: Int
    private let processes: [Process]
    private let labDirectory: String

    static let script = """
        url=$1; dir=$2; timeout=$3; shift 3
        for i in "$@"; do
          ( curl -sS --fail -m "$timeout" "$url" | sha256sum | cut -d' ' -f1 > "$dir/s$i.sha"
            echo "${PIPESTATUS[0]}" > "$dir/s$i.rc.tmp" && mv "$dir/s$i.rc.tmp" "$dir/s$i.rc" ) &
        done
        wait
        """

    static let fileScript = """
        url=$1; dir=$2; timeout=$3; shift 3
        for i in "$@"; do
          ( curl -sS --fail -m "$timeout" -o "$dir/s$i.out" "$url"; rc=$?
            sha256sum "$dir/s$i.out" | cut -d' ' -f1 > "$dir/s$i.sha"
            echo "$rc" > "$dir/s$i.rc.tmp" && mv "$dir/s$i.rc.tmp" "$dir/s$i.rc" ) &
        done
        wait
        """

    /// Where session `i` writes what it receives (with `toFiles`).
    func outputPath(_ i: Int) -> String { "\(directory)/s\(i).out" }

    init(_ lab: Lab, clients: [String], port: UInt16, file: String, count: Int, timeout: Int, toFiles: Bool = false) throws {
        labDirectory = lab.directory
        directory = "\(lab.directory)/downloads"
        self.count = count
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let url = "http://\(lab.address(of: "server1")):\(port)/\(file)"
        var processes: [Process] = []
        for (k, client) in clients.enumerated() {
            let mine = stride(from: k, to: count, by: clients.count).map(String.init)
            guard !mine.isEmpty else { continue }
            processes.append(try lab.spawn(client, ["bash", "-c", toFiles ? Self.fileScript : Self.script, "bash", url, directory, "\(timeout)"] + mine,
                                           logPath: "\(lab.directory)/curl-\(client).log"))
        }
        self.processes = processes
    }

    func logPath(_ client: String) -> String { "\(labDirectory)/curl-\(client).log" }

    func finishedCount() -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".rc") }.count
    }

    /// Waits (polling) until every client's batch has exited; false on timeout.
    func wait(timeout: TimeInterval) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while processes.contains(where: \.isRunning) {
            if Date() > deadline { return false }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return true
    }

    /// Downloads that ended with curl status 0 and the `expected` sha256, and what went wrong with the others
    /// ("sN: curl status X" / "sN: sha256 mismatch" / "sN: not finished").
    func check(expected: String, finished: Bool) -> (intact: Int, problems: [String]) {
        var problems: [String] = []
        if !finished { problems.append("the downloads did not all finish in time (\(finishedCount())/\(count))") }
        var intact = 0
        for (index, result) in results().enumerated() {
            switch result {
            case (nil, _): problems.append("s\(index): not finished")
            case (let status?, _) where status != 0: problems.append("s\(index): curl status \(status)")
            case (_, let digest) where digest != expected: problems.append("s\(index): sha256 mismatch")
            default: intact += 1
            }
        }
        return (intact, problems)
    }

    /// The report's line for download problems (none when there are none).
    static func problemLines(_ problems: [String]) -> [String] {
        problems.isEmpty ? [] : ["  download problems: " + problems.prefix(10).joined(separator: "; ") + (problems.count > 10 ? "; …" : "")]
    }

    /// Per session: curl's exit status and the sha256 of what it received (nil: not finished).
    func results() -> [(Int?, String?)] {
        (0..<count).map { i in
            let rc = (try? String(contentsOfFile: "\(directory)/s\(i).rc", encoding: .utf8))
                .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            let sha = (try? String(contentsOfFile: "\(directory)/s\(i).sha", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
            return (rc, sha)
        }
    }
}

/// On SIGINT/SIGTERM while a benchmark lab is up: remove that lab, then exit 130 (the lab's processes and
/// namespaces would otherwise outlive the benchmark).
enum SignalTeardown {
    private static let current = Mutex<(token: Int, lab: String, logger: Logger)?>(nil)
    private static let counter = Atomic<Int>(0)
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []
    private static let installed = Mutex(false)
    /// Set when a signal arrived: the handler owns the teardown from then on.
    private static let interrupted = Atomic<Bool>(false)

    /// After a signal, parks the calling thread until the handler has removed the lab and exited, so that the
    /// benchmark's own error path does not remove the same lab at the same time.
    static func standAsideIfInterrupted() {
        while interrupted.load(ordering: .acquiring) { sleep(1) }
    }

    static func arm(lab: String, logger: Logger) -> Int {
        let token = counter.add(1, ordering: .relaxed).newValue
        current.withLock { $0 = (token, lab, logger) }
        let first = installed.withLock { done in defer { done = true }; return !done }
        if first {
            let queue = DispatchQueue(label: "dysco-bench-signals")
            queue.sync {
                for number in [SIGINT, SIGTERM] {
                    signal(number, SIG_IGN)
                    let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                    source.setEventHandler {
                        interrupted.store(true, ordering: .releasing)
                        if let (_, lab, logger) = current.withLock({ $0 }) {
                            logger.warning("interrupted: removing the benchmark lab", metadata: ["bench.lab": "\(lab)"])
                            _ = try? Lab.down(name: lab, force: true, logger: logger)
                        }
                        exit(130)
                    }
                    source.resume()
                    sources.append(source)
                }
            }
        }
        return token
    }

    static func disarm(_ token: Int) {
        current.withLock { if $0?.token == token { $0 = nil } }
    }
}

extension ReplaceBenchmark.Report {
    public var text: String {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        var lines: [String] = []
        for run in runs {
            let perClient = (run.sessions + run.clients - 1) / run.clients
            lines.append("replace benchmark, \(run.mode): \(run.sessions) sessions (\(run.megabytes) MiB each, paced at "
                         + "\(String(format: "%g", run.rateMiBps)) MiB/s) from \(run.clients) client(s) (≤ \(perClient) each) "
                         + "through fw1 → fw2 (fw2 \(run.fw2Profile)), lab \(run.lab)")
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
