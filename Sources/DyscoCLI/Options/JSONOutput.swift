import ArgumentParser

/// What one command prints with `--json`: the flag's help text (the flag itself is ``JSONOutput``).
public protocol JSONOutputHelp {
    static var text: String { get }
}

/// `--json`: print JSON for scripts instead of text. Every command that prints JSON takes this one group
/// (`@OptionGroup var output: JSONOutput<JSONHelp.X>`); the type parameter only chooses the help text, which says
/// what that command's JSON is. Name, default (off) and parsing are the same everywhere.
public struct JSONOutput<Help: JSONOutputHelp>: ParsableArguments {
    @Flag(help: ArgumentHelp(Help.text))
    public var json = false

    public init() {}
}

/// The help texts of `--json`, one per kind of JSON a command prints.
public enum JSONHelp {
    /// A benchmark's or `replace`'s report.
    public enum Report: JSONOutputHelp { public static let text = "Print the report as JSON." }
    /// `drain`: the summary (the progress lines move to stderr).
    public enum DrainSummary: JSONOutputHelp {
        public static let text = "Print the summary as JSON (progress lines then go to stderr)."
    }
    /// `path`: the agent's reply.
    public enum Plain: JSONOutputHelp { public static let text = "Print JSON." }
    /// `policy show|reload|cordon|uncordon`: the agent's reply.
    public enum AgentAnswer: JSONOutputHelp { public static let text = "Print the agent's answer as JSON." }
    /// `sessions`: the agent's snapshot.
    public enum Snapshot: JSONOutputHelp {
        public static let text = "Print JSON (the agent's full snapshot) instead of a table."
    }
    /// `lab up`: lab.json.
    public enum LabState: JSONOutputHelp {
        public static let text = "Print the lab's state (lab.json) as JSON when it is ready."
    }
    /// `lab down`: what was removed.
    public enum LabRemoved: JSONOutputHelp { public static let text = "Print what was removed as JSON." }
    /// `lab status`: every lab.
    public enum Labs: JSONOutputHelp { public static let text = "Print JSON (an array of labs) for scripts." }
    /// `state validate`: the verdict and its problems.
    public enum Result: JSONOutputHelp { public static let text = "Print the result as JSON." }
    /// `measure`: report.json.
    public enum MeasureReport: JSONOutputHelp {
        public static let text = "Print report.json to stdout instead of the text report."
    }
    /// `key generate|show|rotate`: path and fingerprint of each key.
    public enum Key: JSONOutputHelp {
        public static let text = "Print the key file's path and fingerprint as JSON (rotate: both keys and the steps)."
    }
    /// `dysco-bench state-validate`: the measurements.
    public enum Measurements: JSONOutputHelp { public static let text = "Print the measurements as JSON." }
}
