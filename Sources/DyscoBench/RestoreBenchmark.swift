import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// `dysco-bench restore`: how long a restarted agent takes to put N sessions back (docs/ARCHITECTURE.md, "Agent crash and
/// restart"). In a namespace of its own (`bench-rs`, no interface but lo: nothing else is touched), it builds a
/// synthetic state file of N established middlebox sessions and the pinned session map a predecessor would have
/// left (every session in the kernel: four entries each, on a bpffs mounted for the benchmark), then starts a real
/// agent on them: read + restore + reconcile, the map taken over, the queue rules, and the journal compacted.
/// Figures, no assertions.
public enum RestoreBenchmark {
    public static let namespace = "bench-rs"
    /// The bpffs the predecessor's maps are pinned under (mounted on the host by ``run(sessions:bench:agent:logger:)``,
    /// so the agent, under its own `ip netns exec`, finds them).
    public static let bpffs = "/run/dysco-migrate/bench-restore-bpf"
    /// The agent's own directory on it (`dysco-<netns>-q<queue>`, queue 7).
    static var pinDirectory: String { "\(bpffs)/dysco-\(namespace)-q7" }
    /// The agent's map size for its default --max-sessions (four translations a session).
    static var maxEntries: UInt32 { UInt32(PacketProcessor.Settings().maxSessions * 4) }

    public struct Report: Codable, Sendable {
        public var sessions = 0
        public var stateFileBytes = 0
        /// Writing the predecessor's map entries from scratch (batched map updates, for comparison).
        public var predecessorInstallSeconds = 0.0
        /// Reading the state file, restoring the records, reconciling with the kernel's listing.
        public var readSeconds = 0.0
        /// Of which: reading the pinned session map.
        public var listSeconds = 0.0
        /// Taking the map over: kept as it is when it holds exactly the carried sessions, else rebuilt.
        public var kernelSeconds = 0.0
        /// Installing the queue rules (iptables-restore).
        public var rulesSeconds = 0.0
        /// The agent's whole start as a restart sees it: from the process's spawn to its control socket (ready).
        public var totalSeconds = 0.0
        public var restored = 0
        public var kernelSessions = 0
        /// Sessions with entries in the map after the start.
        public var kernelChains = 0
        /// The agent found the map as expected and kept it (only the owned keys set again).
        public var tableKept = false
        public var sessionsPerSecond: Double { totalSeconds > 0 ? Double(restored) / totalSeconds : 0 }

        public var text: String {
            func f(_ s: Double) -> String { String(format: "%.3f s", s) }
            return """
                restore of \(sessions) sessions (state file \(stateFileBytes) bytes)
                  read + restore + reconcile  \(f(readSeconds))  (of which the kernel's listing \(f(listSeconds)))
                  kernel re-attach            \(f(kernelSeconds))  (\(tableKept ? "map kept, owned keys set" : "map rebuilt"); \
                \(kernelSessions) sessions in the kernel, \(kernelChains) with map entries after the start)
                  queue rules                 \(f(rulesSeconds))
                  agent start in all          \(f(totalSeconds))  \(Int(sessionsPerSecond)) sessions/s
                  (a predecessor installing them from scratch: \(f(predecessorInstallSeconds)))
                """
        }
    }

    /// The inner half, in the scratch namespace (``namespace``): writes the state file and the predecessor's pinned
    /// map (programs from `bpfObject`); the agent started next finds both.
    public static func runInside(sessions: Int, bpfObject: String, logger: Logger) throws -> Report {
        var report = Report()
        report.sessions = sessions
        let dir = "/run/dysco-migrate"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let socket = "\(dir)/bench-restore.sock"
        let statePath = AgentControlPaths.statePath(socketPath: socket)

        // N middlebox sessions: client i → fw → server, left from the client's port, right from ours.
        let range: ClosedRange<UInt16> = 10000...60000
        var table = SessionTable(portRange: range)
        let fw = IPAddress(10, 79, 69, 101), server = IPAddress(10, 79, 69, 201)
        for i in 0..<sessions {
            let client = IPAddress(10, 79, 69, UInt8(10 + i % 40))
            let port = UInt16(1024 + i / 40)
            let session = FiveTuple(srcAddr: client, srcPort: port, dstAddr: server, dstPort: 80)
            let left = FiveTuple(srcAddr: client, srcPort: port, dstAddr: fw, dstPort: 80)
            let id = try table.insertFromLeft(session: session, left: left, remaining: [server], now: 1)
            try table.openRight(id, local: fw, next: server)
            table.update(id) { record in
                record.remaining = []
                record.rightEstablished = true
                record.established = true
                record.packets = 100
            }
        }
        var written = Set<SessionTable.SessionID>()
        let bytes = SessionStateFile.snapshot(table, written: &written)
        report.stateFileBytes = bytes.count
        try Data(bytes).write(to: URL(fileURLWithPath: statePath))

        // The map a crashed predecessor leaves: every session in the kernel (four entries each).
        let carried = table.records.keys.sorted().map { ($0, table.records[$0]!.fastPathTranslations) }
        try FileManager.default.createDirectory(atPath: pinDirectory, withIntermediateDirectories: true)
        let datapath = try BPFDatapath(objectPath: bpfObject, pinDirectory: pinDirectory, maxEntries: maxEntries)
        let entries = BPFSessionListing.expected(carried).map { ($0.key, $0.value) }
        let installStart = DispatchTime.now().uptimeNanoseconds
        for start in stride(from: 0, to: entries.count, by: 4096) {
            try datapath.writeBatch(Array(entries[start..<min(start + 4096, entries.count)]))
        }
        report.predecessorInstallSeconds = Double(DispatchTime.now().uptimeNanoseconds - installStart) / 1e9

        return report
    }

    /// The timings a restarted agent logs ("sessions restored": state.read_seconds=… state.kernel_seconds=…).
    static func loggedSeconds(_ log: String, _ key: String) -> Double? {
        guard let range = log.range(of: "\(key)=") else { return nil }
        return Double(log[range.upperBound...].prefix { $0.isNumber || $0 == "." || $0 == "e" || $0 == "-" })
    }

    /// The outer half, in the initial namespace: builds the scratch namespace and mounts ``bpffs``, prepares the
    /// files and the map in it (`bench` runs `dysco-bench restore --inside`), starts a real agent there (`agent`, a `dysco-migrate`)
    /// with the state file (the same command line a restart uses), waits for its control socket and reads what it restored, then stops it with
    /// --cleanup-on-exit and removes the namespace.
    public static func run(sessions: Int, bench: String, agent agentBinary: String, logger: Logger) throws -> Report {
        if NetworkNamespace.exists(namespace) { try Command.run(["ip", "netns", "delete", namespace]) }
        try Command.run(["ip", "netns", "add", namespace])
        // Foundation's Process and CFSocket need loopback (a wake-up socket pair over 127.0.0.1): without it a
        // child's exit is never noticed.
        try Command.run(["ip", "link", "set", "lo", "up"], netns: namespace)
        defer { _ = try? Command.run(["ip", "netns", "delete", namespace], check: false) }
        let dir = "/run/dysco-migrate"
        let socket = "\(dir)/bench-restore.sock", key = "\(dir)/bench-restore.key", log = "\(dir)/bench-restore.log"
        defer {
            for path in [socket, key, log, AgentControlPaths.statePath(socketPath: socket)] { unlink(path) }
        }
        guard let object = BenchDatapath.bpfObject(agentBinary: agentBinary) else {
            throw LabError.setupFailed("no dysco.bpf.o where \(agentBinary) looks for it (build it with `make bpf`)")
        }
        try FileManager.default.createDirectory(atPath: bpffs, withIntermediateDirectories: true)
        _ = try? Command.run(["umount", bpffs])
        try Command.run(["mount", "-t", "bpf", "bpf", bpffs])
        defer {
            _ = try? Command.run(["umount", bpffs])
            rmdir(bpffs)
        }
        let prepared = try Command.run(["ip", "netns", "exec", namespace, bench, "restore", "--inside",
                                        "--sessions", "\(sessions)", "--bpf-object", object], check: false)
        guard prepared.succeeded, var report = try? JSONDecoder().decode(Report.self, from: Data(prepared.stdout.utf8)) else {
            throw LabError.setupFailed("preparing the state file and the map failed: \(prepared.stderr)")
        }
        try TrustKeyFile.save(hex: TrustKey.generateHex(), to: key, replace: true)  // mode 0600: the agent refuses others
        unlink(socket)
        let start = Date()
        let agent = try Command.spawn([agentBinary, "agent", "--trust-key", key, "--control-socket", socket, "--bpf-fs", bpffs,
                                       "--port-range", "10000-60000", "--cleanup-on-exit", "--log-level", "notice"],
                                      netns: namespace, logPath: log)
        defer {
            if agent.isRunning {
                agent.terminate()
                agent.waitUntilExit()
            }
        }
        while !FileManager.default.fileExists(atPath: socket) {
            guard agent.isRunning, Date().timeIntervalSince(start) < 600 else {
                throw LabError.setupFailed("the agent did not start: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
            }
            usleep(1_000)
        }
        report.totalSeconds = Date().timeIntervalSince(start)
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        report.readSeconds = loggedSeconds(text, "state.read_seconds") ?? 0
        report.listSeconds = loggedSeconds(text, "state.list_seconds") ?? 0
        report.kernelSeconds = loggedSeconds(text, "state.kernel_seconds") ?? 0
        report.rulesSeconds = loggedSeconds(text, "state.rules_seconds") ?? 0
        report.restored = Int(loggedSeconds(text, "state.sessions") ?? 0)
        report.kernelSessions = Int(loggedSeconds(text, "state.kernel") ?? 0)
        let entries = try BPFDatapath.pinnedEntries(mapPath: pinDirectory + "/dysco_sessions")
        report.kernelChains = Set(entries.map(\.1.sessionID)).count
        report.tableKept = text.contains("state.table_kept=true")
        agent.terminate()
        agent.waitUntilExit()
        return report
    }
}
