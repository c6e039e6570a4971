import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Glibc
import Logging
import Synchronization

/// `measure` (paper §5.3, Figs. 13 and 15): builds its own lab (clients client1…clientK → fw1 → server1, fw2
/// beside), runs N long-lived sender-paced downloads in K bundles (bundle k = the sessions of client k+1), and
/// halfway through moves bundle 1 (client1's sessions) fw1 → fw2 with the `replace` CLI
/// (`--match src=CLIENT1`) while the other bundles stay on fw1. Goodput is measured at the receiving side: the
/// size of each growing download file, sampled every 100 ms. Reports per-session latency percentiles of the
/// whole migration, of the paper's measure and of every phase; goodput per bundle before / during / after the
/// migration; the endpoints' TCP retransmissions, resets and fw2's INVALID drops in the migration window; the
/// sha256 of every download. With both modes, stateful then stateless, each in a fresh lab (the same name and
/// subnet, one after the other). The prototype-style state transfer reference runs in the same invocation.
/// Writes report.json, latency.csv, phases.csv and goodput.csv; scripts/plot-measure.py renders the PNGs.
public struct MeasureBenchmark: Sendable {
    public typealias Mode = MigrationMode

    public struct Options: Sendable {
        public var sessions = 20
        public var bundles = 2
        /// Pace of each session, MiB/s.
        public var rateMiBps = 2.0
        /// How long each session transfers (its size is rate × seconds); the migration starts halfway.
        public var seconds = 8.0
        public var modes: [Mode] = [.stateful]
        public var deadlineMilliseconds: UInt32 = 3000
        public var labName = "measure"
        public var subnet = "10.79.94.0/24"
        public var referenceScript: String?
        public var referenceMissing: String?
        public var agentBinary: String?
        public var agentArguments: [String] = []
        /// Replacement (bundle 1 fw1 → fw2, the paper's Fig. 15) or removal (fw1 taken out of every bundle in turn,
        /// the paper's §5 middlebox deletion, Figs. 12 and 13).
        public var experiment: Experiment = .replacement
        /// Removal only: fw1 runs HAProxy (TCP mode, splicing, libdysco-splice.so preloaded) and the clients download
        /// through it; each bundle's removal takes the proxy out (the paper's §5 deletion of a TCP proxy).
        public var proxy = false
        public init() {}

        /// Sessions of bundle `b` (session i belongs to bundle i mod K).
        public func sessions(inBundle b: Int) -> Int { (0..<sessions).filter { $0 % bundles == b }.count }
        /// Bytes of each download: rate × seconds, rounded up to 64 KiB.
        public var bytesPerSession: Int64 {
            let chunks = Int64((rateMiBps * seconds * 16).rounded(.up))
            return max(1, chunks) * 65_536
        }
    }

    public struct Bundle: Codable, Sendable {
        public var index: Int
        public var host: String
        public var address: String
        public var sessions: Int
        public var migrated: Bool
    }

    public struct BundleGoodput: Codable, Sendable {
        public var bundle: Int
        public var host: String
        public var migrated: Bool
        /// Sessions × rate.
        public var pacedMiBps: Double
        public var goodput: Goodput.PhaseMeans
    }

    /// One session of the migrated bundle as `replace` reported it.
    public struct SessionLatency: Codable, Sendable {
        public var session: String
        public var bundle: Int
        public var result: String
        public var failedStep: String
        public var reason: String
        public var phases: ReplaceReport.Phases?
    }

    public struct Run: Codable, Sendable {
        public var mode: Mode
        public var lab: String
        public var subnet: String
        public var fw2Profile: String
        public var sessions: Int
        public var bundles: [Bundle]
        public var migratedBundle: Int
        /// Sessions of the migrated bundle (what the latency counts should be).
        public var migratedSessions: Int
        /// The `replace` run: the command line, its exit status.
        public var replaceCommand: String
        public var replaceExitStatus: Int32
        public var matched: Int
        public var moved: Int
        public var failures: [MigrationFailure]
        public var latency: MigrationLatency
        public var perSession: [SessionLatency]
        public var batchMicroseconds: UInt64
        public var requestMicroseconds: UInt64
        public var timeline: Goodput.Timeline
        public var binSeconds: Double
        public var goodput: [BundleGoodput]
        public var bins: [Goodput.Bin]
        /// The endpoints' (every client and server1) TCP loss counters: downloads' start → window, the window
        /// (the replace command), window → downloads' end.
        public var lossBefore: TCPLossCounters
        public var lossDuring: TCPLossCounters
        public var lossAfter: TCPLossCounters
        public var retransmissionsDuring: UInt64
        /// fw2's firewall in the window and after it (INVALID is always 0 on an open fw2: no conntrack).
        public var fw2InvalidDuring: UInt64
        public var fw2InvalidAfter: UInt64
        public var fw2PolicyDroppedDuring: UInt64
        public var fw2PolicyDroppedAfter: UInt64
        /// Established paced sessions each middlebox carries right after the window.
        public var fw1SessionsAfter: Int
        public var fw2SessionsAfter: Int
        /// Resets of established connections at the endpoints during the whole run (TcpEstabResets).
        public var sessionsReset: UInt64
        public var downloadsIntact: Int
        public var downloadsFailed: Int
        /// Bytes of the downloads that arrived byte-exact (sha256 of the served file).
        public var bytesChecked: Int64
        public var downloadProblems: [String]
        public var agentCounters: [String: [String: UInt64]]
    }

    public struct Settings: Codable, Sendable {
        public var sessions: Int
        public var bundles: Int
        public var rateMiBps: Double
        public var seconds: Double
        public var bytesPerSession: Int64
        public var deadlineMilliseconds: UInt32
    }

    public struct Report: Codable, Sendable {
        public var experiment: Experiment
        public var settings: Settings
        /// The replacement runs (empty in a removal experiment).
        public var runs: [Run]
        /// The removal experiment (nil in a replacement one).
        public var removal: RemovalRun?
        public var reference: StateTransferReference?
        public var referenceNote: String?
        public var ratios: [ReferenceRatios]
        /// Output files by kind (report, latency, phases, goodput, latencyCDF, phasesPlot, goodputPlot).
        public var files: [String: String]
    }

    public static let port = PacedLab.port
    public static let binSeconds = 0.1
    public static let migratedBundle = 0

    public var options: Options
    public var logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public func run() async throws -> Report {
        let binary = try options.agentBinary ?? Lab.defaultAgentBinary()
        let settings = Settings(sessions: options.sessions, bundles: options.bundles, rateMiBps: options.rateMiBps,
                                seconds: options.seconds, bytesPerSession: options.bytesPerSession,
                                deadlineMilliseconds: options.deadlineMilliseconds)
        if options.experiment == .removal {
            let removal = try await measureRemoval(binary: binary)
            return Report(experiment: .removal, settings: settings, runs: [], removal: removal, reference: nil,
                          referenceNote: "not run (a removal moves no state)", ratios: [], files: [:])
        }
        var runs: [Run] = []
        for mode in options.modes { runs.append(try await measure(mode, binary: binary)) }
        let (reference, note) = StateTransferReference.run(options.referenceScript, sessions: options.sessions(inBundle: Self.migratedBundle),
                                                           missing: options.referenceMissing, logger: logger)
        let ratios = runs.map { run in
            reference?.ratios(mode: run.mode, latency: run.latency, moved: run.moved, batchMicroseconds: run.batchMicroseconds)
                ?? ReferenceRatios(mode: run.mode)
        }
        return Report(experiment: .replacement, settings: settings, runs: runs, removal: nil, reference: reference,
                      referenceNote: note, ratios: ratios, files: [:])
    }

    // MARK: - One lab

    public func spec(_ mode: Mode, binary: String?) -> LabSpec {
        .replacement(name: options.labName, clients: options.bundles, subnet: options.subnet, mode: mode,
                     agentArguments: options.agentArguments, agentBinary: binary)
    }

    private func measure(_ mode: Mode, binary: String) async throws -> Run {
        try await Lab.withBenchmarkLab(spec(mode, binary: binary), logger: logger) { lab in
            try await measure(mode, lab: lab, binary: binary)
        }
    }

    private func measure(_ mode: Mode, lab: Lab, binary: String) async throws -> Run {
        let live = try await startDownloads(lab)
        defer { live.sampler.stop() }
        let sampler = live.sampler, clients = live.clients, endpoints = live.endpoints
        let migrateAt = max(options.seconds / 2, live.steadyFrom + 0.5)
        let wait = migrateAt - sampler.elapsed()
        if wait > 0 { try await Task.sleep(for: .milliseconds(Int(wait * 1000))) }

        // The window: the replace command, with the counters read right before and after it.
        let migrated = clients[Self.migratedBundle]
        var arguments = [binary, "replace", "--lab", lab.name, "--old", "fw1", "--new", "fw2",
                         "--match", "src=\(migrated.address)", "--deadline", "\(options.deadlineMilliseconds)", "--json"]
        if mode == .stateless { arguments.append("--stateless") }
        let lossBefore = try lab.tcpLossCounters(endpoints)
        let fw2Before = try lab.firewallCounters("fw2")
        logger.info("replacing fw1 with fw2 for one bundle", metadata: ["measure.mode": "\(mode)", "measure.bundle": "\(migrated.name)"])
        let (windowStart, result, report, requestTime, windowEnd) = try reconfigure(arguments, sampler: sampler)
        let fw2During = try lab.firewallCounters("fw2")
        let lossDuring = try lab.tcpLossCounters(endpoints)
        let fw1After = try await PacedLab.pacedSessions(lab, "fw1").count
        let fw2After = try await PacedLab.pacedSessions(lab, "fw2").count

        logger.info("waiting for the downloads to finish", metadata: ["measure.moved": "\(report.sessions.filter { $0.result == "moved" }.count)"])
        let end = try await finishDownloads(live, lab: lab)
        let fw2End = try lab.firewallCounters("fw2")
        let lossEnd = end.loss, loss0 = live.loss0, bins = end.bins
        let (intact, problems, failed, intactBytes, agentCounters) = (end.intact, end.problems, end.failed, end.bytesChecked, end.agentCounters)
        let timeline = Goodput.Timeline(steadyFrom: live.steadyFrom, windowStart: windowStart, windowEnd: windowEnd,
                                        steadyUntil: end.steadyUntil ?? windowEnd)
        let bundles = clients.enumerated().map { b, host in
            Bundle(index: b, host: host.name, address: host.address.description,
                   sessions: options.sessions(inBundle: b), migrated: b == Self.migratedBundle)
        }
        let goodput = bundles.map { bundle in
            BundleGoodput(bundle: bundle.index, host: bundle.host, migrated: bundle.migrated,
                          pacedMiBps: Double(bundle.sessions) * options.rateMiBps,
                          goodput: Goodput.means(bins, bundle: bundle.index, timeline: timeline))
        }
        let moved = report.sessions.filter { $0.result == "moved" }
        let perSession = report.sessions.map { s in
            SessionLatency(session: s.session.description,
                           bundle: clients.firstIndex { $0.address == s.session.srcAddr } ?? -1,
                           result: s.result, failedStep: s.failedStep, reason: s.reason, phases: s.phases)
        }
        let lossDuringWindow = lossDuring - lossBefore
        return Run(
            mode: mode, lab: lab.name, subnet: lab.subnet.description, fw2Profile: lab.firewallProfile(of: "fw2").rawValue,
            sessions: options.sessions, bundles: bundles, migratedBundle: Self.migratedBundle,
            migratedSessions: options.sessions(inBundle: Self.migratedBundle),
            replaceCommand: (["dysco-migrate"] + arguments.dropFirst()).joined(separator: " "), replaceExitStatus: result.status,
            matched: report.matched, moved: moved.count,
            failures: report.sessions.filter { $0.result != "moved" }.map(MigrationFailure.init),
            latency: MigrationLatency(moved.compactMap(\.phases)), perSession: perSession,
            batchMicroseconds: report.elapsedMicroseconds, requestMicroseconds: PacedLab.micros(requestTime),
            timeline: timeline, binSeconds: Self.binSeconds, goodput: goodput, bins: bins,
            lossBefore: lossBefore - loss0, lossDuring: lossDuringWindow, lossAfter: lossEnd - lossDuring,
            retransmissionsDuring: lossDuringWindow.retransmitted,
            fw2InvalidDuring: fw2During.invalidDropped.packets &- fw2Before.invalidDropped.packets,
            fw2InvalidAfter: fw2End.invalidDropped.packets &- fw2During.invalidDropped.packets,
            fw2PolicyDroppedDuring: fw2During.policyDropped.packets &- fw2Before.policyDropped.packets,
            fw2PolicyDroppedAfter: fw2End.policyDropped.packets &- fw2During.policyDropped.packets,
            fw1SessionsAfter: fw1After, fw2SessionsAfter: fw2After,
            sessionsReset: (lossEnd - loss0).establishedResets, downloadsIntact: intact, downloadsFailed: failed,
            bytesChecked: intactBytes, downloadProblems: problems, agentCounters: agentCounters)
    }

    // MARK: - What both experiments share

    /// Downloads running through fw1 with the sampler measuring them.
    struct LiveDownloads {
        var downloads: PacedDownloads
        var sampler: FileSizeSampler
        var clients: [LabHost]
        /// Every client and server1 (the TCP counters' hosts).
        var endpoints: [String]
        /// sha256 of the served file.
        var expected: String
        var loss0: TCPLossCounters
        /// Every session is established from here on (seconds on the sampler's clock).
        var steadyFrom: Double
        /// Session i's bundle.
        var bundleOf: [Int]
    }

    /// Serves a random file at the paced rate, starts the downloads (session i from client (i mod K) + 1) into
    /// files sampled every ``binSeconds``, and waits until fw1 carries them all.
    func startDownloads(_ lab: Lab, via proxy: (address: IPAddress, port: UInt16)? = nil) async throws -> LiveDownloads {
        let clients = lab.hosts(.client)
        let endpoints = clients.map(\.name) + ["server1"]
        let file = "blob"
        let original = "\(lab.httpRoot)/\(file)"
        let size = options.bytesPerSession
        try Command.run(["dd", "if=/dev/urandom", "of=\(original)", "bs=65536", "count=\(size / 65_536)", "status=none"])
        let expected = try PacedLab.sha256(original)
        try lab.enableQuickAck()
        try PacedHTTPServer.start(lab, port: Self.port, bytesPerSecond: options.rateMiBps * 1_048_576,
                                  probeFrom: clients[0].name)
        let loss0 = try lab.tcpLossCounters(endpoints)
        let downloads = try PacedDownloads(lab, clients: clients.map(\.name), port: proxy?.port ?? Self.port, file: file,
                                           count: options.sessions, timeout: Int(options.seconds) + 60, toFiles: true,
                                           host: proxy?.address)
        let sampler = FileSizeSampler(paths: (0..<options.sessions).map(downloads.outputPath), interval: Self.binSeconds)
        sampler.start()
        logger.info("downloads started; waiting until fw1 carries them", metadata: ["measure.sessions": "\(options.sessions)"])
        do {
            try await PacedLab.waitForSessions(lab, on: "fw1", count: options.sessions, downloads: downloads, timeout: 30,
                                               joinedProxy: proxy != nil)
        } catch {
            sampler.stop()
            throw error
        }
        return LiveDownloads(downloads: downloads, sampler: sampler, clients: clients, endpoints: endpoints, expected: expected,
                             loss0: loss0, steadyFrom: sampler.elapsed() + 0.2,
                             bundleOf: (0..<options.sessions).map { $0 % clients.count })
    }

    /// Runs a `replace` or `remove` command with `--json`: when it started and ended on the sampler's clock, its
    /// result, its report and how long the command took.
    func reconfigure(_ arguments: [String], sampler: FileSizeSampler) throws
        -> (start: Double, result: CommandResult, report: ReplaceReport, duration: Duration, end: Double) {
        let windowStart = sampler.elapsed()
        let started = ContinuousClock.now
        let result = try Command.run(arguments, check: false)
        let duration = ContinuousClock.now - started
        let windowEnd = sampler.elapsed()
        guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: Data(result.stdout.utf8)) else {
            throw LabError.setupFailed("`\(arguments.joined(separator: " "))` exited \(result.status) without a report: "
                                       + "\(result.stdout.prefix(500)) \(result.stderr.prefix(500))")
        }
        return (windowStart, result, report, duration, windowEnd)
    }

    /// What the downloads left: their check against the served file, the goodput bins, the loss counters at the end.
    struct FinishedDownloads {
        var loss: TCPLossCounters
        var intact: Int
        var problems: [String]
        var failed: Int
        var bytesChecked: Int64
        var bins: [Goodput.Bin]
        /// When the first session completed (nil: none did).
        var steadyUntil: Double?
        var agentCounters: [String: [String: UInt64]]
    }

    /// Waits for every download, stops the sampler and checks each download's sha256.
    func finishDownloads(_ live: LiveDownloads, lab: Lab) async throws -> FinishedDownloads {
        let downloads = live.downloads
        let finished = await downloads.wait(timeout: options.seconds + 70)
        live.sampler.stop()
        let loss = try lab.tcpLossCounters(live.endpoints)
        let (intact, problems) = downloads.check(expected: live.expected, finished: finished)
        let failed = downloads.results().filter { $0.0.map { $0 != 0 } ?? true }.count
        if !problems.isEmpty {
            let log = live.clients.map { ProcessInspector.tail(of: downloads.logPath($0.name), lines: 5) }.joined(separator: "\n")
            logger.warning("downloads with problems", metadata: ["measure.problems": "\(problems.prefix(10))", "measure.curl": "\(log)"])
        }
        let size = options.bytesPerSession
        let bytesChecked = downloads.results().reduce(Int64(0)) { sum, r in r.0 == 0 && r.1 == live.expected ? sum + size : sum }
        let samples = live.sampler.samples()
        return FinishedDownloads(loss: loss, intact: intact, problems: problems, failed: failed, bytesChecked: bytesChecked,
                                 bins: Goodput.bins(samples, bundleOf: live.bundleOf, bundles: live.clients.count),
                                 steadyUntil: Goodput.firstCompletion(samples, complete: size) ?? samples.last?.seconds,
                                 agentCounters: await PacedLab.agentCounters(lab))
    }
}

/// Samples the sizes of files every `interval` seconds on its own thread (not on Swift concurrency's small
/// cooperative pool, which the benchmark's waits share), from `start()` until `stop()`. A missing file is 0 bytes.
final class FileSizeSampler: Sendable {
    private let paths: [String]
    private let interval: Double
    private let origin = ContinuousClock.now
    private let running = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)
    private let collected = Mutex<[Goodput.Sample]>([])
    private let done = DispatchSemaphore(value: 0)

    init(paths: [String], interval: Double) {
        self.paths = paths
        self.interval = interval
    }

    /// Seconds since the sampler was made.
    func elapsed() -> Double {
        let d = ContinuousClock.now - origin
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    func start() {
        guard !running.exchange(true, ordering: .relaxed) else { return }
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                // Stamped at the middle of the pass over the files (a pass the scheduler interrupts would otherwise
                // look like a burst), and after a stall the next sample waits for the next tick instead of catching up.
                let before = elapsed()
                let sizes = paths.map { path -> Int64 in
                    var info = stat()
                    return stat(path, &info) == 0 ? Int64(info.st_size) : 0
                }
                let after = elapsed()
                collected.withLock { $0.append(Goodput.Sample(seconds: (before + after) / 2, bytes: sizes)) }
                let next = ((after / interval).rounded(.down) + 1) * interval
                let pause = next - elapsed()
                if pause > 0 { usleep(UInt32(pause * 1_000_000)) }
            }
            done.signal()
        }
        thread.start()
    }

    /// Stops sampling (after one last sample); idempotent.
    func stop() {
        guard running.load(ordering: .relaxed), !stopped.exchange(true, ordering: .relaxed) else { return }
        done.wait()
    }

    func samples() -> [Goodput.Sample] { collected.withLock { $0 } }
}
