import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// `replace` on real namespaces, NFQUEUE, iptables firewalls (fw2 strict: FORWARD DROP, ESTABLISHED only,
/// INVALID dropped), conntrack and TCP programs (paper §3, §5.3). Each test has its own lab (`rpN`,
/// 10.78.6N.0/24) and removes it, also on failure.
@Suite(.serialized) struct ReplaceTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[replace-tests] \(line)\n".utf8))
    }

    /// (a)/(g): 20 sessions of 20 MiB, sender-paced so they are mid-transfer, moved fw1 → fw2 under a strict fw2.
    /// Over the BPF datapath (issue 16 (c)): zero retransmissions caused by the migration, strictly.
    /// `family`: the sessions' (.ipv6: a dual-stack lab, the downloads over its IPv6 addresses, each box named in both
    /// families by `replace --lab`).
    func liveReplacement(name: String, subnet: String, agentArguments: [String],
                         bpf: FastPathIntegrationTests.Datapath? = nil, family: AddressFamily = .ipv4) async throws {
        try await TestSupport.withLab(MigrationLab.spec(name, subnet: subnet, agentArguments: agentArguments,
                                                        family: family)) { lab in
            // 20 sessions at 1 MiB/s (20 MiB/s through the chain). At 3 MiB/s each (60 MiB/s) the agents' queues
            // are never empty while the sessions are on the slow path, and the hand-over back to the kernel
            // reorders packets: ~130 fast retransmissions per migration (issue 8's closing note).
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 10)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1, family: family)
            let sessions = 20
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, family: family)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)

            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let lossBefore = try MigrationLab.lossCounters(lab)
            let invalidBefore = try TestSupport.invalidDrops(lab, "fw2", family: family)
            let (run, window, baseline, length) = try strict.measure(lab) { try MigrationLab.replace(lab, old: "fw1", new: "fw2") }
            let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0, "replace exit status \(run.status): \(run.stdout)")
            #expect(report.matched == sessions)
            #expect(report.sessions.count == sessions && report.allMoved,
                    "\(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.failedStep): \($0.reason)" })")
            for s in report.sessions {
                let phases = try #require(s.phases)
                #expect(phases.total > 0 && phases.export > 0 && phases.import > 0, "\(s.session): \(phases)")
            }

            // fw2 tracks them now (state moved), fw1 carries nothing any more.
            let conntrack = try lab.conntrackTCP("fw2", family: family)
            #expect(conntrack.components(separatedBy: "dport=\(MigrationLab.pacedPort)").count - 1 >= sessions,
                    "fw2 conntrack: \(conntrack)")
            let fw2Sessions = try await MigrationLab.pacedSessions(lab, "fw2")
            #expect(fw2Sessions.count == sessions && fw2Sessions.allSatisfy { $0.session.srcAddr.family == family })
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").isEmpty)
            let fw1Before = try lab.firewallCounters("fw1", family: family).establishedAccepted.packets
            try await Task.sleep(for: .seconds(1))
            let fw1After = try lab.firewallCounters("fw1", family: family).establishedAccepted.packets
            // After the window the sessions are back on the kernel fast path (on the new path); what TCP counts
            // then is recorded, not asserted (see the closing note of issue 7: hand-over reordering, tail-loss probes).
            let later = try MigrationLab.lossCounters(lab) - lossBefore
            Self.record("\(name) second after the migration: \(later)")
            #expect(fw1After == fw1Before, "fw1's FORWARD counters still grow: \(fw1Before) → \(fw1After)")
            #expect(try lab.firewallCounters("fw2", family: family).establishedAccepted.packets > 100)

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            if let bpf {
                // fw1 held the sessions (HELD entries) and then lost them: its counter poll deletes what they left.
                // Left: only sessions fw1 still has, closing (installed with their SYN, a closed session keeps its
                // entries for the 60 s linger: docs/BPF.md "Connection setup in the kernel"), e.g. the lab's probes.
                let fw1Map = "\(bpf.pins)/dysco-\(lab.namespace(of: "fw1"))-q7/dysco_sessions"
                let emptied = try await TestSupport.eventually(timeout: 15) {
                    let closing = Set(try await TestSupport.snapshot(lab, "fw1").sessions.filter { $0.state == "closing" }.map(\.id))
                    return try BPFDatapath.pinnedEntries(mapPath: fw1Map).allSatisfy { closing.contains($0.1.sessionID) }
                }
                #expect(emptied, "fw1's map still has \((try? BPFDatapath.pinnedEntries(mapPath: fw1Map).count) ?? -1) entries")
            }
            #expect(try TestSupport.invalidDrops(lab, "fw2", family: family) == invalidBefore, "INVALID drops at fw2")
            // No RTO and no reset in the window, always. With the fast path, the hand-over of sessions back to the
            // kernel can still reorder packets when an agent's queue never empties (a loaded 2-core machine): the
            // sender then fast-retransmits segments the receiver gets twice. That is recorded, and asserted only
            // without the fast path, where nothing changes hands (issue 8's closing note has the figures).
            #expect(window.timeouts == 0 && window.establishedResets == 0, "loss during the migration window: \(window)")
            Self.record("\(name) window \(length): \(window); same-length baseline before it: \(baseline)")
            if agentArguments.contains("--no-fastpath") {
                #expect(window.noByteLost, "loss during the migration window: \(window)")
            } else if bpf != nil {
                // The BPF datapath's hand-over rule (docs/BPF.md): zero retransmitted segments caused by the
                // migration, strictly: the window's count minus the same-length stretch's before it is ≤ 0.
                // Tail-loss probes are the hold's stall, not reordering: recorded (with the total), not asserted.
                let (w, b) = (MigrationLab.StrictWindow.reordering(window), MigrationLab.StrictWindow.reordering(baseline))
                #expect(w.retransmitted - b.retransmitted <= 0 && w.signs - b.signs <= 0,
                        "reordering caused by the migration: window \(window), baseline \(baseline)")
                Self.record("\(name) strict: retransmissions but tail-loss probes \(w.retransmitted) (baseline \(b.retransmitted)), "
                            + "reordering signs \(w.signs) (baseline \(b.signs)), tail-loss probes \(window.lossProbes) "
                            + "(baseline \(baseline.lossProbes)); all retransmissions window − baseline = "
                            + "\(Int64(window.retransmitted) - Int64(baseline.retransmitted)); "
                            + ["client1", "fw1", "fw2", "server1"].map { FastPathIntegrationTests.handOverFigures(lab, $0, bpf!) }.joined(separator: "; "))
            }

            let policyDropped = try lab.firewallCounters("fw2", family: family).policyDropped.packets
            #expect(policyDropped == 0, "fw2 dropped \(policyDropped) packets by policy")
            // The client's and the server's agents saw every step (anchors), and reset nothing.
            let client = try await TestSupport.snapshot(lab, "client1")
            #expect(client.control["migrations.moved", default: 0] == 0)  // the controller is fw1
            let fw1 = try await TestSupport.snapshot(lab, "fw1")
            #expect(fw1.control["migrations.moved"] == UInt64(sessions))
        }
    }

    @Test("(a) 20 live paced sessions move fw1 → fw2 (strict) byte-exact: fw2 tracks them, fw1 stops, no INVALID, no RTO; no reordering by the hand-over — no retransmission but tail-loss probes, no receiver reordering, window minus the same-length stretch before it ≤ 0 (labs rpb1, 10.78.69.0/24, and rpb6 over IPv6, 10.78.157.0/24; bpffs /run/dysco-LAB-pins)",
          arguments: [FastPathIntegrationTests.Datapath(lab: "rpb1", subnet: "10.78.69.0/24"),
                      FastPathIntegrationTests.Datapath(lab: "rpb6", subnet: "10.78.157.0/24", family: .ipv6)])
    func replaceLiveSessions(datapath: FastPathIntegrationTests.Datapath) async throws {
        try await datapath.withPins {
            try await liveReplacement(name: datapath.lab, subnet: datapath.subnet, agentArguments: datapath.arguments,
                                      bpf: datapath, family: datapath.family)
        }
    }

    @Test("(g) the same with --no-fastpath")
    func replaceLiveSessionsSlowPath() async throws {
        try await liveReplacement(name: "rp2", subnet: "10.78.62.0/24", agentArguments: ["--no-fastpath"])
    }

    @Test("(b) without the state transfer (--stateless into a strict fw2) the sessions die at fw2: the test bites")
    func withoutStateTransferFwTwoDrops() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rp3", subnet: "10.78.63.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 2, timeout: 12)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 2)
            _ = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--stateless"])
            #expect(!downloads.wait(), "the downloads should stall without fw2's state")
            let fw2 = try lab.firewallCounters("fw2")
            #expect(fw2.policyDropped.packets + fw2.invalidDropped.packets > 0, "fw2 dropped nothing: \(fw2)")
        }
    }

    @Test("--stateless into a stateless box (fw2 open): the two-path rules alone move the sessions byte-exact")
    func statelessReplacement() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rp7", subnet: "10.78.67.0/24", firewallProfiles: ["fw2": .open])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 3)
            let sessions = 6
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--stateless"])
            let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && report.allMoved, "\(run.stdout)")
            for s in report.sessions {
                let phases = try #require(s.phases)
                #expect(phases.export == 0 && phases.import == 0, "stateless moves no state: \(phases)")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").count == sessions)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").isEmpty)
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0)
        }
    }

    @Test("(c) two overlapping replace of the same sessions: exactly one moves each session, the other is refused cleanly")
    func overlappingReplacements() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rp4", subnet: "10.78.64.0/24", middleboxes: ["fw1", "fw2", "fw3"])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 3)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            async let first = Task.detached { try MigrationLab.replace(lab, old: "fw1", new: "fw2") }.value
            async let second = Task.detached { try MigrationLab.replace(lab, old: "fw1", new: "fw3") }.value
            let runs = try await [first, second]
            var moved: [String: Int] = [:]
            for run in runs {
                let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
                for s in report.sessions where s.result == "moved" { moved["\(s.session)", default: 0] += 1 }
                for s in report.sessions where s.result != "moved" {
                    #expect(s.result == "refused", "\(s.session): \(s.result) \(s.reason)")
                }
            }
            #expect(moved.values.allSatisfy { $0 == 1 }, "a session moved twice: \(moved)")
            #expect(moved.count == sessions, "every session moved exactly once: \(moved)")
            let onFw2 = try await MigrationLab.pacedSessions(lab, "fw2").count
            let onFw3 = try await MigrationLab.pacedSessions(lab, "fw3").count
            #expect(onFw2 + onFw3 == sessions)
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }

    @Test("(e) fw2's agent stopped, then fw2 refusing the import: cancelled with the cause, sessions go on via fw1 byte-exact")
    func cancelledMigrations() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rp5", subnet: "10.78.65.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let sessions = 3
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            // 1. fw2's agent is down: the new path gets no answer.
            try lab.killAgent("fw2", signal: SIGTERM)
            let down = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--deadline", "1500"])
            #expect(down.status == 1)
            let downReport = try #require(down.report, "\(down.stdout) \(down.stderr)")
            #expect(downReport.sessions.count == sessions)
            for s in downReport.sessions {
                #expect(s.result == "cancelled" && s.failedStep == "new-path", "\(s.result) \(s.failedStep) \(s.reason)")
                #expect(s.reason.contains(lab.address(of: "fw2").description), "the reason names fw2: \(s.reason)")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions, "the sessions stay on fw1")

            // 2. fw2 is back but refuses migrated state.
            try lab.restartAgent("fw2", extraArguments: ["--accept-state", "no"])
            let refused = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            #expect(refused.status == 1)
            let refusedReport = try #require(refused.report, "\(refused.stdout) \(refused.stderr)")
            for s in refusedReport.sessions {
                #expect(s.result == "cancelled" && s.failedStep == "state", "\(s.result) \(s.failedStep) \(s.reason)")
                #expect(s.reason.contains("does not accept migrated state"), "\(s.reason)")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions)
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").isEmpty, "fw2 dropped what the cancelled paths made")
            let client = try await TestSupport.snapshot(lab, "client1")
            #expect(client.sessions.allSatisfy { $0.migration == nil }, "the anchors finished")

            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0)
        }
    }

    @Test("(h) client → fw1 → fw3 → server: fw1 replaced by fw2, fw3 stays and is the right anchor")
    func replaceInsideLongerChain() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rp6", subnet: "10.78.66.0/24", middleboxes: ["fw1", "fw2", "fw3"],
                                                        chain: ["fw1", "fw3"])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 3)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (run, window, baseline, length) = try strict.measure(lab) { try MigrationLab.replace(lab, old: "fw1", new: "fw2") }
            let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && report.allMoved, "\(run.stdout)")
            let fw3 = try await MigrationLab.pacedSessions(lab, "fw3")
            #expect(fw3.count == sessions)
            #expect(fw3.allSatisfy { $0.left?.srcAddr == lab.address(of: "fw2") }, "fw3's left neighbour is fw2 now")
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").isEmpty)
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw2") == 0)
            #expect(try TestSupport.invalidDrops(lab, "fw3") == 0)
            // As in (a): no RTO or reset, and no retransmission caused by the migration (strict, docs/BPF.md
            // "Hand-over without reordering"): the window's minus the same-length stretch's before it ≤ 0.
            #expect(window.timeouts == 0 && window.establishedResets == 0, "loss during the migration window: \(window)")
            let (w, b) = (MigrationLab.StrictWindow.reordering(window), MigrationLab.StrictWindow.reordering(baseline))
            #expect(w.retransmitted - b.retransmitted <= 0 && w.signs - b.signs <= 0,
                    "reordering caused by the migration: window \(window), baseline \(baseline)")
            Self.record("rp6 window \(length): \(window); same-length baseline before it: \(baseline)")
        }
    }
}
