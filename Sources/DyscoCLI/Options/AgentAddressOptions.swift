import ArgumentParser
import DyscoAgent
import DyscoSystem

/// Which agent a client command (`sessions`, `path`, `policy`) talks to: the one of a named network namespace, or a
/// socket path.
struct AgentAddressOptions: ParsableArguments {
    @Option(help: "Ask the agent of this named network namespace (default: the current one).")
    var netns: String?

    @Option(help: "Control socket path (overrides --netns).")
    var socket: String?

    var socketPath: String { socket ?? AgentControlPaths.socketPath(netns: netns ?? NetworkNamespace.currentName()) }
}
