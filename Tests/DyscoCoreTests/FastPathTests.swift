import DyscoCore
import Foundation
import Testing

@Suite("Kernel fast path: when sessions move to the kernel")
struct FastPathTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!, server = IPAddress("10.77.0.201")!
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

@Suite("Fast-path flush: removals now, installs at the quiet point")
struct FastPathFlushSplitTests {
    static let t = FastPath.Translation(hook: .egress, key: .t("10.0.0.1", 1, "10.0.0.2", 2), target: .t("10.0.0.1", 3, "10.0.0.3", 4))

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
