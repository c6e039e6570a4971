import DyscoCore
import Foundation
import Testing

/// The BPF datapath's ring-buffer reports (``KernelEvent``) get the same bookkeeping as an observed FIN/RST.
@Suite("Kernel events: FIN, RST and ESTABLISHED reported by the kernel fast path")
struct KernelEventTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!, server = IPAddress("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    func harness() -> ChainHarness { ChainHarness.fastPathChain(client: client, fw1: fw1) }

    /// A session fw1's kernel carries (handshake, third ACK, install confirmed).
    func carried(_ h: ChainHarness) throws -> SessionTable.Record {
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        let id = try #require(h.hosts["fw1"]!.table.records.keys.first)
        _ = h.takeFastPathActions("fw1")
        h.hosts["fw1"]!.fastPathInstalled([id])
        let record = try #require(h.hosts["fw1"]!.table.records[id])
        #expect(record.carrier == .kernel)
        return record
    }

    func event(_ kind: KernelEvent.Kind, _ record: SessionTable.Record, hook: HookPoint, key: FiveTuple,
               flags: TCPFlags, id: SessionTable.SessionID? = nil) -> KernelEvent {
        KernelEvent(kind: kind, sessionID: id ?? record.id, hook: hook, key: key, sequenceNumber: 1000,
                    acknowledgmentNumber: 2000, flags: flags)
    }

    @Test("FINs of both directions, reported at both hooks of a middlebox, close the session: it leaves the kernel and goes after the linger")
    func finsClose() throws {
        let h = harness()
        let record = try carried(h)
        let left = try #require(record.left), right = try #require(record.right)
        // The translations' keys (fastPathTranslations): ingress left / right.reversed, egress session / session.reversed.
        #expect(h.hosts["fw1"]!.observe(event(.fin, record, hook: .ingress, key: left, flags: [.fin, .ack]), now: h.now).taken)
        #expect(h.hosts["fw1"]!.observe(event(.fin, record, hook: .egress, key: record.session, flags: [.fin, .ack]), now: h.now).taken)
        var now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(now.finForward && !now.finReverse && now.carrier == .kernel, "half closed: the kernel keeps carrying it")
        let back = h.hosts["fw1"]!.observe(event(.fin, record, hook: .ingress, key: right.reversed, flags: [.fin, .ack]), now: h.now)
        #expect(back.taken)
        #expect(back.effects.fastPath == [.remove(record.id, record.fastPathTranslations)], "closed: off the kernel at once")
        _ = h.hosts["fw1"]!.observe(event(.fin, record, hook: .egress, key: record.session.reversed, flags: [.fin, .ack]), now: h.now)
        now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(now.finForward && now.finReverse && now.closeDeadline != nil && now.carrier == .slow)
        let counters = h.hosts["fw1"]!.counters
        #expect(counters.kernelEvents == 4 && counters.kernelEventsStale == 0)
        #expect(counters.queuedTeardown == 0, "no FIN came through the queue")
        _ = h.hosts["fw1"]!.expire(now: h.now + 11_000_000_000)
        #expect(h.hosts["fw1"]!.table.records.isEmpty, "removed after the close linger")
    }

    @Test("an RST reported at egress is confirmed (it left this host): the session leaves the kernel and goes after the reset linger")
    func resetAtEgress() throws {
        let h = harness()
        let record = try carried(h)
        let taken = h.hosts["fw1"]!.observe(event(.reset, record, hook: .egress, key: record.session, flags: [.rst, .ack]), now: h.now)
        #expect(taken.taken)
        #expect(taken.effects.fastPath == [.remove(record.id, record.fastPathTranslations)])
        let now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(now.reset && now.carrier == .slow && now.closeDeadline != nil)
        #expect(h.hosts["fw1"]!.counters.resetsConfirmed == 1)
        _ = h.hosts["fw1"]!.expire(now: h.now + 2_000_000_000)
        #expect(h.hosts["fw1"]!.table.records.isEmpty)
    }

    @Test("an RST reported at ingress is provisional (RFC 5961): off the kernel, the session stays until proven")
    func resetAtIngress() throws {
        let h = harness()
        let record = try carried(h)
        let left = try #require(record.left)
        _ = h.hosts["fw1"]!.observe(event(.reset, record, hook: .ingress, key: left, flags: [.rst]), now: h.now)
        let now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(now.resetSeen && !now.reset && now.carrier == .slow)
        #expect(h.hosts["fw1"]!.counters.resetsProvisional == 1)
    }

    @Test("an event of a gone session, of another session's key or of an unknown key changes nothing and is counted")
    func staleEvents() throws {
        let h = harness()
        let record = try carried(h)
        let left = try #require(record.left)
        #expect(!h.hosts["fw1"]!.observe(event(.fin, record, hook: .ingress, key: left, flags: [.fin], id: record.id &+ 99), now: h.now).taken)
        #expect(!h.hosts["fw1"]!.observe(event(.reset, record, hook: .ingress, key: FiveTuple(srcAddr: client, srcPort: 1, dstAddr: server, dstPort: 2),
                                               flags: [.rst]), now: h.now).taken)
        // The egress table has no ingress keys: the hook is part of the key.
        #expect(!h.hosts["fw1"]!.observe(event(.fin, record, hook: .egress, key: left, flags: [.fin]), now: h.now).taken)
        let now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(!now.finForward && !now.resetSeen && now.carrier == .kernel)
        #expect(h.hosts["fw1"]!.counters.kernelEvents == 3 && h.hosts["fw1"]!.counters.kernelEventsStale == 3)
    }

    @Test("a FIN through the queue counts as queued teardown (what the BPF datapath avoids)")
    func queuedFinCounted() throws {
        let h = harness()
        _ = try carried(h)
        _ = h.send(PacketBuilder(tuple: session, flags: [.fin, .ack]).build(), along: ["client", "fw1", "server"])
        #expect(h.hosts["fw1"]!.counters.queuedTeardown >= 1)
    }
}
