import ArgumentParser
import ConntrackState
import Foundation
import Logging

/// `dysco-migrate state`: a firewall's conntrack state as JSON, through libnetfilter_conntrack (no shelling out).
struct StateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "state",
        abstract: "Export/import a firewall's conntrack state as JSON (docs/STATE-FORMAT.md).",
        discussion: """
            Works inside a network namespace: run it under `ip netns exec NAME`, or pass --netns NAME. \
            Needs CAP_NET_ADMIN (root).
            """,
        subcommands: [StateExportCommand.self, StateImportCommand.self, StateBenchCommand.self]
    )
}

struct StateCommonOptions: ParsableArguments {
    @Option(name: .long, help: "Work on this network namespace's table (/run/netns/NAME) instead of the current one.")
    var netns: String?

    @Flag(name: .shortAndLong, help: "Log every entry (to stderr).")
    var verbose = false

    var namespace: NamespaceSelection { netns.map(NamespaceSelection.named) ?? .current }

    func logger() -> Logger {
        var logger = Logger(label: "dysco-migrate.state", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = verbose ? .debug : .warning
        return logger
    }
}

struct StateExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export conntrack entries as JSON.",
        discussion: """
            --match src=A,dst=B,sport=N,dport=M[,proto=tcp][,zone=Z]   one session, either direction (repeatable)
            --match mark=V[/MASK]                                      entries with this mark
            --match all                                                the whole table (the default)
            Exits non-zero when a requested session has no entry (the document still lists the others).
            """
    )

    @OptionGroup var common: StateCommonOptions

    @Option(name: .long, help: "What to export (see below); repeat for several sessions.")
    var match: [String] = []

    @Option(name: .shortAndLong, help: "Write the JSON here instead of stdout.")
    var output: String?

    @Flag(name: .long, help: "One-line JSON.")
    var compact = false

    func run() throws {
        let selector = try ExportSelector.parse(matches: match)
        let table = try ConntrackTable(namespace: common.namespace, logger: common.logger())
        let result = try table.export(selector, host: ConntrackTable.hostLabel(namespace: common.namespace))
        var json = try result.document.encoded(pretty: !compact)
        json.append(0x0a)
        if let output, output != "-" {
            try json.write(to: URL(fileURLWithPath: output), options: .atomic)
        } else {
            FileHandle.standardOutput.write(json)
        }
        let count = result.document.entries.count
        if let output, output != "-" {
            FileHandle.standardError.write(Data("exported \(count) entr\(count == 1 ? "y" : "ies") to \(output)\n".utf8))
        }
        if !result.missing.isEmpty {
            let list = result.missing.map { "  no entry: \($0)" }.joined(separator: "\n")
            FileHandle.standardError.write(Data("\(result.missing.count) requested session(s) not found:\n\(list)\n".utf8))
            throw ExitCode(2)
        }
    }
}

struct StateImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Import conntrack entries from JSON (keeps strict TCP window tracking).",
        discussion: """
            The whole document is checked before the first write. Prints a summary; exits non-zero when any \
            entry failed (each failure is listed with its entry and the kernel's reason).
            """
    )

    @OptionGroup var common: StateCommonOptions

    @Flag(name: .long, help: "Replace an existing entry with the same tuple (destroy + create) instead of skipping it.")
    var replace = false

    @Flag(name: .long, help: "Set TCP BE_LIBERAL on the imported entries (weakens window tracking).")
    var liberal = false

    @Option(name: .long, help: "After importing, delete the imported entries from this namespace's table (the source firewall).")
    var deleteOnSource: String?

    @Argument(help: "The state document (JSON); - for stdin.")
    var file: String = "-"

    func run() throws {
        let data: Data
        if file == "-" {
            data = FileHandle.standardInput.readDataToEndOfFile()
        } else {
            data = try Data(contentsOf: URL(fileURLWithPath: file))
        }
        let document = try StateDocument.decode(data)
        let logger = common.logger()
        let table = try ConntrackTable(namespace: common.namespace, logger: logger)
        let source = try deleteOnSource.map { try ConntrackTable(namespace: .named($0), logger: logger) }
        let report = try table.importDocument(
            document, options: ImportOptions(existing: replace ? .replace : .skip, liberal: liberal), deletingFrom: source)
        print(report.summary)
        if !report.succeeded { throw ExitCode(1) }
    }
}

struct StateBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure import/export speed in private network namespaces (prints figures, asserts nothing)."
    )

    @Option(name: .long, help: "Entries for the bulk import.") var importCount = 10_000
    @Option(name: .long, help: "Table size for the one-session export.") var tableSize = 100_000
    @Option(name: .long, help: "Sessions for export → JSON → import.") var sessions = 100
    @Flag(name: .shortAndLong, help: "Log to stderr.") var verbose = false

    func run() throws {
        var logger = Logger(label: "dysco-migrate.state.bench", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = verbose ? .info : .warning
        let figures = try ConntrackBenchmark.run(logger: logger, importCount: importCount, tableSize: tableSize,
                                                 sessionCount: sessions)
        for figure in figures { print(figure) }
    }
}
