import Foundation

/// An inclusive port range, written "80", "8000-8080" or "any".
public struct PortRange: Hashable, Sendable, TextCodable {
    public var lower: UInt16
    public var upper: UInt16

    public static let any = PortRange(lower: 0, upper: .max)

    public init(lower: UInt16, upper: UInt16) {
        self.lower = lower
        self.upper = upper
    }

    public init?(_ text: some StringProtocol) {
        if text == "any" { self = .any; return }
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let lo = UInt16(parts[0]), let hi = UInt16(parts[parts.count - 1]),
              lo <= hi else { return nil }
        lower = lo
        upper = hi
    }

    public func contains(_ port: UInt16) -> Bool { lower <= port && port <= upper }

    public var description: String {
        self == .any ? "any" : lower == upper ? "\(lower)" : "\(lower)-\(upper)"
    }

    public init?(parsing text: String) { self.init(text) }
    public static let textKind = "a port or port range"

    /// Also accepts a bare JSON number (80).
    public init(from decoder: any Decoder) throws {
        if let number = try? decoder.singleValueContainer().decode(UInt16.self) {
            self.init(lower: number, upper: number)
        } else {
            let text = try decoder.singleValueContainer().decode(String.self)
            guard let parsed = PortRange(parsing: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath,
                                                        debugDescription: "'\(text)' is not \(Self.textKind)"))
            }
            self = parsed
        }
    }
}

/// A predicate on a session's 5-tuple (TCP only). Absent fields match anything; a list of port ranges
/// matches if any range does.
public struct SessionPredicate: Hashable, Sendable, Codable {
    public var src: IPPrefix?
    public var dst: IPPrefix?
    public var sport: [PortRange]?
    public var dport: [PortRange]?

    public init(src: IPPrefix? = nil, dst: IPPrefix? = nil, sport: [PortRange]? = nil, dport: [PortRange]? = nil) {
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
    }

    public func matches(_ tuple: FiveTuple) -> Bool {
        if let src, !src.contains(tuple.srcAddr) { return false }
        if let dst, !dst.contains(tuple.dstAddr) { return false }
        if let sport, !sport.contains(where: { $0.contains(tuple.srcPort) }) { return false }
        if let dport, !dport.contains(where: { $0.contains(tuple.dstPort) }) { return false }
        return true
    }
}

/// A service-chaining policy (paper §2.2): predicate → ordered list of middlebox addresses. An empty list: the agents
/// carry the session straight to its right end (a session-terminating proxy there can take itself out later, §4).
public struct Policy: Hashable, Sendable, Codable {
    public var name: String
    public var match: SessionPredicate
    public var chain: [IPAddress]

    public init(name: String, match: SessionPredicate, chain: [IPAddress]) {
        self.name = name
        self.match = match
        self.chain = chain
    }
}

/// The agent's configuration file (JSON). See docs/ARCHITECTURE.md, "Agent configuration".
public struct AgentConfig: Sendable, Codable, Equatable {
    public static let currentVersion = 1

    public var version: Int
    /// Policies in order; the first whose predicate matches a new outbound SYN decides its chain.
    public var policies: [Policy]

    public init(version: Int = AgentConfig.currentVersion, policies: [Policy] = []) {
        self.version = version
        self.policies = policies
    }

    public enum ValidationError: Error, CustomStringConvertible {
        case unsupportedVersion(Int)
        case chainTooLong(policy: String, length: Int)
        case duplicateHop(policy: String, address: IPAddress)
        case forbiddenHop(policy: String, address: IPAddress)
        case mixedFamilies(policy: String, address: IPAddress)

        public var description: String {
            switch self {
            case .unsupportedVersion(let v):
                "config version \(v) is not supported (this agent reads version \(AgentConfig.currentVersion))"
            case .chainTooLong(let p, let n):
                "policy '\(p)': chain has \(n) middleboxes, at most \(DyscoSynPayload.maxAddresses - 1) are allowed"
            case .duplicateHop(let p, let a): "policy '\(p)': middlebox \(a) appears twice in the chain"
            case .forbiddenHop(let p, let a):
                "policy '\(p)': \(a) cannot be a middlebox (loopback, multicast, broadcast, unspecified or link-local)"
            case .mixedFamilies(let p, let a):
                "policy '\(p)': \(a) is not of the chain's first hop's family (a chain is all IPv4 or all IPv6; it applies to sessions of its family)"
            }
        }
    }

    public func validate() throws {
        guard version == Self.currentVersion else { throw ValidationError.unsupportedVersion(version) }
        for policy in policies {
            guard policy.chain.count < DyscoSynPayload.maxAddresses else {
                throw ValidationError.chainTooLong(policy: policy.name, length: policy.chain.count)
            }
            if let hop = policy.chain.first(where: \.isForbiddenHop) {
                throw ValidationError.forbiddenHop(policy: policy.name, address: hop)
            }
            if let first = policy.chain.first, let hop = policy.chain.first(where: { $0.isIPv4 != first.isIPv4 }) {
                throw ValidationError.mixedFamilies(policy: policy.name, address: hop)
            }
            var seen = Set<IPAddress>()
            for hop in policy.chain where !seen.insert(hop).inserted {
                throw ValidationError.duplicateHop(policy: policy.name, address: hop)
            }
        }
    }

    /// Reads and validates a config file; errors name the file and the problem.
    public static func load(path: String) throws -> AgentConfig {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let config = try JSONDecoder().decode(AgentConfig.self, from: data)
        try config.validate()
        return config
    }

    /// The first policy whose predicate matches and whose chain is of the session's family (a session is carried by
    /// hops of its own family; an empty chain serves both).
    public func policy(for tuple: FiveTuple) -> Policy? {
        policies.first { $0.match.matches(tuple) && $0.chain.allSatisfy { $0.isIPv4 == tuple.srcAddr.isIPv4 } }
    }
}

extension SessionPredicate {
    /// Parses a filter written like `state export --match`, with every field optional and prefixes or ranges
    /// allowed: `src=10.77.0.11,dst=10.77.0.0/24,sport=40000-40100,dport=80`; "" or "all" matches every session.
    public init(filter text: String) throws(PolicyFilterError) {
        self.init()
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if trimmed.isEmpty || trimmed == "all" { return }
        for item in trimmed.split(whereSeparator: { $0 == "," || $0 == " " }) {
            let pair = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, !pair[1].isEmpty else { throw PolicyFilterError(filter: text, reason: "\"\(item)\" is not key=value") }
            switch pair[0] {
            case "src", "dst":
                let value = IPPrefix(pair[1])
                guard let prefix = value else {
                    throw PolicyFilterError(filter: text, reason: "\(pair[0])=\(pair[1]) is not an IPv4 or IPv6 address or prefix")
                }
                if pair[0] == "src" { src = prefix } else { dst = prefix }
            case "sport", "dport":
                guard let range = PortRange(pair[1]) else {
                    throw PolicyFilterError(filter: text, reason: "\(pair[0])=\(pair[1]) is not a port or LOW-HIGH range")
                }
                if pair[0] == "sport" { sport = [range] } else { dport = [range] }
            case "proto":
                guard pair[1] == "tcp" else { throw PolicyFilterError(filter: text, reason: "only proto=tcp sessions exist") }
            default:
                throw PolicyFilterError(filter: text, reason: "unknown key \"\(pair[0])\" (known: src, dst, sport, dport, proto)")
            }
        }
    }
}

public struct PolicyFilterError: Error, CustomStringConvertible, Equatable {
    public var filter: String
    public var reason: String
    public var description: String { "--match \"\(filter)\": \(reason)" }
}

/// Middleboxes new sessions stop choosing (`drain` cordons a box before moving its sessions, as `kubectl
/// cordon` does a node): in the chain of a new session each cordoned hop is replaced by one of its
/// replacements, taken in turn (round robin), skipping any already in the chain. Sessions that exist are not
/// touched. Runtime state of the agent: a config reload keeps it; `policy uncordon` ends it.
public struct Cordons: Sendable, Codable, Equatable {
    public struct Cordon: Sendable, Codable, Equatable {
        public var address: IPAddress
        /// At least one; new chains use them in turn.
        public var replacements: [IPAddress]
        public init(address: IPAddress, replacements: [IPAddress]) {
            self.address = address
            self.replacements = replacements
        }
    }

    public private(set) var cordons: [Cordon] = []
    /// How many new chains took a replacement (the round robin's position).
    public private(set) var replaced: UInt64 = 0

    public init() {}

    public enum CordonError: Error, Equatable, CustomStringConvertible {
        case noReplacement(IPAddress)
        case replacementIsCordoned(IPAddress)
        case replacesItself(IPAddress)
        case forbiddenAddress(IPAddress)

        public var description: String {
            switch self {
            case .noReplacement(let a): "cordon \(a): name at least one replacement (new sessions need a box to go through)"
            case .replacementIsCordoned(let a): "replacement \(a) is cordoned itself"
            case .replacesItself(let a): "cordon \(a): a box cannot replace itself"
            case .forbiddenAddress(let a) where !a.isForbiddenHop: "cordon: \(a) is not of the cordoned box's family (a cordon and its replacements are all IPv4 or all IPv6)"
            case .forbiddenAddress(let a): "\(a) cannot be a box (loopback, multicast, broadcast, unspecified or link-local)"
            }
        }
    }

    /// Cordons `address` (again: its replacements are updated).
    public mutating func cordon(_ address: IPAddress, replacements: [IPAddress]) throws(CordonError) {
        guard !replacements.isEmpty else { throw .noReplacement(address) }
        if let bad = ([address] + replacements).first(where: { $0.isForbiddenHop || $0.isIPv4 != address.isIPv4 }) {
            throw .forbiddenAddress(bad)
        }
        guard !replacements.contains(address) else { throw .replacesItself(address) }
        if let cordoned = replacements.first(where: { isCordoned($0) }) { throw .replacementIsCordoned(cordoned) }
        if cordons.contains(where: { $0.replacements.contains(address) }) { throw .replacementIsCordoned(address) }
        cordons.removeAll { $0.address == address }
        cordons.append(Cordon(address: address, replacements: replacements))
    }

    /// Ends a cordon; false if `address` was not cordoned.
    @discardableResult
    public mutating func uncordon(_ address: IPAddress) -> Bool {
        let before = cordons.count
        cordons.removeAll { $0.address == address }
        return cordons.count != before
    }

    public func isCordoned(_ address: IPAddress) -> Bool { cordons.contains { $0.address == address } }

    /// The chain a new session takes: `chain` with each cordoned hop replaced (see the type's rule).
    public mutating func apply(_ chain: [IPAddress]) -> [IPAddress] {
        guard !cordons.isEmpty else { return chain }
        var result = chain
        for (i, hop) in chain.enumerated() {
            guard let cordon = cordons.first(where: { $0.address == hop }) else { continue }
            let usable = cordon.replacements.filter { !result.contains($0) }
            guard !usable.isEmpty else { continue }  // every replacement is on the chain already: keep the hop
            result[i] = usable[Int(replaced % UInt64(usable.count))]
            replaced &+= 1
        }
        return result
    }
}
