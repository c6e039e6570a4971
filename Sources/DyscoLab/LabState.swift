import DyscoCore
import DyscoAgent
import Foundation

/// Where labs keep their files: `/run/dysco-migrate/labs/NAME/` (lab.json, agent configs and logs, www/).
public enum LabPaths {
    public static var labsDirectory: String { "\(AgentControlPaths.runDirectory)/labs" }
    public static func directory(_ lab: String) -> String { "\(labsDirectory)/\(lab)" }
    public static func stateFile(_ lab: String) -> String { "\(directory(lab))/lab.json" }
    public static func agentConfig(_ lab: String, host: String) -> String { "\(directory(lab))/\(host).agent.json" }
    public static func agentLog(_ lab: String, host: String) -> String { "\(directory(lab))/\(host).agent.log" }
    public static func serviceLog(_ lab: String, host: String, service: String) -> String {
        "\(directory(lab))/\(host).\(service).log"
    }
    public static func defaultHTTPRoot(_ lab: String) -> String { "\(directory(lab))/www" }
    /// The lab's trust key (hex text, mode 0600), which every agent gets with `--trust-key`.
    public static func trustKey(_ lab: String) -> String { "\(directory(lab))/trust.key" }
    /// The lab's bpffs (mounted while the lab has agents), which every agent gets with `--bpf-fs`: their pinned
    /// maps outlive them there, so a restarted agent takes its predecessor's sessions over, and tests read them.
    public static func bpfFs(_ lab: String) -> String { "\(directory(lab))/bpf" }

    /// Names of the labs that have a directory (lab.json may be missing after a crash).
    public static func existingLabs() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: labsDirectory)) ?? [])
            .filter { LabSpec.isValidLabName($0) }.sorted()
    }
}

/// A process the lab started (agent, iperf3, HTTP server, or one started through ``Lab/spawn(_:_:logPath:)``).
public struct LabProcessRecord: Codable, Sendable, Hashable {
    public enum Kind: String, Codable, Sendable { case agent, iperf3, http, httpAlt = "http-alt", http6, custom }
    public var host: String
    public var kind: Kind
    public var pid: Int32
    public var command: [String]
    public var log: String?
}

/// The lab's state file, `lab.json`: written before anything is created and updated as things are made, so
/// that `lab down` can remove a lab whose creator crashed.
public struct LabState: Codable, Sendable {
    public enum Phase: String, Codable, Sendable { case creating, ready, failed }
    public static let currentVersion = 1

    public var version: Int
    public var name: String
    public var phase: Phase
    public var createdAt: Date
    public var subnet: IPPrefix
    public var switchNamespace: String
    public var hosts: [LabHost]
    /// The address `snat-shared` boxes translate sources to (the subnet's .254; no host has it). It is on the
    /// switch's bridge so that the servers resolve it: their replies reach their own agent's tc egress, which
    /// sends them to the box.
    public var sharedServiceAddress: IPAddress { IPAddress(subnet.address.value | 254) }
    /// The shared service address's IPv6 counterpart (`::fe` in the lab's /64), in a dual-stack lab.
    public var sharedServiceAddressIPv6: IPAddress? { ipv6 ? IPAddress(high: ipv6Prefix.high, low: 254) : nil }
    /// Middlebox names of the default policy's chain (empty: no policy).
    public var chain: [String]
    public var policyPorts: [UInt16]
    public var agents: Bool
    public var agentBinary: String?
    public var agentArguments: [String]
    public var routeViaMiddlebox: String?
    public var httpRoot: String
    public var processes: [LabProcessRecord]
    /// Firewall profile of every middlebox (absent in lab.json files of older versions: all strict).
    public var firewallProfiles: [String: FirewallProfile] = [:]
    /// The trust key file passed to the agents with `--trust-key` (nil: none was passed).
    public var trustKeyPath: String? = nil
    /// Dual stack (``LabSpec/ipv6``; absent in older lab.json files: IPv4 only).
    public var ipv6 = false

    /// The lab's IPv6 prefix: fd00:0:A:B::/64 for the subnet 10.A.B.0/24 (unique local, RFC 4193).
    public var ipv6Prefix: IPAddress {
        IPAddress(high: 0xfd00 << 48 | UInt64(subnet.address.value >> 16 & 0xff) << 16 | UInt64(subnet.address.value >> 8 & 0xff),
                  low: 0)
    }

    /// A host's IPv6 address in a dual-stack lab: the prefix and the host's last IPv4 octet (fd00:0:A:B::C for
    /// 10.A.B.C); nil in an IPv4-only lab.
    public func ipv6Address(of host: LabHost) -> IPAddress? {
        guard ipv6 else { return nil }
        return IPAddress(high: ipv6Prefix.high, low: UInt64(host.address.value & 0xff))
    }

    /// The firewall profile of middlebox `mb`.
    public func firewallProfile(of mb: String) -> FirewallProfile { firewallProfiles[mb] ?? .strict }

    public var namespaces: [String] { [switchNamespace] + hosts.map(\.namespace) }

    public func host(_ name: String) -> LabHost? { hosts.first { $0.name == name } }

    public static func load(name: String) throws -> LabState {
        let data = try Data(contentsOf: URL(fileURLWithPath: LabPaths.stateFile(name)))
        return try decoder.decode(LabState.self, from: data)
    }

    /// Writes lab.json atomically (a crash never leaves half a file).
    public func save() throws {
        let data = try Self.encoder.encode(self)
        try data.write(to: URL(fileURLWithPath: LabPaths.stateFile(name)), options: .atomic)
    }

    static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        e.dateEncodingStrategy = .iso8601
        return e
    }

    private enum CodingKeys: String, CodingKey {
        case version, name, phase, createdAt, subnet, switchNamespace, hosts, chain, policyPorts, agents, agentBinary,
             agentArguments, routeViaMiddlebox, httpRoot, processes, firewallProfiles, trustKeyPath, ipv6
    }

    static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }
}

extension LabState {
    /// Decodes lab.json; fields added after version 1 (`firewallProfiles`, `trustKeyPath`) may be absent.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(version: try c.decode(Int.self, forKey: .version),
                  name: try c.decode(String.self, forKey: .name),
                  phase: try c.decode(Phase.self, forKey: .phase),
                  createdAt: try c.decode(Date.self, forKey: .createdAt),
                  subnet: try c.decode(IPPrefix.self, forKey: .subnet),
                  switchNamespace: try c.decode(String.self, forKey: .switchNamespace),
                  hosts: try c.decode([LabHost].self, forKey: .hosts),
                  chain: try c.decode([String].self, forKey: .chain),
                  policyPorts: try c.decode([UInt16].self, forKey: .policyPorts),
                  agents: try c.decode(Bool.self, forKey: .agents),
                  agentBinary: try c.decodeIfPresent(String.self, forKey: .agentBinary),
                  agentArguments: try c.decode([String].self, forKey: .agentArguments),
                  routeViaMiddlebox: try c.decodeIfPresent(String.self, forKey: .routeViaMiddlebox),
                  httpRoot: try c.decode(String.self, forKey: .httpRoot),
                  processes: try c.decode([LabProcessRecord].self, forKey: .processes),
                  firewallProfiles: try c.decodeIfPresent([String: FirewallProfile].self, forKey: .firewallProfiles) ?? [:],
                  trustKeyPath: try c.decodeIfPresent(String.self, forKey: .trustKeyPath),
                  ipv6: try c.decodeIfPresent(Bool.self, forKey: .ipv6) ?? false)
    }
}
