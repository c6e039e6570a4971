import DyscoCore
import Foundation
import Testing

/// Connection setup in the kernel (issue 16 item 2, the BPF datapath): with `Settings.installAtSyn` an agent hands a
/// session's translations to the kernel when it handles its SYN (both directions, marked opening), so that the
/// SYN-ACK, the ACK, the request, the response and the close never reach it; the establishment comes back as a
/// kernel event (paper §2.1: the handshake that establishes the session and its subsessions), and a record that
/// never establishes still goes at the SYN timeout, its entries with it.
@Suite("Connection setup in the kernel: install at SYN, establishment from kernel events")
struct ConnectionSetupTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!, server = IPAddress("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }
    let hosts = ["client", "fw1", "server"]

    func harness(installAtSyn: Bool = true) -> ChainHarness {
        ChainHarness.fastPathChain(client: client, fw1: fw1, installAtSyn: installAtSyn)
    }

    /// The SYN through client → fw1 → server; each host's opening taken and confirmed as the kernel path would.
    func opened(_ h: ChainHarness) throws -> [String: SessionTable.Record] {
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), along: hosts))
        var records: [String: SessionTable.Record] = [:]
        for host in hosts {
            let record = try #require(h.hosts[host]!.table.records.values.first)
            _ = h.takeFastPathActions(host)
            h.hosts[host]!.fastPathInstalled([record.id])
            records[host] = h.hosts[host]!.table.records[record.id]
        }
        return records
    }

    func established(_ record: SessionTable.Record, hook: HookPoint, key: FiveTuple,
                     kind: KernelEvent.Kind = .established) -> KernelEvent {
        KernelEvent(kind: kind, sessionID: record.id, hook: hook, key: key, sequenceNumber: 7001,
                    acknowledgmentNumber: 9001, flags: kind == .fin ? [.fin, .ack] : [.ack])
    }

    @Test("the SYN opens the session in every agent's kernel: both directions, 4 translations at the middlebox, 2 at the ends; the SYN's facts where it leaves")
    func installAtSyn() throws {
        let h = harness()
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), along: hosts))
        let expectedSyn: [String: Bool] = ["client": true, "fw1": true, "server": false]
        for host in hosts {
            let record = try #require(h.hosts[host]!.table.records.values.first)
            #expect(record.carrier == .pending, "\(host): going to the kernel with the SYN")
            #expect(!record.established)
            let actions = h.takeFastPathActions(host)
            // The SYN leaves the left end and the middlebox with the session tuple (their egress translation's key).
            let syn = expectedSyn[host]! ? FastPathAction.OpeningSyn(tuple: record.session, sequence: 7000) : nil
            #expect(actions == [.open(record.id, record.fastPathTranslations, syn: syn)], "\(host)")
            #expect(record.fastPathTranslations.count == (host == "fw1" ? 4 : 2), "\(host)")
            #expect(FastPathAction.splitForFlush(actions).now == actions,
                    "\(host): committed at once, before the SYN's verdict")
        }
    }

    @Test("a retransmitted SYN still reaches the agent (no REWRITE_SYN) and carries the trailer again; no second install")
    func retransmittedSyn() throws {
        let h = harness()
        _ = try opened(h)
        let again = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), along: hosts))
        #expect(again.count > 0)
        for host in hosts {
            #expect(h.takeFastPathActions(host).isEmpty, "\(host)")
            #expect(h.hosts[host]!.table.records.count == 1)
        }
    }

    @Test("without installAtSyn (the nftables datapath, --no-fastpath) nothing changes: no install before the third ACK")
    func nftablesUnchanged() throws {
        let h = harness(installAtSyn: false)
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: hosts))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: hosts.reversed()))
        for host in hosts {
            #expect(h.fastPathActions(host).isEmpty, "\(host)")
            #expect(h.hosts[host]!.table.records.values.first?.carrier == .slow)
        }
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: hosts))
        for host in hosts {
            let record = try #require(h.hosts[host]!.table.records.values.first)
            #expect(h.takeFastPathActions(host) == [.install(record.id, record.fastPathTranslations)], "\(host)")
        }
    }

    @Test("ESTABLISHED on a forward translation sets what the slow path's SYN-ACK and ACK would have: synAckSeen, rightEstablished, established")
    func establishedFromEvents() throws {
        let h = harness()
        let records = try opened(h)
        let fw = try #require(records["fw1"]), left = try #require(fw.left), right = try #require(fw.right)
        // A reverse translation's report (the server's first data through fw1) says nothing about the handshake.
        #expect(h.hosts["fw1"]!.observe(established(fw, hook: .ingress, key: right.reversed), now: h.now).taken)
        #expect(h.hosts["fw1"]!.table.records[fw.id]?.established == false)
        // fw1: the client's ACK through the ingress translation from the left (and the egress one to the right).
        let taken = h.hosts["fw1"]!.observe(established(fw, hook: .ingress, key: left), now: h.now)
        #expect(taken.taken && taken.effects.fastPath.isEmpty, "the session stays in the kernel")
        var now = try #require(h.hosts["fw1"]!.table.records[fw.id])
        #expect(now.synAckSeen && now.rightEstablished && now.established && now.carrier == .kernel)
        _ = h.hosts["fw1"]!.observe(established(fw, hook: .egress, key: fw.session), now: h.now)
        now = try #require(h.hosts["fw1"]!.table.records[fw.id])
        #expect(now.established && now.carrier == .kernel)
        // The left end: its own ACK through the egress translation to the right.
        let c = try #require(records["client"])
        #expect(h.hosts["client"]!.observe(established(c, hook: .egress, key: c.session), now: h.now).taken)
        now = try #require(h.hosts["client"]!.table.records[c.id])
        #expect(now.synAckSeen && now.rightEstablished && now.established)
        // The right end (no right subsession): the client's ACK through the ingress translation from the left.
        let s = try #require(records["server"]), sLeft = try #require(s.left)
        #expect(h.hosts["server"]!.observe(established(s, hook: .ingress, key: sLeft), now: h.now).taken)
        now = try #require(h.hosts["server"]!.table.records[s.id])
        #expect(now.synAckSeen && now.established && !now.rightEstablished)
        for host in hosts { #expect(h.hosts[host]!.counters.kernelEventsStale == 0) }
    }

    @Test("an opening session that never establishes goes at the SYN timeout, and its kernel entries with it")
    func synTimeoutRemovesEntries() throws {
        let h = harness()
        let records = try opened(h)
        for host in hosts {
            let record = try #require(records[host])
            let timeout = h.hosts[host]!.settings.synTimeout
            // Kernel activity (a SYN-ACK the kernel carried, say) does not keep a SYN-only record.
            h.hosts[host]!.kernelActivity([record.id], now: h.now + timeout - 1)
            let (removed, effects) = h.hosts[host]!.expire(now: h.now + timeout)
            #expect(removed == 1, "\(host)")
            #expect(effects.fastPath == [.remove(record.id, record.fastPathTranslations)], "\(host): entries removed")
            #expect(h.hosts[host]!.counters.synTimeouts == 1)
            #expect(h.hosts[host]!.table.records.isEmpty)
        }
    }

    @Test("an established session is not a SYN timeout; FINs both ways reported by the kernel close it, and its entries stay until the linger ends (the last ACK stays in the kernel)")
    func establishedThenClosed() throws {
        let h = harness()
        let records = try opened(h)
        let c = try #require(records["client"]), right = try #require(c.right)
        _ = h.hosts["client"]!.observe(established(c, hook: .egress, key: c.session), now: h.now)
        let timeout = h.hosts["client"]!.settings.synTimeout
        h.hosts["client"]!.kernelActivity([c.id], now: h.now + timeout)
        #expect(h.hosts["client"]!.expire(now: h.now + timeout).removed == 0)
        _ = h.hosts["client"]!.observe(established(c, hook: .egress, key: c.session, kind: .fin), now: h.now + timeout)
        let closing = h.hosts["client"]!.observe(established(c, hook: .ingress, key: right.reversed, kind: .fin), now: h.now + timeout)
        #expect(closing.effects.fastPath.isEmpty, "closed, still in the kernel for its last ACK")
        let record = try #require(h.hosts["client"]!.table.records[c.id])
        #expect(record.closeDeadline != nil && record.carrier == .kernel)
        let (removed, effects) = h.hosts["client"]!.expire(now: record.closeDeadline!)
        #expect(removed == 1 && effects.fastPath == [.remove(c.id, c.fastPathTranslations)], "gone with its entries")
    }

    @Test("a full kernel map refuses the opening: the session carries on through the agent (slow path)")
    func openingRefusedByKernel() throws {
        let h = harness()
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: hosts))
        let record = try #require(h.hosts["fw1"]!.table.records.values.first)
        h.hosts["fw1"]!.fastPathFailed([record.id])
        _ = h.takeFastPathActions("fw1")
        #expect(h.hosts["fw1"]!.table.records[record.id]?.carrier == .slow)
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: hosts.reversed()))
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: hosts))
        let now = try #require(h.hosts["fw1"]!.table.records[record.id])
        #expect(now.established && now.carrier == .slow && h.takeFastPathActions("fw1").isEmpty)
    }
}

@Suite("Connection setup in the kernel: restart")
struct ConnectionSetupRestartTests {
    @Test("a restart keeps a closing session in the kernel when sessions are installed at SYN (its entries stayed for the linger); otherwise it goes to the slow path as before")
    func closingKeptAcrossRestart() throws {
        let session = FiveTuple(srcAddr: IPAddress("10.77.0.10")!, srcPort: 40000, dstAddr: IPAddress("10.77.0.201")!, dstPort: 80)
        var table = SessionTable(portRange: 10000...10999)
        let id = try table.insertLeftEnd(session: session, hops: [IPAddress("10.77.0.201")!], identity: .random(), now: 1)
        table.update(id) { $0.closeDeadline = 10 }
        var other = table
        #expect(SessionStateFile.reconcile([id], table: &table, inKernel: [id], fastPath: true, keepClosing: true).map(\.0) == [id])
        #expect(table.records[id]?.carrier == .kernel)
        #expect(SessionStateFile.reconcile([id], table: &other, inKernel: [id], fastPath: true).isEmpty)
        #expect(other.records[id]?.carrier == .slow)
    }
}
