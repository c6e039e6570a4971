import ArgumentParser
import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Logging

/// Where a command that asks one agent to act (`replace`, `insert`, `remove`, `drain`) finds it: this host, a named
/// namespace, or a lab host (a middlebox, or for `insert` also a client).
struct MiddleboxPlacementOptions: ParsableArguments {
    @Option(help: "The controlling agent (of the old box, the box to remove, the --after host, the box to drain) is in this named network namespace (default: the current one).")
    var netns: String?

    @Option(help: "A lab built with `dysco-migrate lab up`: boxes and hosts may then be its host names (fw1, fw2).")
    var lab: String?

    @Option(help: "Control socket path of the controlling agent (overrides --netns and --lab).")
    var socket: String?

    func validate() throws {
        if let netns, !NetworkNamespace.isValidName(netns) {
            throw ValidationError("--netns '\(netns)' is not a valid namespace name")
        }
    }

    /// Resolves a host name (with --lab) or an address.
    func address(_ text: String, lab: Lab?) throws -> IPAddress {
        if let address = IPAddress(text) { return address }
        guard let lab else { throw ValidationError("'\(text)' is not an IP address (host names need --lab NAME)") }
        guard let host = lab.findHost(text) else {
            throw ValidationError("lab '\(lab.name)' has no host '\(text)' (hosts: \(lab.hosts.map(\.name).joined(separator: ", ")))")
        }
        return host.address
    }

    /// The lab of --lab (nil without it); `component` names the command in the log label (``DyscoLog``).
    func openLab(component: String) throws -> Lab? {
        guard let lab else { return nil }
        return try Lab.attach(name: lab, logger: DyscoLog.logger(component, level: .warning))
    }

    /// The control socket of the agent on host `old` (an address or, with --lab, a lab host name): the old box, the
    /// box to remove, the --after host or the last old box of k → m.
    func socketPath(old: String, lab: Lab?) throws -> String {
        if let socket { return socket }
        if let lab, IPAddress(old) == nil {
            guard let host = lab.findHost(old) else { throw ValidationError("lab '\(lab.name)' has no host '\(old)'") }
            return AgentControlPaths.socketPath(netns: host.namespace)
        }
        if let lab, let address = IPAddress(old), let host = lab.hosts.first(where: { $0.address == address }) {
            return AgentControlPaths.socketPath(netns: host.namespace)
        }
        return AgentControlPaths.socketPath(netns: netns ?? NetworkNamespace.currentName())
    }
}
