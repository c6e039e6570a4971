import DyscoCore
import Foundation
import Testing

@Suite("Kernel fast path: when sessions move to nftables, and the script that puts them there")
struct FastPathTests {
    let client = IPv4Address("10.77.0.10")!, fw1 = IPv4Address("10.77.0.101")!, server = IPv4Address("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    func harness() -> ChainHarness { ChainHarness.fastPathChain(client: client, fw1: fw1) }

    func handshake(_ h: ChainHarness) throws {
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
    }

    /// Handshake plus the third ACK through the chain; fw1's processor with its install action taken.
    func pendingAtFirewall(_ h: ChainHarness) throws -> (PacketProcessor, SessionTable.SessionID) {
        try handshake(h)
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        let fw = h.hosts["fw1"]!
        let id = try #require(fw.table.records.keys.first)
        _ = h.takeFastPathActions("fw1")
        return (fw, id)
    }

    @Test("no install before the handshake completes; the third ACK hands every host's translations to the kernel")
    func installAfterHandshake() throws {
        let h = harness()
        try handshake(h)
        for host in ["client", "fw1", "server"] {
            #expect(h.fastPathActions(host).isEmpty, "\(host): SYN and SYN-ACK stay on the slow path")
        }
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        let fw = try #require(h.hosts["fw1"]!.table.records.values.first)
        #expect(fw.carrier == .pending)
        let actions = h.takeFastPathActions("fw1")
        #expect(actions == [.install(fw.id, fw.fastPathTranslations)])
        #expect(fw.fastPathTranslations.count == 4, "a middlebox has both subsessions: 2 ingress + 2 egress")
        #expect(h.takeFastPathActions("client").count == 1)
        #expect(h.takeFastPathActions("server").count == 1)
        h.hosts["fw1"]!.fastPathInstalled([fw.id])
        #expect(h.hosts["fw1"]!.table.records[fw.id]?.carrier == .kernel)
    }

    @Test("hold takes a kernel session back (remove action), release installs it again; removal cleans the kernel")
    func holdRelease() throws {
        let h = harness()
        var (fw, id) = try pendingAtFirewall(h)
        fw.fastPathInstalled([id])
        let hold = fw.hold([id, 999])
        #expect(hold.held == [id])
        #expect(fw.table.records[id]?.carrier == .held)
        #expect(hold.effects.fastPath == [.remove(id, fw.table.records[id]!.fastPathTranslations)])
        fw.fastPathInstalled([id])
        #expect(fw.table.records[id]?.carrier == .held, "a late install report does not undo a hold")
        let release = fw.release([id])
        #expect(release.released == [id])
        #expect(fw.table.records[id]?.carrier == .pending)
        #expect(release.effects.fastPath.count == 1)
        fw.fastPathInstalled([id])
        // Teardown: RST, then expiry removes it from the kernel too.
        h.hosts["fw1"] = fw
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.rst]).build(), along: ["client", "fw1", "server"]))
        fw = h.hosts["fw1"]!
        let expiry = fw.expire(now: h.now + fw.settings.resetLinger)
        #expect(expiry.removed == 1)
        // One removal from the kernel in all: the RST's (it takes the session back at once), or the expiry's.
        #expect(h.takeFastPathActions("fw1").count + expiry.effects.fastPath.count == 1)
        #expect(fw.table.count == 0)
    }

    @Test("a session the kernel refused stays on the slow path and is not retried")
    func failure() throws {
        let h = harness()
        var (fw, id) = try pendingAtFirewall(h)
        fw.fastPathFailed([id])
        #expect(fw.table.records[id]?.carrier == .slow)
        h.hosts["fw1"] = fw
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        #expect(h.fastPathActions("fw1").isEmpty)
    }

    @Test("with a packet threshold, a short exchange stays on the slow path and a longer one moves")
    func threshold() throws {
        let h = harness()
        for host in ["client", "fw1", "server"] { h.hosts[host]!.settings.fastPathAfterPackets = 8 }
        try handshake(h)
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        #expect(h.fastPathActions("fw1").isEmpty, "3 packets: not yet")
        for _ in 0..<5 {
            _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack], payload: [1]).build(), along: ["client", "fw1", "server"]))
        }
        #expect(h.fastPathActions("fw1").count == 1, "8 packets: handed to the kernel")
    }

    @Test("fast path off: nothing is ever handed to the kernel")
    func disabled() throws {
        let h = ChainHarness()
        let policy = Policy(name: "web", match: SessionPredicate(dport: [PortRange("80")!]), chain: [fw1])
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: TestKeys.group)
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: TestKeys.group)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 30000...30999, trust: TestKeys.group)
        try handshake(h)
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        #expect(h.hosts.keys.allSatisfy { h.fastPathActions($0).isEmpty })
    }

    @Test("the script rewrites only changed fields, lets SYN/FIN/RST through to the agent, and marks the packet")
    func script() {
        let l = FiveTuple.t("10.77.0.10", 10000, "10.77.0.101", 80)
        let text = FastPathScript.install(session: 7, [.init(hook: .ingress, key: l, target: session)])
        #expect(text.contains("add chain ip dysco s7_0"))
        #expect(text.contains("add rule ip dysco s7_0 tcp flags & (fin | syn | rst) == 0 counter ip daddr set 10.77.0.201 tcp sport set 40000 meta mark set mark | 0x10000000"))
        #expect(!text.contains("ip saddr set"), "source address unchanged: not rewritten")
        // FIN and RST: rewritten too, marked to be observed (the agent keeps its bookkeeping; none needed to pass).
        #expect(text.contains("add rule ip dysco s7_0 tcp flags & (fin | rst) != 0 tcp flags & syn == 0 ip daddr set 10.77.0.201 tcp sport set 40000 meta mark set mark | 0x11000000"))
        let rebuilt = FastPathScript.rebuild(reroute: false, sessions: [(7, [.init(hook: .ingress, key: l, target: session)])],
                                             ownedIngress: [l], ownedEgress: [])
        #expect(rebuilt.hasPrefix("add table ip dysco\ndelete table ip dysco\n"), "one transaction replaces the table")
        #expect(rebuilt.contains("set owned_in") && rebuilt.contains("@owned_in meta mark set mark | 0x4000000"))
        #expect(rebuilt.contains("add chain ip dysco s7_0"))
        #expect(rebuilt.hasSuffix("add element ip dysco owned_in { 10.77.0.10 . 10000 . 10.77.0.101 . 80 }\n"))
        #expect(FastPathScript.disown(ingress: [], egress: []).isEmpty)
        #expect(text.contains("add element ip dysco ingress { 10.77.0.10 . 10000 . 10.77.0.101 . 80 : jump s7_0 }"))
        let removal = FastPathScript.remove(session: 7, [.init(hook: .ingress, key: l, target: session)])
        #expect(removal == "delete element ip dysco ingress { 10.77.0.10 . 10000 . 10.77.0.101 . 80 }\ndelete chain ip dysco s7_0\n")
        #expect(FastPathScript.session(ofChain: "s7_3") == 7)
        #expect(FastPathScript.session(ofChain: "pre") == nil)
    }
}

@Suite("Fast-path batching")
struct FastPathBatchingTests {
    @Test("install then remove of one session in a batch cancel out; remove then install (hold, release) stays")
    func coalesce() {
        let a = FastPathAction.install(1, []), b = FastPathAction.remove(1, [])
        let c = FastPathAction.install(2, []), d = FastPathAction.remove(3, []), e = FastPathAction.install(3, [])
        #expect(FastPathAction.coalesce([a, c, b]) == [c])
        #expect(FastPathAction.coalesce([d, e]) == [d, e])
        #expect(FastPathAction.coalesce([a, b, a]) == [a])
    }
}

@Suite("Route table inspection for the fast path's local egress")
struct RouteTableTests {
    let header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"

    @Test("on-link routes only: no re-routing needed; a gateway route (RTF_GATEWAY) needs it")
    func gateways() {
        let onLink = header + "eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        #expect(!RouteTable.hasGatewayRoutes(procNetRoute: onLink))
        let viaGateway = onLink + "eth0\t00000000\t01004D0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        #expect(RouteTable.hasGatewayRoutes(procNetRoute: viaGateway))
        #expect(!RouteTable.hasGatewayRoutes(procNetRoute: ""))
    }

    @Test("the reset script picks the output chain type")
    func resetScript() {
        #expect(FastPathScript.reset(reroute: true).contains("chain out { type route hook output"))
        #expect(FastPathScript.reset(reroute: false).contains("chain out { type filter hook output"))
    }
}

@Suite("Kernel counters for idle expiry")
struct FastPathCounterTests {
    @Test("per-session packet counters are summed from `nft -j list table` output; base chains are ignored")
    func parse() {
        let json = """
            {"nftables": [{"metainfo": {"version": "1.0.6"}},
              {"rule": {"family": "ip", "table": "dysco", "chain": "pre", "handle": 6, "expr": [{"vmap": {}}]}},
              {"rule": {"family": "ip", "table": "dysco", "chain": "s7_0", "handle": 10,
                        "expr": [{"counter": {"packets": 120, "bytes": 9000}}, {"return": null}]}},
              {"rule": {"family": "ip", "table": "dysco", "chain": "s7_1", "handle": 12,
                        "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"return": null}]}},
              {"rule": {"family": "ip", "table": "dysco", "chain": "s9_0", "handle": 14,
                        "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]}
            """
        let totals = FastPathCounters.packetsBySession(json: Data(json.utf8))
        #expect(totals == [7: 123, 9: 0])
        #expect(FastPathCounters.packetsBySession(json: Data("not json".utf8)).isEmpty)
    }
}

@Suite("Fast-path flush: removals now, installs at the quiet point")
struct FastPathFlushSplitTests {
    static let t = FastPathScript.Translation(hook: .egress, key: .t("10.0.0.1", 1, "10.0.0.2", 2), target: .t("10.0.0.1", 3, "10.0.0.3", 4))

    @Test("a session with a removal goes now with all its queued actions, in order; install-only sessions wait")
    func split() {
        let actions: [FastPathAction] = [.install(1, [Self.t]), .install(2, [Self.t]), .remove(1, [Self.t]),
                                         .remove(3, [Self.t]), .install(3, [Self.t]), .install(4, [Self.t])]
        let (now, later) = FastPathAction.splitForFlush(actions)
        #expect(now == [.install(1, [Self.t]), .remove(1, [Self.t]), .remove(3, [Self.t]), .install(3, [Self.t])])
        #expect(later == [.install(2, [Self.t]), .install(4, [Self.t])])
        // What goes now coalesces as before: session 1's install and removal cancel out; 3's hold-then-release stays.
        #expect(FastPathAction.coalesce(now) == [.remove(3, [Self.t]), .install(3, [Self.t])])
    }
}
