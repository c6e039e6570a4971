import ArgumentParser
import Logging

/// Options every `lab` subcommand that builds or removes a lab shares: how much it logs.
struct LabLoggingOptions: ParsableArguments {
    @Flag(name: .long, help: "Log every step (debug level).")
    var verbose = false

    func logger() -> Logger {
        var logger = Logger(label: "dysco-migrate.lab")
        logger.logLevel = verbose ? .debug : .info
        return logger
    }
}
