import DyscoBench
import ConntrackState
import DyscoSystem
import Foundation
import Logging
import Testing

/// `dysco-migrate state …` as an operator runs it: under `ip netns exec` and with `--netns`.
@Suite struct ConntrackCLITests {
    @Test func exportAndImportThroughTheCLI() throws {
        let bin = try TestSupport.dyscoBinary()
        let prefix = "ctC"
        ConntrackLab.removeNamespaces(prefix: prefix)
        defer { ConntrackLab.removeNamespaces(prefix: prefix) }
        let source = "\(prefix)-src", destination = "\(prefix)-dst"
        try Command.run(["ip", "netns", "add", source])
        try Command.run(["ip", "netns", "add", destination])
        let directory = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("\(prefix)-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }

        var logger = Logger(label: "conntrack.test")
        logger.logLevel = .critical
        let sessions = (0..<3).map { ConntrackBenchmark.syntheticEntry($0, base: 80) }
        #expect(try ConntrackTable(namespace: .named(source), logger: logger)
            .importDocument(StateDocument(host: "t", entries: sessions)).created == 3)

        // Export two sessions under `ip netns exec`, one given by its reply direction; JSON on stdout.
        let one = sessions[0].orig, two = sessions[1].reply
        let stdout = try Command.run([bin, "state", "export",
                                      "--match", "src=\(one.src),dst=\(one.dst),sport=\(one.sport!),dport=\(one.dport!)",
                                      "--match", "src=\(two.src) dst=\(two.dst) sport=\(two.sport!) dport=\(two.dport!) proto=tcp"],
                                     netns: source).stdout
        let document = try StateDocument.decode(Data(stdout.utf8))
        #expect(document.entries.map(\.key) == [sessions[0].key, sessions[1].key])
        #expect(document.host.hasSuffix("/\(source)"))
        #expect(document.entries.allSatisfy { $0.tcp?.orig.wscale == 7 && $0.status.contains(.assured) })

        // --output, --netns
        let file = directory.appendingPathComponent("state.json").path
        try Command.run([bin, "state", "export", "--netns", source, "--match", "mark=0x1/0xff", "--output", file])
        #expect(try StateDocument.decode(Data(contentsOf: URL(fileURLWithPath: file))).entries.map(\.key) == [sessions[1].key])

        // Import from stdin into the destination, deleting on the source; summary on stdout.
        let imported = try Command.run([bin, "state", "import", "--netns", destination, "--delete-on-source", source, "-"],
                                       input: stdout)
        #expect(imported.stdout.contains("2 created"), "\(imported.stdout)")
        #expect(imported.stdout.contains("2 deleted on the source"), "\(imported.stdout)")
        let left = try ConntrackTable(namespace: .named(source), logger: logger).dump().map(\.key)
        #expect(left == [sessions[2].key])

        // Again: skipped by default, replaced with --replace (under ip netns exec this time).
        let again = try Command.run([bin, "state", "import", "-"], netns: destination, input: stdout)
        #expect(again.stdout.contains("2 skipped"), "\(again.stdout)")
        let replaced = try Command.run([bin, "state", "import", "--replace", "--netns", destination, "-"], input: stdout)
        #expect(replaced.stdout.contains("2 replaced"), "\(replaced.stdout)")

        // Failures: non-zero exit, the reason on stderr, nothing written.
        let badVersion = try Command.run([bin, "state", "import", "--netns", destination, "-"],
                                         input: stdout.replacingOccurrences(of: "\"version\" : 1", with: "\"version\" : 9"),
                                         check: false)
        #expect(badVersion.status != 0)
        #expect(badVersion.stderr.contains("unsupported state document version 9"), "\(badVersion.stderr)")
        let impossible = stdout.replacingOccurrences(of: "\"timeout\" : ", with: "\"timeout\" : 0, \"x\" : ")
        let refused = try Command.run([bin, "state", "import", "--netns", destination, "--replace", "-"], input: impossible,
                                      check: false)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("entry #0") && refused.stderr.contains("timeout is 0"), "\(refused.stderr)")
        let malformed = try Command.run([bin, "state", "import", "--netns", destination, "-"], input: "{\"schema\":",
                                        check: false)
        #expect(malformed.status != 0)
        #expect(malformed.stderr.contains("malformed"), "\(malformed.stderr)")
        let missing = try Command.run([bin, "state", "export", "--netns", source,
                                       "--match", "src=10.1.1.1,dst=10.1.1.2,sport=1,dport=2"], check: false)
        #expect(missing.status != 0)
        #expect(missing.stderr.contains("not found"), "\(missing.stderr)")
        #expect(try ConntrackTable(namespace: .named(destination), logger: logger).dump().count == 2)
    }
}
