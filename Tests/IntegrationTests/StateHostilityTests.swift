import DyscoBench
import ConntrackState
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging
import Testing

/// (e) Hostile state documents (docs/STATE-FORMAT.md, "Hostile documents"): given to `state import` in a
/// namespace lab (ConntrackLab `sdc`, 10.79.70.0/24 + 10.79.71.0/24) and to the agent's own import path
/// (ConntrackStateStore; a real `replace` between agents in lab `sdr`, 10.79.72.0/24), each is refused with its
/// JSON path and the rule, and nothing reaches the importing firewall's conntrack table. The untouched document
/// is imported afterwards: the checks are what refused the others. Needs root.
@Suite(.serialized) struct StateHostilityTests {
    static var bin: String { ProcessInfo.processInfo.environment["DYSCO_BIN"] ?? ".build/release/dysco-migrate" }

    /// Entries of `namespace`'s table that name an address of the lab's subnets.
    static func labEntries(_ namespace: String, net: String = "10.79.") throws -> [ConntrackEntry] {
        let table = try ConntrackTable(namespace: .named(namespace), logger: Logger(label: "sd.test"))
        return try table.dump().filter { "\($0.orig.src)".hasPrefix(net) || "\($0.orig.dst)".hasPrefix(net) }
    }

    /// Valid padding entries 10.79.70.10:(20000+i) → 10.79.71.10:8080 around the real one.
    static func padding(_ count: Int, lab: ConntrackLab) -> [ConntrackEntry] {
        (0..<count).map { index in
            let orig = ConntrackTuple(src: IPAddress(lab.clientIP)!, dst: IPAddress(lab.serverIP)!,
                                      sport: UInt16(20000 + index), dport: 8080)
            return ConntrackEntry(family: .ipv4, proto: .tcp, orig: orig, reply: orig.inverted,
                                  tcp: TCPInfo(state: .established), status: [.seenReply, .assured], timeout: 300)
        }
    }

    static func compact(_ document: StateDocument) throws -> String {
        String(decoding: try document.encoded(pretty: false), as: UTF8.self)
    }

    @Test("(e) state import refuses truncated, out-of-range, oversized and loopback documents with the path; nothing imported")
    func hostileDocumentsThroughTheCLI() throws {
        let lab = try ConntrackLab(prefix: "sdc", left: 70, net: "10.79")
        defer { lab.teardown() }
        _ = try lab.makeBlob(megabytes: 1)
        try lab.startServer()
        // A real TCP session that stays established: the client sends half a request line and waits (curl's
        // --limit-rate does not always hold back a fast veth, and a finished download leaves only TIME_WAIT).
        let client = try Command.spawn(["python3", "-c", """
            import socket, time
            s = socket.create_connection(("\(lab.serverIP)", 8080))
            s.sendall(b"GET /blob HTTP/1.1\\r\\nHost: x")
            time.sleep(120)
            """], netns: lab.cli, logPath: lab.workDir.appendingPathComponent("client.log").path)
        lab.processes.append(client)
        var found: FlowKey?
        for _ in 0..<100 where found == nil {
            found = try? lab.clientSession()
            if found == nil { Thread.sleep(forTimeInterval: 0.1) }
        }
        let session = try #require(found, "no client session (client running: \(client.isRunning)): \(lab.diagnostics())")

        // The real session's entry, exported from fwA, amid 20 valid padding entries (the real one at index 3).
        let export = try Command.run([Self.bin, "state", "export", "--netns", lab.fwA, "--compact", "--match",
                                      "src=\(session.tuple.src),dst=\(session.tuple.dst),sport=\(session.tuple.sport!),dport=8080"])
        let real = try StateDocument.decode(Data(export.stdout.utf8))
        #expect(real.entries.count == 1)
        var entries = Self.padding(20, lab: lab)
        entries.insert(real.entries[0], at: 3)
        let document = StateDocument(host: real.host, entries: entries)
        let good = try Self.compact(document)
        let dir = lab.workDir.path
        #expect(try Self.labEntries(lab.fwB).isEmpty, "fwB starts empty")

        func refused(_ name: String, _ text: String, _ extra: [String] = [], expect needles: [String]) throws {
            let path = "\(dir)/\(name).json"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let run = try Command.run([Self.bin, "state", "import", "--netns", lab.fwB] + extra + [path], check: false)
            #expect(run.status != 0, "\(name) was accepted: \(run.stdout)")
            for needle in needles { #expect(run.stderr.contains(needle), "\(name): no \"\(needle)\" in \(run.stderr)") }
            #expect(run.stderr.contains("nothing imported"), "\(name): \(run.stderr)")
            #expect(try Self.labEntries(lab.fwB).isEmpty, "\(name): something reached fwB's table")
        }

        // 1. Truncated inside entry 10's source port (padding entry 9: sport 20009).
        let marker = try #require(good.range(of: "\"sport\":20009"))
        let cut = good.utf8.distance(from: good.utf8.startIndex, to: marker.upperBound) - 2
        try refused("truncated", String(good.utf8.prefix(cut))!,
                    expect: ["$.entries[10].orig: malformed JSON: unexpected end of document at byte \(cut)", "(truncated?)"])

        // 2. An out-of-range port at a known path (entry 17); the other 20 entries are valid.
        var marked = entries
        marked[17].orig.sport = 65432
        marked[17].reply = marked[17].orig.inverted
        var portHostile = try Self.compact(StateDocument(host: real.host, entries: marked))
        portHostile.replaceSubrange(try #require(portHostile.range(of: "\"sport\":65432")), with: "\"sport\":70000")
        try refused("port", portHostile, expect: ["$.entries[17].orig.sport: 70000 is out of range (0–65535)"])

        // 3. 1,000,000 entries: beyond the default limit (128 MiB), refused before parsing, as a file and as a stream.
        let big = "\(dir)/million.json"
        let size = try StateValidateBenchmark.generate(path: big, count: 1_000_000)
        defer { try? FileManager.default.removeItem(atPath: big) }
        let file = try Command.run([Self.bin, "state", "import", "--netns", lab.fwB, big], check: false)
        #expect(file.status != 0)
        #expect(file.stderr.contains("$: document of \(size) bytes is larger than the limit of 134217728 bytes"), "\(file.stderr)")
        let stream = try Command.run(["sh", "-c", "cat '\(big)' | '\(Self.bin)' state import --netns \(lab.fwB) -"], check: false)
        #expect(stream.status != 0)
        #expect(stream.stderr.contains("refused at byte 134217729"), "\(stream.stderr)")
        #expect(try Self.labEntries(lab.fwB).isEmpty && Self.labEntries(lab.fwB, net: "10.200.").isEmpty)
        try? FileManager.default.removeItem(atPath: big)

        // 4. Loopback endpoints (--only-local), and an entry of a network fwB has no route to (--only-local routes).
        var loopback = entries
        loopback[5].orig.src = IPAddress("127.0.0.1")!
        loopback[5].reply = loopback[5].orig.inverted
        try refused("loopback", try Self.compact(StateDocument(host: "h", entries: loopback)), ["--only-local", "basic"],
                    expect: ["$.entries[5].orig.src: 127.0.0.1 is loopback (--only-local)", "$.entries[5].reply.dst"])
        var foreign = entries
        foreign[8].orig = ConntrackTuple(src: IPAddress("10.79.99.10")!, dst: IPAddress("10.79.98.10")!, sport: 40000, dport: 80)
        foreign[8].reply = foreign[8].orig.inverted
        try refused("foreign", try Self.compact(StateDocument(host: "h", entries: foreign)), ["--only-local", "routes"],
                    expect: ["$.entries[8].orig: neither 10.79.99.10 nor 10.79.98.10", "(--only-local=routes)"])

        // 5. The agent's import (ConntrackStateStore, as the agent builds it) refuses loopback by default.
        let store = ConntrackStateStore(logger: Logger(label: "sd.test"), namespace: .named(lab.fwB))
        do {
            try store.importState(Array(try Self.compact(StateDocument(host: "h", entries: [loopback[5]])).utf8))
            Issue.record("the agent's store imported a loopback entry")
        } catch {
            #expect("\(error)".contains("$.entries[0].orig.src: 127.0.0.1 is loopback (--state-only-local)"), "\(error)")
            #expect("\(error)".contains("nothing imported"), "\(error)")
        }
        #expect(try Self.labEntries(lab.fwB).isEmpty && Self.labEntries(lab.fwB, net: "127.").isEmpty)

        // The untouched document passes every check, --only-local routes included, and imports all 21 entries.
        let goodPath = "\(dir)/good.json"
        try good.write(toFile: goodPath, atomically: true, encoding: .utf8)
        let validate = try Command.run([Self.bin, "state", "validate", "--only-local", "routes", "--netns", lab.fwB, "--json", goodPath],
                                       check: false)
        #expect(validate.status == 0 && validate.stdout.contains("\"valid\" : true"), "\(validate.stdout) \(validate.stderr)")
        let imported = try Command.run([Self.bin, "state", "import", "--netns", lab.fwB, "--only-local", "routes", goodPath], check: false)
        #expect(imported.status == 0 && imported.stdout.contains("21 created"), "\(imported.stdout) \(imported.stderr)")
        let onB = try Self.labEntries(lab.fwB)
        #expect(onB.count == 21 && onB.contains { $0.key == real.entries[0].key }, "\(onB.count) entries on fwB")
        client.terminate()
    }

    @Test("(e) a state document over the new box's limit, sent by the agents during replace: refused, cancelled, nothing imported")
    func hostileDocumentThroughTheAgents() async throws {
        try await TestSupport.withLab(MigrationLab.spec("sdr", subnet: "10.79.72.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 6)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 1)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 1)
            // fw2 accepts state, but only documents of at most 200 bytes: the real one (~500 bytes) is over.
            try lab.restartAgent("fw2", extraArguments: ["--state-max-bytes", "200"])
            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            #expect(run.status == 1)
            let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
            #expect(report.sessions.count == 1)
            for s in report.sessions {
                #expect(s.result == "cancelled" && s.failedStep == "state", "\(s.result) \(s.failedStep) \(s.reason)")
                #expect(s.reason.contains("larger than the limit of 200 bytes"), "\(s.reason)")
                #expect(s.reason.contains("nothing imported"), "\(s.reason)")
            }
            // fw2's firewall holds no established entry of the session (its SYN of the new path may have left a
            // SYN_SENT one; the refused import would have been ESTABLISHED and ASSURED).
            let server = lab.address(of: "server1").description
            let fw2 = try lab.conntrackTCP("fw2").split(separator: "\n").filter { $0.contains("dst=\(server)") }
            #expect(fw2.allSatisfy { !$0.contains("ESTABLISHED") && !$0.contains("ASSURED") }, "\(fw2)")
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == 1, "the session stays on fw1")
            #expect(downloads.wait())
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }
}
