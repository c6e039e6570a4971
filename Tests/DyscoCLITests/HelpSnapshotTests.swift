import ArgumentParser
import DyscoBenchCLI
import DyscoCLI
import Foundation
import Testing

/// The help screen (`X --help`, 100 columns) of every command and subcommand of `dysco-migrate` and `dysco-bench`,
/// hidden helpers included, against `Snapshots/<executable>[_<subcommand>...].txt` beside this file. Pure: nothing
/// runs, no root.
///
/// A help text that changed fails here. If the change is meant, rewrite the files and commit them with it:
///
///     DYSCO_UPDATE_SNAPSHOTS=1 swift test --filter DyscoCLITests
@Suite("help snapshots")
struct HelpSnapshotTests {
    /// One command's help screen.
    struct Screen: Sendable, CustomTestStringConvertible {
        /// The command's path joined with `_`, e.g. `dysco-migrate_policy_cordon` (also the snapshot's file name).
        let name: String
        let help: String
        /// The subcommands `--help` of this command does not list (`shouldDisplay: false`).
        let hiddenSubcommands: [String]
        var testDescription: String { name.replacingOccurrences(of: "_", with: " ") }
    }

    static let columns = 100
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Snapshots")
    static let refresh = "DYSCO_UPDATE_SNAPSHOTS=1 swift test --filter DyscoCLITests"
    static var updating: Bool { ProcessInfo.processInfo.environment["DYSCO_UPDATE_SNAPSHOTS"] == "1" }

    /// Every command of both executables, parents before their subcommands.
    static let screens: [Screen] = tree(DyscoMigrate.self) + tree(BenchCommand.self)

    /// The internal helpers (commands kept out of their parent's `--help`); a new one belongs in this list.
    static let internalHelpers = ["dysco-bench connect", "dysco-bench sink", "dysco-migrate lab inserter", "dysco-migrate lab paced-server"]

    static func tree<Root: ParsableCommand>(_ root: Root.Type) -> [Screen] {
        var screens: [Screen] = []
        func visit(_ command: any ParsableCommand.Type, path: [String]) {
            let subcommands = command.configuration.subcommands
            let help = root.helpMessage(for: command, columns: columns)
            screens.append(Screen(name: path.joined(separator: "_"), help: normalized(help),
                                  hiddenSubcommands: subcommands.filter { !$0.configuration.shouldDisplay }.map(name(of:))))
            for subcommand in subcommands { visit(subcommand, path: path + [name(of: subcommand)]) }
        }
        visit(root, path: [name(of: root)])
        return screens
    }

    /// The name a command is called by: its configured name, or its type's name in lower case with `-` between words
    /// (as swift-argument-parser derives it).
    static func name(of command: any ParsableCommand.Type) -> String {
        if let name = command.configuration.commandName { return name }
        var result = ""
        for character in String(describing: command) {
            if character.isUppercase, !result.isEmpty { result.append("-") }
            result.append(contentsOf: character.lowercased())
        }
        return result
    }

    /// The help text as stored: one final newline, and the machine's temporary directory (a default value) as
    /// `$TMPDIR`.
    static func normalized(_ help: String) -> String {
        var text = help.replacingOccurrences(of: "(default: \(NSTemporaryDirectory()))", with: "(default: $TMPDIR)")
        while text.hasSuffix("\n") { text.removeLast() }
        return text + "\n"
    }

    static func file(_ name: String) -> URL { directory.appendingPathComponent(name + ".txt") }

    @Test("help screen matches its snapshot", arguments: HelpSnapshotTests.screens)
    func matchesSnapshot(_ screen: Screen) throws {
        let url = Self.file(screen.name)
        if Self.updating {
            try FileManager.default.createDirectory(at: Self.directory, withIntermediateDirectories: true)
            try screen.help.write(to: url, atomically: true, encoding: .utf8)
            return
        }
        guard let stored = try? String(contentsOf: url, encoding: .utf8) else {
            Issue.record("no snapshot \(url.path) for `\(screen.testDescription) --help`; write it with: \(Self.refresh)")
            return
        }
        guard stored != screen.help else { return }
        let now = screen.help.components(separatedBy: "\n"), was = stored.components(separatedBy: "\n")
        let line = zip(now, was).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(now.count, was.count)
        Issue.record("""
            `\(screen.testDescription) --help` differs from \(url.path) at line \(line + 1):
              snapshot: \(line < was.count ? was[line] : "(end)")
              now:      \(line < now.count ? now[line] : "(end)")
            If the change is meant, refresh the snapshots with: \(Self.refresh)
            --- now ---
            \(screen.help)
            """)
    }

    @Test("every snapshot belongs to a command")
    func noStaleSnapshots() throws {
        let names = Set(Self.screens.map(\.name))
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.directory.path).filter { $0.hasSuffix(".txt") }
        for file in files where !names.contains(String(file.dropLast(4))) {
            if Self.updating {
                try FileManager.default.removeItem(at: Self.directory.appendingPathComponent(file))
            } else {
                Issue.record("snapshot \(file) belongs to no command; remove it, or run: \(Self.refresh)")
            }
        }
    }

    @Test("internal helpers are hidden from their parent's --help, and only they are")
    func internalHelpersHidden() {
        var hidden: [String] = []
        for screen in Self.screens {
            let parent = screen.testDescription
            for name in screen.hiddenSubcommands {
                hidden.append("\(parent) \(name)")
                #expect(!screen.help.contains("\n  \(name) "), "`\(parent) --help` lists the hidden `\(name)`")
            }
        }
        #expect(hidden.sorted() == Self.internalHelpers.sorted())
    }
}
