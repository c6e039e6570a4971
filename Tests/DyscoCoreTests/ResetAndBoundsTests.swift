import DyscoCore
import Testing

/// A client → fw1 → server chain in memory with a completed handshake and some data, for the RST and bounds
/// tests. Client ISN 1000, server ISN 5000, no window scaling; the server acknowledges everything.
struct ResetLab {
    static let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!
    static let server = IPAddress("10.77.0.201")!
    /// The same hosts over IPv6 (`family` .ipv6; issue 18 (c)).
    static let client6 = IPAddress("fd00:77::10")!, fw16 = IPAddress("fd00:77::101")!, server6 = IPAddress("fd00:77::201")!
    let h = ChainHarness()
    let session: FiveTuple
    /// Next sequence numbers of each side (what the other side acknowledged last).
    var clientNext: UInt32 = 1001
    var serverNext: UInt32 = 5001

    init(settings: PacketProcessor.Settings = PacketProcessor.Settings(), clients: [IPAddress] = [client],
         family: AddressFamily = .ipv4) {
        let v6 = family == .ipv6
        session = FiveTuple(srcAddr: v6 ? Self.client6 : Self.client, srcPort: 40000, dstAddr: v6 ? Self.server6 : Self.server,
                            dstPort: 80)
        let policy = Policy(name: "web", match: SessionPredicate(dst: v6 ? nil : IPPrefix("10.77.0.201/32"), dport: [PortRange("80")!]),
                            chain: [v6 ? Self.fw16 : Self.fw1])
        for (i, address) in clients.enumerated() {
            h.hosts[i == 0 ? "client" : "client\(i)"] = PacketProcessor(
                config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: TestKeys.group, settings: settings)
            _ = address
        }
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: TestKeys.group, settings: settings)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 40000...40999, trust: TestKeys.group,
                                            settings: settings)
    }

    var forward: [String] { ["client", "fw1", "server"] }
    var reverse: [String] { ["server", "fw1", "client"] }

    /// SYN, SYN-ACK, ACK, then `rounds` of 100 bytes forward, each acknowledged (window 1000).
    mutating func establish(rounds: Int = 3) throws {
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn], seq: 1000, ack: 0).build(), along: forward))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack], seq: 5000, ack: 1001, window: 1000).build(),
                                along: reverse))
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack], seq: 1001, ack: 5001).build(), along: forward))
        for _ in 0..<rounds { try exchange() }
    }

    /// 100 bytes forward and their ACK.
    mutating func exchange() throws {
        let data = PacketBuilder(tuple: session, flags: [.ack, .psh], seq: clientNext, ack: serverNext,
                                 payload: Array(repeating: 7, count: 100)).build()
        _ = try #require(h.send(data, along: forward))
        clientNext &+= 100
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.ack], seq: serverNext, ack: clientNext,
                                              window: 1000).build(), along: reverse))
    }

    var fw1: PacketProcessor { h.hosts["fw1"]! }
    var fw1Record: SessionTable.Record { fw1.table.records.values.first! }

    /// An RST as an off-path host would send it to fw1's left subsession tuple (client → fw1), at fw1's ingress.
    func forgedRST(seq: UInt32, flags: TCPFlags = [.rst]) -> Verdict {
        let wire = fw1Record.left!
        return h.run("fw1", PacketBuilder(tuple: wire, flags: flags, seq: seq, ack: 0).build(), .ingress).0
    }
}

@Suite("Resets (RFC 5961 §3): sequence checks, provisional RSTs, refutation")
struct ResetTests {
    typealias J = SequenceTracking.Judgement

    /// Tracking after a handshake (ISNs 1000/5000, no window scale) and 300 bytes forward, all acknowledged
    /// with window 1000: the server's receive window is [1301, 2301].
    static func tracked() -> SequenceTracking {
        var t = SequenceTracking()
        t.observe(.forward, seq: 1000, ack: nil, window: 64000, flags: [.syn], payloadLength: 0, windowScale: nil)
        t.observe(.reverse, seq: 5000, ack: 1001, window: 1000, flags: [.syn, .ack], payloadLength: 0, windowScale: nil)
        t.observe(.forward, seq: 1001, ack: 5001, window: 64000, flags: [.ack], payloadLength: 300, windowScale: nil)
        t.observe(.reverse, seq: 5001, ack: 1301, window: 1000, flags: [.ack], payloadLength: 0, windowScale: nil)
        return t
    }

    @Test("RFC 5961 §3.2: below RCV.NXT or beyond the window is outside, RCV.NXT exactly is exact, the rest unknown")
    func judgeWindow() {
        let t = Self.tracked()
        #expect(t.judge(.forward, seq: 1300, ack: nil) == J.outside, "one below the receiver's last ACK")
        #expect(t.judge(.forward, seq: 1301 &- 0x7000_0000, ack: nil) == J.outside)
        #expect(t.judge(.forward, seq: 1301, ack: nil) == J.exact, "RCV.NXT, all data acknowledged")
        #expect(t.judge(.forward, seq: 1800, ack: nil) == J.unknown, "in window, not exact: the receiver sends a challenge ACK")
        #expect(t.judge(.forward, seq: 2301, ack: nil) == J.unknown, "the right edge")
        #expect(t.judge(.forward, seq: 2302, ack: nil) == J.outside)
        #expect(t.judge(.forward, seq: 0xdead_beef, ack: nil) == J.outside)
        // The other direction: the client's window (it acknowledged 5001 with window 64000).
        #expect(t.judge(.reverse, seq: 5001, ack: nil) == J.exact)
        #expect(t.judge(.reverse, seq: 5000, ack: nil) == J.outside)
        #expect(t.judge(.reverse, seq: 5001 &+ 64001, ack: nil) == J.outside)
    }

    @Test("the right edge widens to what the sender sent (an ACK may be on its way); unacknowledged data is not exact")
    func judgeInFlight() {
        var t = Self.tracked()
        t.observe(.forward, seq: 1301, ack: 5001, window: 64000, flags: [.ack], payloadLength: 1000, windowScale: nil)
        t.observe(.forward, seq: 2301, ack: 5001, window: 64000, flags: [.ack], payloadLength: 500, windowScale: nil)
        #expect(t.judge(.forward, seq: 2801, ack: nil) == J.unknown, "the sender's SND.NXT may be the receiver's RCV.NXT")
        #expect(t.judge(.forward, seq: 1301, ack: nil) == J.unknown, "RCV.NXT may have moved: not provably exact")
        #expect(t.judge(.forward, seq: 2802, ack: nil) == J.outside)
    }

    @Test("window scale (RFC 7323) applies only when both SYNs carried it; unknown scales count as 14")
    func judgeScale() {
        var t = SequenceTracking()
        t.observe(.forward, seq: 1000, ack: nil, window: 64000, flags: [.syn], payloadLength: 0, windowScale: 7)
        t.observe(.reverse, seq: 5000, ack: 1001, window: 1000, flags: [.syn, .ack], payloadLength: 0, windowScale: 7)
        #expect(t.judge(.forward, seq: 1001 &+ 1000 * 128, ack: nil) == J.unknown)
        #expect(t.judge(.forward, seq: 1001 &+ 1000 * 128 &+ 1, ack: nil) == J.outside)
        var noScale = SequenceTracking()
        noScale.observe(.forward, seq: 1000, ack: nil, window: 64000, flags: [.syn], payloadLength: 0, windowScale: nil)
        noScale.observe(.reverse, seq: 5000, ack: 1001, window: 1000, flags: [.syn, .ack], payloadLength: 0, windowScale: 7)
        #expect(noScale.judge(.forward, seq: 2002, ack: nil) == J.outside, "the client offered none: no scaling")
        var unseen = SequenceTracking()  // e.g. a new box of a migration: no SYN crossed it
        unseen.observe(.reverse, seq: 5000, ack: 1001, window: 1000, flags: [.ack], payloadLength: 0, windowScale: nil)
        #expect(unseen.judge(.forward, seq: 1001 &+ 1000 << 14, ack: nil) == J.unknown)
    }

    @Test("SYN-SENT (RFC 793 §3.9): an RST must acknowledge the SYN; stale tracking judges nothing")
    func judgeSynSentAndStale() {
        var t = SequenceTracking()
        t.observe(.forward, seq: 1000, ack: nil, window: 64000, flags: [.syn], payloadLength: 0, windowScale: nil)
        #expect(t.judge(.reverse, seq: 0, ack: 1001) == J.exact)
        #expect(t.judge(.reverse, seq: 0, ack: 1234) == J.outside)
        #expect(t.judge(.reverse, seq: 0, ack: nil) == J.outside)
        var stale = Self.tracked()
        stale.invalidate()
        #expect(stale.judge(.forward, seq: 0xdead_beef, ack: nil) == J.unknown)
    }

    @Test("the window scale option is read from the SYN's options")
    func windowScaleOption() {
        let options: [UInt8] = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1, 3, 3, 9]
        var bytes = PacketBuilder(tuple: .t("10.0.0.1", 1, "10.0.0.2", 2), flags: [.syn], options: options).build()
        let scale = bytes.withUnsafeMutableBytes { raw -> UInt8? in
            guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { return 99 }
            return p.tcp.windowScaleOption
        }
        #expect(scale == 9)
    }

    @Test("a forged RST outside the window is dropped at fw1 and changes nothing (slow path)", arguments: [AddressFamily.ipv4, .ipv6])
    func outsideDropped(family: AddressFamily) throws {
        var lab = ResetLab(family: family)
        try lab.establish()
        for seq: UInt32 in [0, 77, 0x8000_0000, lab.clientNext &- 1, lab.clientNext &+ 5000] {
            #expect(lab.forgedRST(seq: seq) == .drop, "seq \(seq), tracking \(lab.fw1Record.sequence)")
        }
        #expect(lab.fw1.counters.resetsOutOfWindow == 5)
        lab.h.now += 2 * lab.fw1.settings.resetLinger
        #expect(lab.h.hosts["fw1"]!.expire(now: lab.h.now).removed == 0)
        #expect(lab.fw1Record.reset == false && lab.fw1Record.closeDeadline == nil)
        try lab.exchange()
    }

    @Test("an in-window RST that the firewall drops is provisional: the session is not removed, a later packet refutes it", arguments: [AddressFamily.ipv4, .ipv6])
    func provisionalRefuted(family: AddressFamily) throws {
        var lab = ResetLab(family: family)
        try lab.establish()
        #expect(lab.forgedRST(seq: lab.clientNext &+ 500) != .drop, "passed on: the firewall and the server judge")
        #expect(lab.fw1.counters.resetsProvisional == 1)
        #expect(lab.fw1Record.resetSeen && !lab.fw1Record.reset && lab.fw1Record.closeDeadline == nil)
        // An idle session that nobody's packet crosses: still there long after the reset linger.
        lab.h.now += 10 * lab.fw1.settings.resetLinger
        #expect(lab.h.hosts["fw1"]!.expire(now: lab.h.now).removed == 0)
        // The server's challenge ACK (RFC 5961 §3.2) crosses fw1: the RST was false.
        _ = try #require(lab.h.send(PacketBuilder(tuple: lab.session.reversed, flags: [.ack], seq: lab.serverNext,
                                                  ack: lab.clientNext, window: 1000).build(), along: lab.reverse))
        #expect(lab.fw1.counters.resetsRefuted == 1)
        #expect(!lab.fw1Record.resetSeen)
        try lab.exchange()
    }

    @Test("an RST that leaves fw1 (the firewall let it through) is confirmed, and a later packet still refutes it")
    func confirmedThenRefuted() throws {
        var lab = ResetLab()
        try lab.establish()
        let wire = lab.fw1Record.left!
        let rst = PacketBuilder(tuple: wire, flags: [.rst], seq: lab.clientNext &+ 200, ack: 0).build()
        let (v, atFw1) = lab.h.run("fw1", rst, .ingress)
        #expect(v.delivers)
        #expect(lab.h.run("fw1", atFw1, .egress).0.delivers)
        #expect(lab.fw1.counters.resetsProvisional == 1 && lab.fw1.counters.resetsConfirmed == 1)
        #expect(lab.fw1Record.reset && lab.fw1Record.closeDeadline != nil)
        try lab.exchange()  // data before the linger ends: the RST was false
        #expect(lab.fw1Record.closeDeadline == nil && !lab.fw1Record.reset)
        lab.h.now += 2 * lab.fw1.settings.resetLinger
        #expect(lab.h.hosts["fw1"]!.expire(now: lab.h.now).removed == 0)
    }

    @Test("a genuine RST (the client's, at RCV.NXT) removes the session everywhere after the reset linger")
    func genuineReset() throws {
        var lab = ResetLab()
        try lab.establish()
        _ = try #require(lab.h.send(PacketBuilder(tuple: lab.session, flags: [.rst], seq: lab.clientNext, ack: 0).build(),
                                    along: lab.forward))
        lab.h.now += lab.fw1.settings.resetLinger
        for host in ["client", "fw1", "server"] {
            #expect(lab.h.hosts[host]!.expire(now: lab.h.now).removed == 1, "\(host)")
            #expect(lab.h.hosts[host]!.table.count == 0)
        }
        #expect(lab.h.hosts["server"]!.counters.resetsConfirmed == 1, "exact by tracking at the server's ingress")
    }

    @Test("on the kernel fast path (no sequence numbers seen) an RST is provisional and takes the session off the kernel", arguments: [AddressFamily.ipv4, .ipv6])
    func fastPathProvisional(family: AddressFamily) throws {
        var settings = PacketProcessor.Settings()
        settings.fastPath = true
        settings.fastPathAfterPackets = 2
        var lab = ResetLab(settings: settings, family: family)
        try lab.establish()
        let id = lab.fw1Record.id
        #expect(lab.fw1Record.carrier == .pending)
        lab.h.hosts["fw1"]!.fastPathInstalled([id])
        _ = lab.h.takeFastPathActions("fw1")
        #expect(lab.forgedRST(seq: 0xdead_beef) != .drop, "stale tracking: the firewall and the endpoint judge")
        #expect(lab.fw1Record.carrier == .slow)
        let actions = lab.h.takeFastPathActions("fw1")
        #expect(actions.contains { if case .remove(id, _) = $0 { true } else { false } })
        lab.h.now += 5 * lab.fw1.settings.resetLinger
        #expect(lab.h.hosts["fw1"]!.expire(now: lab.h.now).removed == 0, "an idle session an RST did not prove dead stays")
        try lab.exchange()
        #expect(lab.fw1.counters.resetsRefuted == 1)
        // Refuted: the session goes back to the kernel as usual.
        #expect(lab.fw1Record.carrier == .pending)
        #expect(lab.h.takeFastPathActions("fw1").contains { if case .install(id, _) = $0 { true } else { false } })
    }
}

@Suite("Bounds: SYN-only expiry, session caps, random ports, compaction")
struct BoundsTests {
    @Test("a SYN-only record goes after the SYN timeout; an established one keeps the idle timeout")
    func synTimeout() throws {
        var settings = PacketProcessor.Settings()
        settings.synTimeout = 5_000_000_000
        var lab = ResetLab(settings: settings)
        try lab.establish()
        let other = FiveTuple(srcAddr: ResetLab.client, srcPort: 40001, dstAddr: ResetLab.server, dstPort: 80)
        _ = try #require(lab.h.send(PacketBuilder(tuple: other, flags: [.syn]).build(), along: lab.forward))
        #expect(lab.fw1.table.count == 2)
        lab.h.now += settings.synTimeout
        #expect(lab.h.hosts["fw1"]!.expire(now: lab.h.now).removed == 1)
        #expect(lab.fw1.table.count == 1 && lab.fw1Record.session == lab.session)
        #expect(lab.fw1.counters.synTimeouts == 1)
        #expect(lab.fw1.table.ports.inUse == 1, "the SYN-only record's port is free again")
    }

    @Test("per-source cap: one client's flood is refused beyond its cap, another client still connects; total cap")
    func caps() throws {
        var settings = PacketProcessor.Settings()
        settings.maxSessionsPerSource = 3
        settings.maxSessions = 5
        let other = IPAddress("10.77.0.11")!
        let lab = ResetLab(settings: settings, clients: [ResetLab.client, other])
        for port in 0..<5 {
            let t = FiveTuple(srcAddr: ResetLab.client, srcPort: 41000 + UInt16(port), dstAddr: ResetLab.server, dstPort: 80)
            _ = lab.h.send(PacketBuilder(tuple: t, flags: [.syn]).build(), along: ["client", "fw1", "server"])
        }
        #expect(lab.fw1.table.count == 3)
        #expect(lab.fw1.counters.sourceCapRefused == 2)
        #expect(lab.fw1.table.sessions(from: ResetLab.client) == 3)
        for port in 0..<3 {
            let t = FiveTuple(srcAddr: other, srcPort: 42000 + UInt16(port), dstAddr: ResetLab.server, dstPort: 80)
            let delivered = lab.h.send(PacketBuilder(tuple: t, flags: [.syn]).build(), along: ["client1", "fw1", "server"])
            #expect((delivered != nil) == (port < 2), "port \(port)")
        }
        #expect(lab.fw1.table.count == 5)
        #expect(lab.fw1.counters.sessionCapRefused == 1)
        // The client's own agent (left end) applies the total cap only.
        #expect(lab.h.hosts["client"]!.table.count == 5 && lab.h.hosts["client"]!.counters.sourceCapRefused == 0)
    }

    @Test("ports are random within the range, never two live sessions on one, every one allocatable, O(1)-ish")
    func randomPorts() {
        var ports = PortAllocator(range: 20000...29999)
        var first: [UInt16] = []
        for _ in 0..<100 { first.append(ports.allocate()!) }
        let ascending = zip(first, first.dropFirst()).filter { $0.1 == $0.0 + 1 }.count
        #expect(ascending < 10, "not sequential: \(first.prefix(10))")
        #expect(Set(first).count == 100)
        #expect(first.contains { $0 >= 25000 } && first.contains { $0 < 25000 })
        var seen = Set(first)
        while let port = ports.allocate() { #expect(seen.insert(port).inserted) }
        #expect(seen.count == 10000 && ports.inUse == 10000)
        #expect(seen.allSatisfy { (20000...29999).contains($0) })
        ports.release(27777)
        #expect(ports.allocate() == 27777)
        #expect(ports.allocate() == nil)
    }

    @Test("the same seeded generator gives the same ports; a range not a multiple of 64 stays inside")
    func seededAndOddRange() {
        var a = PortAllocator(range: 1000...1010), b = PortAllocator(range: 1000...1010)
        var ra = SplitMix64(state: 5), rb = SplitMix64(state: 5)
        var got: [UInt16] = []
        for _ in 0..<11 {
            let p = a.allocate(using: &ra)
            #expect(p == b.allocate(using: &rb))
            got.append(p!)
        }
        #expect(Set(got) == Set(1000...1010))
        #expect(a.allocate(using: &ra) == nil)
    }

    @Test("the table's dictionaries shrink once a flood's records are gone, and keep their content")
    func compaction() throws {
        var table = SessionTable(portRange: 10000...29999)
        var ids: [SessionTable.SessionID] = []
        for i in 0..<10_000 {
            let s = FiveTuple(srcAddr: IPAddress(UInt32(0x0a4d_0000) + UInt32(i / 60_000)), srcPort: UInt16(1024 + i % 60_000),
                              dstAddr: IPAddress("10.77.0.201")!, dstPort: 80)
            let left = FiveTuple(srcAddr: IPAddress("10.77.0.10")!, srcPort: UInt16(1024 + i), dstAddr: IPAddress("10.77.0.101")!,
                                 dstPort: 80)
            ids.append(try table.insertFromLeft(session: s, left: left, remaining: [], now: 0))
        }
        let big = table.records.capacity
        let early = table.compactIfSparse()
        #expect(!early, "not sparse yet")
        for id in ids.dropFirst(10) { table.remove(id) }
        let compacted = table.compactIfSparse()
        #expect(compacted)
        #expect(table.records.capacity < big / 8 && table.ingress.capacity < big / 8)
        #expect(table.count == 10 && table.ingress.count == 10 && table.bySession.count == 10)
        for id in ids.prefix(10) { #expect(table.records[id] != nil) }
        #expect(table.sessions(from: IPAddress(0x0a4d_0000)) == 10)
    }
}

/// Issue 19 item 4.4: an RST provisional at the end host that receives it is settled by the local stack's own
/// judgement (the shell's sock_diag probe, `AgentDataplane.probeResets`): docs/ARCHITECTURE.md "Forged resets".
@Suite("Resets at the receiving end host: the local stack's judgement settles a provisional RST")
struct ResetProbeTests {
    /// An in-window RST that is not exact (RFC 5961 §3.2: the receiver would answer with a challenge ACK, or take it
    /// only if genuine): provisional at every ingress, confirmed only where it leaves a host.
    static func inexactRST(_ lab: ResetLab) -> [UInt8] {
        PacketBuilder(tuple: lab.session, flags: [.rst], seq: lab.clientNext &+ 50, ack: 0).build()
    }

    @Test("the server's provisional RST is offered for a probe of the server's socket; confirmed, the session goes after the reset linger")
    func confirmedByProbe() throws {
        var lab = ResetLab()
        try lab.establish()
        _ = try #require(lab.h.send(Self.inexactRST(lab), along: lab.forward))
        var server = lab.h.hosts["server"]!
        #expect(server.counters.resetsProvisional == 1 && server.counters.resetsConfirmed == 0)
        let probes = server.resetProbes(limit: 10)
        let id = try #require(server.table.records.keys.first)
        #expect(probes == [PacketProcessor.ResetProbe(id: id, local: lab.session.reversed)], "server:80 → client")
        let fw1Probes = lab.h.hosts["fw1"]!.resetProbes(limit: 10)
        #expect(fw1Probes.isEmpty, "a middlebox has no socket of the session")
        // Without the probe's answer the session stays (idle expiry only).
        lab.h.now += 5 * lab.fw1.settings.resetLinger
        let early = server.expire(now: lab.h.now).removed
        #expect(early == 0)
        let first = server.confirmProbedReset(id, now: lab.h.now), second = server.confirmProbedReset(id, now: lab.h.now)
        #expect(first && !second, "confirmed once")
        #expect(server.counters.resetsConfirmed == 1 && server.counters.resetsConfirmedByProbe == 1)
        let after = server.resetProbes(limit: 10)
        #expect(after.isEmpty)
        let removed = server.expire(now: lab.h.now + server.settings.resetLinger).removed
        #expect(removed == 1)
    }

    @Test("a packet after the RST refutes it: nothing left to probe; the client end probes the client's socket")
    func refutedAndClientSide() throws {
        var lab = ResetLab()
        try lab.establish()
        _ = try #require(lab.h.send(Self.inexactRST(lab), along: lab.forward))
        #expect(lab.h.hosts["server"]!.resetProbeIDs.count == 1)
        try lab.exchange()
        #expect(lab.h.hosts["server"]!.counters.resetsRefuted == 1)
        let refutedProbes = lab.h.hosts["server"]!.resetProbes(limit: 10)
        #expect(refutedProbes.isEmpty)
        #expect(lab.h.hosts["server"]!.resetProbeIDs.isEmpty, "the stale id is forgotten at the look")
        // The server's RST towards the client, in window but not exact: the client end probes its own socket.
        let rst = PacketBuilder(tuple: lab.session.reversed, flags: [.rst], seq: lab.serverNext &+ 50, ack: 0).build()
        _ = try #require(lab.h.send(rst, along: lab.reverse))
        var client = lab.h.hosts["client"]!
        let id = try #require(client.table.records.keys.first)
        let none = client.resetProbes(limit: 0)
        #expect(none.isEmpty, "the limit bounds a turn")
        let probes = client.resetProbes(limit: 10)
        #expect(probes == [PacketProcessor.ResetProbe(id: id, local: lab.session)])
    }
}
