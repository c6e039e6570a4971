import Logging

/// The one logger factory of both executables (the libraries take a `Logger` and make none): label
/// `dysco.<component>` (dysco.agent, dysco.replace, dysco.drain, dysco.lab, dysco.state, dysco.measure, dysco.bench,
/// dysco.bench.conntrack), swift-log's `StreamLogHandler` on stderr, so a line reads
/// `<time> <level> dysco.<component>: <metadata> [<module>] <message>`. No global `LoggingSystem.bootstrap`.
public enum DyscoLog {
    /// The label of `component`'s logger.
    public static func label(_ component: String) -> String { "dysco.\(component)" }

    /// A logger for `component` at `level`.
    public static func logger(_ component: String, level: Logger.Level) -> Logger {
        var logger = Logger(label: label(component), factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = level
        return logger
    }
}
