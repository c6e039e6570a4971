import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation

/// What `dysco-migrate lab status` reports about one lab.
public struct LabStatus: Codable, Sendable {
    public struct Host: Codable, Sendable {
        public var name: String
        public var namespace: String
        public var role: LabRole
        public var address: IPAddress
        public var namespaceExists: Bool
        public var agentPid: Int32?
        public var agentAlive: Bool?
        /// Services (iperf3, http, ...) with pid and whether they run.
        public var services: [Service]
        /// The firewall profile the lab built this middlebox with (nil for other roles).
        public var firewallProfile: FirewallProfile?
        public var firewall: FirewallCounters?
    }

    public struct Service: Codable, Sendable {
        public var kind: String
        public var pid: Int32
        public var alive: Bool
    }

    public var name: String
    /// creating / ready / failed, or "broken" when lab.json is missing or unreadable.
    public var phase: String
    public var directory: String
    public var subnet: IPPrefix?
    public var chain: [String]
    public var agents: Bool?
    /// The trust key file the agents were started with (nil: none, or unknown).
    public var trustKeyPath: String?
    public var hosts: [Host]
    public var problem: String?

    /// Status of lab `name`, or of every lab under /run/dysco-migrate/labs when `name` is nil.
    public static func collect(name: String? = nil) -> [LabStatus] {
        let names = name.map { [$0] } ?? LabPaths.existingLabs()
        return names.compactMap { lab in
            let dir = LabPaths.directory(lab)
            guard FileManager.default.fileExists(atPath: dir) else { return nil }
            let state: LabState
            do { state = try LabState.load(name: lab) } catch {
                return LabStatus(name: lab, phase: "broken", directory: dir, subnet: nil, chain: [], agents: nil,
                                 trustKeyPath: nil, hosts: [], problem: "cannot read lab.json (\(error)); `lab down --name \(lab)` removes it")
            }
            let hosts = state.hosts.map { h -> Host in
                let exists = NetworkNamespace.exists(h.namespace)
                let agent = state.processes.last { $0.host == h.name && $0.kind == .agent }
                let services = state.processes.filter { $0.host == h.name && $0.kind != .agent }.map {
                    Service(kind: $0.kind.rawValue, pid: $0.pid,
                            alive: exists && ProcessInspector.isAlive(pid: $0.pid, namespace: h.namespace))
                }
                var firewall: FirewallCounters?
                if h.role == .middlebox, exists,
                   let out = try? Command.run(["iptables", "-w", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"],
                                              netns: h.namespace, check: false), out.succeeded {
                    firewall = try? FirewallCounters.parse(out.stdout)
                }
                return Host(name: h.name, namespace: h.namespace, role: h.role, address: h.address,
                            namespaceExists: exists, agentPid: agent?.pid,
                            agentAlive: agent.map { exists && ProcessInspector.isAlive(pid: $0.pid, namespace: h.namespace) },
                            services: services,
                            firewallProfile: h.role == .middlebox ? state.firewallProfile(of: h.name) : nil,
                            firewall: firewall)
            }
            let missing = hosts.filter { !$0.namespaceExists }.map(\.namespace)
            return LabStatus(name: lab, phase: state.phase.rawValue, directory: dir, subnet: state.subnet,
                             chain: state.chain, agents: state.agents, trustKeyPath: state.trustKeyPath, hosts: hosts,
                             problem: missing.isEmpty ? nil : "missing namespaces: \(missing.joined(separator: ", "))")
        }
    }

    /// A human-readable rendering.
    public var text: String {
        var lines: [String] = []
        let chainText = chain.isEmpty ? "none" : chain.joined(separator: " → ")
        lines.append("lab \(name): \(phase), subnet \(subnet?.description ?? "?"), chain \(chainText), "
                     + "agents \(agents.map { $0 ? "on" : "off" } ?? "?")")
        if let trustKeyPath { lines.append("  trust key: \(trustKeyPath)") }
        if let problem { lines.append("  ! \(problem)") }
        for h in hosts {
            var line = "  \(h.name.padding(toLength: 10, withPad: " ", startingAt: 0))"
                + "\(h.role.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0))"
                + "\(h.address.description.padding(toLength: 16, withPad: " ", startingAt: 0))"
                + "\(h.namespace.padding(toLength: 22, withPad: " ", startingAt: 0))"
            if !h.namespaceExists { line += "namespace missing" } else if h.role == .attacker {
                line += "attacker (no agent)"
            } else if let alive = h.agentAlive {
                line += "agent \(h.agentPid.map(String.init) ?? "-") \(alive ? "running" : "DEAD")"
            } else {
                line += "no agent"
            }
            if !h.services.isEmpty {
                line += "; " + h.services.map { "\($0.kind)\($0.alive ? "" : " DEAD")" }.joined(separator: ", ")
            }
            lines.append(line)
            if let fw = h.firewall {
                switch h.firewallProfile ?? fw.profile ?? .strict {
                case .strict, .snat, .dnat, .snatShared:
                    lines.append("      firewall \(h.firewallProfile ?? .strict): NEW SYN accepted \(fw.newAccepted), ESTABLISHED accepted "
                                 + "\(fw.establishedAccepted), INVALID dropped \(fw.invalidDropped), "
                                 + "policy \(fw.policy) \(fw.policyDropped)")
                case .open:
                    lines.append("      firewall open (stateless, no conntrack): forwarded \(fw.openAccepted), "
                                 + "policy \(fw.policy) \(fw.policyDropped)")
                }
            } else if let profile = h.firewallProfile {
                lines.append("      firewall \(profile): counters unavailable")
            }
        }
        return lines.joined(separator: "\n")
    }
}
