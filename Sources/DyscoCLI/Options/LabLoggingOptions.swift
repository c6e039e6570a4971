import ArgumentParser
import Logging

/// Options every `lab` subcommand that builds or removes a lab shares: how much it logs.
struct LabLoggingOptions: ParsableArguments {
    @Flag(name: .long, help: "Log every step (debug level).")
    var verbose = false

    func logger() -> Logger { DyscoLog.logger("lab", level: verbose ? .debug : .info) }
}
