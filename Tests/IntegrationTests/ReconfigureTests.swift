import DyscoAgent
import DyscoCore
import DyscoLab
import Foundation
import Testing

/// `insert`, `remove` and k → m `replace` on real namespaces, BPF, iptables firewalls (strict: FORWARD DROP,
/// ESTABLISHED only, INVALID dropped), conntrack and paced HTTP downloads checked by sha256 (issue 17; paper §3:
/// an old path of zero middleboxes is an insertion, a new path of zero a deletion). Each test has its own lab
/// (`riN`, 10.78.12N.0/24) and removes it, also on failure.
@Suite(.serialized) struct ReconfigureTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[reconfigure-tests] \(line)\n".utf8))
    }

    static func run(_ lab: Lab, _ command: String, _ arguments: [String]) throws -> MigrationLab.ReplaceRun {
        try MigrationLab.ReplaceRun([command, "--lab", lab.name] + arguments)
    }

    /// The old path's agents leave the session when the teardown passes them (oldPathFinAck): true once `host` has
    /// none of the report's sessions left (a closed session of the lab's own probes may linger there).
    static func left(_ lab: Lab, _ host: String, _ run: MigrationLab.ReplaceRun) async throws -> Bool {
        let chains = Set(run.report?.sessions.map(\.chainID) ?? [])
        func remaining() async throws -> [AgentSnapshot.Session] {
            try await MigrationLab.pacedSessions(lab, host, anyState: true).filter { $0.chainID.map(chains.contains) ?? false }
        }
        let gone = try await TestSupport.eventually(timeout: 5) { try await remaining().isEmpty }
        if !gone {
            for s in try await remaining() {
                record("\(lab.name) \(host) still has \(s.session) \(s.state) left \(s.left?.description ?? "-") right \(s.right?.description ?? "-") migration \(s.migration ?? "-")")
            }
        }
        return gone
    }

    /// Every session of the report moved, with a clear message otherwise.
    static func expectAllMoved(_ run: MigrationLab.ReplaceRun, sessions: Int, _ what: String) throws {
        let report = try #require(run.report, "\(what) printed no report: \(run.stdout) \(run.stderr)")
        #expect(run.status == 0, "\(what) exit status \(run.status): \(run.stdout)")
        #expect(report.matched == sessions && report.sessions.count == sessions && report.allMoved,
                "\(what): \(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.result) \($0.failedStep): \($0.reason)" })")
    }

    /// No RTO, no reset, and no retransmission or receiver reordering caused by the reconfiguration: the window's
    /// count minus the same-length stretch's before it ≤ 0 (as ReplaceTests (a), docs/BPF.md "Hand-over").
    static func expectNoLoss(_ window: MigrationLab.LossCounters, baseline: MigrationLab.LossCounters, _ what: String) {
        #expect(window.timeouts == 0 && window.establishedResets == 0, "\(what): loss in the window: \(window)")
        let (w, b) = (MigrationLab.StrictWindow.reordering(window), MigrationLab.StrictWindow.reordering(baseline))
        #expect(w.retransmitted - b.retransmitted <= 0 && w.signs - b.signs <= 0,
                "\(what): reordering caused by the reconfiguration: window \(window), baseline \(baseline)")
    }

    /// By family (issue 18 (c)): the IPv6 case inserts and removes fw2 under IPv6 downloads of a dual-stack lab
    /// (`insert --lab`/`remove --lab` name each box in both families; fw1's AF_INET6 entries go to fw2).
    @Test("(a) a second strict firewall inserted into 20 live sessions (state from fw1) and removed again: byte-exact, fw2 carries them only in between, no INVALID, no retransmission caused",
          arguments: [MigrationLab.Case(lab: "ri1", subnet: "10.78.122.0/24"),
                      MigrationLab.Case(lab: "ri1v6", subnet: "10.78.163.0/24", family: .ipv6)])
    func insertThenRemove(_ c: MigrationLab.Case) async throws {
        let family = c.family
        try await TestSupport.withLab(MigrationLab.spec(c.lab, subnet: c.subnet, family: family)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 10)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1, family: family)
            let sessions = 20
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, family: family)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)
            let fw2Before = try lab.firewallCounters("fw2", family: family).establishedAccepted.packets

            // Insert fw2 after fw1: fw1 is the left anchor and the donor of the conntrack entries.
            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (insert, window, baseline, length) = try strict.measure(lab) {
                try Self.run(lab, "insert", ["--after", "fw1", "--box", "fw2", "--state-from", "fw1", "--json"])
            }
            try Self.expectAllMoved(insert, sessions: sessions, "insert")
            for s in insert.report?.sessions ?? [] {
                let phases = try #require(s.phases)
                #expect(phases.export > 0 && phases.import > 0, "the state moved: \(phases)")
            }
            Self.record("\(c.lab) insert window \(length): \(window); baseline \(baseline)")
            Self.expectNoLoss(window, baseline: baseline, "insert")
            let fw2 = try lab.address(of: "fw2", family: family)
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").count == sessions)
            let fw1Sessions = try await MigrationLab.pacedSessions(lab, "fw1")
            #expect(fw1Sessions.count == sessions && fw1Sessions.allSatisfy { $0.right?.dstAddr == fw2 },
                    "fw1 stays, its right neighbour is fw2: \(fw1Sessions.map { $0.right?.description ?? "-" })")
            let carried = try await TestSupport.eventually(timeout: 10) {
                try lab.firewallCounters("fw2", family: family).establishedAccepted.packets > fw2Before + 100
            }
            #expect(carried, "fw2's firewall accepted no traffic of the inserted sessions")

            // Remove it again: fw1 → server directly.
            let strict2 = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (remove, window2, baseline2, length2) = try strict2.measure(lab) {
                try Self.run(lab, "remove", ["--box", "fw2", "--json"])
            }
            try Self.expectAllMoved(remove, sessions: sessions, "remove")
            Self.record("\(c.lab) remove window \(length2): \(window2); baseline \(baseline2)")
            Self.expectNoLoss(window2, baseline: baseline2, "remove")
            #expect(try await Self.left(lab, "fw2", remove), "fw2 still has the sessions")
            let server = try lab.address(of: "server1", family: family)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").allSatisfy { $0.right?.dstAddr == server })
            let fw2After = try lab.firewallCounters("fw2", family: family).establishedAccepted.packets
            try await Task.sleep(for: .seconds(1))
            #expect(try lab.firewallCounters("fw2", family: family).establishedAccepted.packets == fw2After, "fw2 still carries traffic")

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw1", family: family) == 0)
            #expect(try TestSupport.invalidDrops(lab, "fw2", family: family) == 0)
            #expect(try lab.firewallCounters("fw2", family: family).policyDropped.packets == 0)
        }
    }

    @Test("(b) fw1 removed from client → fw1 → fw3 → server: the client talks to fw3 directly, byte-exact, no retransmission caused",
          arguments: [MigrationLab.Case(lab: "ri2", subnet: "10.78.123.0/24"),
                      MigrationLab.Case(lab: "ri2v6", subnet: "10.78.165.0/24", family: .ipv6)])
    func removeFromLongerChain(_ c: MigrationLab.Case) async throws {
        let family = c.family
        try await TestSupport.withLab(MigrationLab.spec(c.lab, subnet: c.subnet, middleboxes: ["fw1", "fw3"],
                                                        chain: ["fw1", "fw3"], family: family)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 3, family: family)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, family: family)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)
            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (run, window, baseline, length) = try strict.measure(lab) {
                try Self.run(lab, "remove", ["--box", "fw1", "--json"])
            }
            try Self.expectAllMoved(run, sessions: sessions, "remove")
            Self.record("\(c.lab) window \(length): \(window); baseline \(baseline)")
            Self.expectNoLoss(window, baseline: baseline, "remove")
            #expect(try await Self.left(lab, "fw1", run), "fw1 still has the sessions")
            let fw3 = try await MigrationLab.pacedSessions(lab, "fw3")
            Self.record("\(c.lab) fw3: \(fw3.map { "\($0.session) \($0.state) left \($0.left?.description ?? "-")" })")
            let client = try lab.address(of: "client1", family: family)
            #expect(fw3.count == sessions && fw3.allSatisfy { $0.left?.srcAddr == client },
                    "fw3's left neighbour is the client now")
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw3", family: family) == 0)
        }
    }

    @Test("(e) a byte-inserting box removed: fw1 inserts a header line into each response (its delta reported to its agent); after `remove --box fw1` the client's anchor translates sequence numbers, acks and SACK blocks; every response has the line once and a byte-exact body, no INVALID at fw3, no retransmission caused (lab ri6, 10.78.128.0/24)")
    func removeByteInsertingBox() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ri6", subnet: "10.78.128.0/24", middleboxes: ["fw1", "fw3"],
                                                        chain: ["fw1", "fw3"], firewallProfiles: ["fw1": .open])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let line = "X-Dysco-Inserted: by-fw1"
            let log = "\(lab.directory)/inserter.log"
            let inserter = try lab.spawn("fw1", [try TestSupport.dyscoBinary(), "lab", "inserter", "--port",
                                                 "\(MigrationLab.pacedPort)", "--text", line], logPath: log)
            defer { inserter.terminate() }
            func logged() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
            #expect(try await TestSupport.eventually(timeout: 10) { logged().contains("ready") }, "inserter: \(logged())")
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, curlOptions: ["-i"])
            // Each session's delta reached fw1's agent (the box reports it when the line goes in).
            let reported = try await TestSupport.eventually(timeout: 15) {
                logged().split(separator: "\n").filter { $0.hasPrefix("inserted ") && !$0.contains("session none") }.count == sessions
            }
            #expect(reported, "inserter: \(logged())")
            let n = Int32(line.utf8.count + 2)
            let atBox = try await MigrationLab.pacedSessions(lab, "fw1")
            #expect(atBox.count == sessions && atBox.allSatisfy { $0.boxDelta == .init(forward: 0, reverse: n) },
                    "fw1's agent knows the box's delta: \(atBox.map { "\($0.boxDelta.map { "\($0)" } ?? "-")" })")
            try await MigrationLab.waitForKernelCarried(lab, on: "fw3", count: sessions)
            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (run, window, baseline, length) = try strict.measure(lab) {
                try Self.run(lab, "remove", ["--box", "fw1", "--json"])
            }
            try Self.expectAllMoved(run, sessions: sessions, "remove")
            Self.record("ri6 window \(length): \(window); baseline \(baseline)")
            Self.expectNoLoss(window, baseline: baseline, "remove")
            #expect(try await Self.left(lab, "fw1", run), "fw1 still has the sessions")
            let client = try await MigrationLab.pacedSessions(lab, "client1")
            #expect(client.count == sessions && client.allSatisfy { $0.right?.dstAddr == lab.address(of: "fw3") })
            #expect(client.allSatisfy { $0.rightDelta == n }, "the client's anchor translates the server's stream: \(client.map { "\($0.rightDelta ?? 0)" })")
            // The BPF datapath carries the translated sessions (seq in, ack and SACK out shifted in the kernel).
            let kernel = try await TestSupport.eventually(timeout: 10) {
                try await MigrationLab.pacedSessions(lab, "client1").allSatisfy { $0.carrier == .kernel }
            }
            #expect(kernel, "the client's sessions are back in the kernel")
            #expect(downloads.wait(diagnose: lab), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            let original = try Data(contentsOf: URL(fileURLWithPath: "\(lab.httpRoot)/blob"))
            for out in downloads.outputs {
                let data = try Data(contentsOf: URL(fileURLWithPath: out))
                let end = try #require(data.range(of: Data("\r\n\r\n".utf8)), "\(out): no header block")
                let headers = String(decoding: data[..<end.lowerBound], as: UTF8.self).components(separatedBy: "\r\n")
                #expect(headers.count > 2 && headers[1] == line && headers.filter { $0 == line }.count == 1,
                        "\(out): the inserted line once, right after the status line: \(headers)")
                #expect(data[end.upperBound...] == original, "\(out): the body is not the file (\(data.count - end.upperBound) of \(original.count) bytes)")
            }
            #expect(try TestSupport.invalidDrops(lab, "fw3") == 0)
            inserter.terminate()
            inserter.waitUntilExit()
            #expect(logged().contains("stopped:"), "the inserter removes its rules and stops: \(logged())")
        }
    }

    @Test("(c) fw1,fw3 replaced by fw2 (k → m): fw1's state moves to fw2, both old boxes leave, byte-exact",
          arguments: [MigrationLab.Case(lab: "ri3", subnet: "10.78.124.0/24"),
                      MigrationLab.Case(lab: "ri3v6", subnet: "10.78.164.0/24", family: .ipv6)])
    func replaceTwoByOne(_ c: MigrationLab.Case) async throws {
        let family = c.family
        try await TestSupport.withLab(MigrationLab.spec(c.lab, subnet: c.subnet, middleboxes: ["fw1", "fw2", "fw3"],
                                                        chain: ["fw1", "fw3"], family: family)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 3, family: family)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, family: family)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)
            let strict = try MigrationLab.StrictWindow.sampleBefore(lab)
            let (run, window, baseline, length) = try strict.measure(lab) {
                try MigrationLab.replace(lab, old: "fw1,fw3", new: "fw2")
            }
            try Self.expectAllMoved(run, sessions: sessions, "replace fw1,fw3 → fw2")
            Self.record("\(c.lab) window \(length): \(window); baseline \(baseline)")
            Self.expectNoLoss(window, baseline: baseline, "replace fw1,fw3 → fw2")
            let fw2 = try await MigrationLab.pacedSessions(lab, "fw2")
            #expect(fw2.count == sessions)
            let client = try lab.address(of: "client1", family: family), server = try lab.address(of: "server1", family: family)
            #expect(fw2.allSatisfy { $0.left?.srcAddr == client && $0.right?.dstAddr == server },
                    "client → fw2 → server")
            #expect(try await Self.left(lab, "fw1", run), "fw1 still has the sessions")
            #expect(try await Self.left(lab, "fw3", run), "fw3 still has the sessions")
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw2", family: family) == 0)
            #expect(try lab.firewallCounters("fw2", family: family).policyDropped.packets == 0)
        }
    }

    @Test("(f) overlapping reconfigurations of one segment, client → fw1 → fw3 → server: an insertion after fw3 holds fw3's lock (its new box stopped) while a removal of fw1,fw3 (another left anchor: the client) asks for the same subsession: the removal is refused (§3.2 contention), the insertion then completes; byte-exact (lab ri4, 10.78.126.0/24)")
    func overlappingInsertAndRemove() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ri4", subnet: "10.78.126.0/24", middleboxes: ["fw1", "fw2", "fw3"],
                                                        chain: ["fw1", "fw3"])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)
            // fw2's agent does not answer the insertion's new path while it is stopped: the insertion (left anchor
            // fw3, right anchor the server) holds the lock of fw3's right subsession until fw2 is continued.
            try lab.killAgent("fw2", signal: SIGSTOP, wait: false)
            defer { try? lab.killAgent("fw2", signal: SIGCONT, wait: false) }
            let insert = Task.detached {
                try Self.run(lab, "insert", ["--after", "fw3", "--box", "fw2", "--state-from", "fw3", "--deadline", "30000", "--json"])
            }
            let locked = try await TestSupport.eventually(timeout: 10) {
                let fw3 = try await MigrationLab.pacedSessions(lab, "fw3")
                return fw3.count == sessions && fw3.allSatisfy { $0.migration != nil }
            }
            #expect(locked, "the insertion did not lock the sessions at fw3")
            // The removal's controller is fw1, its left anchor the client; its requestLock meets fw3's lock.
            let remove = try Self.run(lab, "remove", ["--box", "fw1,fw3", "--json"])
            let removeReport = try #require(remove.report, "\(remove.stdout) \(remove.stderr)")
            #expect(remove.status == 1)
            #expect(removeReport.sessions.count == sessions)
            for s in removeReport.sessions {
                #expect(s.result == "refused" && s.failedStep == "lock" && s.reason.contains("contention"),
                        "\(s.session): \(s.result) \(s.failedStep) \(s.reason)")
            }
            try lab.killAgent("fw2", signal: SIGCONT, wait: false)
            try Self.expectAllMoved(try await insert.value, sessions: sessions, "insert")
            let server = try await MigrationLab.pacedSessions(lab, "server1")
            #expect(server.count == sessions && server.allSatisfy { $0.left?.srcAddr == lab.address(of: "fw2") },
                    "client → fw1 → fw3 → fw2 → server")
            let client = try await MigrationLab.pacedSessions(lab, "client1")
            #expect(client.allSatisfy { $0.right?.dstAddr == lab.address(of: "fw1") && $0.migration == nil },
                    "the refused removal left the client as it was")
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions, "fw1 stays")
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw2") == 0)
            #expect(try TestSupport.invalidDrops(lab, "fw3") == 0)
        }
    }

    @Test("(g) fw1 removed while every host drops 30 % of the control messages it sends: every session moves (retransmissions), byte-exact (lab ri5, 10.78.127.0/24)")
    func removalUnderControlLoss() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ri5", subnet: "10.78.127.0/24", agentArguments: [])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let sessions = 8
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)
            let lossy = ["-p", "udp", "--dport", "\(ControlMessage.port)", "-m", "statistic", "--mode", "random",
                         "--probability", "0.3", "-j", "DROP"]
            let hosts = ["client1", "fw1", "server1"]
            for host in hosts { _ = try lab.exec(host, ["iptables", "-I", "OUTPUT"] + lossy) }
            let run = try Self.run(lab, "remove", ["--box", "fw1", "--deadline", "10000", "--json"])
            let dropped = try hosts.map { host in
                let out = try lab.exec(host, ["iptables", "-L", "OUTPUT", "-v", "-n", "-x"]).stdout
                return out.split(separator: "\n").first { $0.contains("statistic") }
                    .flatMap { $0.split(separator: " ").first.flatMap { UInt64($0) } } ?? 0
            }.reduce(0, +)
            for host in hosts { _ = try lab.exec(host, ["iptables", "-D", "OUTPUT"] + lossy) }
            Self.record("ri5: \(dropped) control messages dropped; \(run.stdout.prefix(2000))")
            #expect(dropped > 0, "the loss rule dropped nothing: the test would not bite")
            let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
            #expect(report.sessions.count == sessions && report.sessions.allSatisfy { $0.result == "moved" },
                    "\(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.result) \($0.failedStep): \($0.reason)" })")
            let server = try await MigrationLab.pacedSessions(lab, "server1")
            #expect(server.count == sessions && server.allSatisfy { $0.left?.srcAddr == lab.address(of: "client1") },
                    "client → server directly")
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }
}
