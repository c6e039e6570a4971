import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Logging

/// `measure --experiment removal` (paper §5, "Middlebox deletion", Figs. 12 and 13): clients client1…clientK →
/// fw1 → server1, N paced downloads in K bundles (bundle k = the sessions of client k + 1, as the paper's
/// client–server pairs), and at evenly spaced times (``removalSchedule(bundles:seconds:notBefore:)``) fw1 is
/// removed from one bundle after the other with the `remove` CLI (`--box fw1 --match src=CLIENTk`), so every
/// bundle ends up going client → server directly. The paper removes a session-terminating proxy: fw1 is a plain
/// forwarding box (firewall profile open: a removal moves no state), unless `--proxy`:
/// fw1 then runs HAProxy in TCP mode with libdysco-splice.so preloaded, the clients download through it (their
/// chains end at fw1, fw1's own sessions go to server1), its agent joins each pair of sessions it splices
/// (`agent --splice join`) and each bundle's `remove --box fw1` takes the proxy out.
extension MeasureBenchmark {
    public enum Experiment: String, Codable, Sendable, CaseIterable {
        /// Bundle 1 moves fw1 → fw2 halfway (the paper's Fig. 15), stateful and/or stateless.
        case replacement
        /// fw1 is removed from each bundle in turn (the paper's §5 middlebox deletion, Figs. 12 and 13).
        case removal
    }

    /// One bundle's removal: the `remove` command's window and report, and the bundle's goodput around it.
    public struct BundleRemoval: Codable, Sendable {
        public var bundle: Int
        public var host: String
        public var sessions: Int
        /// When the schedule put it and when the command ran, seconds since the downloads started.
        public var scheduledAt: Double
        public var windowStart: Double
        public var windowEnd: Double
        public var command: String
        public var exitStatus: Int32
        public var matched: Int
        public var moved: Int
        public var failures: [MigrationFailure]
        /// The agent's batch for the bundle, µs.
        public var batchMicroseconds: UInt64
        /// The endpoints' TCP counters during the command.
        public var lossDuring: TCPLossCounters
        /// Sessions × rate.
        public var pacedMiBps: Double
        /// The bundle's goodput before its removal, during it and after it (in the steady part of the run).
        public var goodput: Goodput.PhaseMeans

        /// This removal's window in the run's steady part (what ``Goodput/means`` splits the bins by).
        public func timeline(steadyFrom: Double, steadyUntil: Double) -> Goodput.Timeline {
            Goodput.Timeline(steadyFrom: steadyFrom, windowStart: windowStart, windowEnd: windowEnd, steadyUntil: steadyUntil)
        }
    }

    public struct RemovalRun: Codable, Sendable {
        public var lab: String
        public var subnet: String
        /// fw1's firewall profile (open: a forwarding box).
        public var fw1Profile: String
        /// fw1 was a splicing proxy (HAProxy, TCP mode) rather than a forwarding box.
        public var proxy: Bool?
        public var sessions: Int
        public var bundles: [Bundle]
        public var removals: [BundleRemoval]
        public var matched: Int
        public var moved: Int
        /// Per moved session: trigger → release, the paper's measure (new-path SYN → new path used), each phase.
        public var latency: MigrationLatency
        public var perSession: [SessionLatency]
        /// The CDFs of the paper's measure and of the whole removal, with the shares under 2 and 4 ms.
        public var paperCDF: LatencyCDF
        public var totalCDF: LatencyCDF
        public var binSeconds: Double
        public var steadyFrom: Double
        public var steadyUntil: Double
        public var bins: [Goodput.Bin]
        /// The endpoints' TCP counters during the removals (summed) and outside them.
        public var lossDuring: TCPLossCounters
        public var lossOutside: TCPLossCounters
        /// Established paced sessions fw1 still carries after the last removal (expected 0).
        public var fw1SessionsAfter: Int
        public var sessionsReset: UInt64
        public var downloadsIntact: Int
        public var downloadsFailed: Int
        public var bytesChecked: Int64
        public var downloadProblems: [String]
        public var agentCounters: [String: [String: UInt64]]
    }

    /// When each bundle's removal starts, seconds since the downloads started: bundle k (1…K) at k/(K+1) of the
    /// transfer time, evenly spaced, but none before `notBefore` (every session established and steady).
    public static func removalSchedule(bundles: Int, seconds: Double, notBefore: Double = 0) -> [Double] {
        guard bundles > 0 else { return [] }
        return (1...bundles).map { max(seconds * Double($0) / Double(bundles + 1), notBefore) }
    }

    /// The removal experiment's lab: `bundles` clients → fw1 (open, forwarding) → server1 on the paced port.
    public func removalSpec(binary: String?) -> LabSpec {
        LabSpec(name: options.labName, clients: options.bundles, middleboxes: ["fw1"], chain: ["fw1"], subnet: options.subnet,
                policyPorts: [PacedLab.port], agentArguments: options.agentArguments + (options.proxy ? ["--splice", "join"] : []),
                agentBinary: binary, firewallProfiles: ["fw1": .open])
    }

    /// HAProxy's port on fw1.
    public static let proxyPort: UInt16 = 8080

    /// The proxy variant's setup: policies with empty chains (clients → fw1:8080, fw1 → server1), HAProxy on fw1 with
    /// the interposer beside `binary`.
    func startProxy(_ lab: Lab, binary: String) async throws {
        let library = URL(fileURLWithPath: binary).deletingLastPathComponent().appendingPathComponent("libdysco-splice.so").path
        guard FileManager.default.fileExists(atPath: library) else {
            throw LabError.setupFailed("no \(library): build it with `make release`")
        }
        let proxy = lab.address(of: "fw1"), server = lab.address(of: "server1")
        let toProxy = Policy(name: "to-proxy", match: SessionPredicate(dst: IPPrefix("\(proxy)/32"),
                                                                         dport: [PortRange(lower: Self.proxyPort, upper: Self.proxyPort)]), chain: [])
        let toServer = Policy(name: "to-server", match: SessionPredicate(dst: IPPrefix("\(server)/32"),
                                                                         dport: [PortRange(lower: PacedLab.port, upper: PacedLab.port)]), chain: [])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        for (host, policy) in lab.hosts(.client).map({ ($0.name, toProxy) }) + [("fw1", toServer)] {
            try encoder.encode(AgentConfig(policies: [policy])).write(to: URL(fileURLWithPath: LabPaths.agentConfig(lab.name, host: host)))
            _ = try await ControlClient.request(ControlRequest(.policy, policy: PolicyRequest(.reload)),
                                                path: AgentControlPaths.socketPath(netns: lab.namespace(of: host)))
        }
        let config = """
            global
                maxconn 4000
            defaults
                mode tcp
                option splice-request
                option splice-response
                timeout connect 5s
                timeout client 300s
                timeout server 300s
            frontend downloads
                bind \(proxy):\(Self.proxyPort)
                default_backend paced
            backend paced
                server server1 \(server):\(PacedLab.port)

            """
        let path = "\(lab.directory)/haproxy.cfg"
        try config.write(toFile: path, atomically: true, encoding: .utf8)
        _ = try lab.spawn("fw1", ["env", "LD_PRELOAD=\(library)",
                                  "DYSCO_CONTROL_SOCKET=\(AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1")))",
                                  "DYSCO_SPLICE_LOG=\(lab.directory)/splice.log", "haproxy", "-f", path, "-db"],
                          logPath: "\(lab.directory)/haproxy.log")
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? lab.exec("fw1", ["ss", "-Hltn", "sport = :\(Self.proxyPort)"]).stdout.contains("LISTEN")) == true { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw LabError.setupFailed("haproxy does not listen on fw1:\(Self.proxyPort): \(ProcessInspector.tail(of: "\(lab.directory)/haproxy.log", lines: 5))")
    }

    func measureRemoval(binary: String) async throws -> RemovalRun {
        try await Lab.withBenchmarkLab(removalSpec(binary: binary), logger: logger) { lab in
            try await measureRemoval(lab: lab, binary: binary)
        }
    }

    private func measureRemoval(lab: Lab, binary: String) async throws -> RemovalRun {
        if options.proxy { try await startProxy(lab, binary: binary) }
        let live = try await startDownloads(lab, via: options.proxy ? (lab.address(of: "fw1"), Self.proxyPort) : nil)
        defer { live.sampler.stop() }
        let sampler = live.sampler, clients = live.clients, endpoints = live.endpoints
        let schedule = Self.removalSchedule(bundles: clients.count, seconds: options.seconds, notBefore: live.steadyFrom + 0.5)
        struct Window {
            var scheduledAt: Double, start: Double, end: Double, command: [String], status: Int32
            var report: ReplaceReport, loss: TCPLossCounters
        }
        var windows: [Window] = []
        for (b, client) in clients.enumerated() {
            let wait = schedule[b] - sampler.elapsed()
            if wait > 0 { try await Task.sleep(for: .milliseconds(Int(wait * 1000))) }
            let arguments = [binary, "remove", "--lab", lab.name, "--box", "fw1", "--match", "src=\(client.address)",
                             "--deadline", "\(options.deadlineMilliseconds)", "--json"]
            logger.info("removing fw1 from one bundle", metadata: ["measure.bundle": "\(client.name)"])
            let before = try lab.tcpLossCounters(endpoints)
            let (start, result, report, _, end) = try reconfigure(arguments, sampler: sampler)
            let loss = try lab.tcpLossCounters(endpoints) - before
            windows.append(Window(scheduledAt: schedule[b], start: start, end: end, command: arguments, status: result.status,
                                  report: report, loss: loss))
        }
        let fw1After = options.proxy ? try await PacedLab.proxySessions(lab, "fw1").count : try await PacedLab.pacedSessions(lab, "fw1").count

        logger.info("waiting for the downloads to finish", metadata: ["measure.fw1After": "\(fw1After)"])
        let end = try await finishDownloads(live, lab: lab)
        let steadyUntil = end.steadyUntil ?? windows.last?.end ?? 0
        let bundles = clients.enumerated().map { b, host in
            Bundle(index: b, host: host.name, address: host.address.description, sessions: options.sessions(inBundle: b), migrated: true)
        }
        let removals = zip(bundles, windows).map { bundle, w in
            var removal = BundleRemoval(
                bundle: bundle.index, host: bundle.host, sessions: bundle.sessions, scheduledAt: w.scheduledAt,
                windowStart: w.start, windowEnd: w.end, command: (["dysco-migrate"] + w.command.dropFirst()).joined(separator: " "),
                exitStatus: w.status, matched: w.report.matched, moved: w.report.sessions.filter { $0.result == "moved" }.count,
                failures: w.report.sessions.filter { $0.result != "moved" }.map(MigrationFailure.init),
                batchMicroseconds: w.report.elapsedMicroseconds, lossDuring: w.loss,
                pacedMiBps: Double(bundle.sessions) * options.rateMiBps,
                goodput: Goodput.PhaseMeans(before: 0, during: 0, after: 0, binsBefore: 0, binsDuring: 0, binsAfter: 0))
            removal.goodput = Goodput.means(end.bins, bundle: bundle.index,
                                            timeline: removal.timeline(steadyFrom: live.steadyFrom, steadyUntil: steadyUntil))
            return removal
        }
        let sessions = windows.flatMap(\.report.sessions)
        let moved = sessions.filter { $0.result == "moved" }.compactMap(\.phases)
        let perSession = sessions.map { s in
            SessionLatency(session: s.session.description, bundle: clients.firstIndex { $0.address == s.session.srcAddr } ?? -1,
                           result: s.result, failedStep: s.failedStep, reason: s.reason, phases: s.phases)
        }
        let lossDuring = windows.map(\.loss).reduce(TCPLossCounters(), +)
        return RemovalRun(
            lab: lab.name, subnet: lab.subnet.description, fw1Profile: lab.firewallProfile(of: "fw1").rawValue,
            proxy: options.proxy ? true : nil,
            sessions: options.sessions, bundles: bundles, removals: removals,
            matched: removals.map(\.matched).reduce(0, +), moved: removals.map(\.moved).reduce(0, +),
            latency: MigrationLatency(moved), perSession: perSession,
            paperCDF: LatencyCDF(moved.compactMap(\.paper)), totalCDF: LatencyCDF(moved.compactMap(\.total)),
            binSeconds: Self.binSeconds, steadyFrom: live.steadyFrom, steadyUntil: steadyUntil, bins: end.bins,
            lossDuring: lossDuring, lossOutside: (end.loss - live.loss0) - lossDuring, fw1SessionsAfter: fw1After,
            sessionsReset: (end.loss - live.loss0).establishedResets, downloadsIntact: end.intact,
            downloadsFailed: end.failed, bytesChecked: end.bytesChecked, downloadProblems: end.problems,
            agentCounters: end.agentCounters)
    }
}

extension MeasureBenchmark.RemovalRun {
    /// What went wrong (a session that did not leave fw1, a download that is not byte-exact, a reset): empty when nothing did.
    public var problems: [String] {
        var found: [String] = []
        if moved < sessions { found.append("removal: \(sessions - moved) of \(sessions) sessions did not leave fw1") }
        if downloadsIntact < sessions { found.append("removal: \(sessions - downloadsIntact) downloads not byte-exact") }
        if sessionsReset > 0 { found.append("removal: \(sessionsReset) sessions reset") }
        return found
    }

    /// The terminal lines of a removal experiment.
    public func lines(settings: MeasureBenchmark.Settings) -> [String] {
        func ms(_ us: UInt64) -> String { String(format: "%.2f", Double(us) / 1000) }
        func f(_ v: Double) -> String { String(format: "%.2f", v) }
        func pct(_ v: Double) -> String { String(format: "%.1f %%", v * 100) }
        func cell(_ s: String, _ width: Int) -> String {
            s.count >= width ? s + " " : String(repeating: " ", count: width - s.count) + s
        }
        let mib = Double(settings.bytesPerSession) / 1_048_576
        var lines = ["measure, removal (paper §5 middlebox deletion): \(sessions) sessions in \(bundles.count) bundles ("
                     + bundles.map { "\($0.host) \($0.sessions)" }.joined(separator: ", ") + "), "
                     + String(format: "%.1f MiB each paced at %g MiB/s", mib, settings.rateMiBps)
                     + "; lab \(lab) \(subnet); clients → fw1 → server1, fw1 removed from one bundle after the other"]
        if proxy == true {
            lines.append("note: fw1 runs HAProxy (TCP mode, splice, libdysco-splice.so): the paper's session-terminating proxy; "
                         + "its agent joined each download's two sessions, a removal takes the proxy out (no state moves)")
        } else {
            lines.append("note: fw1 is a plain forwarding box (firewall \(fw1Profile)), not the paper's session-terminating proxy "
                         + "(`--proxy` for HAProxy); a removal moves no state")
        }
        for r in removals {
            lines.append("  \(r.host): `\(r.command)` (exit \(r.exitStatus)) at "
                         + String(format: "%.2f–%.2f s (scheduled %.2f s)", r.windowStart, r.windowEnd, r.scheduledAt)
                         + ", moved \(r.moved)/\(r.sessions) (matched \(r.matched)), batch \(ms(r.batchMicroseconds)) ms")
        }
        lines.append("sessions moved off fw1: \(moved)/\(sessions) (matched \(matched)); fw1 carries \(fw1SessionsAfter) after the last removal")
        if moved > 0 {
            lines.append("removals under 2 ms: \(pct(paperCDF.under2ms)) (paper 80 %), under 4 ms: \(pct(paperCDF.under4ms)) "
                         + "(paper 98.7 %) — the paper's measure, new-path SYN → new path used, \(paperCDF.count) sessions")
            lines.append("whole removal (trigger → release): under 2 ms \(pct(totalCDF.under2ms)), under 4 ms \(pct(totalCDF.under4ms))")
            lines += latency.table(stateless: true, why: "a removal moves no state")
        } else {
            lines.append("no session left fw1: no latency figures (see \"sessions not moved\" below)")
        }
        lines.append("goodput per bundle around its own removal, MiB/s (\(Int(binSeconds * 1000)) ms bins at the receiver; steady "
                     + String(format: "%.1f–%.1f s)", steadyFrom, steadyUntil))
        lines.append("  bundle".padding(toLength: 14, withPad: " ", startingAt: 0) + cell("paced", 9) + cell("before", 9)
                     + cell("during", 9) + cell("after", 9) + cell("retrans", 9) + cell("RTOs", 6) + cell("resets", 8))
        for r in removals {
            lines.append("  \(r.host)".padding(toLength: 14, withPad: " ", startingAt: 0) + cell(f(r.pacedMiBps), 9)
                         + cell(f(r.goodput.before), 9) + cell(f(r.goodput.during), 9) + cell(f(r.goodput.after), 9)
                         + cell("\(r.lossDuring.retransmitted)", 9) + cell("\(r.lossDuring.timeouts)", 6)
                         + cell("\(r.lossDuring.establishedResets)", 8))
        }
        lines.append("removal windows: TCP retransmissions \(lossDuring.retransmitted) (\(lossDuring.spurious) spurious by DSACK, "
                     + "\(lossDuring.timeouts) RTOs, \(lossDuring.establishedResets) resets); outside them \(lossOutside.retransmitted) "
                     + "(\(lossOutside.spurious) spurious, \(lossOutside.timeouts) RTOs)")
        lines.append("bytes checked: \(downloadsIntact)/\(sessions) downloads byte-exact (sha256 of each against the served file), "
                     + "\(bytesChecked) bytes; sessions reset \(sessionsReset), downloads failed \(downloadsFailed)")
        lines += PacedDownloads.problemLines(downloadProblems) + MigrationFailure.lines(removals.flatMap(\.failures))
        return lines
    }
}
