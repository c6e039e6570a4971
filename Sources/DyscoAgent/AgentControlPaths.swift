/// Where an agent listens for `sessions` and other local requests: one Unix socket per network namespace.
public enum AgentControlPaths {
    public static let runDirectory = "/run/dysco-migrate"

    /// The control socket of the agent in namespace `netns` (nil: the initial namespace, named "host").
    public static func socketPath(netns: String?) -> String {
        "\(runDirectory)/agent-\(netns ?? "host").sock"
    }

    /// The state file that goes with a control socket: `.sock` replaced by `.state` (appended otherwise), so
    /// `/run/dysco-migrate/agent-<netns>.state` by default (docs/ARCHITECTURE.md, "Agent crash and restart").
    public static func statePath(socketPath: String) -> String {
        (socketPath.hasSuffix(".sock") ? String(socketPath.dropLast(5)) : socketPath) + ".state"
    }
}
