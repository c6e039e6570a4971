import ArgumentParser
import DyscoCore

/// The `dysco-migrate` command tree (the executable is only `@main extension DyscoMigrate {}`).
public struct DyscoMigrate: AsyncParsableCommand {
    public init() {}

    public static let configuration = CommandConfiguration(
        commandName: "dysco-migrate",
        abstract: "Steer live TCP sessions through service chains and replace middleboxes under them (Dysco).",
        discussion: """
            Run `dysco-migrate agent` on every host of a chain (inside its network namespace). The other \
            commands talk to agents, to the kernel, or build a test lab of network namespaces. The benchmarks \
            are a separate executable, `dysco-bench`.
            """,
        subcommands: [AgentCommand.self, ReplaceCommand.self, InsertCommand.self, RemoveCommand.self, DeltaCommand.self, DrainCommand.self, PolicyCommand.self, MeasureCommand.self, SessionsCommand.self, StateCommand.self, LabCommand.self, PathCommand.self, KeyCommand.self]
    )

    // The root's own flag rather than the configuration's `version:`, which argument-parser would add to the help of
    // every subcommand.
    @Flag(help: "Print the version and exit.")
    var version = false

    public func run() async throws {
        guard version else { throw CleanExit.helpRequest(self) }
        print(DyscoVersion.string)
    }
}
