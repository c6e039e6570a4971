import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// `drain` on real namespaces, agents, strict iptables firewalls, conntrack and curl (issue 8, tests (a)–(c)).
/// Each test has its own lab (`drN`, 10.79.4N.0/24) and removes it, also on failure.
@Suite(.serialized) struct DrainTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[drain-tests] \(line)\n".utf8))
    }

    /// `dysco-migrate drain --lab … --json` (the CLI, as an operator would).
    static func drain(_ lab: Lab, old: String, to: String, extra: [String] = []) throws -> MigrationLab.CLIRun<Evacuation.Summary> {
        try MigrationLab.CLIRun(["drain", "--lab", lab.name, "--old", old, "--to", to] + extra)
    }

    static func policy(_ lab: Lab, _ host: String) throws -> PolicyReply {
        let result = try Command.run([try TestSupport.dyscoBinary(), "policy", "show", "--netns", lab.namespace(of: host), "--json"])
        return try JSONDecoder().decode(PolicyReply.self, from: Data(result.stdout.utf8))
    }

    @Test("(a) drain fw1 --to fw2 with 100 live sessions from 4 clients: fw1 ends empty and silent, all byte-exact, new sessions take fw2; no RTO, no reset, no INVALID; no retransmission but tail-loss probes and no reordering beyond the same-length stretch before the drain (labs hob2, 10.78.112.0/24, and hob6 over IPv6, 10.78.158.0/24)",
          arguments: [FastPathIntegrationTests.Datapath(lab: "hob2", subnet: "10.78.112.0/24"),
                      FastPathIntegrationTests.Datapath(lab: "hob6", subnet: "10.78.158.0/24", family: .ipv6)])
    func drainHundred(datapath: FastPathIntegrationTests.Datapath) async throws {
        try await datapath.withPins {
            try await drainHundred(name: datapath.lab, subnet: datapath.subnet, bpf: datapath, family: datapath.family)
        }
    }

    /// (a): 100 paced sessions from 4 clients drained fw1 → fw2. Over the BPF datapath (hand-over rule, docs/BPF.md)
    /// the retransmissions are asserted strictly: the window's minus the same-length stretch's before it ≤ 0.
    /// `family` .ipv6: the sessions over a dual-stack lab's IPv6 addresses (the drain names fw2 in both families and
    /// cordons fw1 in both).
    func drainHundred(name: String, subnet: String, bpf: FastPathIntegrationTests.Datapath? = nil,
                      family: AddressFamily = .ipv4) async throws {
        let clients = 4
        try await TestSupport.withLab(MigrationLab.spec(name, subnet: subnet, agentArguments: bpf?.arguments ?? [],
                                                        clients: clients, family: family)) { lab in
            let (fw1Address, fw2Address) = (try lab.address(of: "fw1", family: family), try lab.address(of: "fw2", family: family))
            // 100 sessions at 128 KiB/s each (12.5 MiB/s through fw1). At 1 MiB/s each the agents' queues are
            // never empty, so fast-path hand-overs reorder packets (the closing note of issue 8 has the figures).
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 2)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 0.125, family: family)
            let sessions = 100
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 90,
                                                       clients: (1...clients).map { "client\($0)" }, family: family)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions, timeout: 40)

            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let invalidBefore = try TestSupport.invalidDrops(lab, "fw2", family: family)
            let (run, window, baseline, length) = try strict.measure(lab) { try Self.drain(lab, old: "fw1", to: "fw2") }
            Self.record("\(name) loss during the drain (\(length)): \(window); same-length baseline before it: \(baseline)")
            let summary = try #require(run.report, "drain printed no summary: \(run.stdout) \(run.stderr)")
            Self.record("\(name) drained \(summary.moved) in \(summary.elapsedMicroseconds) µs, \(summary.batches) batches")
            #expect(run.status == 0, "drain exit status \(run.status): \(run.stdout) \(run.stderr)")
            #expect(summary.total == sessions && summary.moved == sessions && summary.failures.isEmpty,
                    "\(summary.failures.map { "\($0.session) \($0.failedStep): \($0.reason)" })")
            #expect(summary.movedByTarget == ["\(fw2Address)": sessions])
            #expect(summary.remaining == 0 && summary.succeeded)
            // Cordoned at the left ends (the clients) and the right end's agent (server1): 5 agents.
            #expect(summary.cordons.count == clients + 1 && summary.cordons.allSatisfy { $0.error == nil }, "\(summary.cordons)")

            // fw1's agent carries nothing, and its firewall forwards nothing more.
            let fw1 = try await TestSupport.snapshot(lab, "fw1")
            #expect(fw1.sessions.filter { $0.state != "closing" }.isEmpty, "fw1 still has \(fw1.sessions.map(\.session))")
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").count == sessions)
            let fw1Before = try lab.firewallCounters("fw1", family: family).establishedAccepted.packets
            try await Task.sleep(for: .seconds(1))
            #expect(try lab.firewallCounters("fw1", family: family).establishedAccepted.packets == fw1Before,
                    "fw1's FORWARD counters still grow")

            // A new session, started after the drain, goes through fw2 (the cordon): fw1's counters stay still.
            // (A dual-stack lab's drain cordons fw1 in both families, each to fw2's address of that family.)
            let policy = try Self.policy(lab, "client2")
            let families: [AddressFamily] = family == .ipv6 ? [.ipv4, .ipv6] : [.ipv4]
            let cordons = try families.map { f in
                Cordons.Cordon(address: try lab.address(of: "fw1", family: f), replacements: [try lab.address(of: "fw2", family: f)])
            }
            #expect(policy.cordons.sorted { $0.address < $1.address } == cordons.sorted { $0.address < $1.address },
                    "\(policy.cordons)")
            #expect(policy.cordons.contains(Cordons.Cordon(address: fw1Address, replacements: [fw2Address])))
            let fw1NewBefore = try lab.firewallCounters("fw1", family: family).newAccepted.packets
            let fw2NewBefore = try lab.firewallCounters("fw2", family: family).newAccepted.packets
            try lab.exec("client2", ["curl", "-sS", "--fail", "-g", "-m", "10", "-o", "/dev/null",
                                     "http://\(try lab.address(of: "server1", family: family).urlHost)/index.html"])
            #expect(try lab.firewallCounters("fw1", family: family).newAccepted.packets == fw1NewBefore, "a new session went through fw1")
            #expect(try lab.firewallCounters("fw2", family: family).newAccepted.packets > fw2NewBefore,
                    "the new session did not go through fw2")

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw2", family: family) == invalidBefore, "INVALID drops at fw2")
            // No RTO, no reset; the fast-path hand-over's reordering under load is recorded above, not asserted
            // (see ReplaceTests (a); issue 8's closing note).
            #expect(window.timeouts == 0 && window.establishedResets == 0, "loss during the drain: \(window)")
            if bpf != nil {
                // The BPF datapath's hand-over rule (docs/BPF.md), for held keys and for the new keys a release
                // installs ("New keys"): zero retransmitted segments caused by the drain, strictly: the window's
                // count minus the same-length stretch's before it is ≤ 0, and no receiver-side reordering signs
                // beyond it. Tail-loss probes are the hold's stall, not reordering: recorded, not asserted.
                let (w, b) = (MigrationLab.StrictWindow.reordering(window), MigrationLab.StrictWindow.reordering(baseline))
                #expect(w.retransmitted - b.retransmitted <= 0 && w.signs - b.signs <= 0,
                        "reordering caused by the drain: window \(window), baseline \(baseline)")
                let moved = window.detail.filter { $0.value != 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
                Self.record("\(name) strict: retransmissions but tail-loss probes \(w.retransmitted) (baseline \(b.retransmitted)), "
                            + "reordering signs \(w.signs) (baseline \(b.signs)), tail-loss probes \(window.lossProbes) "
                            + "(baseline \(baseline.lossProbes)); all retransmissions window − baseline = "
                            + "\(Int64(window.retransmitted) - Int64(baseline.retransmitted)); window detail \(moved); "
                            + ["client1", "client2", "client3", "client4", "fw1", "fw2", "server1"]
                                .map { FastPathIntegrationTests.handOverFigures(lab, $0, bpf!) }.joined(separator: "; "))
            }
        }
    }

    @Test("(b) drain to two targets spreads the sessions; --dry-run changes nothing; --concurrency 1 moves one at a time")
    func drainTwoTargets() async throws {
        let spec = MigrationLab.spec("dr2", subnet: "10.79.42.0/24", middleboxes: ["fw1", "fw2", "fw3"], chain: ["fw1"])
        try await TestSupport.withLab(spec) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 12
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 60)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            let dry = try Self.drain(lab, old: "fw1", to: "fw2,fw3", extra: ["--dry-run"])
            let plan = try #require(dry.report?.plan, "dry run: \(dry.stdout) \(dry.stderr)")
            #expect(dry.status == 0)
            #expect(plan.count == sessions)
            #expect(plan.filter { $0.target == "\(lab.address(of: "fw2"))" }.count == sessions / 2)
            #expect(plan.filter { $0.target == "\(lab.address(of: "fw3"))" }.count == sessions / 2)
            #expect(dry.report?.moved == 0)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions, "--dry-run moved sessions")
            #expect(try Self.policy(lab, "client1").cordons.isEmpty, "--dry-run cordoned")

            let run = try Self.drain(lab, old: "fw1", to: "fw2,fw3", extra: ["--concurrency", "1"])
            let summary = try #require(run.report, "drain: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
            #expect(summary.moved == sessions && summary.batches == sessions, "one session per batch with --concurrency 1")
            #expect(summary.movedByTarget["\(lab.address(of: "fw2"))"] == sessions / 2)
            #expect(summary.movedByTarget["\(lab.address(of: "fw3"))"] == sessions / 2)
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").count == sessions / 2)
            #expect(try await MigrationLab.pacedSessions(lab, "fw3").count == sessions / 2)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").isEmpty)

            // Running it again is safe: nothing left, exit 0.
            let again = try Self.drain(lab, old: "fw1", to: "fw2,fw3")
            #expect(again.status == 0 && again.report?.total == 0 && again.report?.remaining == 0, "\(again.stdout)")

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }

    @Test("(c) fw2's agent stopped mid-drain: the sessions not moved stay on fw1 intact and are named, exit 1; a second run finishes")
    func drainWithTargetStopped() async throws {
        try await TestSupport.withLab(MigrationLab.spec("dr3", subnet: "10.79.43.0/24")) { lab in
            // 36 s of download at 1 MB/s: each session that fails against the stopped fw2 costs its 400 ms deadline
            // plus the newPathCancel retransmissions (about 0.6 s in all), so the sessions must outlive both runs.
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 36)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 24
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 90)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            // One session at a time, so the stop falls mid-drain; a short deadline so the rest fail quickly.
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try TestSupport.dyscoBinary())
            process.arguments = ["drain", "--lab", lab.name, "--old", "fw1", "--to", "fw2", "--concurrency", "1",
                                 "--deadline", "400", "--json"]
            let out = Pipe()
            process.standardOutput = out
            process.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try process.run()
            let deadline = Date().addingTimeInterval(30)
            while try await MigrationLab.pacedSessions(lab, "fw2").count < 4, Date() < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            // fw2 counts a session once its new path is set up, before the drain sees the move finish: with
            // one move at a time, four on fw2 means at least three moves finished and the fourth may be cut.
            let agent = try #require(lab.agentRecord("fw2"))
            kill(agent.pid, SIGSTOP)
            let data = out.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            let summary = try #require(try? JSONDecoder().decode(Evacuation.Summary.self, from: data),
                                       "drain: \(String(decoding: data, as: UTF8.self))")
            Self.record("dr3 first run: moved \(summary.moved), failed \(summary.failures.count), remaining \(summary.remaining)")
            Self.record("dr3 first run's reasons: \(Set(summary.failures.map(\.reason)).sorted())")
            #expect(process.terminationStatus == 1)
            #expect(summary.moved >= 3 && summary.moved < sessions)
            #expect(!summary.failures.isEmpty && summary.failures.count + summary.moved == sessions)
            #expect(summary.remaining == summary.failures.count)
            // The ones not moved are still on fw1, unharmed, and the summary names each of them.
            let onFW1 = try await MigrationLab.pacedSessions(lab, "fw1").map(\.session)
            #expect(Set(onFW1) == Set(summary.failures.map(\.session)))
            #expect(summary.failures.allSatisfy { !$0.reason.isEmpty })

            kill(agent.pid, SIGCONT)
            // fw2's agent answers again once it has worked through what queued while it was stopped.
            let resumed = Date().addingTimeInterval(20)
            while (try? await MigrationLab.pacedSessions(lab, "fw2")) == nil, Date() < resumed {
                try await Task.sleep(for: .milliseconds(50))
            }
            let second = try Self.drain(lab, old: "fw1", to: "fw2")
            Self.record("dr3 second run: \(second.report.map { "moved \($0.moved), failed \($0.failures.count)" } ?? second.stdout)")
            #expect(second.status == 0, "\(second.stdout) \(second.stderr)")
            #expect(second.report?.moved == summary.failures.count)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").isEmpty)

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }
}
