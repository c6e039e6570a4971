import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Rolling upgrade (issue 19 item 3, docs/CONTROL-PROTOCOL.md "Versions"): agents of the previous release and of
/// this one reconfigure sessions together. The previous release is simulated on the wire by `--wire-version 3`
/// (it takes and sends only version 3, byte for byte the previous release's format: WireVersionTests checks the
/// bytes); the other agents run this release's default (take 3 and 4, send the oldest that carries each message).
/// Lab `ru1`, 10.78.132.0/24. Needs root.
@Suite(.serialized) struct RollingUpgradeTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[rolling-upgrade-tests] \(line)\n".utf8))
    }

    @Test("mid-upgrade (client1 and fw2 on the previous wire version) live sessions move fw1 → fw2 → fw1 byte-exact; an agent pinned to version 4 refuses version 3 and the replace is cancelled harmlessly")
    func mixedVersions() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ru1", subnet: "10.78.132.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)

            // The previous release on client1 (the sessions' left anchor) and fw2 (the new box); each restart keeps
            // the live sessions.
            let previous = ["--wire-version", "3"]
            try await MigrationLab.waitUntilRestartSafe(lab, "client1", count: sessions)
            try lab.restartAgent("client1", extraArguments: previous)
            try lab.restartAgent("fw2", extraArguments: previous)
            for host in ["client1", "fw2"] {
                #expect(try await TestSupport.snapshot(lab, host).wireVersions == [3], "\(host)")
            }
            for host in ["fw1", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.wireVersions == [3, 4] && snapshot.agentVersion == DyscoVersion.string, "\(host)")
            }

            // fw1 → fw2 (fw1's agent, this release, is the controller; client1 runs the protocol as version 3),
            // then back (fw2's agent, the previous release, is the controller).
            for (old, new) in [("fw1", "fw2"), ("fw2", "fw1")] {
                let run = try MigrationLab.replace(lab, old: old, new: new)
                let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
                #expect(run.status == 0 && report.matched == sessions && report.allMoved,
                        "\(old) → \(new): \(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.failedStep): \($0.reason)" })")
                Self.record("\(old) → \(new) across versions: \(report.sessions.filter { $0.result == "moved" }.count) moved")
            }
            for host in ["client1", "fw1", "fw2", "server1"] {
                let control = try await TestSupport.snapshot(lab, host).control
                #expect(control["dropped.bad-version", default: 0] == 0 && control["unsent.version", default: 0] == 0,
                        "\(host): \(control)")
                #expect(control["received.requestLock", default: 0] + control["received.newPathSyn", default: 0]
                        + control["received.trigger", default: 0] + control["received.ackLock", default: 0] > 0,
                        "\(host) took part: \(control)")
            }

            // After the upgrade an operator may pin an agent to version 4: it then drops the previous release's
            // messages (counted), and a replace through it is cancelled with the data plane untouched.
            try await MigrationLab.waitUntilRestartSafe(lab, "server1", count: sessions)
            try lab.restartAgent("server1", extraArguments: ["--wire-version", "4"])
            let refused = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--deadline", "1000"])
            let refusedReport = try #require(refused.report, "\(refused.stdout) \(refused.stderr)")
            #expect(refusedReport.matched == sessions && refusedReport.sessions.allSatisfy { $0.result == "cancelled" },
                    "\(refusedReport.sessions.map { "\($0.result) \($0.failedStep): \($0.reason)" })")
            #expect(try await TestSupport.snapshot(lab, "server1").control["dropped.bad-version", default: 0] > 0)
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions, "the sessions stay on fw1")

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0 && TestSupport.invalidDrops(lab, "fw2") == 0)

            // A CLI of this release reads a pinned agent's JSON (sessions --json through the lab).
            let sessionsJSON = try Command.run([try TestSupport.dyscoBinary(), "sessions", "--netns", lab.namespace(of: "client1"), "--json"],
                                               check: false)
            #expect(sessionsJSON.status == 0, "\(sessionsJSON.stderr)")
        }
    }
}
