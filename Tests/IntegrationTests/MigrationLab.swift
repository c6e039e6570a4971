import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation

/// What the `replace` integration tests share: a sender-paced HTTP server (so sessions are mid-transfer when
/// they migrate, and the receiver never overruns: a clean baseline of zero retransmissions), parallel
/// downloads with sha256 checks, the `replace` CLI, and the "no byte lost" counters.
enum MigrationLab {
    /// The paced server's port (added to the lab's policy ports, so the chain carries it).
    static let pacedPort: UInt16 = 8090

    /// One case of a test parameterised by family (issue 18 (c)): its lab's name and subnet, and the sessions' family.
    struct Case: CustomStringConvertible, Sendable {
        var lab: String, subnet: String, family: AddressFamily = .ipv4
        var description: String { "\(lab)\(family == .ipv6 ? ", IPv6" : "")" }
    }

    /// `family` .ipv6: a dual-stack lab (``LabSpec/ipv6``), whose tests run their sessions over IPv6 (issue 18 (c):
    /// the chain, migration, drain, restart and attack tests parameterised by family).
    static func spec(_ name: String, subnet: String, middleboxes: [String] = ["fw1", "fw2"], chain: [String]? = nil,
                     agentArguments: [String] = [], firewallProfiles: [String: FirewallProfile] = [:],
                     attackers: Int = 0, clients: Int = 1, family: AddressFamily = .ipv4) -> LabSpec {
        LabSpec(name: name, clients: clients, middleboxes: middleboxes, chain: chain, subnet: subnet,
                policyPorts: [80, pacedPort], agentArguments: ["--close-linger", "60"] + agentArguments,
                firewallProfiles: firewallProfiles, attackers: attackers, ipv6: family == .ipv6)
    }

    /// The sender-paced server (``PacedHTTPServer`` in DyscoLab, shared with `measure` and `dysco-bench replace`) on server1, with
    /// immediate ACKs at the endpoints (``Lab/enableQuickAck()``): the baseline is then zero retransmissions,
    /// and any retransmission in a test is the path's.
    static func quickAck(_ lab: Lab) throws { try lab.enableQuickAck() }

    /// On server1's address of `family`.
    static func startPacedServer(_ lab: Lab, megabytesPerSecond: Double, family: AddressFamily = .ipv4) throws {
        try quickAck(lab)
        try PacedHTTPServer.start(lab, port: pacedPort, bytesPerSecond: megabytesPerSecond * 1_048_576,
                                  ipv6: family == .ipv6)
    }

    /// `count` parallel downloads of `file` from the paced server, running in the background.
    /// With several `clients`, the downloads are spread over them (one curl each, `count` in all).
    final class Downloads: @unchecked Sendable {
        let processes: [Process]
        let outputs: [String]
        let expectedBytes: Int
        /// `curlOptions` go before the URLs (e.g. `-i`: the response headers are kept in each output). `family`:
        /// server1's address of that family (the paced server started with the same family).
        init(_ lab: Lab, file: String, count: Int, timeout: Int = 120, clients: [String] = ["client1"],
             curlOptions: [String] = [], family: AddressFamily = .ipv4) throws {
            let server = try lab.address(of: "server1", family: family).urlHost
            var outputs: [String] = []
            var processes: [Process] = []
            for (c, client) in clients.enumerated() {
                let mine = Array(stride(from: c, to: count, by: clients.count))
                guard !mine.isEmpty else { continue }
                var args = ["curl", "-sS", "--fail", "-g", "-m", "\(timeout)", "--parallel", "--parallel-immediate",
                            "--parallel-max", "\(mine.count)"] + curlOptions
                for i in mine {
                    let out = "\(lab.directory)/dl\(i).out"
                    outputs.append(out)
                    args += ["-o", out, "http://\(server):\(pacedPort)/\(file)"]
                }
                let log = c == 0 ? "\(lab.directory)/curl.log" : "\(lab.directory)/curl-\(client).log"
                processes.append(try lab.spawn(client, args, logPath: log))
            }
            self.outputs = outputs
            self.processes = processes
            expectedBytes = ((try? FileManager.default.attributesOfItem(atPath: "\(lab.httpRoot)/\(file)"))?[.size] as? Int) ?? 0
        }

        /// Waits for every curl; true if all exited 0. With `diagnose`, a download that stops growing for
        /// `stalledAfter` seconds while unfinished gets `MigrationLab.stallReport` printed once (what each agent,
        /// endpoint socket and firewall holds for it), so a failure explains itself; the verdict is still curl's.
        func wait(diagnose lab: Lab? = nil, stalledAfter: TimeInterval = 10) -> Bool {
            if let lab {
                var sizes = outputs.map { _ in -1 }
                var since = outputs.map { _ in Date() }
                var reported = false
                while processes.contains(where: \.isRunning), !reported {
                    Thread.sleep(forTimeInterval: 0.5)
                    for (i, out) in outputs.enumerated() {
                        let size = ((try? FileManager.default.attributesOfItem(atPath: out))?[.size] as? Int) ?? 0
                        if size != sizes[i] { sizes[i] = size; since[i] = Date() }
                        if !reported, size < expectedBytes, processes.contains(where: \.isRunning),
                           Date().timeIntervalSince(since[i]) > stalledAfter {
                            reported = true
                            MigrationLab.stallReport(lab, stalled: out, bytes: size)
                        }
                    }
                }
            }
            return processes.allSatisfy { process in
                process.waitUntilExit()
                return process.terminationStatus == 0
            }
        }
    }

    /// Sessions of `host`'s agent whose destination port is the paced server's.
    /// (`anyState`: closing ones too.)
    static func pacedSessions(_ lab: Lab, _ host: String, anyState: Bool = false) async throws -> [AgentSnapshot.Session] {
        try await TestSupport.snapshot(lab, host).sessions.filter {
            $0.session.dstPort == pacedPort && (anyState || $0.state == "established")
        }
    }

    /// Waits until fw1 carries `count` established paced sessions that have moved data.
    static func waitForSessions(_ lab: Lab, on host: String, count: Int, timeout: TimeInterval = 20) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try await pacedSessions(lab, host).count >= count { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw LabError.setupFailed("fewer than \(count) sessions through \(host) after \(timeout) s")
    }

    /// Waits until `host`'s agent carries at least `count` established paced sessions and the kernel carries every
    /// one of them (the steady state a migration starts from; with --no-fastpath, once they are established).
    static func waitForKernelCarried(_ lab: Lab, on host: String, count: Int, timeout: TimeInterval = 20) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let snapshot = try await TestSupport.snapshot(lab, host)
            let sessions = snapshot.sessions.filter { $0.session.dstPort == pacedPort && $0.state == "established" }
            if sessions.count >= count, !snapshot.fastPath || sessions.allSatisfy({ $0.carrier == .kernel }) { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw LabError.setupFailed("\(host): fewer than \(count) paced sessions carried by the kernel after \(timeout) s")
    }

    /// Waits until each of `host`'s established paced sessions (at least `count`) would survive its agent's crash:
    /// carried by the kernel, or its ingress keys in the pinned `dysco_owned` (docs/BPF.md "Owned keys"). `bpfPins`:
    /// the bpffs the agents pin under (nil: the lab's own, ``LabPaths/bpfFs(_:)``).
    static func waitUntilRestartSafe(_ lab: Lab, _ host: String, count: Int, timeout: TimeInterval = 20,
                                     bpfPins: String? = nil) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let sessions = try await pacedSessions(lab, host)
            let owned = try bpfOwnedKeys(lab, host, pins: bpfPins ?? LabPaths.bpfFs(lab.name), hook: .ingress)
            let safe = sessions.filter { s in
                s.carrier == .kernel || ([s.left, s.right?.reversed].compactMap { $0 }.allSatisfy { owned.contains($0) })
            }
            if sessions.count >= count, safe.count == sessions.count { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw LabError.setupFailed("\(host): fewer than \(count) paced sessions safe across a restart after \(timeout) s")
    }

    /// The keys of `hook` in `host`'s pinned `dysco_owned` map (the agent pins under `pins`, queue 7).
    static func bpfOwnedKeys(_ lab: Lab, _ host: String, pins: String, hook: BPFHook) throws -> Set<FiveTuple> {
        let map = "\(pins)/dysco-\(lab.namespace(of: host))-q7/dysco_owned"
        return Set(try BPFDatapath.pinnedOwnedKeys(mapPath: map).filter { $0.hook == hook }.map(\.tuple))
    }

    /// A CLI command run as an operator would, with its `--json` report decoded (nil if it printed none).
    struct CLIRun<Report: Decodable & Sendable>: Sendable {
        var report: Report?
        var status: Int32
        var stdout: String
        var stderr: String

        init(_ arguments: [String]) throws {
            let result = try Command.run([try TestSupport.dyscoBinary()] + arguments + ["--json"], check: false)
            report = try? JSONDecoder().decode(Report.self, from: Data(result.stdout.utf8))
            status = result.status
            stdout = result.stdout
            stderr = result.stderr
        }
    }
    typealias ReplaceRun = CLIRun<ReplaceReport>

    /// Runs `dysco-migrate replace --lab … --json`.
    static func replace(_ lab: Lab, old: String, new: String, extra: [String] = []) throws -> ReplaceRun {
        try ReplaceRun(["replace", "--lab", lab.name, "--old", old, "--new", new] + extra)
    }

    /// The endpoints' retransmission counters (client1 + server1).
    static func retransmissions(_ lab: Lab) throws -> UInt64 {
        try TestSupport.tcpRetransmissions(lab, "client1") + TestSupport.tcpRetransmissions(lab, "server1")
    }

    /// The endpoints' TCP loss counters (every client + server1), shared with `measure` (``TCPLossCounters``).
    typealias LossCounters = TCPLossCounters

    static func lossCounters(_ lab: Lab) throws -> LossCounters {
        try lab.tcpLossCounters(lab.hosts(.client).map(\.name) + ["server1"])
    }

    /// The strict "no retransmission caused by a migration" measure (issue 16 item 3): the endpoints' counters
    /// sampled every `step` for `seconds` before the window (``sampleBefore(_:seconds:step:)``), then the window
    /// itself (``measure(_:)``); the baseline is the same-length stretch just before it (its length rounded up to
    /// the sampling step, so the baseline is never shorter than the window).
    struct StrictWindow {
        /// Retransmissions other than tail-loss probes, and the receivers' signs of reordering (out-of-order queue,
        /// SACK reordering): what a hand-over that lets a later packet overtake an earlier one shows. Tail-loss
        /// probes are a stall's (a sender whose ACKs come late while a migration holds its session), recorded apart.
        static func reordering(_ c: LossCounters) -> (retransmitted: Int64, signs: Int64) {
            let signs = c.detail.filter { $0.key.hasSuffix(".TcpExtTCPOFOQueue") || $0.key.hasSuffix(".TcpExtTCPSACKReorder") }
            // A probe may send new data (not a retransmission): never below zero.
            return (max(0, Int64(c.retransmitted) - Int64(c.lossProbes)), Int64(signs.values.reduce(0, +)))
        }

        var samples: [(at: ContinuousClock.Instant, counters: LossCounters)] = []

        static func sampleBefore(_ lab: Lab, seconds: Double = 2, step: Duration = .milliseconds(100)) throws -> StrictWindow {
            var window = StrictWindow()
            let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
            while true {
                window.samples.append((ContinuousClock.now, try MigrationLab.lossCounters(lab)))
                if ContinuousClock.now >= end { return window }
                Thread.sleep(forTimeInterval: Double(step.components.attoseconds) / 1e18 + Double(step.components.seconds))
            }
        }

        /// Runs `body` (the migration) and returns the window's counters, the baseline's, and the window's length.
        func measure<T>(_ lab: Lab, _ body: () throws -> T) throws -> (result: T, window: LossCounters, baseline: LossCounters, length: Duration) {
            let start = try MigrationLab.lossCounters(lab)
            let began = ContinuousClock.now
            let result = try body()
            let length = ContinuousClock.now - began
            let window = try MigrationLab.lossCounters(lab) - start
            let last = samples.last!
            // The latest sample at least `length` before the last one (the earliest if the window is longer than
            // the sampled stretch: then the baseline is all of it).
            let from = samples.last { last.at - $0.at >= length } ?? samples.first!
            return (result, window, last.counters - from.counters, length)
        }
    }

    /// Prints (stderr) what the lab holds for the paced sessions when a download stalls: each agent's sessions
    /// and control counters, the endpoints' sockets (`ss -tin`), the firewalls' conntrack entries and counters.
    static func stallReport(_ lab: Lab, stalled: String, bytes: Int) {
        var lines = ["STALL: \(stalled) stopped at \(bytes) bytes"]
        let binary = (try? TestSupport.dyscoBinary()) ?? "dysco-migrate"
        for host in ["client1", "server1", "fw1", "fw2"] {
            let out = (try? Command.run([binary, "sessions", "--netns", lab.namespace(of: host), "--json"], check: false).stdout) ?? "?"
            lines.append("agent \(host):\n\(out)")
        }
        for host in ["client1", "server1"] {
            lines.append("ss \(host):\n" + ((try? lab.exec(host, ["ss", "-tin", "state", "established"], check: false).stdout) ?? "?"))
        }
        for mb in ["fw1", "fw2"] {
            lines.append("conntrack \(mb):\n" + ((try? lab.exec(mb, ["conntrack", "-L", "-p", "tcp", "--orig-port-dst", "\(pacedPort)"], check: false).stdout) ?? "?"))
            lines.append("iptables \(mb):\n" + ((try? lab.exec(mb, ["iptables", "-vnL", "FORWARD"], check: false).stdout) ?? "?"))
        }
        FileHandle.standardError.write(Data((lines.joined(separator: "\n") + "\n").utf8))
    }

    /// Every download equals the served file.
    static func allIntact(_ outputs: [String], original: String) throws -> [String] {
        let expected = try TestSupport.sha256(original)
        return try outputs.filter { try TestSupport.sha256($0) != expected }
    }
}
