import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Agent crash and restart (issue 9, tests (c) and (d); docs/ARCHITECTURE.md, "Agent crash and restart"): kill -9
/// or SIGTERM of an agent mid-transfer, then a start with the same command line (``Lab/restartAgent(_:extraArguments:)``),
/// on real namespaces, NFQUEUE, the BPF datapath, strict iptables firewalls and curl downloads checked by sha256. Each test
/// has its own lab (`rsN`, 10.79.6N.0/24) and removes it, also on failure. The BPF datapath's cases (`--datapath
/// bpf`, docs/BPF.md "Restart via pinning") have labs `rsbN`, 10.78.9N.0/24, and a bpffs the test mounts on the host
/// at `/run/dysco-rsbN-pins` (so the pins outlive each agent and the test reads the maps), removed in every path.
@Suite(.serialized) struct RestartTests {
    typealias Datapath = FastPathIntegrationTests.Datapath

    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[restart-tests] \(line)\n".utf8))
    }

    /// The longest time the downloads' total size did not grow, sampled every 10 ms while it runs.
    final class Progress: @unchecked Sendable {
        private let outputs: [String]
        private let lock = NSLock()
        private var longestStall = 0.0
        private var running = true
        private let done = DispatchSemaphore(value: 0)

        init(_ outputs: [String]) {
            self.outputs = outputs
            let thread = Thread { [self] in
                var last = -1, lastChange = Date()
                while lock.withLock({ running }) {
                    let total = outputs.reduce(0) { sum, path in
                        sum + ((try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0)
                    }
                    let now = Date()
                    if total != last {
                        last = total
                        lastChange = now
                    }
                    let stall = now.timeIntervalSince(lastChange)
                    lock.withLock { longestStall = max(longestStall, stall) }
                    usleep(10_000)
                }
                done.signal()
            }
            thread.start()
        }

        /// Stops sampling; returns the longest stall in seconds.
        func stop() -> Double {
            lock.withLock { running = false }
            done.wait()
            return lock.withLock { longestStall }
        }
    }

    /// Paced downloads through fw1; for each host in `hosts`, in turn, its agent is stopped with `signal` and
    /// started again with the same command line while they run. Byte-exact, no reset, every session restored.
    /// `datapath` BPF: each session must be kernel-carried or its keys in the pinned `dysco_owned` before each stop;
    /// while no agent runs the programs stay attached and the pinned maps keep the sessions' entries and owned keys;
    /// the restarted agent takes them over from the map (its log: `state.kernel` ≥ the sessions). With
    /// `--no-fastpath` (the BPF path carrying nothing, its owned keys only) the owned keys stay instead.
    func restartMidTransfer(name: String, subnet: String, agentArguments: [String], hosts: [String],
                            signal: Int32, datapath: Datapath? = nil) async throws {
        let bpf = datapath != nil
        let carries = !agentArguments.contains("--no-fastpath")
        let family = datapath?.family ?? .ipv4
        try await TestSupport.withLab(MigrationLab.spec(name, subnet: subnet, middleboxes: ["fw1"],
                                                        agentArguments: agentArguments + (datapath?.arguments ?? []),
                                                        family: family)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 6)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1, family: family)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, family: family)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            let lossBefore = try MigrationLab.lossCounters(lab)
            for host in hosts {
                let progress = Progress(downloads.outputs)
                let before = try await MigrationLab.pacedSessions(lab, host).count
                #expect(before >= sessions, "\(host) carries \(before) sessions before the stop")
                // Owned keys follow the table in batches: stop it once every session would survive (kernel or owned).
                try await MigrationLab.waitUntilRestartSafe(lab, host, count: sessions, bpfPins: bpf ? datapath!.pins : nil)
                let entriesBefore = bpf ? try Self.bpfEntries(lab, host, datapath!).count : 0
                let ownedBefore = bpf ? try Self.bpfOwned(lab, host, datapath!).count : 0
                let start = Date()
                try lab.killAgent(host, signal: signal)
                #expect(!lab.agentIsAlive(host))
                let rules = try lab.exec(host, [family == .ipv4 ? "iptables-save" : "ip6tables-save"]).stdout
                #expect(rules.contains("DYSCO-IN") && rules.contains("--queue-bypass"),
                        "\(host): the queue rules stay while no agent runs")
                if let datapath, bpf {
                    // Programs attached, maps pinned with the sessions' entries (two a session at an end, four at fw1).
                    let net = try lab.exec(host, ["bpftool", "net", "show"]).stdout
                    #expect(net.contains("dysco_ingress") && net.contains("dysco_egress"),
                            "\(host): the programs stay attached while no agent runs: \(net)")
                    let entries = try Self.bpfEntries(lab, host, datapath)
                    let owned = try Self.bpfOwned(lab, host, datapath)
                    #expect(owned.count == ownedBefore, "\(host): the owned keys stay: \(owned.count) (\(ownedBefore) before)")
                    if carries {
                        #expect(entries.count == entriesBefore && entries.count >= 2 * sessions,
                                "\(host): the pinned map keeps \(entries.count) entries (\(entriesBefore) before the stop)")
                    } else {
                        #expect(entries.isEmpty && owned.count >= 2 * sessions,
                                "\(host): no session entry (\(entries.count)), the sessions' owned keys (\(owned.count))")
                        #expect(rules.contains("dysco_egress_owned"), "the egress fail-closed rule")
                    }
                }
                try await Task.sleep(for: .milliseconds(500))
                try lab.restartAgent(host)
                let restart = Date().timeIntervalSince(start)
                if bpf, carries {
                    // The restarted agent took the sessions over from the pinned map (not from scratch).
                    let log = try String(contentsOfFile: LabPaths.agentLog(lab.name, host: host), encoding: .utf8)
                    let kernel = Self.logged(log, "state.kernel") ?? 0
                    #expect(kernel >= sessions, "\(host): \(kernel) sessions back in the kernel")
                    #expect(log.contains("state.table_kept=true"), "\(host): the map kept as it was")
                    #expect(log.contains("bpf.inherited=true"))
                }
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.counters.sessionsRestored >= UInt64(sessions), "\(host) restored \(snapshot.counters.sessionsRestored)")
                let paced = snapshot.sessions.filter { $0.session.dstPort == MigrationLab.pacedPort }
                #expect(paced.count >= sessions, "\(host) knows \(paced.count) paced sessions after the restart")
                try await Task.sleep(for: .seconds(1))
                let stall = progress.stop()
                Self.record("\(name) \(host) signal \(signal): down+restart \(String(format: "%.3f", restart)) s, "
                            + "longest stall of the downloads \(String(format: "%.3f", stall)) s")
            }
            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            let window = try MigrationLab.lossCounters(lab) - lossBefore
            Self.record("\(name) loss counters over the restarts: \(window)")
            #expect(window.establishedResets == 0, "resets: \(window)")
            if !agentArguments.contains("--no-fastpath") {
                // The kernel carried every data packet throughout: nothing was stranded long enough for an RTO.
                // (Without the fast path the packets of the stopped agent's sessions are dropped, and TCP
                // retransmits them after an RTO: recorded above.)
                #expect(window.timeouts == 0, "RTOs with the fast path: \(window)")
            }
            Self.record("\(name) fw1 INVALID drops: \(try TestSupport.invalidDrops(lab, "fw1", family: family))")
        }
    }

    /// A number the agent logged as `key=N` (the last occurrence).
    static func logged(_ log: String, _ key: String) -> Int? {
        guard let range = log.range(of: "\(key)=", options: .backwards) else { return nil }
        return Int(log[range.upperBound...].prefix { $0.isNumber })
    }

    /// `host`'s `dysco_owned` keys (the agent pins under the lab's bpffs, queue 7).
    static func bpfOwned(_ lab: Lab, _ host: String, _ datapath: Datapath) throws -> [BPFSessionKey] {
        try BPFDatapath.pinnedOwnedKeys(mapPath: "\(datapath.pins)/dysco-\(lab.namespace(of: host))-q7/dysco_owned")
    }

    /// `host`'s `dysco_sessions` entries (the agent pins under the lab's bpffs, queue 7).
    static func bpfEntries(_ lab: Lab, _ host: String, _ datapath: Datapath) throws -> [(BPFSessionKey, BPFSessionEntry)] {
        try BPFDatapath.pinnedEntries(mapPath: "\(datapath.pins)/dysco-\(lab.namespace(of: host))-q7/dysco_sessions")
    }

    @Test("queue rules: owned packets without bypass, the rest with; a predecessor's jumps kept")
    func queueRuleScript() {
        let script = QueueRules(queue: 7).restoreScript()
        let ingress = script.split(separator: "\n").filter { $0.hasPrefix("-A DYSCO-IN") }
        #expect(ingress == [
            "-A DYSCO-IN -p tcp ! -i lo -m mark --mark 0x4000000/0x14000000 -j NFQUEUE --queue-num 7",
            "-A DYSCO-IN -p tcp ! -i lo -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7 --queue-bypass",
        ])
        #expect(script.contains("-I PREROUTING 1 -j DYSCO-IN") && script.contains("-I POSTROUTING 1 -j DYSCO-FWD-OUT"))
        let again = QueueRules(queue: 7).restoreScript(existingJumps: ["PREROUTING", "OUTPUT", "POSTROUTING"])
        #expect(!again.contains("-I "), "no second jump")
        #expect(again.contains(":DYSCO-IN - [0:0]"), "declared, so iptables-restore --noflush empties it in the same commit")
    }

    @Test("queue rules with the BPF filters: each egress chain first returns what the pinned socket filter says tc egress rewrites, then queues what the owned filter claims without bypass; ingress by marks, no observe rules")
    func queueRuleScriptBPF() {
        let filter = "/run/pins/dysco-x-q7/dysco_egress_carried"
        let owned = "/run/pins/dysco-x-q7/dysco_egress_owned"
        let script = QueueRules(queue: 7, egressFilter: filter, ownedFilter: owned).restoreScript()
        let lines = script.split(separator: "\n")
        // Ingress as without the filters (the ingress program marks what it rewrote and what is owned); no observe
        // rule (the programs report FIN/RST through their ring buffer).
        #expect(lines.filter { $0.hasPrefix("-A DYSCO-IN") } == QueueRules(queue: 7).restoreScript().split(separator: "\n")
            .filter { $0.hasPrefix("-A DYSCO-IN") })
        #expect(!script.contains("--mark 0x1000000/0x1000000") && !script.contains("--mark 0x2000000/0x2000000"),
                "no observe rule")
        // Egress: carried RETURN, the owned filter without bypass (no mark rule: nothing marks egress packets
        // owned before tc egress), the rest with bypass.
        #expect(lines.filter { $0.hasPrefix("-A DYSCO-OUT") } == [
            "-A DYSCO-OUT -p tcp ! -o lo -m bpf --object-pinned \(filter) -j RETURN",
            "-A DYSCO-OUT -p tcp ! -o lo -m bpf --object-pinned \(owned) -j NFQUEUE --queue-num 7",
            "-A DYSCO-OUT -p tcp ! -o lo -m mark ! --mark 0x20000000/0x20000000 -j NFQUEUE --queue-num 7 --queue-bypass",
        ])
        #expect(lines.filter { $0.hasPrefix("-A DYSCO-FWD-OUT") } == [
            "-A DYSCO-FWD-OUT -p tcp -m addrtype ! --src-type LOCAL -m bpf --object-pinned \(filter) -j RETURN",
            "-A DYSCO-FWD-OUT -p tcp -m addrtype ! --src-type LOCAL -m bpf --object-pinned \(owned) -j NFQUEUE --queue-num 7",
            "-A DYSCO-FWD-OUT -p tcp -m addrtype ! --src-type LOCAL -m mark ! --mark 0x20000000/0x20000000 -j NFQUEUE --queue-num 7 --queue-bypass",
        ])
        #expect(lines.filter { $0.contains("-m bpf") }.count == 4)
        #expect(!script.contains("--mark 0x8000000/"), "no egress owned-mark rule")
        // No kernel path (--no-fastpath without the BPF programs): every rule has bypass.
        let open = QueueRules(queue: 7, failClosed: false).restoreScript()
        #expect(open.split(separator: "\n").filter { $0.contains("NFQUEUE") }.allSatisfy { $0.hasSuffix("--queue-bypass") })
    }

    @Test("(c) kill -9 and restart of fw1's agent, then of the client's, mid-transfer, fast path on: byte-exact, no reset",
          arguments: [Datapath(lab: "rsb1", subnet: "10.78.91.0/24"), Datapath(lab: "rsb6", subnet: "10.78.159.0/24", family: .ipv6)])
    func killFastPath(datapath: Datapath) async throws {
        try await datapath.withPins {
            try await restartMidTransfer(name: datapath.lab, subnet: datapath.subnet, agentArguments: [],
                                         hosts: ["fw1", "client1"], signal: SIGKILL, datapath: datapath)
        }
    }

    /// With `--no-fastpath` the agents load the BPF programs for the owned keys only (docs/BPF.md "Owned keys"): a
    /// bpffs the test reads.
    @Test("(c) kill -9 and restart of fw1's agent, then of the client's, mid-transfer, fast path off: byte-exact, no reset")
    func killSlowPath() async throws {
        let datapath = Datapath(lab: "rs2", subnet: "10.79.62.0/24")
        try await datapath.withPins {
            try await restartMidTransfer(name: "rs2", subnet: "10.79.62.0/24", agentArguments: ["--no-fastpath"],
                                         hosts: ["fw1", "client1"], signal: SIGKILL, datapath: datapath)
        }
    }

    @Test("(d) SIGTERM and restart (an upgrade) of fw1's, the client's and the server's agents mid-transfer: byte-exact",
          arguments: [Datapath(lab: "rsb2", subnet: "10.78.92.0/24")])
    func upgrade(datapath: Datapath) async throws {
        try await datapath.withPins {
            try await restartMidTransfer(name: datapath.lab, subnet: datapath.subnet, agentArguments: [],
                                         hosts: ["fw1", "client1", "server1"], signal: SIGTERM, datapath: datapath)
        }
    }

    @Test("(d) SIGTERM and restart mid-transfer with the fast path off: byte-exact")
    func upgradeSlowPath() async throws {
        let datapath = Datapath(lab: "rs4", subnet: "10.79.64.0/24")
        try await datapath.withPins {
            try await restartMidTransfer(name: "rs4", subnet: "10.79.64.0/24", agentArguments: ["--no-fastpath"],
                                         hosts: ["fw1"], signal: SIGTERM, datapath: datapath)
        }
    }

    @Test("fast path on, fw1's agent killed and not restarted: a transfer finishing meanwhile completes (its FINs too); --purge clears",
          arguments: [Datapath(lab: "rsb3", subnet: "10.78.93.0/24")])
    func noRestart(datapath: Datapath) async throws {
        try await datapath.withPins {
        try await TestSupport.withLab(MigrationLab.spec(datapath.lab, subnet: datapath.subnet, middleboxes: ["fw1"],
                                                        agentArguments: datapath.arguments)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 3)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 2)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 2)
            // Wait until fw1's kernel carries them (4 map entries a session at a middlebox).
            var translations = 0
            let carried = try await TestSupport.eventually(timeout: 5) {
                translations = try Self.bpfEntries(lab, "fw1", datapath).count
                return translations >= 8
            }
            #expect(carried, "fw1's kernel carries \(translations) translations")
            let lossBefore = try MigrationLab.lossCounters(lab)
            try lab.killAgent("fw1", signal: SIGKILL)
            #expect(!lab.agentIsAlive("fw1"))
            // Their data and their FINs pass fw1 in the kernel: curl ends (with -m 120 it would fail on a hang).
            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            let window = try MigrationLab.lossCounters(lab) - lossBefore
            #expect(window.establishedResets == 0, "\(window)")
            // The FINs reached the peers: neither end keeps the connection (no FIN_WAIT/CLOSE_WAIT/LAST_ACK left
            // for the paced port). The last ACK may still be on its way when curl exits: wait for it (a stranded FIN
            // would leave the sockets there for a minute, past the deadline).
            var stuck: [String: [Substring]] = [:]
            let deadline = Date().addingTimeInterval(10)
            repeat {
                for host in ["client1", "server1"] {
                    let sockets = try lab.exec(host, ["ss", "-tanH", "( sport = :\(MigrationLab.pacedPort) or dport = :\(MigrationLab.pacedPort) )"]).stdout
                    stuck[host] = sockets.split(separator: "\n").filter {
                        $0.hasPrefix("FIN-WAIT") || $0.hasPrefix("CLOSE-WAIT") || $0.hasPrefix("LAST-ACK") || $0.hasPrefix("ESTAB")
                    }
                }
                if stuck.values.allSatisfy(\.isEmpty) { break }
                try await Task.sleep(for: .milliseconds(50))
            } while Date() < deadline
            for (host, sockets) in stuck { #expect(sockets.isEmpty, "\(host): \(sockets)") }

            // The operator takes the agent away for good: --purge removes rules, programs and pins, and state file.
            let bin = try TestSupport.dyscoBinary()
            let pinDirectory = "\(datapath.pins)/dysco-\(lab.namespace(of: "fw1"))-q7"
            #expect(FileManager.default.fileExists(atPath: pinDirectory + "/dysco_sessions"), "pins stay until --purge")
            let purgeArguments = ["--bpf-fs", datapath.pins]
            let purge = try lab.exec("fw1", [bin, "agent", "--purge"] + purgeArguments, check: false)
            #expect(purge.status == 0, "\(purge.stderr)")
            #expect(purge.stdout.contains(#""rules":true"#) && purge.stdout.contains(#""bpf":true"#)
                    && purge.stdout.contains(#""stateFile":true"#), "\(purge.stdout)")
            #expect(!(try lab.exec("fw1", ["iptables-save"]).stdout.contains("DYSCO")))
            #expect(!FileManager.default.fileExists(atPath: pinDirectory), "--purge removed the pins")
            let net = try lab.exec("fw1", ["bpftool", "net", "show"]).stdout
            #expect(!net.contains("dysco_"), "--purge detached the programs: \(net)")
            // While an agent runs, --purge is refused.
            let purgeClient = try lab.exec("client1", [bin, "agent", "--purge"] + purgeArguments, check: false)
            #expect(purgeClient.status != 0 && purgeClient.stderr.contains("an agent is running"), "\(purgeClient.stderr)")
        }
        }
    }

    @Test("BPF: a restart with another --max-sessions is refused with a clear message while the kernel carries on; the same command line takes the sessions over; --fresh replaces the map")
    func bpfMapSizeChange() async throws {
        let datapath = Datapath(lab: "rsb4", subnet: "10.78.94.0/24")
        try await datapath.withPins {
        try await TestSupport.withLab(MigrationLab.spec(datapath.lab, subnet: datapath.subnet, middleboxes: ["fw1"],
                                                        agentArguments: datapath.arguments)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 4)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 1)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 1)
            try await MigrationLab.waitUntilRestartSafe(lab, "fw1", count: 1, bpfPins: datapath.pins)
            try lab.killAgent("fw1", signal: SIGKILL)
            // The download's four entries, and those of sessions closed within the linger (the BPF datapath keeps a
            // closed session's entries until its linger ends: docs/BPF.md "Connection setup in the kernel").
            let killed = try Self.bpfEntries(lab, "fw1", datapath)
            let closed = killed.count / 4 - 1
            let log = LabPaths.agentLog(lab.name, host: "fw1")
            do {
                try lab.restartAgent("fw1", extraArguments: ["--max-sessions", "1000"])
                Issue.record("an agent with another --max-sessions started on the pinned map")
            } catch {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                #expect(text.contains("holds 524288 translations") && text.contains("--max-sessions 131072")
                        && text.contains("--fresh"), "\(text)")
            }
            #expect(!lab.agentIsAlive("fw1"))
            let left = try Self.bpfEntries(lab, "fw1", datapath)
            #expect(left.count >= 4 && Set(left.map(\.0)) == Set(killed.map(\.0)), "the refused start left the map alone")
            // A stray entry (a session without a record) makes the restart rebuild the map by difference: the stray
            // goes, the session's four entries stay with their counters.
            let stray = BPFSessionKey(FiveTuple(srcAddr: IPAddress(10, 78, 94, 250), srcPort: 1,
                                                dstAddr: IPAddress(10, 78, 94, 251), dstPort: 2), hook: .ingress)
            do {
                let pinned = try BPFDatapath(objectPath: try BPFDatapathTests.objectPath(),
                                             pinDirectory: "\(datapath.pins)/dysco-\(lab.namespace(of: "fw1"))-q7",
                                             maxEntries: 524_288)
                try pinned.insert(stray, BPFSessionEntry(target: stray.tuple.reversed, sessionID: 999_999))
            }
            let packetsBefore = left.reduce(0) { $0 + $1.1.packets }
            try lab.restartAgent("fw1")
            let text = try String(contentsOfFile: log, encoding: .utf8)
            #expect(Self.logged(text, "state.kernel") == 1 + closed && text.contains("state.table_kept=false"), "\(text)")
            let after = try Self.bpfEntries(lab, "fw1", datapath)
            #expect(Set(after.map(\.0)) == Set(left.map(\.0)), "the stray is gone, the session's entries stay")
            #expect(after.reduce(0) { $0 + $1.1.packets } >= packetsBefore, "kept with their counters")
            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)

            // --fresh with another size: the map is replaced (empty, of the new size), the agent starts.
            try lab.killAgent("fw1", signal: SIGKILL)
            try lab.restartAgent("fw1", extraArguments: ["--max-sessions", "1000", "--fresh"])
            let map = "\(datapath.pins)/dysco-\(lab.namespace(of: "fw1"))-q7/dysco_sessions"
            #expect(try BPFDatapath.pinnedLayout(mapPath: map).maxEntries == 4000)
            #expect(try BPFDatapath.pinnedEntries(mapPath: map).isEmpty)
        }
        }
    }

    @Test("SIGTERM with no live session removes everything; --cleanup-on-exit removes everything with live sessions")
    func cleanStops() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rs6", subnet: "10.79.66.0/24", middleboxes: ["fw1"])) { lab in
            let state = AgentControlPaths.statePath(socketPath: AgentControlPaths.socketPath(netns: lab.namespace(of: "fw1")))
            #expect(FileManager.default.fileExists(atPath: state))
            try lab.killAgent("fw1", signal: SIGTERM)
            #expect(!(try lab.exec("fw1", ["iptables-save"]).stdout.contains("DYSCO")), "no session: rules removed")
            #expect(!FileManager.default.fileExists(atPath: FastPathIntegrationTests.pinDirectory(lab, "fw1")), "no session: pins removed")
            #expect(!FileManager.default.fileExists(atPath: state))

            try lab.restartAgent("fw1", extraArguments: ["--cleanup-on-exit"])
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 3)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 1)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 1)
            #expect(try String(contentsOfFile: state, encoding: .utf8).contains(#""put""#), "the session is journaled")
            try lab.killAgent("fw1", signal: SIGTERM)
            #expect(!(try lab.exec("fw1", ["iptables-save"]).stdout.contains("DYSCO")), "--cleanup-on-exit: rules removed")
            #expect(!FileManager.default.fileExists(atPath: state))
            for process in downloads.processes { process.terminate() }
        }
    }
}
