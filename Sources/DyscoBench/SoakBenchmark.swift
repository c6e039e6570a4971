import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// The soak (issue 19, item 5): live sessions moved back and forth fw1 ⇄ fw2 many times (default 1,000 moves) while
/// every host drops a share of the control datagrams it sends (default 30 %), with the agents' memory and tables
/// sampled along the way. Builds its own lab (client1 → fw1 → server1, fw2 beside; both strict conntrack firewalls,
/// so every move carries the firewall state) and keeps it busy with waves of sender-paced downloads: a wave's
/// sessions start through fw1 (the lab's policy), each move asks the agent of the box that carries most of them to
/// replace itself with the other box for all it carries, and once a download of the wave has ended (moves are of
/// sessions mid-transfer) the wave is left to finish, every download's sha256 is checked and the next wave starts. Where a session is, is read from its left end (the client's agent: the box its
/// right subsession goes to), not from the boxes, which may keep records of sessions that left them. Per move:
/// sessions matched, moved, not moved (with the agent's reasons), the request's time and the moved sessions' phases.
/// Before each move it checks the previous one at the clients: a session of it the client no longer lists is counted
/// as vanished, one that is not where the move's result says as misplaced. Every `sampleEvery` moves (and before
/// the first, after the last, and at the end once the tables have drained or the drain timeout passed): each agent's
/// RSS (/proc/PID/status VmRSS), open files and table size (``AgentSnapshot/total``), the records each box keeps of
/// sessions it does not carry (stale: established records of ended sessions or of sessions the client sends
/// elsewhere) and each firewall's conntrack count; the report gives each agent's least-squares RSS slope in KiB per
/// 1,000 moves and lists what the tables still hold at the end. Prints figures; asserts nothing (SoakTests asserts
/// on a short run).
public struct SoakBenchmark: Sendable {
    public struct Options: Sendable {
        /// Moves (one replace request each, of every session the source box carries).
        public var moves = 1000
        /// Live downloads per wave.
        public var sessions = 10
        /// Share of the control datagrams (UDP to the control port) every host's OUTPUT drops (0: no rule).
        public var lossProbability = 0.3
        /// Sample the agents every this many moves.
        public var sampleEvery = 100
        /// Size of each download, MiB, and its pace, MiB/s (a wave lasts about megabytes ÷ rate seconds).
        public var megabytes = 4
        public var rateMiBps = 0.5
        /// Per-session deadline of each move (generous: under loss, control messages are sent again).
        public var deadlineMilliseconds: UInt32 = 10_000
        /// How long to wait at the end for every agent's table to empty (the close linger is 10 s by default).
        public var drainTimeoutSeconds = 60.0
        public var labName = "bench-soak"
        public var subnet = "10.79.96.0/24"
        public var agentBinary: String?
        public var agentArguments: [String] = []
        public init() {}
    }

    /// One move: a replace request at `from`'s agent of the sessions it carried, to `to`.
    public struct Move: Codable, Sendable {
        public var index: Int
        public var wave: Int
        public var from: String
        public var to: String
        /// Sessions of the wave sent to `from`'s agent (by chain id), sessions it matched, and those that moved.
        public var asked: Int
        public var matched: Int
        public var moved: Int
        public var failures: [MigrationFailure]
        /// The agent's batch time (first trigger → last report) and the control request's round trip.
        public var agentMicroseconds: UInt64
        public var requestMicroseconds: UInt64
        /// The moved sessions' slowest trigger → release, and the phase with the largest median (its median), µs.
        public var slowestSessionMicroseconds: UInt64
        public var slowestPhase: String
        public var slowestPhaseMicroseconds: UInt64
    }

    /// One agent at one sample.
    public struct AgentSample: Codable, Sendable {
        public var host: String
        public var pid: Int32
        /// VmRSS, KiB (-1: unreadable).
        public var rssKiB: Int
        /// Open file descriptors (-1: unreadable).
        public var fds: Int
        /// Sessions in the agent's table.
        public var table: Int
        /// Established records of sessions this box does not carry (ended, or sent elsewhere by their client): left
        /// behind. Middleboxes only (0 elsewhere).
        public var stale: Int
    }

    public struct Sample: Codable, Sendable {
        /// Moves done when the sample was taken.
        public var move: Int
        public var wave: Int
        public var seconds: Double
        /// "", or what is special about it ("end").
        public var note: String
        public var agents: [AgentSample]
        /// Entries in each firewall's conntrack table (its namespace's nf_conntrack_count; -1: unreadable).
        public var conntrack: [String: Int]
    }

    /// One agent's RSS over the samples taken during the moves (not the one at the end).
    public struct MemoryTrend: Codable, Sendable {
        public var host: String
        public var firstKiB: Int
        public var lastKiB: Int
        public var minKiB: Int
        public var maxKiB: Int
        /// Least-squares slope of RSS over moves, KiB per 1,000 moves: all samples, and the second half's.
        public var slopeKiBPer1000Moves: Double
        public var secondHalfSlopeKiBPer1000Moves: Double
        public var firstFds: Int
        public var lastFds: Int
        /// The table's size at the first and the last of these samples (live sessions included).
        public var firstTable: Int
        public var lastTable: Int
        /// At the end (after the drain wait): RSS and the table.
        public var endKiB: Int?
        public var endTable: Int?
    }

    public struct Report: Codable, Sendable {
        public var lab: String
        public var sessionsPerWave: Int
        public var megabytes: Int
        public var rateMiBps: Double
        public var lossProbability: Double
        public var deadlineMilliseconds: UInt32
        public var movesRequested: Int
        public var moves: [Move]
        public var waves: Int
        /// Sums over the moves.
        public var matched: Int
        public var moved: Int
        public var cancelled: Int
        public var refused: Int
        /// Moves in which every matched session moved.
        public var movesAllMoved: Int
        /// Each move's request round trip, µs.
        public var moveTime: Percentiles
        /// Per moved session: trigger → release, and the paper's measure.
        public var sessionTotal: Percentiles
        public var sessionPaper: Percentiles
        public var downloads: Int
        public var downloadsIntact: Int
        public var downloadProblems: [String]
        /// Sessions of a move their client no longer listed before the next ("move N: chain X (result)").
        public var vanished: [String]
        /// Sessions of a move their client sent elsewhere than the move's result says.
        public var misplaced: [String]
        /// Waves whose sessions fw1 did not all carry at their start: their numbers, and what their clients listed of
        /// the others.
        public var partialWaves: [Int]
        public var waveProblems: [String]
        /// The waves of `downloadProblems` (one entry each).
        public var downloadProblemWaves: [Int]
        /// Control datagrams the loss rule dropped, per host.
        public var controlDropped: [String: UInt64]
        /// The firewalls' INVALID drops and the endpoints' TCP retransmissions over the whole run.
        public var invalidDropped: [String: UInt64]
        public var retransmissions: UInt64
        public var samples: [Sample]
        public var memory: [MemoryTrend]
        /// Whether every agent's table was empty within the drain timeout at the end (but for the sessions it held before
        /// the first wave: `baselineSessions`), and when.
        public var baselineSessions: Int
        public var drained: Bool
        public var drainSeconds: Double
        /// What the tables still held at the end (host, chain, role, state, carrier, packets, age, idle).
        public var leftovers: [String]
        /// dropped.* and migrations.* of every agent at the end.
        public var agentCounters: [String: [String: UInt64]]
        public var elapsedSeconds: Double
    }

    public var options: Options
    public var logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// The lab: one client (two from 26 sessions on, …), fw1 in the chain, fw2 beside it, both strict.
    public func spec(binary: String?) -> LabSpec {
        let clients = min(max(1, (options.sessions + 24) / 25), LabSpec.hostCountRange.upperBound)
        return .replacement(name: options.labName, clients: clients, subnet: options.subnet, mode: .stateful,
                            agentArguments: options.agentArguments, agentBinary: binary)
    }

    /// Builds the lab, soaks it and removes it (also on error or Ctrl-C).
    public func run() async throws -> Report {
        let binary = try options.agentBinary ?? Lab.defaultAgentBinary()
        return try await Lab.withBenchmarkLab(spec(binary: binary), logger: logger) { lab in try await run(in: lab) }
    }

    /// Soaks `lab` (a replacement lab: clients → fw1 → server1, fw2 beside; ``spec(binary:)``).
    public func run(in lab: Lab) async throws -> Report {
        let started = ContinuousClock.now
        let clients = lab.hosts(.client).map(\.name)
        let endpoints = clients + ["server1"]
        let agentHosts = lab.hosts.filter { $0.role != .attacker }.map(\.name)
        let file = "blob"
        let original = "\(lab.httpRoot)/\(file)"
        try Command.run(["dd", "if=/dev/urandom", "of=\(original)", "bs=1M", "count=\(options.megabytes)", "status=none"])
        let expected = try PacedLab.sha256(original)
        try PacedHTTPServer.start(lab, port: PacedLab.port, bytesPerSecond: options.rateMiBps * 1_048_576)
        let retransStart = try endpoints.reduce(UInt64(0)) { $0 + (try lab.tcpRetransmissions($1)) }
        // What the tables hold before the first wave (the server's readiness probes: a refused one stays `opening`
        // until --syn-timeout), left out of the drain at the end.
        var before: [String: Set<UInt64>] = [:]
        for host in agentHosts { before[host] = Set(try await PacedLab.snapshot(lab, host).sessions.map(\.id)) }

        let loss = ControlLoss(probability: options.lossProbability, hosts: agentHosts)
        try loss.install(lab)
        var soak = Soak(lab: lab, clients: clients, agentHosts: agentHosts, file: file, expected: expected, started: started,
                        options: options, logger: logger)
        try await soak.run()
        let controlDropped = loss.dropped(lab)
        try loss.remove(lab)

        // The end: every table back to empty (closing sessions linger), then a last sample.
        logger.info("waiting for the agents' tables to drain", metadata: ["bench.timeout": "\(options.drainTimeoutSeconds)"])
        let drainStart = ContinuousClock.now
        func left() async -> [(String, AgentSnapshot.Session)]? {
            var left: [(String, AgentSnapshot.Session)] = []
            for host in agentHosts {
                guard let snapshot = try? await PacedLab.snapshot(lab, host) else { return nil }
                left += snapshot.sessions.filter { !(before[host]?.contains($0.id) ?? false) }.map { (host, $0) }
            }
            return left
        }
        let drained = await Self.eventually(timeout: options.drainTimeoutSeconds) { await left()?.isEmpty ?? false }
        let drainSeconds = Self.seconds(ContinuousClock.now - drainStart)
        soak.samples.append(await soak.sample(note: drained ? "end" : "end, not empty"))
        var leftovers: [String] = []
        for (host, s) in await left() ?? [] {
            leftovers.append("\(host): \(s.session) chain \(s.chainID ?? "-") \(s.role.rawValue) \(s.state) \(s.carrier.rawValue)"
                             + (s.migration.map { " migration \($0)" } ?? "")
                             + " packets \(s.packets) age " + String(format: "%.0f s idle %.0f s", s.ageSeconds, s.idleSeconds))
        }

        let retransEnd = try endpoints.reduce(UInt64(0)) { $0 + (try lab.tcpRetransmissions($1)) }
        var invalid: [String: UInt64] = [:]
        for mb in ["fw1", "fw2"] { invalid[mb] = try lab.firewallCounters(mb).invalidDropped.packets }
        var counters: [String: [String: UInt64]] = [:]
        for host in agentHosts {
            guard let snapshot = try? await PacedLab.snapshot(lab, host) else { continue }
            let picked = snapshot.control.filter { $0.key.hasPrefix("dropped.") || $0.key.hasPrefix("migrations.") }
            if !picked.isEmpty { counters[host] = picked }
        }
        let moves = soak.moves
        let failures = moves.flatMap(\.failures)
        return Report(
            lab: lab.name, sessionsPerWave: options.sessions, megabytes: options.megabytes, rateMiBps: options.rateMiBps,
            lossProbability: options.lossProbability, deadlineMilliseconds: options.deadlineMilliseconds,
            movesRequested: options.moves, moves: moves, waves: soak.waveCount,
            matched: moves.reduce(0) { $0 + $1.matched }, moved: moves.reduce(0) { $0 + $1.moved },
            cancelled: failures.filter { $0.result == "cancelled" }.count, refused: failures.filter { $0.result == "refused" }.count,
            movesAllMoved: moves.filter { $0.matched > 0 && $0.moved == $0.matched }.count,
            moveTime: Percentiles(moves.map { UInt32(clamping: $0.requestMicroseconds) }),
            sessionTotal: Percentiles(soak.phases.map(\.total)), sessionPaper: Percentiles(soak.phases.map(\.paper)),
            downloads: soak.downloads, downloadsIntact: soak.intact, downloadProblems: soak.problems,
            vanished: soak.vanished, misplaced: soak.misplaced, partialWaves: soak.partialWaves,
            waveProblems: soak.waveProblems, downloadProblemWaves: soak.problemWaves, controlDropped: controlDropped,
            invalidDropped: invalid, retransmissions: retransEnd &- retransStart,
            samples: soak.samples, memory: Self.trends(soak.samples),
            baselineSessions: before.values.reduce(0) { $0 + $1.count },
            drained: drained, drainSeconds: drainSeconds, leftovers: leftovers, agentCounters: counters,
            elapsedSeconds: Self.seconds(ContinuousClock.now - started))
    }

    // MARK: - The moves

    /// The run's state: the current wave, the moves so far, the checks.
    private struct Soak {
        struct Wave {
            var number: Int
            var downloads: PacedDownloads
            /// Its sessions, by chain id (hex).
            var chains: Set<String> = []
        }

        let lab: Lab
        let clients: [String]
        let agentHosts: [String]
        let file: String
        let expected: String
        let started: ContinuousClock.Instant
        let options: Options
        let logger: Logger
        var moves: [Move] = []
        var phases: [ReplaceReport.Phases] = []
        var samples: [Sample] = []
        var wave: Wave?
        var waveCount = 0
        /// Sessions of the waves before the current one.
        var earlier: Set<String> = []
        var downloads = 0
        var intact = 0
        var problems: [String] = []
        var problemWaves: [Int] = []
        var partialWaves: [Int] = []
        var vanished: [String] = []
        var misplaced: [String] = []
        var waveProblems: [String] = []
        /// Waves in a row that started with no session carried.
        var emptyWaves = 0
        /// The previous move: each session's result, and where it should be now.
        var lastMove: [String: (result: String, expected: String)] = [:]
        var lastSource: String?

        init(lab: Lab, clients: [String], agentHosts: [String], file: String, expected: String,
             started: ContinuousClock.Instant, options: Options, logger: Logger) {
            self.lab = lab
            self.clients = clients
            self.agentHosts = agentHosts
            self.file = file
            self.expected = expected
            self.started = started
            self.options = options
            self.logger = logger
        }

        var transferSeconds: Double { Double(options.megabytes) / max(options.rateMiBps, 0.001) }
        var downloadTimeout: Int { Int(transferSeconds * 3) + 60 }

        /// The boxes by address.
        var boxes: [IPAddress: String] {
            Dictionary(uniqueKeysWithValues: ["fw1", "fw2"].map { (lab.address(of: $0), $0) })
        }

        /// Where the clients send their paced sessions (established ones, by the box their right subsession goes to),
        /// and every paced session they list (any state), by chain id.
        func located() async throws -> (box: [String: String], listed: Set<String>) {
            var box: [String: String] = [:]
            var listed = Set<String>()
            let boxes = self.boxes
            for client in clients {
                for s in try await PacedLab.snapshot(lab, client).sessions
                where s.role == .leftEnd && s.session.dstPort == PacedLab.port {
                    guard let chain = s.chainID else { continue }
                    listed.insert(chain)
                    if s.state == "established", let next = s.right?.dstAddr, let name = boxes[next] { box[chain] = name }
                }
            }
            return (box, listed)
        }

        mutating func startWave() async throws {
            waveCount += 1
            // Each wave's downloads write their results afresh (sN.sha, sN.rc) into the lab's download directory.
            try? FileManager.default.removeItem(atPath: "\(lab.directory)/downloads")
            let downloads = try PacedDownloads(lab, clients: clients, port: PacedLab.port, file: file, count: options.sessions,
                                               timeout: downloadTimeout)
            var wave = Wave(number: waveCount, downloads: downloads)
            lastMove = [:]
            // Its sessions: new chains the clients send through fw1, once fw1 lists them all established; or, when
            // a download ends first (or after 30 s), those that are (the others are a finding: `waveProblems`).
            let deadline = Date().addingTimeInterval(30)
            while true {
                let fresh = try await located().box.filter { !earlier.contains($0.key) && $0.value == "fw1" }
                let atFw1 = Set(try await PacedLab.pacedSessions(lab, "fw1").compactMap(\.chainID))
                let carried = Set(fresh.keys.filter(atFw1.contains))
                if carried.count >= options.sessions {
                    wave.chains = carried
                    break
                }
                if downloads.finishedCount() > 0 || Date() > deadline {
                    wave.chains = carried
                    partialWaves.append(waveCount)
                    waveProblems.append("wave \(waveCount): fw1 carried \(carried.count) of \(options.sessions) new sessions when "
                                        + (downloads.finishedCount() > 0 ? "the first download ended" : "30 s had passed")
                                        + "; the others: " + (await stragglers(besides: carried)).joined(separator: "; "))
                    logger.warning("wave not carried in full", metadata: ["bench.problem": "\(waveProblems.last ?? "")"])
                    break
                }
                try await Task.sleep(for: .milliseconds(100))
            }
            emptyWaves = wave.chains.isEmpty ? emptyWaves + 1 : 0
            if emptyWaves >= 5 {
                throw LabError.setupFailed("five waves in a row with no session carried by fw1: \(waveProblems.suffix(5))")
            }
            self.wave = wave
        }

        /// The clients' new paced sessions (of no earlier wave) but `carried`, as their client lists them, with the
        /// records each box has of the same subsession (its left tuple).
        func stragglers(besides carried: Set<String>) async -> [String] {
            var lines: [String] = []
            var boxRecords: [(String, AgentSnapshot.Session)] = []
            for box in ["fw1", "fw2"] {
                boxRecords += ((try? await PacedLab.snapshot(lab, box))?.sessions ?? []).map { (box, $0) }
            }
            for client in clients {
                for s in (try? await PacedLab.snapshot(lab, client))?.sessions ?? []
                where s.role == .leftEnd && s.session.dstPort == PacedLab.port {
                    guard let chain = s.chainID, !earlier.contains(chain), !carried.contains(chain) else { continue }
                    let same = boxRecords.filter { $0.1.left == s.right && s.right != nil }.map { box, r in
                        "\(box) has \(r.session) chain \(r.chainID ?? "-") \(r.state) packets \(r.packets) age "
                            + String(format: "%.0f s", r.ageSeconds)
                    }
                    lines.append("\(client) \(s.session) chain \(chain) \(s.state) \(s.carrier.rawValue) right \(s.right?.description ?? "-") "
                                 + "packets \(s.packets)" + (same.isEmpty ? "" : " (" + same.joined(separator: ", ") + ")"))
                }
            }
            return lines.isEmpty ? ["not listed by their client"] : lines
        }

        mutating func finishWave() async {
            guard let wave else { return }
            let finished = await wave.downloads.wait(timeout: Double(downloadTimeout) + 10)
            let (intact, problems) = wave.downloads.check(expected: expected, finished: finished)
            downloads += wave.downloads.count
            self.intact += intact
            self.problems += problems.map { "wave \(wave.number) \($0)" }
            problemWaves += problems.map { _ in wave.number }
            if !problems.isEmpty {
                logger.warning("downloads with problems", metadata: ["bench.wave": "\(wave.number)", "bench.problems": "\(problems.prefix(10))"])
            }
            earlier.formUnion(wave.chains)
            self.wave = nil
        }

        mutating func run() async throws {
            try await startWave()
            samples.append(await sample(note: ""))
            while moves.count < options.moves {
                guard let wave else {
                    try await startWave()
                    continue
                }
                // Moves are of live sessions, mid-transfer: once a download of the wave has ended, the wave is left to
                // finish (and checked), and the next one starts.
                if wave.downloads.finishedCount() > 0 {
                    await finishWave()
                    continue
                }
                let index = moves.count + 1
                // Where the wave's sessions are, and the previous move checked at the clients.
                let (box, listed) = try await located()
                for (chain, last) in lastMove.sorted(by: { $0.key < $1.key }) {
                    if !listed.contains(chain) {
                        vanished.append("move \(index - 1): chain \(chain) (\(last.result)) not listed by its client")
                    } else if let now = box[chain], now != last.expected {
                        misplaced.append("move \(index - 1): chain \(chain) (\(last.result)) goes to \(now), not \(last.expected)")
                    }
                }
                lastMove = [:]
                let live = box.filter { wave.chains.contains($0.key) }
                let on1 = live.filter { $0.value == "fw1" }.map(\.key)
                let on2 = live.filter { $0.value == "fw2" }.map(\.key)
                if on1.isEmpty && on2.isEmpty {
                    // None established at its client (closing, or between two paths): look again shortly.
                    try await Task.sleep(for: .milliseconds(100))
                    continue
                }
                let source = on1.count != on2.count ? (on1.count > on2.count ? "fw1" : "fw2") : (lastSource == "fw1" ? "fw2" : "fw1")
                let target = source == "fw1" ? "fw2" : "fw1"
                let chains = source == "fw1" ? on1 : on2
                let (move, report) = try await self.move(index: index, wave: wave.number, from: source, to: target, chains: chains)
                lastSource = source
                moves.append(move)
                phases += report.sessions.filter { $0.result == "moved" }.compactMap(\.phases)
                for s in report.sessions { lastMove[s.chainID] = (s.result, s.result == "moved" ? target : source) }
                if index % 50 == 0 || move.moved != move.matched || move.matched != move.asked {
                    logger.info("move", metadata: ["bench.move": "\(index)", "bench.wave": "\(wave.number)", "bench.from": "\(source)",
                                                   "bench.moved": "\(move.moved)/\(move.matched)/\(move.asked)",
                                                   "bench.ms": "\(move.requestMicroseconds / 1000)"])
                }
                if index % max(1, options.sampleEvery) == 0 { samples.append(await sample(note: "")) }
            }
            if moves.count % max(1, options.sampleEvery) != 0 { samples.append(await sample(note: "")) }
            logger.info("moves done; waiting for the last wave's downloads", metadata: ["bench.moves": "\(moves.count)"])
            await finishWave()
        }

        func move(index: Int, wave: Int, from: String, to: String, chains: [String]) async throws -> (Move, ReplaceReport) {
            let request = ReplaceRequest(predicate: SessionPredicate(dport: [PortRange(lower: PacedLab.port, upper: PacedLab.port)]),
                                         newBoxes: [lab.address(of: to)], stateful: true,
                                         deadlineMilliseconds: options.deadlineMilliseconds,
                                         chains: Set(chains.compactMap { UInt64($0, radix: 16) }))
            let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: from))
            let started = ContinuousClock.now
            let data = try await ControlClient.request(ControlRequest(.replace, replace: request), path: socket)
            let elapsed = ContinuousClock.now - started
            guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
                throw LabError.setupFailed("\(from)'s agent answered move \(index) with: \(String(decoding: data.prefix(500), as: UTF8.self))")
            }
            let moved = report.sessions.filter { $0.result == "moved" }
            let latency = MigrationLatency(moved.compactMap(\.phases))
            let slowest = MigrationLatency.phaseOrder.filter { !["export", "transfer", "import"].contains($0) }
                .compactMap { name in latency.phases[name].map { (name, $0.p50) } }.max { $0.1 < $1.1 }
            return (Move(index: index, wave: wave, from: from, to: to, asked: chains.count, matched: report.matched, moved: moved.count,
                         failures: report.sessions.filter { $0.result != "moved" }.map(MigrationFailure.init),
                         agentMicroseconds: report.elapsedMicroseconds, requestMicroseconds: PacedLab.micros(elapsed),
                         slowestSessionMicroseconds: latency.total.max, slowestPhase: slowest?.0 ?? "",
                         slowestPhaseMicroseconds: slowest?.1 ?? 0), report)
        }

        // MARK: Samples

        func sample(note: String) async -> Sample {
            let live = (try? await located().box) ?? [:]
            let current = wave?.chains ?? []
            var agents: [AgentSample] = []
            for host in agentHosts {
                guard let snapshot = try? await PacedLab.snapshot(lab, host) else {
                    agents.append(AgentSample(host: host, pid: 0, rssKiB: -1, fds: -1, table: -1, stale: -1))
                    continue
                }
                let stale = lab.host(host).role != .middlebox ? 0 : snapshot.sessions.filter { s in
                    guard s.role == .middlebox, s.state == "established", let chain = s.chainID else { return false }
                    return !(current.contains(chain) && live[chain] == host)
                }.count
                agents.append(AgentSample(host: host, pid: snapshot.pid, rssKiB: SoakBenchmark.rssKiB(pid: snapshot.pid) ?? -1,
                                          fds: SoakBenchmark.openFiles(pid: snapshot.pid) ?? -1,
                                          table: snapshot.total ?? snapshot.sessions.count, stale: stale))
            }
            var conntrack: [String: Int] = [:]
            for mb in lab.hosts(.middlebox).map(\.name) {
                let text = (try? lab.exec(mb, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], check: false).stdout) ?? ""
                conntrack[mb] = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            }
            return Sample(move: moves.count, wave: wave?.number ?? waveCount, seconds: SoakBenchmark.seconds(ContinuousClock.now - started),
                          note: note, agents: agents, conntrack: conntrack)
        }
    }

    /// VmRSS of `pid`, KiB.
    static func rssKiB(pid: Int32) -> Int? {
        guard pid > 0, let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        return statusField(status, "VmRSS")
    }

    /// A `NAME:   VALUE kB` field of /proc/PID/status.
    static func statusField(_ status: String, _ name: String) -> Int? {
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            return line.dropFirst(name.count + 1).split(whereSeparator: \.isWhitespace).first.flatMap { Int($0) }
        }
        return nil
    }

    static func openFiles(pid: Int32) -> Int? {
        guard pid > 0 else { return nil }
        return (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count
    }

    // MARK: - Figures

    /// Least-squares slope of `points` (x, y); 0 with fewer than two distinct x.
    public static func slope(_ points: [(x: Double, y: Double)]) -> Double {
        guard points.count >= 2 else { return 0 }
        let n = Double(points.count)
        let mx = points.reduce(0) { $0 + $1.x } / n
        let my = points.reduce(0) { $0 + $1.y } / n
        let sxx = points.reduce(0) { $0 + ($1.x - mx) * ($1.x - mx) }
        guard sxx > 0 else { return 0 }
        return points.reduce(0) { $0 + ($1.x - mx) * ($1.y - my) } / sxx
    }

    /// Each agent's RSS trend over the samples taken during the moves (the one at the end apart).
    public static func trends(_ samples: [Sample]) -> [MemoryTrend] {
        let during = samples.filter { $0.note.isEmpty }
        let after = samples.last { !$0.note.isEmpty }
        let hosts = during.first?.agents.map(\.host) ?? []
        return hosts.compactMap { host in
            let series = during.compactMap { s in s.agents.first { $0.host == host && $0.rssKiB >= 0 }.map { (s.move, $0) } }
            guard let first = series.first, let last = series.last else { return nil }
            let points = series.map { (x: Double($0.0), y: Double($0.1.rssKiB)) }
            let secondHalf = points.filter { $0.x >= Double(last.0) / 2 }
            let drained = after?.agents.first { $0.host == host }
            return MemoryTrend(host: host, firstKiB: first.1.rssKiB, lastKiB: last.1.rssKiB,
                               minKiB: series.map(\.1.rssKiB).min() ?? 0, maxKiB: series.map(\.1.rssKiB).max() ?? 0,
                               slopeKiBPer1000Moves: slope(points) * 1000,
                               secondHalfSlopeKiBPer1000Moves: slope(secondHalf) * 1000,
                               firstFds: first.1.fds, lastFds: last.1.fds, firstTable: first.1.table, lastTable: last.1.table,
                               endKiB: drained?.rssKiB, endTable: drained?.table)
        }
    }

    /// The report's lines for the sessions that did not move, grouped by what happened (request ids and tuples in the
    /// reasons left out, so that the same cause is one line).
    public static func failureLines(_ failures: [MigrationFailure]) -> [String] {
        MigrationFailure.lines(failures.map { f in
            var f = f
            f.reason = f.reason.replacingOccurrences(of: #" \(new box of request [0-9]+\)"#, with: "", options: .regularExpression)
                .replacingOccurrences(of: #"collision\([^)]*\)"#, with: "collision(…)", options: .regularExpression)
            return f
        })
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    static func eventually(timeout: TimeInterval, _ condition: () async -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if await condition() { return true }
            if Date() >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(200))
        }
    }
}

/// A share of every host's control datagrams dropped (iptables statistic match in OUTPUT, as ReconfigureTests (g)).
struct ControlLoss {
    var probability: Double
    var hosts: [String]

    var rule: [String] {
        ["-p", "udp", "--dport", "\(ControlMessage.port)", "-m", "statistic", "--mode", "random",
         "--probability", String(format: "%.4f", probability), "-j", "DROP"]
    }

    func install(_ lab: Lab) throws {
        guard probability > 0 else { return }
        for host in hosts { try lab.exec(host, ["iptables", "-w", "-I", "OUTPUT"] + rule) }
    }

    func remove(_ lab: Lab) throws {
        guard probability > 0 else { return }
        for host in hosts { try lab.exec(host, ["iptables", "-w", "-D", "OUTPUT"] + rule) }
    }

    /// Datagrams each host's rule dropped so far.
    func dropped(_ lab: Lab) -> [String: UInt64] {
        guard probability > 0 else { return [:] }
        var result: [String: UInt64] = [:]
        for host in hosts {
            let out = (try? lab.exec(host, ["iptables", "-w", "-L", "OUTPUT", "-v", "-n", "-x"]).stdout) ?? ""
            result[host] = out.split(separator: "\n").first { $0.contains("statistic") }
                .flatMap { $0.split(whereSeparator: \.isWhitespace).first.flatMap { UInt64($0) } } ?? 0
        }
        return result
    }
}

extension SoakBenchmark.Report {
    public var text: String {
        func ms(_ us: UInt64) -> String { String(format: "%.1f", Double(us) / 1000) }
        func percentiles(_ p: Percentiles) -> String { "p50 \(ms(p.p50)), p90 \(ms(p.p90)), p99 \(ms(p.p99)), max \(ms(p.max))" }
        var lines = ["soak benchmark: \(moves.count) moves fw1 ⇄ fw2 (stateful, both strict firewalls) of waves of \(sessionsPerWave) "
                     + "live sessions (\(megabytes) MiB each, paced at \(String(format: "%g", rateMiBps)) MiB/s), "
                     + String(format: "%g", lossProbability * 100) + " % of the control datagrams dropped at every host, "
                     + "deadline \(deadlineMilliseconds) ms; lab \(lab); " + String(format: "%.0f s", elapsedSeconds)]
        let asked = moves.reduce(0) { $0 + $1.asked }
        lines.append("moves: \(moves.count)/\(movesRequested) in \(waves) waves; sessions asked \(asked), matched \(matched), "
                     + "moved \(moved), cancelled \(cancelled), refused \(refused); every session moved in \(movesAllMoved) moves")
        lines.append("move (request round trip) ms: \(percentiles(moveTime))")
        lines.append("per moved session, trigger → release ms: \(percentiles(sessionTotal)); paper measure ms: \(percentiles(sessionPaper))")
        var slowest: [String: Int] = [:]
        for m in moves where !m.slowestPhase.isEmpty { slowest[m.slowestPhase, default: 0] += 1 }
        if !slowest.isEmpty {
            lines.append("slowest phase (largest median) per move: " + slowest.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }
                .joined(separator: ", "))
        }
        lines += SoakBenchmark.failureLines(moves.flatMap(\.failures))
        let partial = moves.filter { $0.moved != $0.matched || $0.matched != $0.asked }
        if !partial.isEmpty {
            lines.append("moves not complete (moved/matched/asked): "
                         + partial.prefix(20).map { "#\($0.index) \($0.from)→\($0.to) \($0.moved)/\($0.matched)/\($0.asked)" }
                .joined(separator: ", ") + (partial.count > 20 ? ", … (\(partial.count) in all)" : ""))
        }
        lines.append("downloads byte-exact (sha256): \(downloadsIntact)/\(downloads)")
        lines += PacedDownloads.problemLines(downloadProblems)
        lines.append("sessions after each move, at their client: \(vanished.count) no longer listed, \(misplaced.count) not where "
                     + "the move's result says")
        lines += (vanished + misplaced).prefix(10).map { "  \($0)" }
        if !waveProblems.isEmpty {
            lines.append("waves not carried in full at their start: \(waveProblems.count)")
            lines += waveProblems.prefix(10).map { "  \($0)" }
        }
        let dropped = controlDropped.values.reduce(0, +)
        lines.append("control datagrams dropped by the loss rule: \(dropped)"
                     + (controlDropped.isEmpty ? "" : " (" + controlDropped.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
                        .joined(separator: ", ") + ")"))
        lines.append("firewall INVALID drops: " + invalidDropped.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            .joined(separator: ", ") + "; endpoints' TCP retransmissions: \(retransmissions)")

        let hosts = samples.first?.agents.map(\.host) ?? []
        let firewalls = samples.first?.conntrack.keys.sorted() ?? []
        lines.append("samples: per agent RSS KiB / open files / sessions in its table (+ stale: established records of sessions "
                     + "it does not carry); conntrack entries per firewall")
        func right(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }
        lines.append(right("move", 6) + right("wave", 6) + right("s", 7) + hosts.map { right($0, 24) }.joined()
                     + firewalls.map { right("ct \($0)", 9) }.joined())
        for s in samples {
            let cells = hosts.map { host -> String in
                guard let a = s.agents.first(where: { $0.host == host }) else { return right("-", 24) }
                return right("\(a.rssKiB) / \(a.fds) / \(a.table)" + (a.stale > 0 ? "+\(a.stale)" : ""), 24)
            }
            lines.append(right("\(s.move)", 6) + right("\(s.wave)", 6) + right(String(format: "%.0f", s.seconds), 7) + cells.joined()
                         + firewalls.map { right("\(s.conntrack[$0] ?? -1)", 9) }.joined() + (s.note.isEmpty ? "" : "  \(s.note)"))
        }
        lines.append("RSS over the moves (least-squares slope, KiB per 1,000 moves):")
        for m in memory {
            lines.append("  \(m.host): \(m.firstKiB) → \(m.lastKiB) KiB (min \(m.minKiB), max \(m.maxKiB)), slope "
                         + String(format: "%+.0f", m.slopeKiBPer1000Moves) + ", second half "
                         + String(format: "%+.0f", m.secondHalfSlopeKiBPer1000Moves) + "; open files \(m.firstFds) → \(m.lastFds); "
                         + "table \(m.firstTable) → \(m.lastTable)"
                         + (m.endKiB.map { "; at the end \($0) KiB" } ?? "") + (m.endTable.map { ", table \($0)" } ?? ""))
        }
        let baseline = baselineSessions > 0 ? " (but for the \(baselineSessions) sessions they held before the first wave)" : ""
        lines.append(drained ? "tables after the last download: every agent's empty\(baseline) after " + String(format: "%.1f s", drainSeconds)
                     : "tables after the last download: not all empty\(baseline) after " + String(format: "%.0f s", drainSeconds)
                        + " (\(leftovers.count) sessions left):")
        lines += leftovers.prefix(20).map { "  \($0)" }
        if leftovers.count > 20 { lines.append("  …") }
        let diagnostics = agentCounters.sorted { $0.key < $1.key }.map { host, counters in
            "\(host) " + counters.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        if !diagnostics.isEmpty { lines.append("agent counters: " + diagnostics.joined(separator: "; ")) }
        return lines.joined(separator: "\n")
    }
}
