import DyscoCore
import DyscoSystem
import Logging

/// The agent's NFQUEUE rules (iptables: CONFIG_NFT_QUEUE is off here, so the xt NFQUEUE target is used).
///
/// | table  | chain (ours)  | jumped to from | queues                                        |
/// |--------|---------------|----------------|-----------------------------------------------|
/// | raw    | DYSCO-IN      | PREROUTING     | TCP not from `lo`: ingress, before conntrack  |
/// | mangle | DYSCO-OUT     | OUTPUT         | TCP not to `lo`: egress of local packets      |
/// | mangle | DYSCO-FWD-OUT | POSTROUTING    | TCP with a non-local source: forwarded egress |
///
/// The ingress rule skips packets carrying the ingress mark bit (``FastPath``), which the tc ingress program sets
/// on what it rewrote, so no packet takes both paths; tc egress runs after these rules, so each egress chain first
/// returns, unqueued, the packets the pinned socket filter says the egress program will rewrite
/// (`-m bpf --object-pinned`, docs/BPF.md). The egress rules skip the egress bit (the agent's own sent packets).
///
/// The rules use `--queue-bypass` (while no agent listens, packets pass untouched), except the one for packets of
/// owned sessions (``restoreScript(existingJumps:)``), which fail closed. Owned packets are told by a mark at
/// ingress (the BPF ingress program sets ``FastPath/ownedIngressMark``) and at egress by the pinned socket filter
/// `dysco_egress_owned` (``ownedFilter``: tc egress runs after these rules, so no program could have marked the
/// packet yet). Installed atomically with one
/// `iptables-restore --noflush`, replacing a predecessor's rules in place; they stay when an agent stops with live
/// sessions (docs/ARCHITECTURE.md, "Agent crash and restart"); removal deletes our jumps and chains and nothing
/// else, and is idempotent.
public struct QueueRules: Sendable {
    public static let ingressChain = "DYSCO-IN"
    public static let egressChain = "DYSCO-OUT"
    public static let forwardEgressChain = "DYSCO-FWD-OUT"

    public var queue: UInt16
    /// The BPF datapath's pinned `dysco_egress_carried` program (nil: no kernel path, `--no-fastpath`).
    public var egressFilter: String?
    /// The BPF datapath's pinned `dysco_egress_owned` program: the egress fail-closed rule asks it (nil: no egress
    /// fail-closed rule).
    public var ownedFilter: String?
    /// Whether owned packets fail closed at all (false: no kernel path could load; every rule has bypass).
    public var failClosed: Bool
    /// Install the same rules in ip6tables too (agent `--ipv6`): IPv6 sessions are the agent's, carried by the same BPF
    /// programs (their IPv6 maps) and failing closed the same way. False: IPv6 passes untouched, outside every chain.
    public var ipv6: Bool

    public init(queue: UInt16, egressFilter: String? = nil, ownedFilter: String? = nil, failClosed: Bool = true,
                ipv6: Bool = false) {
        self.queue = queue
        self.egressFilter = egressFilter
        self.ownedFilter = ownedFilter
        self.failClosed = failClosed
        self.ipv6 = ipv6
    }

    /// The iptables-restore (and, with ``ipv6``, ip6tables-restore: the same rules, the BPF filters judge both
    /// families) input that installs the rules: with `--noflush`, declaring a chain of ours empties it
    /// if it exists, so the rules are replaced in one commit per table, never absent in between (a restarted
    /// agent's sessions would pass unrewritten). `existingJumps`: the built-in chains that already jump to ours
    /// (``installedJumps()``), which get no second jump.
    ///
    /// Per chain, in order: (1) egress chains: a packet `dysco_egress_carried` says tc egress rewrites returns
    /// unqueued; (2) a packet of an owned session the kernel did not rewrite, WITHOUT bypass (no agent: dropped,
    /// TCP retransmits it): by the owned mark at ingress, by `-m bpf --object-pinned` ``ownedFilter`` at egress;
    /// (3) every other TCP packet the kernel did not rewrite, with bypass.
    public func restoreScript(existingJumps: Set<String> = []) -> String {
        let bypass = "-j NFQUEUE --queue-num \(queue) --queue-bypass"
        let failClosed = "-j NFQUEUE --queue-num \(queue)"
        func rules(_ chain: String, _ match: String, hook: UInt32, owned: UInt32) -> String {
            let egress = chain != Self.ingressChain
            let carried = egressFilter.map { egress ? "-A \(chain) \(match) -m bpf --object-pinned \($0) -j RETURN\n" : "" } ?? ""
            let ownedRule: String
            if !self.failClosed {
                ownedRule = ""
            } else if egress {
                ownedRule = ownedFilter.map { "-A \(chain) \(match) -m bpf --object-pinned \($0) \(failClosed)\n" } ?? ""
            } else {
                ownedRule = "-A \(chain) \(match) -m mark --mark \(Self.hex(owned))/\(Self.hex(owned | hook)) \(failClosed)\n"
            }
            return carried + ownedRule + "-A \(chain) \(match) -m mark ! --mark \(Self.markMatch(hook)) \(bypass)"
        }
        func jump(_ builtin: String, _ chain: String) -> String {
            existingJumps.contains(builtin) ? "" : "-I \(builtin) 1 -j \(chain)\n"
        }
        let ingress = rules(Self.ingressChain, "-p tcp ! -i lo", hook: FastPath.ingressMark,
                            owned: FastPath.ownedIngressMark)
        let egress = rules(Self.egressChain, "-p tcp ! -o lo", hook: FastPath.egressMark,
                           owned: FastPath.ownedEgressMark)
        let forward = rules(Self.forwardEgressChain, "-p tcp -m addrtype ! --src-type LOCAL", hook: FastPath.egressMark,
                            owned: FastPath.ownedEgressMark)
        return """
            *raw
            :\(Self.ingressChain) - [0:0]
            \(ingress)
            \(jump("PREROUTING", Self.ingressChain))COMMIT
            *mangle
            :\(Self.egressChain) - [0:0]
            :\(Self.forwardEgressChain) - [0:0]
            \(egress)
            \(forward)
            \(jump("OUTPUT", Self.egressChain))\(jump("POSTROUTING", Self.forwardEgressChain))COMMIT

            """
    }

    static func hex(_ bits: UInt32) -> String { "0x" + String(bits, radix: 16) }

    static func markMatch(_ bit: UInt32) -> String { "\(hex(bit))/\(hex(bit))" }

    static let jumps = [("raw", "PREROUTING", ingressChain), ("mangle", "OUTPUT", egressChain),
                        ("mangle", "POSTROUTING", forwardEgressChain)]

    /// The built-in chains that already jump to ours (a predecessor's rules), in iptables or ip6tables.
    static func installedJumps(_ tool: String = "iptables") -> Set<String> {
        Set(jumps.compactMap { table, builtin, chain in
            (try? Command.run([tool, "-w", "-t", table, "-C", builtin, "-j", chain])) != nil ? builtin : nil
        })
    }

    /// Installs the rules, replacing a predecessor's in place (idempotent: no duplicate, no moment without them);
    /// with ``ipv6`` the IPv6 rules too, else any IPv6 rules a predecessor left are removed.
    public func install(logger: Logger) throws {
        let existing = Self.installedJumps()
        try Command.run(["iptables-restore", "-w", "--noflush"], input: restoreScript(existingJumps: existing))
        if ipv6 {
            try Command.run(["ip6tables-restore", "-w", "--noflush"],
                            input: restoreScript(existingJumps: Self.installedJumps("ip6tables")))
        } else if Self.present(tool: "ip6tables") {
            try Self.remove(tool: "ip6tables", logger: logger)
        }
        logger.info("installed NFQUEUE rules", metadata: ["queue.number": "\(queue)",
                                                          "queue.replaced": "\(!existing.isEmpty)", "queue.ipv6": "\(ipv6)"])
    }

    /// Removes every jump to our chains and the chains themselves, whatever queue they used, for both families.
    public static func remove(logger: Logger) throws {
        try remove(tool: "iptables", logger: logger)
        try remove(tool: "ip6tables", logger: logger)
    }

    static func remove(tool: String, logger: Logger) throws {
        for (table, builtin, chain) in jumps {
            while (try? Command.run([tool, "-w", "-t", table, "-D", builtin, "-j", chain])) != nil {}
            if (try? Command.run([tool, "-w", "-t", table, "-F", chain])) != nil {
                try Command.run([tool, "-w", "-t", table, "-X", chain])
                logger.debug("removed chain", metadata: ["iptables.table": "\(table)", "iptables.chain": "\(chain)",
                                                         "iptables.tool": "\(tool)"])
            }
        }
    }

    /// True when any of our chains exists, in either family (tests check that nothing is left after an agent exits).
    public static func present() -> Bool { present(tool: "iptables") || present(tool: "ip6tables") }

    /// Whether `tool`'s tables hold any of our chains (one `*-save` run).
    static func present(tool: String) -> Bool {
        guard let saved = try? Command.run(["\(tool)-save"]).stdout else { return false }
        return [ingressChain, egressChain, forwardEgressChain].contains { saved.contains(":\($0) ") }
    }
}
