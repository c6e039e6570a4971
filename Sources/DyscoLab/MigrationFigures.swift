import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Histogram
import Logging

// What `dysco-bench replace` and `measure` share: percentiles, per-phase latency statistics of a `replace` report,
// the endpoints' TCP loss counters, the prototype-style reference and its ratios, the lookup of files of the
// repository the binary was built in, and CSV text.

/// Percentiles of one latency, microseconds (HdrHistogram, 3 significant digits).
public struct Percentiles: Codable, Sendable, Equatable {
    public var count: Int
    public var p50: UInt64
    /// The paper's deletion figure is read at 80 % (§5, Fig. 13); issue 17 asks for it.
    public var p80: UInt64
    public var p90: UInt64
    public var p99: UInt64
    public var max: UInt64
    public var mean: Double

    public init(_ values: [UInt32]) {
        var histogram = Histogram<UInt64>(highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
        for value in values { _ = histogram.record(UInt64(value)) }
        count = values.count
        let empty = values.isEmpty
        p50 = empty ? 0 : histogram.valueAtPercentile(50)
        p80 = empty ? 0 : histogram.valueAtPercentile(80)
        p90 = empty ? 0 : histogram.valueAtPercentile(90)
        p99 = empty ? 0 : histogram.valueAtPercentile(99)
        max = empty ? 0 : histogram.maxRecorded
        mean = empty ? 0 : histogram.mean
    }
}

/// The paper's removal-latency figures (§5 "Middlebox deletion", Fig. 13: 600 sessions in bundles of 150, one
/// removal per bundle): "almost 80% of reconfigurations took less than 2ms and 98.7% less than 4ms".
public enum PaperDeletion {
    public static let under2ms = 0.80
    public static let under4ms = 0.987
}

/// The empirical CDF of per-session latencies, µs: one point per distinct value, with the fraction of the values
/// at or below it.
public struct LatencyCDF: Codable, Sendable, Equatable {
    public struct Point: Codable, Sendable, Equatable {
        public var latencyMicroseconds: UInt32
        public var fraction: Double
        public init(latencyMicroseconds: UInt32, fraction: Double) {
            self.latencyMicroseconds = latencyMicroseconds
            self.fraction = fraction
        }
    }

    public var count: Int
    public var points: [Point]
    /// Share of the values strictly under 2 ms and 4 ms (the paper's two figures).
    public var under2ms: Double
    public var under4ms: Double

    public init(_ values: [UInt32]) {
        let sorted = values.sorted()
        count = sorted.count
        var points: [Point] = []
        for (i, value) in sorted.enumerated() where i + 1 == sorted.count || sorted[i + 1] != value {
            points.append(Point(latencyMicroseconds: value, fraction: Double(i + 1) / Double(sorted.count)))
        }
        self.points = points
        under2ms = Self.share(values, under: 2000)
        under4ms = Self.share(values, under: 4000)
    }

    /// Share of `values` strictly under `micros` (0 without values).
    public static func share(_ values: [UInt32], under micros: UInt32) -> Double {
        values.isEmpty ? 0 : Double(values.filter { $0 < micros }.count) / Double(values.count)
    }
}

/// Per-session latency of the moved sessions of a `replace`: the whole migration, the paper's measure and
/// every phase.
public struct MigrationLatency: Codable, Sendable, Equatable {
    /// Trigger → release.
    public var total: Percentiles
    /// The paper's measure (§5.3): new-path SYN sent → new path first used.
    public var paper: Percentiles
    /// By phase name (``phaseOrder``).
    public var phases: [String: Percentiles]

    /// The phases of ``ReplaceReport/Phases``, in the order they happen (export, transfer, import are parts of state).
    public static let phaseOrder = ["lock", "newPath", "drain", "state", "export", "transfer", "import", "release", "teardown"]
    /// Phases that are 0 by construction in a stateless migration (nothing moves, nothing is held).
    public static let statefulOnly: Set<String> = ["state", "export", "transfer", "import", "release"]

    /// The value of phase `name` (or `total`, `paper`) of one session.
    public static func value(_ phases: ReplaceReport.Phases, _ name: String) -> UInt32? {
        switch name {
        case "lock": phases.lock
        case "newPath": phases.newPath
        case "drain": phases.drain
        case "state": phases.state
        case "export": phases.export
        case "transfer": phases.transfer
        case "import": phases.import
        case "release": phases.release
        case "teardown": phases.teardown
        case "total": phases.total
        case "paper": phases.paper
        default: nil
        }
    }

    public init(total: Percentiles, paper: Percentiles, phases: [String: Percentiles]) {
        self.total = total
        self.paper = paper
        self.phases = phases
    }

    public init(_ moved: [ReplaceReport.Phases]) {
        func column(_ name: String) -> Percentiles { Percentiles(moved.compactMap { Self.value($0, name) }) }
        total = column("total")
        paper = column("paper")
        phases = Dictionary(uniqueKeysWithValues: Self.phaseOrder.map { ($0, column($0)) })
    }

    /// The terminal table (ms): total, paper, then each phase; stateless runs (and removals: `why` says so) leave
    /// out the stateful-only phases that are 0 and say why.
    public func table(stateless: Bool, why: String = "stateless: no state moves and nothing is held") -> [String] {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        func cell(_ s: String, _ width: Int) -> String {
            s.count >= width ? s + " " : String(repeating: " ", count: width - s.count) + s
        }
        let labels = ["total": "total (trigger → release)", "paper": "paper (§5.3: new-path SYN → used)",
                      "lock": "lock", "newPath": "new path", "drain": "drain", "state": "state (export+transfer+import)",
                      "export": "  export (fw1)", "transfer": "  transfer", "import": "  import (fw2)",
                      "release": "release", "teardown": "teardown (after release)"]
        var lines = ["per session, ms".padding(toLength: 34, withPad: " ", startingAt: 0)
                     + cell("p50", 9) + cell("p90", 9) + cell("p99", 9) + cell("max", 9) + cell("mean", 9)]
        var skipped: [String] = []
        for key in ["total", "paper"] + Self.phaseOrder {
            guard let p = key == "total" ? total : key == "paper" ? paper : phases[key] else { continue }
            if stateless, p.max == 0, Self.statefulOnly.contains(key) {
                skipped.append(labels[key]?.trimmingCharacters(in: .whitespaces) ?? key)
                continue
            }
            lines.append((labels[key] ?? key).padding(toLength: 34, withPad: " ", startingAt: 0)
                         + cell(ms(p.p50), 9) + cell(ms(p.p90), 9) + cell(ms(p.p99), 9) + cell(ms(p.max), 9)
                         + cell(String(format: "%.2f", p.mean / 1000), 9))
        }
        if !skipped.isEmpty { lines.append("(\(why); 0 for \(skipped.joined(separator: ", ")))") }
        return lines
    }
}

/// TCP loss counters of a set of lab hosts (summed): every retransmitted segment, the retransmitted segments
/// the receiver reported it already had (DSACK: spurious, no byte was missing), RTOs, and resets of
/// established connections.
public struct TCPLossCounters: Codable, Sendable, Equatable, CustomStringConvertible {
    public var retransmitted: UInt64 = 0
    public var spurious: UInt64 = 0
    public var timeouts: UInt64 = 0
    public var establishedResets: UInt64 = 0
    /// By host and counter (for messages).
    public var detail: [String: UInt64] = [:]

    public static let counterNames = ["TcpRetransSegs", "TcpExtTCPDSACKRecvSegs", "TcpExtTCPTimeouts", "TcpEstabResets",
                                      "TcpExtTCPLossProbes", "TcpExtTCPFastRetrans", "TcpExtTCPSlowStartRetrans",
                                      "TcpExtTCPSACKReorder", "TcpExtTCPOFOQueue", "TcpExtTCPRcvQDrop"]

    public init() {}

    /// Retransmissions of bytes the receiver did not have: what a lost byte would cost.
    public var needed: Int64 { Int64(retransmitted) - Int64(spurious) }

    /// Tail-loss probes sent (RFC 8985): a sender whose ACKs come late probes with its last (or a new) segment. Right
    /// after a release the path runs through busy agents' slow paths for a moment, so a sender that resumes at
    /// once (the window update) may probe once although nothing was lost; Linux then ignores the receiver's
    /// DSACK for it as "dubious" (TcpExtTCPDSACKIgnoredDubious), so `spurious` does not cover it.
    public var lossProbes: UInt64 { detail.filter { $0.key.hasSuffix(".TcpExtTCPLossProbes") }.values.reduce(0, +) }

    /// The migration rule of the tests: no RTO, no reset, and every retransmission either reported by the
    /// receiver as a duplicate (DSACK) or a tail-loss probe. A lost byte would show as more: a probe that finds
    /// a hole gets it SACKed, and the sender then fast-retransmits what is missing (or times out).
    public var noByteLost: Bool {
        timeouts == 0 && establishedResets == 0 && needed <= Int64(lossProbes)
    }

    public static func + (a: Self, b: Self) -> Self {
        var s = Self()
        s.retransmitted = a.retransmitted &+ b.retransmitted
        s.spurious = a.spurious &+ b.spurious
        s.timeouts = a.timeouts &+ b.timeouts
        s.establishedResets = a.establishedResets &+ b.establishedResets
        s.detail = a.detail.merging(b.detail) { x, y in x &+ y }.filter { $0.value != 0 }
        return s
    }

    public static func - (a: Self, b: Self) -> Self {
        var d = Self()
        d.retransmitted = a.retransmitted &- b.retransmitted
        d.spurious = a.spurious &- b.spurious
        d.timeouts = a.timeouts &- b.timeouts
        d.establishedResets = a.establishedResets &- b.establishedResets
        d.detail = a.detail.merging(b.detail) { x, y in x &- y }.filter { $0.value != 0 }
        return d
    }

    public var description: String {
        "\(retransmitted) retransmitted (\(spurious) spurious by DSACK), \(timeouts) RTOs, \(establishedResets) resets; "
            + "\(detail.sorted { $0.key < $1.key })"
    }
}

extension Lab {
    /// The loss counters of `hosts` (nstat in each namespace).
    public func tcpLossCounters(_ hosts: [String]) throws -> TCPLossCounters {
        var total = TCPLossCounters()
        for host in hosts {
            let c = try kernelCounters(host, TCPLossCounters.counterNames)
            for (name, value) in c { total.detail["\(host).\(name)"] = value }
            total.retransmitted += c["TcpRetransSegs"] ?? 0
            total.spurious += c["TcpExtTCPDSACKRecvSegs"] ?? 0
            total.timeouts += c["TcpExtTCPTimeouts"] ?? 0
            total.establishedResets += c["TcpEstabResets"] ?? 0
        }
        return total
    }

    /// Immediate ACKs at the endpoints (`quickack` on their subnet route): a paced, application-limited sender
    /// then never waits on a delayed ACK for a chunk's tail, which its tail-loss probe (≈ 2 RTT) would answer
    /// with a spurious retransmission whatever the path does (scripts/retrans-probe.sh). The baseline is then
    /// zero retransmissions, and any retransmission during a migration is the path's.
    public func enableQuickAck() throws {
        for host in hosts where host.role == .client || host.role == .server {
            try exec(host.name, ["ip", "route", "change", subnet.description, "dev", host.interface,
                                 "proto", "kernel", "scope", "link", "src", host.address.description, "quickack", "1"])
            // Dual stack: the IPv6 prefix's route too.
            if state.ipv6Address(of: host) != nil {
                try exec(host.name, ["ip", "-6", "route", "change", "\(state.ipv6Prefix)/64", "dev", host.interface,
                                     "proto", "kernel", "metric", "256", "quickack", "1"])
            }
        }
    }
}

extension LabSpec {
    /// The replacement benchmarks' lab: `clients` clients → fw1 → server1 on the paced port, fw2 beside fw1;
    /// fw2 strict for a stateful run, open for a stateless one.
    /// `natPair`: fw1 and fw2 an HA pair of NAT'ing firewalls (``FirewallProfile/snatShared``).
    public static func replacement(name: String, clients: Int, subnet: String, mode: MigrationMode, natPair: Bool = false,
                            agentArguments: [String], agentBinary: String?) -> LabSpec {
        LabSpec(name: name, clients: clients, middleboxes: ["fw1", "fw2"], chain: ["fw1"], subnet: subnet,
                policyPorts: [PacedLab.port], agentArguments: agentArguments, agentBinary: agentBinary,
                firewallProfiles: natPair ? ["fw1": .snatShared, "fw2": .snatShared] : mode == .stateless ? ["fw2": .open] : [:])
    }
}

extension Lab {
    /// A benchmark's own lab: removes a leftover of the same name, builds `spec`, runs `body` and removes the lab
    /// again, also when `body` fails or on Ctrl-C (SIGINT/SIGTERM).
    public static func withBenchmarkLab<T>(_ spec: LabSpec, logger: Logger, _ body: (Lab) async throws -> T) async throws -> T {
        try Lab.down(name: spec.name, force: true, logger: logger)
        logger.info("building lab", metadata: ["bench.lab": "\(spec.name)", "bench.clients": "\(spec.clients)",
                                               "bench.fw2": "\(spec.firewallProfile(of: "fw2"))"])
        let guardToken = SignalTeardown.arm(lab: spec.name, logger: logger)
        defer { SignalTeardown.disarm(guardToken) }
        let lab = try Lab.up(spec, logger: logger)
        do {
            let result = try await body(lab)
            SignalTeardown.standAsideIfInterrupted()
            _ = try lab.down()
            return result
        } catch {
            SignalTeardown.standAsideIfInterrupted()
            logger.error("benchmark failed; removing the lab", metadata: ["bench.error": "\(error)"])
            _ = try? lab.down()
            throw error
        }
    }
}

/// One session's firewall state moved the original prototype's way (shared/bench/state-transfer-prototype-ref.sh).
public struct StateTransferReference: Codable, Sendable {
    public var script: String
    public var sessions: Int
    public var moved: Int
    public var exportMillisecondsPerSession: Double
    public var importMillisecondsPerSession: Double
    public var totalMillisecondsPerSession: Double

    public static let scriptName = "state-transfer-prototype-ref.sh"

    /// Runs the script for `sessions` sessions; nil if it fails or prints no result.
    public static func run(_ script: String, sessions: Int) -> Self? {
        guard let result = try? Command.run(["bash", script, "\(sessions)"], check: false), result.status == 0 else {
            return nil
        }
        var values: [String: Double] = [:]
        for field in result.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
            let parts = field.split(separator: "=")
            if parts.count == 2, let value = Double(parts[1]) { values[String(parts[0])] = value }
        }
        guard let total = values["total_ms_per_session"] else { return nil }
        return Self(script: script, sessions: Int(values["prototype_style_sessions"] ?? Double(sessions)),
                    moved: Int(values["moved"] ?? 0), exportMillisecondsPerSession: values["export_ms_per_session"] ?? 0,
                    importMillisecondsPerSession: values["import_ms_per_session"] ?? 0, totalMillisecondsPerSession: total)
    }

    /// Runs `script` (if given) as a benchmark's reference: the result, or why there is none (`missing` when
    /// no script was given).
    public static func run(_ script: String?, sessions: Int, missing: String?, logger: Logger) -> (Self?, String?) {
        guard let script else { return (nil, missing ?? "not run") }
        logger.info("running the prototype-style state transfer reference", metadata: ["bench.script": "\(script)"])
        guard let reference = run(script, sessions: sessions) else { return (nil, "the reference script \(script) printed no result") }
        return (reference, nil)
    }

    /// Where the script is: `../shared/bench/NAME` relative to the current directory, then relative to the
    /// repository the running binary was built in. Returns the path found (if any) and every place looked at.
    public static func find(_ name: String = scriptName,
                            currentDirectory: String = FileManager.default.currentDirectoryPath) -> (String?, [String]) {
        var candidates = ["\(currentDirectory)/../shared/bench/\(name)"]
        if let repository = RepositoryFiles.binaryRepository() {
            candidates.append(repository.deletingLastPathComponent().appendingPathComponent("shared/bench/\(name)").path)
        }
        return (RepositoryFiles.firstExisting(candidates), candidates)
    }

    /// The prototype's per-session state move over ours (nil where ours is 0 or nothing moved).
    public func ratios(mode: MigrationMode, latency: MigrationLatency, moved: Int,
                       batchMicroseconds: UInt64) -> ReferenceRatios {
        let proto = totalMillisecondsPerSession * 1000
        func over(_ ours: Double) -> Double? { ours > 0 ? proto / ours : nil }
        let state = latency.phases["state"]?.p50 ?? 0
        return ReferenceRatios(
            mode: mode, overTotalP50: moved > 0 ? over(Double(latency.total.p50)) : nil,
            overStateP50: mode == .stateful && moved > 0 ? over(Double(state)) : nil,
            overBatchPerSession: moved > 0 ? over(Double(batchMicroseconds) / Double(moved)) : nil)
    }

    /// The terminal lines: the reference's cost and the ratios.
    public static func text(_ reference: Self?, note: String?, ratios: [ReferenceRatios]) -> [String] {
        guard let reference else { return ["reference: \(note ?? "not run"); no ratio"] }
        var lines = ["reference (prototype-style: iptables-save + conntrack -L, iptables-restore + conntrack -I, per session; "
                     + "\(reference.sessions) sessions, \(reference.moved) moved): "
                     + String(format: "%.2f ms per session (export %.2f, import %.2f)", reference.totalMillisecondsPerSession,
                              reference.exportMillisecondsPerSession, reference.importMillisecondsPerSession)]
        func x(_ v: Double?) -> String { v.map { String(format: $0 < 10 ? "%.2f×" : "%.1f×", $0) } ?? "n/a" }
        for r in ratios {
            lines.append("prototype state move ÷ ours (\(r.mode)): ÷ per-session total p50 \(x(r.overTotalP50)), "
                         + "÷ state phase p50 \(x(r.overStateP50)), ÷ batch time per session \(x(r.overBatchPerSession))")
        }
        return lines
    }
}

/// Files of the source tree the running binary was built in (scripts, shared references).
public enum RepositoryFiles {
    /// The first parent directory of the running executable with a Package.swift.
    public static func binaryRepository() -> URL? {
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while dir.path != "/" {
            if FileManager.default.fileExists(atPath: dir.appendingPathComponent("Package.swift").path) { return dir }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }

    /// `relative` in the current directory, then in the binary's repository.
    public static func find(_ relative: String,
                            currentDirectory: String = FileManager.default.currentDirectoryPath) -> (String?, [String]) {
        var candidates = ["\(currentDirectory)/\(relative)"]
        if let repository = binaryRepository() { candidates.append(repository.appendingPathComponent(relative).path) }
        return (firstExisting(candidates), candidates)
    }

    static func firstExisting(_ candidates: [String]) -> String? {
        candidates.first { FileManager.default.fileExists(atPath: $0) }.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
    }
}

/// RFC 4180 CSV text: a header and rows, fields quoted when they hold a comma, a quote or a line break.
public enum CSV {
    public static func field(_ text: String) -> String {
        guard text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return text }
        return "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    public static func render(header: [String], rows: [[String]]) -> String {
        ([header] + rows).map { $0.map(field).joined(separator: ",") }.joined(separator: "\n") + "\n"
    }
}

extension StateTransferReference {
    /// The reference script of a `--reference` option (a path, 'none', or nil: looked up), or why there is none.
    public static func resolve(_ reference: String?) -> (script: String?, missing: String?) {
        switch reference {
        case "none": return (nil, "skipped (--reference none)")
        case .some(let path): return (path, nil)
        case nil:
            let (found, tried) = find()
            return (found, found == nil ? "not found (looked for \(tried.joined(separator: ", ")))" : nil)
        }
    }
}

/// Stateful or stateless replacement (`measure` and `dysco-bench replace`).
public enum MigrationMode: String, Codable, Sendable, CaseIterable {
    /// fw2 strict (conntrack firewall): the firewall state moves with each session.
    case stateful
    /// fw2 open (no conntrack): no state moves, no data is held (the two-path rules only).
    case stateless
}

/// A session that did not move: its tuple, result, step and reason (as the agent reported).
public struct MigrationFailure: Codable, Sendable {
    public var session: String
    public var result: String
    public var failedStep: String
    public var reason: String

    public init(_ session: ReplaceReport.Session) {
        self.session = session.session.description
        result = session.result
        failedStep = session.failedStep
        reason = session.reason
    }

    /// The report's lines for the sessions that did not move, grouped by what happened.
    public static func lines(_ failures: [MigrationFailure]) -> [String] {
        guard !failures.isEmpty else { return [] }
        var grouped: [String: Int] = [:]
        for f in failures { grouped["\(f.result) at \(f.failedStep): \(f.reason)", default: 0] += 1 }
        return ["sessions not moved:"] + grouped.sorted { $0.value > $1.value }.map { "  \($0.value)× \($0.key)" }
    }
}

/// The prototype's per-session state move over ours.
public struct ReferenceRatios: Codable, Sendable {
    public var mode: MigrationMode
    /// ÷ our per-session total (p50).
    public var overTotalP50: Double?
    /// ÷ our state phase (p50; stateful only).
    public var overStateP50: Double?
    /// ÷ our batch time per moved session (what a batch costs per session).
    public var overBatchPerSession: Double?

    public init(mode: MigrationMode, overTotalP50: Double? = nil, overStateP50: Double? = nil, overBatchPerSession: Double? = nil) {
        self.mode = mode
        self.overTotalP50 = overTotalP50
        self.overStateP50 = overStateP50
        self.overBatchPerSession = overBatchPerSession
    }
}

/// What `measure` and the replace benchmark read from a lab running paced downloads through fw1.
public enum PacedLab {
    /// The sender-paced server's port (one of the replacement lab's policy ports).
    public static let port: UInt16 = 8090

    /// The agents' `dropped.*` control counters and fw1's `migrations.*` (product diagnostics), of those of the
    /// hosts the lab has (a removal lab has no fw2).
    public static func agentCounters(_ lab: Lab) async -> [String: [String: UInt64]] {
        var agentCounters: [String: [String: UInt64]] = [:]
        for host in ["fw1", "fw2", "client1", "server1"] where lab.hosts.contains(where: { $0.name == host }) {
            guard let snapshot = try? await Self.snapshot(lab, host) else { continue }
            let picked = snapshot.control.filter { $0.key.hasPrefix("dropped.") || (host == "fw1" && $0.key.hasPrefix("migrations.")) }
            if !picked.isEmpty { agentCounters[host] = picked }
        }
        return agentCounters
    }

    public static func snapshot(_ lab: Lab, _ host: String) async throws -> AgentSnapshot {
        try await ControlClient.snapshot(path: AgentControlPaths.socketPath(netns: lab.namespace(of: host)))
    }

    /// Established middlebox sessions of `host`'s agent to the paced server.
    /// A splicing proxy's joined records (its client's session and its own to the paced server) on `host`.
    public static func proxySessions(_ lab: Lab, _ host: String) async throws -> [AgentSnapshot.Session] {
        try await snapshot(lab, host).sessions.filter { $0.splicedTo?.dstPort == Self.port && $0.state != "closing" }
    }

    public static func pacedSessions(_ lab: Lab, _ host: String) async throws -> [AgentSnapshot.Session] {
        try await snapshot(lab, host).sessions.filter {
            $0.role == .middlebox && $0.session.dstPort == Self.port && $0.state == "established"
        }
    }

    /// `joinedProxy`: count the proxy's joined records instead (``proxySessions(_:_:)``) whose timestamp clocks are known
    /// (a removal before that waits for them at the gate, within its deadline).
    public static func waitForSessions(_ lab: Lab, on host: String, count: Int, downloads: PacedDownloads, timeout: TimeInterval,
                                       joinedProxy: Bool = false) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        var seen = 0
        while Date() < deadline {
            seen = joinedProxy ? try await Self.proxySessions(lab, host).filter { $0.spliceClocksKnown == true }.count
                : try await Self.pacedSessions(lab, host).count
            if seen >= count { return }
            if downloads.finishedCount() > 0 {
                throw LabError.setupFailed("a download ended before fw1 carried all \(count) sessions (\(seen) so far); "
                                           + "curl: \(ProcessInspector.tail(of: downloads.logPath(lab.hosts(.client)[0].name), lines: 5))")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw LabError.setupFailed("fw1 carries only \(seen) of \(count) sessions after \(Int(timeout)) s")
    }

    public static func sha256(_ path: String) throws -> String {
        String(try Command.run(["sha256sum", path]).stdout.split(separator: " ").first ?? "")
    }

    public static func micros(_ duration: Duration) -> UInt64 {
        UInt64(max(0, duration.components.seconds)) * 1_000_000 + UInt64(max(0, duration.components.attoseconds) / 1_000_000_000_000)
    }
}
