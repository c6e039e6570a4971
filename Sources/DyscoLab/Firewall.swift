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

/// Counters of a lab middlebox's firewall (filter FORWARD). The lab installs, in this order:
///
///     -P FORWARD DROP
///     -A FORWARD -m conntrack --ctstate INVALID -j DROP                                  (invalidDropped)
///     -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT                    (establishedAccepted)
///     -A FORWARD -p tcp --syn -s SUBNET -d SUBNET -m conntrack --ctstate NEW -j ACCEPT   (newAccepted)
///
/// Everything else (e.g. a mid-stream packet of a session the firewall has no state for, which conntrack
/// picks up as NEW, or any non-TCP packet) ends at the policy (policyDropped).
public struct FirewallCounters: Codable, Sendable, Hashable {
    public var policy: String
    public var policyDropped: PacketCounter
    public var invalidDropped: PacketCounter
    public var establishedAccepted: PacketCounter
    public var newAccepted: PacketCounter
    public var rules: [FirewallRule]

    public init(policy: String = "ACCEPT", policyDropped: PacketCounter = .init(),
                invalidDropped: PacketCounter = .init(), establishedAccepted: PacketCounter = .init(),
                newAccepted: PacketCounter = .init(), rules: [FirewallRule] = []) {
        self.policy = policy
        self.policyDropped = policyDropped
        self.invalidDropped = invalidDropped
        self.establishedAccepted = establishedAccepted
        self.newAccepted = newAccepted
        self.rules = rules
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

    /// Parses `iptables -w -L FORWARD -v -x -n`. Rules are recognized by the lab's comments, or failing that
    /// by their conntrack match (`ctstate INVALID`, `ctstate RELATED,ESTABLISHED`, `ctstate NEW`).
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
            }
        }
        guard sawHeader else { throw ParseError.noChainHeader(output) }
        return result
    }

    /// The iptables commands (arguments after `iptables -w`) that install the lab firewall for `subnet`.
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
