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
        subcommands: [StateExportCommand.self, StateImportCommand.self, StateValidateCommand.self]
    )
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
            The whole document is read and checked before the first write, as `state validate` does (size limit \
            before parsing, strict JSON, every entry, --only-local); a refused document imports nothing and every \
            problem is listed with its JSON path. Prints a summary; exits non-zero when any entry failed (each \
            failure is listed with its entry and the kernel's reason).
            """
    )

    @OptionGroup var common: StateCommonOptions

    @Flag(name: .long, help: "Replace an existing entry with the same tuple (destroy + create) instead of skipping it.")
    var replace = false

    @Flag(name: .long, help: "Set TCP BE_LIBERAL on the imported entries (weakens window tracking).")
    var liberal = false

    @Option(name: .long, help: "After importing, delete the imported entries from this namespace's table (the source firewall).")
    var deleteOnSource: String?

    @OptionGroup var read: StateReadOptions

    @Argument(help: "The state document (JSON); - for stdin.")
    var file: String = "-"

    func run() throws {
        let document = try read.reader(namespace: common.namespace).read(StateReadOptions.source(file))
        let logger = common.logger()
        let table = try ConntrackTable(namespace: common.namespace, logger: logger)
        let source = try deleteOnSource.map { try ConntrackTable(namespace: .named($0), logger: logger) }
        let report = table.importDocument(
            document, options: ImportOptions(existing: replace ? .replace : .skip, liberal: liberal), deletingFrom: source)
        print(report.summary)
        if !report.succeeded { throw ExitCode(1) }
    }
}

struct StateValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate",
        abstract: "Check a state document as import would, without touching any table.",
        discussion: """
            Streams the document (memory for one entry, not the document) and applies every check of import: \
            the size limit, strict JSON (UTF-8, no BOM, nesting, string length, duplicate keys, nothing after the \
            document), the header, each entry's fields and ranges, --only-local and duplicate tuples. Each \
            problem is printed with its JSON path, e.g. `$.entries[17].orig.sport: 70000 is out of range \
            (0–65535)`. Exit 0 when valid, 1 when refused. --json prints {"valid", "entries", "bytes", \
            "problems", "issues": [{"path", "reason", "index", "entry"}]}.
            """
    )

    @OptionGroup var read: StateReadOptions

    @Option(name: .long, help: "Namespace whose addresses and routes --only-local routes uses (default: the current one).")
    var netns: String?

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Result>

    @Argument(help: "The state document (JSON); - for stdin.")
    var file: String = "-"

    struct Output: Encodable {
        struct Issue: Encodable { var path: String; var reason: String; var index: Int?; var entry: String? }
        var valid: Bool
        var entries: Int?
        var bytes: Int?
        var problems: Int
        var issues: [Issue]
    }

    func run() throws {
        let json = jsonOutput.json
        let reader = try read.reader(namespace: netns.map(NamespaceSelection.named) ?? .current)
        let output: Output
        do {
            let result = try reader.validate(StateReadOptions.source(file))
            output = Output(valid: true, entries: result.entryCount, bytes: result.byteCount, problems: 0, issues: [])
        } catch {
            output = Output(valid: false, problems: error.count, issues: error.issues.map {
                .init(path: $0.path, reason: $0.reason, index: $0.index, entry: $0.entry.isEmpty ? nil : $0.entry)
            })
            if !json { FileHandle.standardError.write(Data("\(error)\n".utf8)) }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            FileHandle.standardOutput.write(try encoder.encode(output) + Data("\n".utf8))
        } else if output.valid {
            print("valid: \(output.entries ?? 0) entries, \(output.bytes ?? 0) bytes")
        }
        if !output.valid { throw ExitCode(1) }
    }
}
