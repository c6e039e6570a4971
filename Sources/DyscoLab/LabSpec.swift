import DyscoCore
import Foundation

/// What a lab host is for.
public enum LabRole: String, Codable, Sendable, CaseIterable {
    case client, middlebox, server
    /// An off-path host (`attackerN`): on the segment, but no agent, no firewall, no forwarding.
    case attacker
}

/// The firewall a lab middlebox runs (see ``FirewallCounters`` for the rules).
public enum FirewallProfile: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
    /// A stateful firewall: FORWARD policy DROP, INVALID dropped, ESTABLISHED,RELATED accepted, NEW only for SYNs.
    case strict
    /// A stateless box: FORWARD policy ACCEPT with one counting rule and no conntrack match, so conntrack is
    /// not used at all in that namespace.
    case open
    /// The strict firewall that also masquerades what it forwards (a NAT'ing firewall: the server sees the box's
    /// address and a port the NAT chose). Its agent runs with `--nat` (docs/ARCHITECTURE.md, "Boxes that translate").
    case snat
    /// The strict firewall that also publishes the lab's first server on the box's own address (destination NAT of
    /// the policy ports): clients reach it through the box's address, the server sees the client's. Its agent runs
    /// with `--nat`, and the clients' policies steer sessions to the box's address through the chain.
    case dnat
    /// The strict firewall that translates the source of what it forwards to the lab's shared service address
    /// (``LabState/sharedServiceAddress``, .254): boxes of this profile are an HA pair, and the server sees the same
    /// client address whichever of them forwards. Its agent runs with `--nat`.
    case snatShared = "snat-shared"

    public var description: String { rawValue }

    /// Whether the box changes the session's tuple (its agent needs `--nat`).
    public var translates: Bool { self == .snat || self == .dnat || self == .snatShared }

    /// Parses `fw2=strict,fw3=open` (the `lab up --firewall` syntax). Empty text: no profiles.
    public static func parseAssignments(_ text: String) throws(LabError) -> [String: FirewallProfile] {
        var result: [String: FirewallProfile] = [:]
        for item in text.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !item.isEmpty {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2, !parts[0].isEmpty else {
                throw .invalidSpec("--firewall: '\(item)' is not MIDDLEBOX=PROFILE (e.g. fw2=open)")
            }
            guard let profile = FirewallProfile(rawValue: parts[1]) else {
                throw .invalidSpec("--firewall: '\(parts[1])' is not a firewall profile "
                                   + "(\(allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            guard result.updateValue(profile, forKey: parts[0]) == nil else {
                throw .invalidSpec("--firewall: middlebox '\(parts[0])' is given twice")
            }
        }
        return result
    }
}

/// One host of a lab: a network namespace with one interface, `eth0`, on the lab's segment.
public struct LabHost: Codable, Sendable, Hashable {
    /// Short name inside the lab: `client1`, `fw1`, `server2`, ...
    public var name: String
    /// The network namespace: `LAB-NAME`, e.g. `demo-client1`.
    public var namespace: String
    public var role: LabRole
    public var address: IPAddress
    /// The host's interface (always `eth0`).
    public var interface: String
    /// The veth peer in the switch namespace (named after the host).
    public var switchPort: String

    public init(name: String, namespace: String, role: LabRole, address: IPAddress,
                interface: String = "eth0", switchPort: String? = nil) {
        self.name = name
        self.namespace = namespace
        self.role = role
        self.address = address
        self.interface = interface
        self.switchPort = switchPort ?? name
    }
}

/// The description of a lab to build (see ``Lab`` for the layout and the address plan).
public struct LabSpec: Sendable, Codable, Equatable {
    public static let defaultSubnet = "10.77.0.0/24"
    public static let defaultPolicyPorts: [UInt16] = [80, 5201]
    public static let defaultMiddleboxes = ["fw1", "fw2"]
    public static let maxNameLength = 12
    public static let hostCountRange = 1...20
    public static let maxMiddleboxes = 20
    public static let attackerCountRange = 0...20

    /// Prefix of every namespace of the lab: letters, digits and '-', at most 12 characters.
    public var name: String
    public var clients: Int
    public var servers: Int
    /// Middlebox host names, in address order (.101, .102, ...).
    public var middleboxes: [String]
    /// The chain of the default client→server policy, by middlebox name. nil: the first middlebox (if any);
    /// empty: no policy at all.
    public var chain: [String]?
    /// A 10.A.B.0/24 prefix.
    public var subnet: String
    /// Destination ports the default policy steers through the chain.
    public var policyPorts: [UInt16]
    /// Start a Dysco agent on every host. false: a plain kernel-forwarding baseline.
    public var agents: Bool
    /// Extra arguments passed to every `dysco-migrate agent`.
    public var agentArguments: [String]
    /// The `dysco-migrate` executable for agents; nil: the running executable (/proc/self/exe).
    public var agentBinary: String?
    /// Directory the port-80/8080 HTTP servers serve; nil: the lab directory's `www/`.
    public var httpRoot: String?
    /// Only without agents: route client↔server traffic through this middlebox with static /32 routes, so a
    /// baseline crosses the same middlebox and firewall.
    public var routeViaMiddlebox: String?
    /// Start iperf3 and the HTTP servers on every server host.
    public var services: Bool
    /// Firewall profile by middlebox name; a middlebox not listed runs ``FirewallProfile/strict``.
    public var firewallProfiles: [String: FirewallProfile]
    /// Number of attacker hosts (`attacker1`... at .51, .52, ...): no agent, no firewall (0...20).
    public var attackers: Int
    /// Pass `--trust-key <lab dir>/trust.key` to every agent (the key is written either way). The agent requires
    /// the option; false only serves an agent binary older than it. Recorded in lab.json
    /// (``LabState/trustKeyPath``) and restarts follow it. A `--trust-key` among `agentArguments` replaces the lab's.
    public var passTrustKey: Bool
    /// RPS on every port of the switch (each flow on one CPU): without it a veth queues each packet on the sending
    /// CPU's backlog and a sender running on both CPUs has its flow reordered, which TCP takes for loss (the
    /// migration tests count retransmissions). It costs an inter-processor interrupt per steered packet (in a VM,
    /// an exit), which a chain with NFQUEUE verdicts pays at every reinjection: `bench dataplane --no-flow-steering`
    /// measures without it (as 0d3b31d's labs were); a lab of separate machines has no such switch.
    public var flowSteering = true
    /// Dual stack: every host gets an IPv6 address beside its IPv4 one (``LabState/ipv6Address(of:)``), the boxes
    /// forward and filter IPv6 with the same firewall profile (ip6tables), the agents run with `--ipv6`, the clients'
    /// policies get an IPv6 chain, and the servers an HTTP server on their IPv6 address. The NAT profiles translate IPv6 too (ip6tables).
    public var ipv6 = false

    public init(name: String, clients: Int = 1, servers: Int = 1, middleboxes: [String] = LabSpec.defaultMiddleboxes,
                chain: [String]? = nil, subnet: String = LabSpec.defaultSubnet,
                policyPorts: [UInt16] = LabSpec.defaultPolicyPorts, agents: Bool = true,
                agentArguments: [String] = [], agentBinary: String? = nil, httpRoot: String? = nil,
                routeViaMiddlebox: String? = nil, services: Bool = true,
                firewallProfiles: [String: FirewallProfile] = [:], attackers: Int = 0,
                passTrustKey: Bool = true, ipv6: Bool = false) {
        self.ipv6 = ipv6
        self.name = name
        self.clients = clients
        self.servers = servers
        self.middleboxes = middleboxes
        self.chain = chain
        self.subnet = subnet
        self.policyPorts = policyPorts
        self.agents = agents
        self.agentArguments = agentArguments
        self.agentBinary = agentBinary
        self.httpRoot = httpRoot
        self.routeViaMiddlebox = routeViaMiddlebox
        self.services = services
        self.firewallProfiles = firewallProfiles
        self.attackers = attackers
        self.passTrustKey = passTrustKey
    }

    /// The firewall profile of middlebox `mb` (``FirewallProfile/strict`` unless `firewallProfiles` says otherwise).
    public func firewallProfile(of mb: String) -> FirewallProfile { firewallProfiles[mb] ?? .strict }

    /// The profile of every middlebox, defaults filled in.
    public var effectiveFirewallProfiles: [String: FirewallProfile] {
        Dictionary(uniqueKeysWithValues: middleboxes.map { ($0, firewallProfile(of: $0)) })
    }

    /// The chain actually used: `chain`, or the first middlebox by default.
    public var effectiveChain: [String] {
        chain ?? Array(middleboxes.prefix(1))
    }

    public static func isValidLabName(_ name: String) -> Bool {
        guard (1...maxNameLength).contains(name.count), let first = name.first, first.isASCII,
              first.isLetter || first.isNumber, name.last != "-", !name.contains("--") else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
    }

    public static func isValidMiddleboxName(_ name: String) -> Bool {
        guard (1...8).contains(name.count), let first = name.first, ("a"..."z").contains(first) else { return false }
        guard name.allSatisfy({ ("a"..."z").contains($0) || ("0"..."9").contains($0) }) else { return false }
        return !isReservedHostName(name)
    }

    /// `sw` and `client<digits>` / `server<digits>` / `attacker<digits>` are taken by the lab itself.
    static func isReservedHostName(_ name: String) -> Bool {
        if name == "sw" { return true }
        for prefix in ["client", "server", "attacker"] where name.hasPrefix(prefix) {
            let rest = name.dropFirst(prefix.count)
            if rest.isEmpty || rest.allSatisfy(\.isNumber) { return true }
        }
        return false
    }

    /// Parses a lab subnet: exactly `10.A.B.0/24`.
    public static func parseSubnet(_ text: String) throws(LabError) -> IPPrefix {
        guard let prefix = IPPrefix(text), prefix.isIPv4, text.contains("/"), prefix.length == 24,
              prefix.address.value >> 24 == 10, IPAddress(text.split(separator: "/")[0]) == prefix.address else {
            throw .invalidSpec("subnet '\(text)' is not allowed: a lab uses a 10.A.B.0/24 prefix (e.g. 10.77.0.0/24); "
                               + "other ranges could clash with the machine's own networks")
        }
        return prefix
    }

    /// Checks everything that can be checked without touching the system.
    public func validate() throws(LabError) {
        guard Self.isValidLabName(name) else {
            throw .invalidSpec("lab name '\(name)' is not valid: use 1–\(Self.maxNameLength) letters, digits or '-' "
                               + "(not leading/trailing, no '--'); it prefixes every namespace name")
        }
        guard Self.hostCountRange.contains(clients) else {
            throw .invalidSpec("--clients \(clients): must be between 1 and 20")
        }
        guard Self.hostCountRange.contains(servers) else {
            throw .invalidSpec("--servers \(servers): must be between 1 and 20")
        }
        guard Self.attackerCountRange.contains(attackers) else {
            throw .invalidSpec("--attackers \(attackers): must be between 0 and 20")
        }
        guard middleboxes.count <= Self.maxMiddleboxes else {
            throw .invalidSpec("at most \(Self.maxMiddleboxes) middleboxes")
        }
        var seen = Set<String>()
        for mb in middleboxes {
            guard Self.isValidMiddleboxName(mb) else {
                throw .invalidSpec("middlebox name '\(mb)' is not valid: use [a-z][a-z0-9]{0,7}, "
                                   + "not 'sw', 'clientN', 'serverN' or 'attackerN'")
            }
            guard seen.insert(mb).inserted else { throw .invalidSpec("middlebox '\(mb)' is listed twice") }
        }
        var inChain = Set<String>()
        for hop in effectiveChain {
            guard seen.contains(hop) else {
                throw .invalidSpec("chain member '\(hop)' is not one of the middleboxes (\(middleboxes.joined(separator: ",")))")
            }
            guard inChain.insert(hop).inserted else { throw .invalidSpec("chain lists '\(hop)' twice") }
        }
        for mb in firewallProfiles.keys.sorted() where !seen.contains(mb) {
            throw .invalidSpec("firewall profile for '\(mb)', which is not one of the middleboxes "
                               + "(\(middleboxes.joined(separator: ",")))")
        }
        _ = try Self.parseSubnet(subnet)
        if !effectiveChain.isEmpty {
            guard !policyPorts.isEmpty else { throw .invalidSpec("the policy needs at least one port") }
            guard !policyPorts.contains(0) else { throw .invalidSpec("port 0 is not a valid policy port") }
        }
        if let via = routeViaMiddlebox {
            guard !agents else {
                throw .invalidSpec("routing via a middlebox is only for labs without agents (the agents steer sessions)")
            }
            guard seen.contains(via) else { throw .invalidSpec("route-via middlebox '\(via)' is not one of the middleboxes") }
        }
        if let agentBinary, agents, agentBinary.isEmpty { throw .invalidSpec("agent binary path is empty") }
    }

    /// The address plan (validates first).
    public func plan() throws(LabError) -> LabPlan {
        try validate()
        return LabPlan(spec: self, subnet: try Self.parseSubnet(subnet))
    }
}

/// Hosts and addresses of a lab: clients .10+i, attackers .50+i, middleboxes .100+i (in the order given),
/// servers .200+i.
public struct LabPlan: Sendable, Equatable {
    public var name: String
    public var subnet: IPPrefix
    public var switchNamespace: String
    public var hosts: [LabHost]
    /// Middlebox names of the default chain.
    public var chain: [String]

    public init(spec: LabSpec, subnet: IPPrefix) {
        name = spec.name
        self.subnet = subnet
        switchNamespace = "\(spec.name)-sw"
        func host(_ hostName: String, _ role: LabRole, _ octet: Int) -> LabHost {
            LabHost(name: hostName, namespace: "\(spec.name)-\(hostName)", role: role,
                    address: IPAddress(subnet.address.value | UInt32(octet)))
        }
        var hosts: [LabHost] = []
        for i in 1...max(1, spec.clients) { hosts.append(host("client\(i)", .client, 10 + i)) }
        for i in stride(from: 1, through: min(spec.attackers, LabSpec.attackerCountRange.upperBound), by: 1) {
            hosts.append(host("attacker\(i)", .attacker, 50 + i))
        }
        for (i, mb) in spec.middleboxes.enumerated() { hosts.append(host(mb, .middlebox, 101 + i)) }
        for i in 1...max(1, spec.servers) { hosts.append(host("server\(i)", .server, 200 + i)) }
        self.hosts = hosts
        chain = spec.effectiveChain
    }

    public func host(_ name: String) -> LabHost? { hosts.first { $0.name == name } }
    public var namespaces: [String] { [switchNamespace] + hosts.map(\.namespace) }
    public func hosts(_ role: LabRole) -> [LabHost] { hosts.filter { $0.role == role } }
}

public enum LabError: Error, CustomStringConvertible, Sendable {
    case invalidSpec(String)
    case exists(String)
    case notFound(String)
    case unknownHost(lab: String, host: String)
    case setupFailed(String)
    case agentFailed(host: String, reason: String, logTail: String)
    case serviceFailed(host: String, service: String, reason: String, logTail: String)
    case needsForce(String)

    public var description: String {
        switch self {
        case .invalidSpec(let m): return m
        case .exists(let m): return m
        case .notFound(let m): return m
        case .unknownHost(let lab, let host): return "lab '\(lab)' has no host '\(host)'"
        case .setupFailed(let m): return m
        case .agentFailed(let host, let reason, let tail):
            return "agent on \(host) \(reason)" + (tail.isEmpty ? " (its log is empty)" : "; last log lines:\n\(tail)")
        case .serviceFailed(let host, let service, let reason, let tail):
            return "\(service) on \(host) \(reason)" + (tail.isEmpty ? "" : "; last log lines:\n\(tail)")
        case .needsForce(let m): return m
        }
    }
}
