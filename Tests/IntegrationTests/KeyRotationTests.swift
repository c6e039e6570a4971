import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// `dysco-migrate key rotate` with live sessions (issue 19): the lab's key is rotated with the CLI, and the agents
/// are restarted (their sessions survive a restart) half-way through the rotation, so that two sign with the old
/// key and accept the new one, and two sign with the new key and accept the old one. Sessions set up before keep
/// flowing, a `replace` fw1 → fw2 across agents with different current keys moves them, and a new session crosses
/// them: nothing is refused for its MAC. Lab `kr1`, 10.78.88.0/24. Needs root.
@Suite(.serialized) struct KeyRotationTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[key-rotation-tests] \(line)\n".utf8))
    }

    func cli(_ arguments: [String]) throws -> CommandResult {
        try Command.run([try TestSupport.dyscoBinary()] + arguments, check: false)
    }

    func json(_ result: CommandResult) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]) ?? [:]
    }

    func mode(_ path: String) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? NSNumber)?.intValue ?? -1
    }

    @Test("agents on the old and on the new key interoperate during the rotation: live sessions, replace, new sessions")
    func rotationWithLiveSessions() async throws {
        try await TestSupport.withLab(MigrationLab.spec("kr1", subnet: "10.78.88.0/24")) { lab in
            // The deployment's key, where the operator keeps it; `key rotate` there.
            let keys = "\(lab.directory)/keys", current = "\(lab.directory)/keys/trust.key"
            let previous = "\(lab.directory)/keys/trust-previous.key"
            let labKey = try TrustKey.load(path: lab.trustKeyPath)
            try TrustKeyFile.save(hex: labKey.hex, to: current, replace: false)
            let shown = json(try cli(["key", "show", "--path", current, "--json"]))
            #expect(shown["fingerprint"] as? String == labKey.fingerprint && shown["key"] == nil, "\(shown)")

            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 10)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)

            let rotation = try cli(["key", "rotate", "--path", current, "--previous-path", previous, "--json"])
            #expect(rotation.status == 0, "\(rotation)")
            let rotated = json(rotation)
            let newInfo = rotated["current"] as? [String: Any], oldInfo = rotated["previous"] as? [String: Any]
            let newKey = try TrustKey.load(path: current)
            #expect(oldInfo?["fingerprint"] as? String == labKey.fingerprint, "\(rotation.stdout)")
            #expect(newInfo?["fingerprint"] as? String == newKey.fingerprint && newKey != labKey)
            #expect(try TrustKey.load(path: previous) == labKey)
            #expect(mode(current) == 0o600 && mode(previous) == 0o600)
            #expect((rotated["steps"] as? [String])?.joined().contains("--trust-key-previous") == true)
            #expect(try FileManager.default.contentsOfDirectory(atPath: keys).sorted() == ["trust-previous.key", "trust.key"])

            // Mid-rotation: fw1 and server1 at step 2 (sign old, accept new), client1 and fw2 at step 3 (sign new,
            // accept old). Each restart keeps the live sessions (state file, kernel fast path).
            let signOld = ["--trust-key", previous, "--trust-key-previous", current]
            let signNew = ["--trust-key", current, "--trust-key-previous", previous]
            for (host, arguments) in [("fw1", signOld), ("server1", signOld), ("client1", signNew), ("fw2", signNew)] {
                if host != "fw2" { try await MigrationLab.waitUntilRestartSafe(lab, host, count: sessions) }
                try lab.restartAgent(host, extraArguments: arguments)
                let command = lab.agentRecord(host)?.command ?? []
                #expect(command.contains(arguments[1]) && command.filter { $0 == "--trust-key" }.count == 1, "\(host): \(command)")
            }

            // The live sessions move fw1 → fw2: the control messages cross agents that sign with different keys.
            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && report.matched == sessions && report.allMoved,
                    "\(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.failedStep): \($0.reason)" })")
            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)

            // A new session: client1 signs its SYN with the new key, fw1 relays it signing with the old one.
            let fetch = try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "5", "-o", "/dev/null",
                                                 "http://\(lab.address(of: "server1"))/index.html"], check: false)
            #expect(fetch.status == 0, "new session across the rotation: \(fetch.stderr)")

            for host in ["client1", "fw1", "fw2", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                let c = snapshot.counters
                #expect(c.trailerBadMAC == 0 && c.malformedDyscoSyn == 0, "\(host): \(c)")
                #expect(snapshot.control["dropped.bad-mac", default: 0] == 0, "\(host): \(snapshot.control)")
            }
            // (fw1's counters start at its restart: the sessions before it are restored, not created.)
            #expect(try await TestSupport.snapshot(lab, "fw1").counters.sessionsCreated >= 1, "the new session went through fw1")

            // A key file others may read is refused, by the agent and by `key show`, naming the fix.
            chmod(previous, 0o640)
            let agent = try cli(["agent", "--trust-key", current, "--trust-key-previous", previous])
            #expect(agent.status != 0 && agent.stderr.contains("--trust-key-previous") && agent.stderr.contains("chmod 600"),
                    "\(agent)")
            let show = try cli(["key", "show", "--path", previous])
            #expect(show.status == 1 && show.stderr.contains("mode 0640"), "\(show)")
            Self.record("rotation mid-transfer: \(sessions) sessions moved across agents with different current keys")
        }
    }
}
