import DyscoCore
import Foundation

/// Packets and bytes counted by one iptables rule or chain policy.
public struct PacketCounter: Codable, Sendable, Hashable, CustomStringConvertible {
    public var packets: UInt64
    public var bytes: UInt64

    public init(packets: UInt64 = 0, bytes: UInt64 = 0) {
        self.packets = packets
        self.bytes = bytes
    }

    public var description: String { "\(packets) pkts/\(bytes) B" }
}

/// One rule of the FORWARD chain as `iptables -L FORWARD -v -x -n` shows it.
public struct FirewallRule: Codable, Sendable, Hashable {
    public var counter: PacketCounter
    public var target: String
    /// The rest of the line after the counters (protocol, addresses, matches).
    public var text: String
}

/// Counters of a lab middlebox's firewall (filter FORWARD). For the ``FirewallProfile/strict`` profile the lab
/// installs, in this order:
///
///     -P FORWARD DROP
///     -A FORWARD -m conntrack --ctstate INVALID -j DROP                                  (invalidDropped)
///     -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT                    (establishedAccepted)
///     -A FORWARD -p tcp --syn -s SUBNET -d SUBNET -m conntrack --ctstate NEW -j ACCEPT   (newAccepted)
///
/// Everything else (e.g. a mid-stream packet of a session the firewall has no state for, which conntrack
/// picks up as NEW, or any non-TCP packet) ends at the policy (policyDropped).
///
/// For the ``FirewallProfile/open`` profile (a stateless box) it installs
///
///     -P FORWARD ACCEPT
///     -A FORWARD -j ACCEPT                                                               (openAccepted)
///
/// with no conntrack match, so nothing in that namespace uses conntrack; the other counters stay 0 there.
public struct FirewallCounters: Codable, Sendable, Hashable {
    public var policy: String
    public var policyDropped: PacketCounter
    public var invalidDropped: PacketCounter
    public var establishedAccepted: PacketCounter
    public var newAccepted: PacketCounter
    /// The open profile's single counting rule (every forwarded packet).
    public var openAccepted: PacketCounter
    public var rules: [FirewallRule]

    public init(policy: String = "ACCEPT", policyDropped: PacketCounter = .init(),
                invalidDropped: PacketCounter = .init(), establishedAccepted: PacketCounter = .init(),
                newAccepted: PacketCounter = .init(), openAccepted: PacketCounter = .init(), rules: [FirewallRule] = []) {
        self.policy = policy
        self.policyDropped = policyDropped
        self.invalidDropped = invalidDropped
        self.establishedAccepted = establishedAccepted
        self.newAccepted = newAccepted
        self.openAccepted = openAccepted
        self.rules = rules
    }

    private enum CodingKeys: String, CodingKey {
        case policy, policyDropped, invalidDropped, establishedAccepted, newAccepted, openAccepted, rules
    }

    /// Decodes older JSON without `openAccepted` too.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        policy = try c.decode(String.self, forKey: .policy)
        policyDropped = try c.decode(PacketCounter.self, forKey: .policyDropped)
        invalidDropped = try c.decode(PacketCounter.self, forKey: .invalidDropped)
        establishedAccepted = try c.decode(PacketCounter.self, forKey: .establishedAccepted)
        newAccepted = try c.decode(PacketCounter.self, forKey: .newAccepted)
        openAccepted = try c.decodeIfPresent(PacketCounter.self, forKey: .openAccepted) ?? .init()
        rules = try c.decode([FirewallRule].self, forKey: .rules)
    }

    /// The profile these rules look like: ``FirewallProfile/open`` if the open rule is there, else
    /// ``FirewallProfile/strict`` if the conntrack rules are, else nil (someone changed the chain).
    public var profile: FirewallProfile? {
        if rules.contains(where: { $0.text.contains(Self.openComment) }) { return .open }
        if policy == "DROP" && rules.contains(where: { $0.text.contains(Self.establishedComment) || $0.text.contains("ctstate") }) {
            return .strict
        }
        if policy == "ACCEPT" && rules.count == 1 && rules[0].target == "ACCEPT" { return .open }
        return nil
    }

    /// Every packet dropped by the firewall (INVALID rule plus policy, when the policy is DROP).
    public var totalDropped: UInt64 {
        invalidDropped.packets + (policy == "DROP" ? policyDropped.packets : 0)
    }

    public enum ParseError: Error, CustomStringConvertible {
        case noChainHeader(String)
        public var description: String {
            switch self {
            case .noChainHeader(let out): "no 'Chain FORWARD (policy ...)' line in iptables output: \(out.prefix(200))"
            }
        }
    }

    /// Comments the lab puts on its rules (`-m comment`), which identify them whatever else is in the chain.
    static let invalidComment = "dysco-lab:invalid"
    static let establishedComment = "dysco-lab:established"
    static let newComment = "dysco-lab:new-syn"
    static let openComment = "dysco-lab:open"
    static let masqueradeComment = "dysco-lab:masquerade"
    static let publishComment = "dysco-lab:publish"

    /// Parses `iptables -w -L FORWARD -v -x -n` for either profile. Rules are recognized by the lab's comments,
    /// or failing that by their conntrack match (`ctstate INVALID`, `ctstate RELATED,ESTABLISHED`, `ctstate NEW`);
    /// an ACCEPT rule without any match (the open profile's, without its comment) counts as openAccepted.
    public static func parse(_ output: String) throws -> FirewallCounters {
        var result = FirewallCounters()
        var sawHeader = false
        for rawLine in output.split(separator: "\n") {
            let line = rawLine.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("Chain ") {
                // Chain FORWARD (policy DROP 12 packets, 720 bytes)
                guard let open = line.firstIndex(of: "(") else { continue }
                let inner = line[line.index(after: open)...].split(whereSeparator: { " ,()".contains($0) })
                if inner.count >= 5, inner[0] == "policy" {
                    result.policy = String(inner[1])
                    result.policyDropped = PacketCounter(packets: UInt64(inner[2]) ?? 0, bytes: UInt64(inner[4]) ?? 0)
                    sawHeader = true
                }
                continue
            }
            let fields = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
            guard fields.count >= 3, let packets = UInt64(fields[0]), let bytes = UInt64(fields[1]) else { continue }
            let text = fields.count > 3 ? String(fields[3]) : ""
            let rule = FirewallRule(counter: PacketCounter(packets: packets, bytes: bytes),
                                    target: String(fields[2]), text: text)
            result.rules.append(rule)
            let words = text.split(separator: " ").map(String.init)
            func ctstate() -> String? {
                guard let i = words.firstIndex(of: "ctstate"), i + 1 < words.count else { return nil }
                return words[i + 1]
            }
            if text.contains(invalidComment) || (rule.target == "DROP" && ctstate() == "INVALID") {
                result.invalidDropped = rule.counter
            } else if text.contains(establishedComment)
                        || (rule.target == "ACCEPT" && ctstate().map { Set($0.split(separator: ",")) == ["ESTABLISHED", "RELATED"] } == true) {
                result.establishedAccepted = rule.counter
            } else if text.contains(newComment) || (rule.target == "ACCEPT" && ctstate() == "NEW") {
                result.newAccepted = rule.counter
            } else if text.contains(openComment) || (rule.target == "ACCEPT" && isMatchAll(words)) {
                result.openAccepted = rule.counter
            }
        }
        guard sawHeader else { throw ParseError.noChainHeader(output) }
        return result
    }

    /// `0 -- * * 0.0.0.0/0 0.0.0.0/0` (protocol all, any interface, any address, nothing else): a rule that
    /// matches every packet. iptables-legacy prints the protocol as `all`, iptables-nft as `0`.
    static func isMatchAll(_ words: [String]) -> Bool {
        words.count == 6 && ["0", "all"].contains(words[0]) && words[1] == "--" && words[2] == "*" && words[3] == "*"
            && words[4] == "0.0.0.0/0" && words[5] == "0.0.0.0/0"
    }

    /// The iptables commands (arguments after `iptables -w`) that install the lab firewall of `profile` for `subnet`.
    /// `published`: for the `dnat` profile, the box's address, the server it publishes there and the ports.
    /// `shared`: for `snat-shared`, the address it translates sources to.
    public static func installCommands(subnet: String, profile: FirewallProfile,
                                       published: (box: IPAddress, server: IPAddress, ports: [UInt16])? = nil,
                                       shared: IPAddress? = nil) -> [[String]] {
        switch profile {
        case .snatShared:
            installCommands(subnet: subnet) + (shared.map { address in
                [["-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-m", "addrtype", "!", "--src-type", "LOCAL",
                  "-m", "comment", "--comment", masqueradeComment, "-j", "SNAT", "--to-source", "\(address)"]]
            } ?? [])
        case .dnat:
            installCommands(subnet: subnet) + (published.map { p in
                p.ports.map { port in
                    ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-d", "\(p.box)", "--dport", "\(port)",
                     "-m", "comment", "--comment", publishComment, "-j", "DNAT",
                     "--to-destination", p.server.isIPv4 ? "\(p.server):\(port)" : "[\(p.server)]:\(port)"]
                }
            } ?? [])
        case .strict: installCommands(subnet: subnet)
        case .snat:
            // Masquerade what the box forwards (a source outside this host), not what the host sends itself.
            installCommands(subnet: subnet) + [
                ["-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-m", "addrtype", "!", "--src-type", "LOCAL",
                 "-m", "comment", "--comment", masqueradeComment, "-j", "MASQUERADE"],
            ]
        case .open:
            [
                ["-t", "filter", "-P", "FORWARD", "ACCEPT"],
                ["-t", "filter", "-A", "FORWARD", "-m", "comment", "--comment", openComment, "-j", "ACCEPT"],
            ]
        }
    }

    /// The iptables commands (arguments after `iptables -w`) that install the strict lab firewall for `subnet`.
    public static func installCommands(subnet: String) -> [[String]] {
        [
            ["-t", "filter", "-P", "FORWARD", "DROP"],
            ["-t", "filter", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID",
             "-m", "comment", "--comment", invalidComment, "-j", "DROP"],
            ["-t", "filter", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
             "-m", "comment", "--comment", establishedComment, "-j", "ACCEPT"],
            ["-t", "filter", "-A", "FORWARD", "-p", "tcp", "--syn", "-s", subnet, "-d", subnet,
             "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", newComment, "-j", "ACCEPT"],
        ]
    }
}
