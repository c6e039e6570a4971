import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Rolling upgrade (issue 19 item 3, docs/CONTROL-PROTOCOL.md "Versions"): agents of the previous release and of
/// this one reconfigure sessions together, and each release's CLI reads the other's agents. The previous release is
/// the real one: `make test` builds it from its commit on main (`make previous`, scripts/build-previous.sh, release 0.19.0) and
/// passes it as $DYSCO_PREVIOUS_BIN. Lab `ru1`, 10.78.132.0/24. Needs root.
@Suite(.serialized) struct RollingUpgradeTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[rolling-upgrade-tests] \(line)\n".utf8))
    }

    static func previousBinary() throws -> String {
        let path = try #require(ProcessInfo.processInfo.environment["DYSCO_PREVIOUS_BIN"],
                                "DYSCO_PREVIOUS_BIN is not set: `make previous` builds the previous release (make test does)")
        try #require(FileManager.default.isExecutableFile(atPath: path), "DYSCO_PREVIOUS_BIN \(path) is not an executable")
        return path
    }

    @Test("mid-upgrade (client1 and fw2 run the previous release) live sessions move fw1 → fw2 → fw1 byte-exact; each release's CLI reads the other's agents")
    func mixedReleases() async throws {
        let previous = try Self.previousBinary()
        let version = try Command.run([previous, "--version"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(version != DyscoVersion.string, "the previous release must be another release: \(version)")
        try await TestSupport.withLab(MigrationLab.spec("ru1", subnet: "10.78.132.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions)

            // The previous release on client1 (the sessions' left anchor) and fw2 (the new box): an upgrade half
            // done. Each restart keeps the live sessions (the state file and the pinned maps cross the releases).
            try await MigrationLab.waitUntilRestartSafe(lab, "client1", count: sessions)
            try lab.restartAgent("client1", binary: previous)
            try lab.restartAgent("fw2", binary: previous)
            Self.record("previous release \(version) (\(previous)) on client1 and fw2, \(DyscoVersion.string) on fw1 and server1")
            for host in ["client1", "fw2"] {
                // This release's CLI reads the previous release's snapshot (it has no agentVersion, and not every
                // counter this release has).
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.agentVersion == nil, "\(host) runs the previous release: \(snapshot.agentVersion ?? "")")
            }
            for host in ["fw1", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.agentVersion == DyscoVersion.string && snapshot.wireVersions == Array(ControlMessage.versions),
                        "\(host)")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "client1").count == sessions, "client1 took its sessions back")

            // fw1 → fw2: fw1's agent (this release) is the controller, client1 (previous) the left anchor, fw2
            // (previous) the new box; then back: fw2's agent (previous) is the controller, fw1 (this) the new box.
            for (old, new) in [("fw1", "fw2"), ("fw2", "fw1")] {
                let run = try MigrationLab.replace(lab, old: old, new: new)
                let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
                #expect(run.status == 0 && report.matched == sessions && report.allMoved,
                        "\(old) → \(new): matched \(report.matched), \(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.failedStep): \($0.reason)" }) \(run.stderr.prefix(500))")
                Self.record("\(old) → \(new) across releases: \(report.sessions.filter { $0.result == "moved" }.count) moved")
            }
            for host in ["client1", "fw1", "fw2", "server1"] {
                let control = try await TestSupport.snapshot(lab, host).control
                #expect(control["dropped.bad-version", default: 0] == 0 && control["unsent.version", default: 0] == 0,
                        "\(host): \(control.filter { $0.key.hasPrefix("dropped") || $0.key.hasPrefix("unsent") })")
                #expect(control["received.requestLock", default: 0] + control["received.newPathSyn", default: 0]
                        + control["received.trigger", default: 0] + control["received.ackLock", default: 0] > 0,
                        "\(host) took part: \(control)")
            }

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0 && TestSupport.invalidDrops(lab, "fw2") == 0)

            // Both CLIs read both releases' agents (`sessions --json`: JSON replies across releases).
            for (cli, host) in [(try TestSupport.dyscoBinary(), "client1"), (previous, "fw1")] {
                let result = try Command.run([cli, "sessions", "--netns", lab.namespace(of: host), "--json"], check: false)
                #expect(result.status == 0 && result.stdout.contains("\"counters\""), "\(cli) on \(host): \(result.stderr.prefix(300))")
            }
        }
    }
}
