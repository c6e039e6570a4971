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
/// Each queue rule skips packets carrying its hook's fast-path mark bit (``FastPathScript``): the kernel
/// already rewrote them, so no packet takes both paths.
///
/// Every rule uses `--queue-bypass`: while no agent listens, packets pass untouched instead of being
/// dropped. Installed atomically with one `iptables-restore --noflush`; removal deletes our jumps and
/// chains and nothing else, and is idempotent (the agent runs it at start too, to clear a crashed
/// predecessor's rules).
public struct QueueRules: Sendable {
    public static let ingressChain = "DYSCO-IN"
    public static let egressChain = "DYSCO-OUT"
    public static let forwardEgressChain = "DYSCO-FWD-OUT"

    public var queue: UInt16

    public init(queue: UInt16) { self.queue = queue }

    /// The iptables-restore input that installs the rules.
    public var restoreScript: String {
        let target = "-j NFQUEUE --queue-num \(queue) --queue-bypass"
        let ingressSkip = Self.markMatch(FastPathScript.ingressMark)
        let egressSkip = Self.markMatch(FastPathScript.egressMark)
        return """
            *raw
            :\(Self.ingressChain) - [0:0]
            -A \(Self.ingressChain) -p tcp ! -i lo -m mark ! --mark \(ingressSkip) \(target)
            -I PREROUTING 1 -j \(Self.ingressChain)
            COMMIT
            *mangle
            :\(Self.egressChain) - [0:0]
            :\(Self.forwardEgressChain) - [0:0]
            -A \(Self.egressChain) -p tcp ! -o lo -m mark ! --mark \(egressSkip) \(target)
            -A \(Self.forwardEgressChain) -p tcp -m mark ! --mark \(egressSkip) -m addrtype ! --src-type LOCAL \(target)
            -I OUTPUT 1 -j \(Self.egressChain)
            -I POSTROUTING 1 -j \(Self.forwardEgressChain)
            COMMIT

            """
    }

    static func markMatch(_ bit: UInt32) -> String {
        let hex = "0x" + String(bit, radix: 16)
        return "\(hex)/\(hex)"
    }

    public func install(logger: Logger) throws {
        try Self.remove(logger: logger)
        try Command.run(["iptables-restore", "-w", "--noflush"], input: restoreScript)
        logger.info("installed NFQUEUE rules", metadata: ["queue.number": "\(queue)"])
    }

    /// Removes every jump to our chains and the chains themselves, whatever queue they used.
    public static func remove(logger: Logger) throws {
        for (table, builtin, chain) in [("raw", "PREROUTING", ingressChain), ("mangle", "OUTPUT", egressChain),
                                        ("mangle", "POSTROUTING", forwardEgressChain)] {
            while (try? Command.run(["iptables", "-w", "-t", table, "-D", builtin, "-j", chain])) != nil {}
            if (try? Command.run(["iptables", "-w", "-t", table, "-F", chain])) != nil {
                try Command.run(["iptables", "-w", "-t", table, "-X", chain])
                logger.debug("removed chain", metadata: ["iptables.table": "\(table)", "iptables.chain": "\(chain)"])
            }
        }
    }

    /// True when any of our chains exists (tests check that nothing is left after an agent exits).
    public static func present() -> Bool {
        [("raw", ingressChain), ("mangle", egressChain), ("mangle", forwardEgressChain)].contains { table, chain in
            (try? Command.run(["iptables", "-w", "-t", table, "-S", chain])) != nil
        }
    }
}
