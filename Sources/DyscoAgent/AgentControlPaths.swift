/// Where an agent listens for `sessions` and other local requests: one Unix socket per network namespace.
public enum AgentControlPaths {
    public static let runDirectory = "/run/dysco-migrate"

    /// The control socket of the agent in namespace `netns` (nil: the initial namespace, named "host").
    public static func socketPath(netns: String?) -> String {
        "\(runDirectory)/agent-\(netns ?? "host").sock"
    }
}
