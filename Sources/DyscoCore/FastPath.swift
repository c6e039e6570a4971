/// The nftables ruleset of the kernel fast path, as text for libnftables (docs/ARCHITECTURE.md, "Kernel fast
/// path"). Pure: generated from session-table translations, unit-tested without root.
///
/// ```
/// table ip dysco {
///   map ingress { type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; }
///   map egress  { type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; }
///   chain pre  { type filter hook prerouting priority -310; ... vmap @ingress }   # before conntrack and DYSCO-IN
///   chain out  { type route|filter hook output priority -160; ... vmap @egress }  # local egress
///   chain post { type filter hook postrouting priority -160; ... vmap @egress }   # forwarded egress
///   chain s<id>_<k> { tcp flags & (fin|syn|rst) == 0 counter <rewrite> meta mark set mark | BIT
///                     tcp flags & (fin|rst) != 0 tcp flags & syn == 0 <rewrite> meta mark set mark | BIT | OBSERVE }
/// }
/// ```
/// A packet the kernel rewrote carries a mark bit (ingress or egress); the iptables NFQUEUE rules skip packets
/// with their hook's bit, so no packet takes both paths. SYNs match nothing and leave unmarked: they reach the
/// agent (handshake, trailer). FIN and RST are rewritten and marked to be observed: the agent does its teardown
/// bookkeeping for them, and with no agent they still leave rewritten (docs/ARCHITECTURE.md, "Agent crash and restart").
public enum FastPathScript {
    public static let table = "dysco"
    /// Set by the kernel at ingress (raw-PREROUTING queue rule skips it) and at egress (OUTPUT/POSTROUTING).
    public static let ingressMark: UInt32 = 0x1000_0000
    public static let egressMark: UInt32 = 0x2000_0000
    /// A FIN or RST the kernel rewrote (second rule of a session chain): queued to the agent, with bypass, for its
    /// teardown bookkeeping only; with no agent it leaves rewritten (docs/ARCHITECTURE.md, "Agent crash and restart").
    public static let observeIngressMark: UInt32 = 0x0100_0000
    public static let observeEgressMark: UInt32 = 0x0200_0000
    /// A packet whose key is in `owned_in` / `owned_out`: a session past its handshake that the kernel does not
    /// rewrite. Queued without bypass: while no agent runs, it is dropped (TCP retransmits it), never passed
    /// unrewritten.
    public static let ownedIngressMark: UInt32 = 0x0400_0000
    public static let ownedEgressMark: UInt32 = 0x0800_0000

    /// One translation of one session: key tuple → target tuple at a hook.
    public struct Translation: Equatable, Sendable {
        public enum Hook: String, Sendable { case ingress, egress }
        public var hook: Hook
        public var key: FiveTuple
        public var target: FiveTuple
        public init(hook: Hook, key: FiveTuple, target: FiveTuple) {
            self.hook = hook
            self.key = key
            self.target = target
        }
    }

    /// Replaces the table with an empty one in one transaction (a crashed agent's leftovers go with it).
    ///
    /// `reroute`: local egress runs in a `route` chain, so the kernel re-routes a packet whose destination
    /// the rewrite changed (needed when a next hop lies behind a gateway; it costs a route lookup per packet).
    /// Without it, a `filter` chain: right whenever every destination is on-link, where the neighbour is
    /// resolved from the rewritten address (DESIGN §2).
    public static func reset(reroute: Bool) -> String {
        """
        add table ip \(table)
        delete table ip \(table)
        table ip \(table) {
          map ingress { type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; }
          map egress { type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; }
          set owned_in { type ipv4_addr . inet_service . ipv4_addr . inet_service; }
          set owned_out { type ipv4_addr . inet_service . ipv4_addr . inet_service; }
          chain pre { type filter hook prerouting priority -310; policy accept; \(ownedRule("owned_in", ownedIngressMark)) ip protocol tcp ip saddr . tcp sport . ip daddr . tcp dport vmap @ingress; }
          chain out { type \(reroute ? "route" : "filter") hook output priority -160; policy accept; \(ownedRule("owned_out", ownedEgressMark)) ip protocol tcp ip saddr . tcp sport . ip daddr . tcp dport vmap @egress; }
          chain post { type filter hook postrouting priority -160; policy accept; \(ownedRule("owned_out", ownedEgressMark)) ip protocol tcp ip saddr . tcp sport . ip daddr . tcp dport vmap @egress; }
        }

        """
    }

    /// Marks a packet whose key is owned, before the verdict map (which sees the key before any rewrite).
    static func ownedRule(_ set: String, _ mark: UInt32) -> String {
        "ip protocol tcp ip saddr . tcp sport . ip daddr . tcp dport @\(set) meta mark set mark | 0x\(String(mark, radix: 16));"
    }

    /// The table rebuilt in one transaction (a restarted agent, docs/ARCHITECTURE.md "Agent crash and restart"):
    /// the empty table of ``reset(reroute:)``, the sessions the kernel carried (`sessions`, in the current rule
    /// format) and the owned keys. The kernel swaps old table for new atomically: packets see one or the other.
    public static func rebuild(reroute: Bool, sessions: [(UInt64, [Translation])], ownedIngress: [FiveTuple],
                               ownedEgress: [FiveTuple]) -> String {
        reset(reroute: reroute) + sessions.map { install(session: $0.0, $0.1) }.joined()
            + own(ingress: ownedIngress, egress: ownedEgress)
    }

    /// Sets the owned keys anew, in one transaction (a restarted agent whose kernel table is as it left it).
    public static func replaceOwned(ingress: [FiveTuple], egress: [FiveTuple]) -> String {
        "flush set ip \(table) owned_in\nflush set ip \(table) owned_out\n" + own(ingress: ingress, egress: egress)
    }

    /// Adds keys to the owned sets (a key already there is no error).
    public static func own(ingress: [FiveTuple], egress: [FiveTuple]) -> String {
        elements("add", ingress: ingress, egress: egress)
    }

    /// Removes keys from the owned sets (each must be there: the worker deletes only what it added).
    public static func disown(ingress: [FiveTuple], egress: [FiveTuple]) -> String {
        elements("delete", ingress: ingress, egress: egress)
    }

    private static func elements(_ verb: String, ingress: [FiveTuple], egress: [FiveTuple]) -> String {
        var lines: [String] = []
        for (set, keys) in [("owned_in", ingress), ("owned_out", egress)] where !keys.isEmpty {
            // Chunks keep each command's line a reasonable length.
            for start in stride(from: 0, to: keys.count, by: 512) {
                let chunk = keys[start..<min(start + 512, keys.count)].map(element).joined(separator: ", ")
                lines.append("\(verb) element ip \(table) \(set) { \(chunk) }")
            }
        }
        return lines.isEmpty ? "" : lines.joined(separator: "\n") + "\n"
    }

    public static var destroy: String { "add table ip \(table)\ndelete table ip \(table)\n" }

    static func chainName(session: UInt64, index: Int) -> String { "s\(session)_\(index)" }

    /// Parses a per-session chain name back to its session id.
    public static func session(ofChain name: String) -> UInt64? {
        guard name.hasPrefix("s"), let underscore = name.firstIndex(of: "_") else { return nil }
        return UInt64(name[name.index(after: name.startIndex)..<underscore])
    }

    static func element(_ t: FiveTuple) -> String { "\(t.srcAddr) . \(t.srcPort) . \(t.dstAddr) . \(t.dstPort)" }

    /// Commands that put one session's translations into the kernel.
    public static func install(session: UInt64, _ translations: [Translation]) -> String {
        var lines: [String] = []
        for (index, t) in translations.enumerated() {
            let chain = chainName(session: session, index: index)
            var rewrite: [String] = []
            if t.key.srcAddr != t.target.srcAddr { rewrite.append("ip saddr set \(t.target.srcAddr)") }
            if t.key.dstAddr != t.target.dstAddr { rewrite.append("ip daddr set \(t.target.dstAddr)") }
            if t.key.srcPort != t.target.srcPort { rewrite.append("tcp sport set \(t.target.srcPort)") }
            if t.key.dstPort != t.target.dstPort { rewrite.append("tcp dport set \(t.target.dstPort)") }
            let mark = t.hook == .ingress ? ingressMark : egressMark
            let observe = mark | (t.hook == .ingress ? observeIngressMark : observeEgressMark)
            // Rule 1, data: SYN/FIN/RST do not match. Rule 2: FIN and RST are rewritten too and marked to be
            // observed (the agent keeps its teardown bookkeeping; with no agent they still leave rewritten).
            // SYNs match neither and fall off the chain unmarked, to the agent (trailer, handshake).
            let statements = ["tcp flags & (fin | syn | rst) == 0", "counter"] + rewrite
                + ["meta mark set mark | 0x\(String(mark, radix: 16))"]
            // Rule 1 has no verdict, so a data packet goes on to rule 2: its match must exclude data.
            let teardown = ["tcp flags & (fin | rst) != 0", "tcp flags & syn == 0"] + rewrite + ["meta mark set mark | 0x\(String(observe, radix: 16))"]
            lines.append("add chain ip \(table) \(chain)")
            lines.append("add rule ip \(table) \(chain) \(statements.joined(separator: " "))")
            lines.append("add rule ip \(table) \(chain) \(teardown.joined(separator: " "))")
            lines.append("add element ip \(table) \(t.hook.rawValue) { \(element(t.key)) : jump \(chain) }")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Commands that take one session's translations out of the kernel (its next packets reach the agent).
    public static func remove(session: UInt64, _ translations: [Translation]) -> String {
        var lines: [String] = []
        for (index, t) in translations.enumerated() {
            lines.append("delete element ip \(table) \(t.hook.rawValue) { \(element(t.key)) }")
            lines.append("delete chain ip \(table) \(chainName(session: session, index: index))")
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

extension SessionTable.Record {
    /// The record's translations for the fast path, in a fixed order (chain names depend on it).
    public var fastPathTranslations: [FastPathScript.Translation] {
        var result: [FastPathScript.Translation] = []
        if let left {
            result.append(.init(hook: .ingress, key: left, target: session))
            result.append(.init(hook: .egress, key: session.reversed, target: left.reversed))
        }
        if let right {
            result.append(.init(hook: .egress, key: session, target: right))
            result.append(.init(hook: .ingress, key: right.reversed, target: session.reversed))
        }
        return result
    }
}

/// Whether this namespace routes anything through a gateway (IPv4 main table, `/proc/net/route`). Without
/// such routes every destination is on-link and the fast path's local egress needs no re-routing.
public enum RouteTable {
    /// RTF_GATEWAY in the Flags column of /proc/net/route.
    static let gatewayFlag: UInt32 = 0x0002

    public static func hasGatewayRoutes(procNetRoute text: String) -> Bool {
        text.split(separator: "\n").dropFirst().contains { line in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count > 3, let flags = UInt32(fields[3], radix: 16) else { return false }
            return flags & gatewayFlag != 0
        }
    }
}
