import ArgumentParser
import ConntrackState
import Logging

/// What every `state` subcommand that opens a table shares: the namespace and how much it logs.
struct StateCommonOptions: ParsableArguments {
    @Option(name: .long, help: "Work on this network namespace's table (/run/netns/NAME) instead of the current one.")
    var netns: String?

    @Flag(name: .shortAndLong, help: "Log every entry (to stderr).")
    var verbose = false

    var namespace: NamespaceSelection { netns.map(NamespaceSelection.named) ?? .current }

    func logger() -> Logger { DyscoLog.logger("state", level: verbose ? .debug : .warning) }
}
