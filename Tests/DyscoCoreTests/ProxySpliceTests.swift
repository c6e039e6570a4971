import DyscoCore
import Foundation
import Testing

/// A session-terminating proxy's two sessions joined into one middlebox record (paper §2.2, §3.4, §4):
/// client 10.0.1.1 → proxy 10.0.2.1:8080 (the client's chain ends at the proxy) and proxy 10.0.2.1 → server
/// 10.0.3.1:80 (the proxy's own chain).
@Suite("Proxy splice (paper §2.2, §3.4, §4): two sessions joined into one middlebox record")
struct ProxySpliceTests {
    typealias A = AnchorDataplaneTests
    static let client = FiveTuple.t("10.0.1.1", 40000, "10.0.2.1", 8080)     // S1, as the proxy's stack sees it
    static let clientLeft = FiveTuple.t("10.0.1.1", 30001, "10.0.2.1", 8080)  // its subsession from the client's agent
    static let server = FiveTuple.t("10.0.2.1", 33000, "10.0.3.1", 80)       // S2
    static let proxy = IPAddress("10.0.2.1")!, serverHost = IPAddress("10.0.3.1")!

    struct Setup {
        var p: PacketProcessor
        var s1: SessionTable.SessionID
        var s2: SessionTable.SessionID
        var right: FiveTuple
    }

    /// Both sessions established, with initial numbers client 1000, proxy (to the client) 5000, proxy (to the
    /// server) 90000, server 70000.
    static func setup(isns: Bool = true) throws -> Setup {
        var p = PacketProcessor(config: AgentConfig(), portRange: 20000...20003, trust: TestKeys.group)
        let s1 = try p.table.insertFromLeft(session: client, left: clientLeft, remaining: [], now: 0)
        let s2 = try p.table.insertLeftEnd(session: server, hops: [serverHost], now: 0)
        for (id, forward, reverse) in [(s1, UInt32(1000), UInt32(5000)), (s2, 90000, 70000)] {
            p.table.update(id) {
                $0.established = true
                $0.rightEstablished = $0.right != nil
                if isns {
                    $0.sequence.forward.isn = forward
                    $0.sequence.reverse.isn = reverse
                }
            }
        }
        return Setup(p: p, s1: s1, s2: s2, right: try #require(p.table.records[s2]?.right))
    }

    @Test("§3.4: the joined record's deltas are the initial numbers' differences; its subsessions and keys are the two sessions'")
    func joins() throws {
        var s = try Self.setup()
        let portsBefore = s.p.table.ports.inUse
        // The interposer's report: the server's socket read, the client's written (a download's first splice).
        let outcome = try s.p.splice(from: Self.server, to: Self.client.reversed, delta: 0).get()
        #expect(outcome.id == s.s1 && !outcome.alreadyJoined)
        #expect(outcome.boxDelta == .init(forward: 90000 - 1000, reverse: 5000 - 70000))
        let record = try #require(s.p.table.records[s.s1])
        #expect(s.p.table.count == 1 && record.role == .middlebox)
        #expect(record.left == Self.clientLeft && record.right == s.right && record.rightSession == Self.server)
        #expect(record.boxDelta == outcome.boxDelta && record.hopDelta == outcome.boxDelta)
        #expect(s.p.table.byChain.count == 2 && Set(s.p.table.byChain.values) == [s.s1])
        #expect(s.p.table.bySession[Self.client] == s.s1 && s.p.table.bySession[Self.server] == s.s1)
        #expect(s.p.table.ports.inUse == portsBefore, "the right subsession's port stays taken")
        // The maps: the client's subsession in, the proxy's socket to the server out, and back.
        #expect(s.p.table.ingress[Self.clientLeft]?.target == Self.client)
        #expect(s.p.table.egress[Self.client.reversed]?.target == Self.clientLeft.reversed)
        #expect(s.p.table.egress[Self.server]?.target == s.right)
        #expect(s.p.table.ingress[s.right.reversed]?.target == Self.server.reversed)
        #expect(Set(record.fastPathTranslations.map(\.key)) == Set(s.p.table.ingress.keys).union(s.p.table.egress.keys),
                "the kernel gets the same keys")
        // Packets: the proxy's segment to the server leaves on the right subsession, the server's answer reaches its socket.
        let (_, out) = A.run(&s.p, PacketBuilder(tuple: Self.server, seq: 90001, ack: 70001, payload: [1]), hook: .egress)
        #expect(A.tuple(out) == s.right && A.seq(out) == 90001, "no delta on the proxy's own sessions")
        let (_, back) = A.run(&s.p, PacketBuilder(tuple: s.right.reversed, seq: 70001, ack: 90002), hook: .ingress)
        #expect(A.tuple(back) == Self.server.reversed)
        // The other direction's splice names the same pair: nothing changes.
        let again = try s.p.splice(from: Self.client.reversed, to: Self.server, delta: 0).get()
        #expect(again.alreadyJoined && again.id == s.s1 && again.boxDelta == outcome.boxDelta)
        // Removal frees everything, the moved port too.
        s.p.table.remove(s.s1)
        #expect(s.p.table.count == 0 && s.p.table.byChain.isEmpty && s.p.table.bySession.isEmpty)
        #expect(s.p.table.ingress.isEmpty && s.p.table.egress.isEmpty)
        #expect(s.p.table.ports.inUse == portsBefore - 1)
    }

    @Test("dysco_splice's delta (bytes the proxy added) counts in the direction of the stream it read")
    func reportedDelta() throws {
        var s = try Self.setup()
        let forward = try s.p.splice(from: Self.client.reversed, to: Self.server, delta: 25).get()
        #expect(forward.boxDelta == .init(forward: 89000 + 25, reverse: -65000))
        var t = try Self.setup()
        let reverse = try t.p.splice(from: Self.server, to: Self.client.reversed, delta: -7).get()
        #expect(reverse.boxDelta == .init(forward: 89000, reverse: -65000 - 7))
    }

    @Test("refused, changing nothing: unknown sockets, two of one role, handshakes the agent did not see")
    func refusals() throws {
        var s = try Self.setup()
        let stranger = FiveTuple.t("10.0.2.1", 1, "10.0.9.9", 2)
        for (from, to) in [(stranger, Self.server), (Self.server, Self.server), (Self.client.reversed, Self.client.reversed),
                           (Self.client, Self.server)] {
            guard case .failure = s.p.splice(from: from, to: to, delta: 0) else {
                Issue.record("\(from) → \(to) was joined")
                continue
            }
        }
        #expect(s.p.table.count == 2 && s.p.table.records[s.s1]?.role == .rightEnd)
        var t = try Self.setup(isns: false)
        guard case .failure(let error) = t.p.splice(from: Self.server, to: Self.client.reversed, delta: 0) else {
            Issue.record("joined without initial numbers")
            return
        }
        #expect(error.description.contains("handshakes"))
        #expect(t.p.table.count == 2)
    }

    @Test("a joined record survives the state file: both sessions' keys and identities come back")
    func persists() throws {
        var s = try Self.setup()
        _ = try s.p.splice(from: Self.server, to: Self.client.reversed, delta: 0).get()
        let record = try #require(s.p.table.records[s.s1])
        let line = SessionStateFile.encode(.put(PersistedRecord(record)))
        let contents = try SessionStateFile.decode(Data(Array((SessionStateFile.header + "\n").utf8) + line))
        let persisted = try #require(contents.records[s.s1])
        var restored = SessionTable(portRange: 20000...20003)
        try restored.restore(persisted, now: 5)
        let back = try #require(restored.records[s.s1])
        #expect(back.spliced?.session == record.spliced?.session && back.spliced?.identity == record.spliced?.identity)
        #expect(back.boxDelta == record.boxDelta && back.role == .middlebox)
        #expect(Set(restored.ingress.keys) == Set(s.p.table.ingress.keys) && Set(restored.egress.keys) == Set(s.p.table.egress.keys))
        #expect(restored.byChain.count == 2)
    }
}

/// The timestamps of a spliced-out proxy's two sessions (paper §4, "Differences in TCP options"): the clocks,
/// the notices that carry the deltas to the anchors, and the per-packet shift.
@Suite("Proxy splice: timestamps (paper §4)")
struct ProxyTimestampTests {
    typealias A = AnchorDataplaneTests

    /// TCP options: NOP, NOP, timestamps (TSval, TSecr).
    static func timestamps(_ value: UInt32, _ echo: UInt32) -> [UInt8] {
        [1, 1, 8, 10] + withUnsafeBytes(of: value.bigEndian) { Array($0) } + withUnsafeBytes(of: echo.bigEndian) { Array($0) }
    }

    static func option(_ bytes: [UInt8]) -> (UInt32, UInt32) {
        func u32(_ at: Int) -> UInt32 { bytes[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        return (u32(44), u32(48))  // 20 IP + 20 TCP + NOP NOP kind len
    }

    @Test("each clock's offset is its largest TSval − now; the deltas map the client's clock onto the proxy's towards the server and the server's onto the proxy's towards the client, plus the margin")
    func clocks() {
        var c = SessionTable.TimestampClocks()
        c.observe(.client, value: 1_000_100, nowMillis: 100)           // offset 1,000,000
        c.observe(.client, value: 1_000_150, nowMillis: 160)           // 999,990: a packet seen late, not kept
        c.observe(.proxyToServer, value: 5_000_100, nowMillis: 100)    // 5,000,000
        c.observe(.server, value: 200, nowMillis: 100)                 // 100
        #expect(c.deltas == nil, "three clocks known")
        c.observe(.proxyToClient, value: 7_000_100, nowMillis: 100)    // 7,000,000
        let m = SessionTable.TimestampClocks.margin
        #expect(c.deltas == .init(forward: 4_000_000 + m, reverse: 7_000_000 - 100 + m))
        var none = SessionTable.TimestampClocks()
        for _ in 0..<16 { none.observe(.client, value: nil, nowMillis: 0) }
        #expect(none.deltas == .zero, "sixteen packets without the option: no timestamps")
    }

    @Test("the shift keeps the checksum valid with the option at an odd offset (no NOP padding), and leaves packets without it alone")
    func oddOffset() throws {
        let odd: [UInt8] = [1] + Array(Self.timestamps(0xFFFF_FFFF, 9).dropFirst(2)) + [1]
        let shifted = try SequenceDeltaTests.apply(PacketBuilder(tuple: ProxySpliceTests.client, seq: 1, ack: 1, options: odd)) {
            $0.applyIngressDelta(0, timestamps: 2)
            $0.applyEgressDelta(0, timestamps: 9)
        }
        func u32(_ at: Int) -> UInt32 { shifted[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        #expect(u32(43) == 1 && u32(47) == 0, "TSval + 2 across the wrap, TSecr − 9")
        #expect(Reference.tcpChecksumValid(shifted))
        let plain = PacketBuilder(tuple: ProxySpliceTests.client, seq: 1, ack: 1)
        #expect(try SequenceDeltaTests.apply(plain) { $0.applyIngressDelta(0, timestamps: 5); $0.applyEgressDelta(0, timestamps: 5) } == plain.build())
    }

    @Test("a joined proxy stays on the slow path until its clocks are known; a subsession that shifts timestamps stays there")
    func slowPath() throws {
        var s = try ProxySpliceTests.setup()
        _ = try s.p.splice(from: ProxySpliceTests.server, to: ProxySpliceTests.client.reversed, delta: 0).get()
        #expect(s.p.table.records[s.s1]?.needsSlowPath == true)
        for (tuple, hook) in [(ProxySpliceTests.clientLeft, HookPoint.ingress), (ProxySpliceTests.server, .egress),
                              (s.right.reversed, .ingress), (ProxySpliceTests.client.reversed, .egress)] {
            _ = A.run(&s.p, PacketBuilder(tuple: tuple, seq: 1, ack: 1, options: Self.timestamps(500, 0)), hook: hook)
        }
        #expect(s.p.table.records[s.s1]?.needsSlowPath == false && s.p.table.records[s.s1]?.clocks.deltas != nil)
    }

    @Test("after the release, a spliced-out proxy's old path brings only duplicates: data, FIN and RST from it are dropped; before the release its data passes")
    func oldPathAfterRelease() throws {
        var a = try A.setup(stateful: true)  // a left end, held, new path to fw2 open; the old path is to fw1
        _ = a.processor.anchorSetPhase(chainID: a.chainID, .buffering, now: 1)
        let noticed = a.processor.spliceNotice(chainID: a.chainID, alias: nil, tsDelta: 1000)
        #expect(noticed)
        // While the anchors hold, the proxy still delivers what it holds: its data passes (translated).
        let (held, _) = A.run(&a.processor, PacketBuilder(tuple: a.old.reversed, seq: 7000, ack: 5001, payload: [1, 2, 3]),
                              hook: .ingress)
        #expect(held != .drop)
        a.processor.anchorPromote(chainID: a.chainID)
        _ = a.processor.anchorSetPhase(chainID: a.chainID, .released, now: 2)
        for (flags, payload) in [(TCPFlags.ack, [UInt8]([1, 2, 3])), ([.ack, .fin], []), ([.rst], []), ([.ack], [])] {
            let (verdict, _) = A.run(&a.processor, PacketBuilder(tuple: a.old.reversed, flags: flags, seq: 7000, ack: 5001,
                                                                 payload: payload), hook: .ingress)
            #expect(verdict == .drop, "\(flags) with \(payload.count) bytes from the old path after the release")
        }
        // The new path's packets still pass.
        let (fresh, _) = A.run(&a.processor, PacketBuilder(tuple: a.new.reversed, seq: 7003, ack: 5001, payload: [4]), hook: .ingress)
        #expect(fresh != .drop)
    }

    @Test("a splice notice reaches the new path's subsession of a reconfiguration under way, which shifts TSval in and TSecr out; without one it is refused")
    func notices() throws {
        var a = try A.setup(stateful: false)  // a left end, held, new path to fw2 open
        let known = a.processor.spliceNotice(chainID: a.chainID, alias: nil, tsDelta: 1000)
        #expect(known)
        let id = try #require(a.processor.table.byChain[a.chainID])
        #expect(a.processor.table.records[id]?.rightLink?.other?.tsDelta == 1000)
        // From the new path: TSval + 1000; towards it, after the promotion: TSecr − 1000.
        let (_, incoming) = A.run(&a.processor, PacketBuilder(tuple: a.new.reversed, seq: 7000, ack: 5001,
                                                              options: Self.timestamps(50, 60)), hook: .ingress)
        #expect(Self.option(incoming) == (1050, 60))
        #expect(Reference.tcpChecksumValid(incoming), "checksum updated")
        a.processor.anchorPromote(chainID: a.chainID)
        _ = a.processor.anchorSetPhase(chainID: a.chainID, .released, now: 1)
        let (_, outgoing) = A.run(&a.processor, PacketBuilder(tuple: A.session, seq: 5001, ack: 7001,
                                                              options: Self.timestamps(70, 1050)), hook: .egress)
        #expect(Self.option(outgoing) == (70, 50))
        #expect(a.processor.table.records[id]?.needsSlowPath == true, "the active subsession shifts timestamps")
        // Before the hold (no reconfiguration under way): refused, nothing changes (a late or forged notice).
        var p = PacketProcessor(config: AgentConfig(), portRange: 10000...10100, trust: TestKeys.group)
        let other = try p.table.insertLeftEnd(session: A.session, hops: [A.fw1, A.server], now: 0)
        let chain = try #require(p.table.records[other]).identity.chainID
        let alias = SessionTable.ChainAlias(identity: SessionIdentity(chainID: 99, nonce: 7),
                                            session: .t("10.0.0.50", 1, "10.0.0.51", 2), peer: A.fw2)
        let early = p.spliceNotice(chainID: chain, alias: alias, tsDelta: -5)
        #expect(!early && p.table.byChain[99] == nil)
        _ = p.anchorHold(chainID: chain, side: .right, stateful: false, now: 0)
        let taken = p.spliceNotice(chainID: chain, alias: alias, tsDelta: -5)
        #expect(taken && p.table.records[other]?.migration?.tsDelta == -5 && p.table.byChain[99] == other)
        let unknown = p.spliceNotice(chainID: 12345, alias: nil, tsDelta: 1)
        #expect(!unknown, "unknown chain")
    }
}

extension ProxySpliceTests {
    @Test("dysco_splice per direction: the second report's bytes join the box delta (until a reconfiguration starts)")
    func secondDirection() throws {
        var s = try Self.setup()
        _ = try s.p.splice(from: Self.client.reversed, to: Self.server, delta: 10).get()
        let second = try s.p.splice(from: Self.server, to: Self.client.reversed, delta: -3).get()
        #expect(second.alreadyJoined && second.boxDelta == .init(forward: 89000 + 10, reverse: -65000 - 3))
        #expect(s.p.table.records[s.s1]?.spliced?.bytesDelta == .init(forward: 10, reverse: -3))
    }
}
