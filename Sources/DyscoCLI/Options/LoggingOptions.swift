import ArgumentParser
import Logging

/// `--log-level` (the agent).
struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    /// `component`'s logger (``DyscoLog``) at --log-level.
    func logger(_ component: String) -> Logger { DyscoLog.logger(component, level: logLevel) }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
