import ArgumentParser
import DyscoBench
import DyscoCLI
import Foundation
import Logging

/// `dysco-bench conntrack` (formerly `dysco-migrate state bench`).
struct ConntrackBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conntrack",
        abstract: "Conntrack state import/export speed in private network namespaces (prints figures, asserts nothing)."
    )

    @Option(name: .long, help: "Entries for the bulk import.") var importCount = 10_000
    @Option(name: .long, help: "Table size for the one-session export.") var tableSize = 100_000
    @Option(name: .long, help: "Sessions for export → JSON → import.") var sessions = 100
    @Flag(name: .shortAndLong, help: "Log to stderr.") var verbose = false

    func run() throws {
        let logger = DyscoLog.logger("bench.conntrack", level: verbose ? .info : .warning)
        let figures = try ConntrackBenchmark.run(logger: logger, importCount: importCount, tableSize: tableSize,
                                                 sessionCount: sessions)
        for figure in figures { print(figure) }
    }
}
