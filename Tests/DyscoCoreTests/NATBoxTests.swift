import DyscoCore
import Testing

/// Boxes that translate tuples (paper §2.1, "Middleboxes that modify the five-tuple": the local tag on each SYN
/// entering the middlebox, recognised on the way out). The box's agent tags the Dysco SYN at ingress, lets it through
/// untranslated, and the kernel reports it after the NAT; the agent then records the translated tuple as the session's
/// right-hand tuple and sends the SYN on in it (docs/ARCHITECTURE.md, "Boxes that translate").
@Suite("A box that translates: the SYN tag, the translated tuple, its translations (§2.1)")
struct NATBoxTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!, server = IPAddress("10.77.0.201")!
    let vip = IPAddress("10.77.0.150")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }
    /// What fw1's masquerade makes of the session.
    var masqueraded: FiveTuple { FiveTuple(srcAddr: fw1, srcPort: 61000, dstAddr: server, dstPort: 80) }

    func harness(natBox: Bool = true) -> ChainHarness {
        let h = ChainHarness.fastPathChain(client: client, fw1: fw1, installAtSyn: true)
        h.hosts["fw1"]!.settings.natBox = natBox
        return h
    }

    /// Runs one packet through `host` at `hook`: the verdict, the bytes it leaves with, the mark bits it sets.
    func run(_ h: ChainHarness, _ host: String, _ bytes: [UInt8], _ hook: HookPoint) -> (Verdict, [UInt8], UInt32) {
        var buffer = bytes + [UInt8](repeating: 0, count: 256)
        let outcome = buffer.withUnsafeMutableBytes { raw in
            h.hosts[host]!.process(raw.baseAddress!, count: bytes.count, capacity: raw.count, hook: hook,
                                   checksum: .complete, now: h.now)
        }
        h.effects[host, default: DataplaneEffects()].append(outcome.effects)
        switch outcome.verdict {
        case .acceptModified(let length): return (outcome.verdict, Array(buffer[0..<length]), outcome.markBits)
        case .accept: return (outcome.verdict, bytes, outcome.markBits)
        case .drop, .hold: return (outcome.verdict, [], outcome.markBits)
        }
    }

    /// The same packet with another tuple (the box's NAT), checksums left alone (the processor does not check them).
    func translated(_ bytes: [UInt8], to tuple: FiveTuple) -> [UInt8] {
        var copy = bytes
        copy.withUnsafeMutableBytes { raw in
            guard case .success(let packet) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { return }
            packet.rewrite(to: tuple, checksum: .complete)
        }
        return copy
    }

    /// The client's SYN through fw1 with the NAT giving it `nat` (applied after fw1's ingress; `egressSees`: the tuple
    /// at fw1's egress queue rule, before source NAT), then the kernel's report: returns the SYN fw1 sends itself.
    func synThrough(_ h: ChainHarness, egressSees: FiveTuple, nat: FiveTuple) throws -> [UInt8] {
        let (v1, out1, _) = run(h, "client", PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), .egress)
        #expect(v1.delivers)
        let (v2, inside, mark) = run(h, "fw1", out1, .ingress)
        #expect(v2.delivers)
        #expect(mark == FastPath.natSynMark, "§2.1: the SYN entering the box is tagged")
        #expect(tuple(of: inside) == session)
        let (v3, leaving, mark3) = run(h, "fw1", translated(inside, to: egressSees), .egress)
        #expect(v3 == .accept, "the tagged SYN goes through the NAT untouched")
        #expect(mark3 == 0)
        #expect(tuple(of: leaving) == egressSees)
        if h.hosts["fw1"]!.counters.natSyns == 0 {
            #expect(h.hosts["fw1"]!.table.records.values.first?.right == nil, "no right subsession before the NAT's tuple is known")
        }
        let (sent, effects) = h.hosts["fw1"]!.natSynLeft(nat, sequence: 7000, now: h.now)
        h.effects["fw1", default: DataplaneEffects()].append(effects)
        return try #require(sent)
    }

    @Test("masquerade: the right subsession carries the translated session, which the right end delivers; replies come back to the client")
    func masquerade() throws {
        let h = harness()
        let syn = try synThrough(h, egressSees: session, nat: masqueraded)
        let record = try #require(h.hosts["fw1"]!.table.records.values.first)
        #expect(record.translated == masqueraded)
        #expect(record.rightSession == masqueraded)
        let right = try #require(record.right)
        #expect(right.srcAddr == fw1 && right.dstAddr == server && right.dstPort == 80)
        #expect(tuple(of: syn) == right, "the SYN leaves in the right subsession")
        #expect(trailerError(syn, tuple: right) == nil, "its trailer authenticates for that tuple")
        #expect(h.hosts["fw1"]!.counters.natSyns == 1)
        // The kernel gets the translated tuples, and an identity entry for the tuple the egress rule sees before the NAT.
        let translations = record.fastPathTranslations
        #expect(translations.contains(.init(hook: .egress, key: masqueraded, target: right, afterQueueRules: true)))
        #expect(translations.contains(.init(hook: .ingress, key: right.reversed, target: masqueraded.reversed)))
        // Only the masqueraded tuple meets the kernel after every queue rule (tc egress, after the NAT): its entry is
        // never written held (a held packet of it would leave untranslated: NATTests (a), the release's first probe).
        #expect(translations.filter(\.afterQueueRules).map(\.key) == [masqueraded])
        #expect(translations.contains(.init(hook: .egress, key: session.reversed, target: try #require(record.left).reversed)))
        #expect(translations.contains(.init(hook: .egress, key: session, target: session)))
        #expect(translations.count == 5)
        guard case .open(_, let opened, let opening) = h.takeFastPathActions("fw1").last else {
            Issue.record("the session goes to the kernel with its SYN")
            return
        }
        #expect(opened == translations)
        #expect(opening == FastPathAction.OpeningSyn(tuple: masqueraded, sequence: 7000))

        // The right end delivers the session as the box's NAT made it: the server sees fw1's address.
        let (v4, delivered, _) = run(h, "server", syn, .ingress)
        #expect(v4.delivers)
        #expect(tuple(of: delivered) == masqueraded)
        #expect(h.hosts["server"]!.table.records.values.first?.session == masqueraded)

        // The SYN-ACK: server → fw1 (into the translated tuple; the NAT undoes it) → client.
        let (_, synAck, _) = run(h, "server", PacketBuilder(tuple: masqueraded.reversed, flags: [.syn, .ack], seq: 9000, ack: 7001).build(), .egress)
        #expect(tuple(of: synAck) == right.reversed)
        let (_, atBox, _) = run(h, "fw1", synAck, .ingress)
        #expect(tuple(of: atBox) == masqueraded.reversed)
        let (_, toClient, _) = run(h, "fw1", translated(atBox, to: session.reversed), .egress)
        #expect(tuple(of: toClient) == record.left!.reversed)
        let (_, atClient, _) = run(h, "client", toClient, .ingress)
        #expect(tuple(of: atClient) == session.reversed)
    }

    @Test("destination NAT: the session's right end becomes the address the box sent it to")
    func destinationNAT() throws {
        let h = harness()
        let published = FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: vip, dstPort: 80)
        let real = FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 8080)
        // The client's policy names fw1 for the published address.
        h.hosts["client"]!.config = AgentConfig(policies: [Policy(name: "vip", match: SessionPredicate(dport: [PortRange("80")!]),
                                                                  chain: [fw1])])
        let (_, out1, _) = run(h, "client", PacketBuilder(tuple: published, flags: [.syn], seq: 7000).build(), .egress)
        let (_, inside, mark) = run(h, "fw1", out1, .ingress)
        #expect(mark == FastPath.natSynMark)
        // Destination NAT happened before the egress rule: it sees the real server already.
        let (v3, _, _) = run(h, "fw1", translated(inside, to: real), .egress)
        #expect(v3 == .accept)
        let (sent, _) = h.hosts["fw1"]!.natSynLeft(real, sequence: 7000, now: h.now)
        let syn = try #require(sent)
        let record = try #require(h.hosts["fw1"]!.table.records.values.first)
        #expect(record.translated == real)
        #expect(record.right?.dstAddr == server && record.right?.dstPort == 8080, "the next hop is the real server")
        #expect(record.remaining.isEmpty)
        // Replies reach the egress rule before the NAT gives them the published source back: an identity entry for them.
        #expect(record.fastPathTranslations.contains(.init(hook: .egress, key: real.reversed, target: real.reversed)))
        // After the NAT gave them the published source back, tc egress sees the replies as the client knows them: that
        // entry is never written held; the forward one (the real server's tuple) is seen by the rules too.
        #expect(record.fastPathTranslations.filter(\.afterQueueRules).map(\.key) == [published.reversed])
        let (_, delivered, _) = run(h, "server", syn, .ingress)
        #expect(tuple(of: delivered) == real)
    }

    @Test("a report no tagged SYN waits for is counted and sends nothing; a retransmitted SYN goes on in the same subsession")
    func staleAndRetransmitted() throws {
        let h = harness()
        let (none, _) = h.hosts["fw1"]!.natSynLeft(masqueraded, sequence: 1234, now: h.now)
        #expect(none == nil)
        #expect(h.hosts["fw1"]!.counters.natSynsStale == 1)
        let first = try synThrough(h, egressSees: session, nat: masqueraded)
        let again = try synThrough(h, egressSees: session, nat: masqueraded)
        #expect(tuple(of: again) == tuple(of: first))
        #expect(h.hosts["fw1"]!.table.records.count == 1)
        // The NAT gave a retransmission another tuple (its binding expired): not sent.
        let other = FiveTuple(srcAddr: fw1, srcPort: 61001, dstAddr: server, dstPort: 80)
        let (sent, _) = h.hosts["fw1"]!.natSynLeft(other, sequence: 7000, now: h.now)
        #expect(sent == nil)
        // Once the right side is established the tag is forgotten at the next expiry turn.
        let id = try #require(h.hosts["fw1"]!.table.records.keys.first)
        h.hosts["fw1"]!.table.update(id) { $0.rightEstablished = true }
        _ = h.hosts["fw1"]!.expire(now: h.now)
        #expect(h.hosts["fw1"]!.natSyns.isEmpty)
    }

    @Test("a box that does not translate tags nothing and opens its right side at its egress rule, as before")
    func plainBox() throws {
        let h = harness(natBox: false)
        let (_, out1, _) = run(h, "client", PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), .egress)
        let (_, inside, mark) = run(h, "fw1", out1, .ingress)
        #expect(mark == 0)
        let (v3, leaving, _) = run(h, "fw1", inside, .egress)
        #expect(v3 != .accept)
        #expect(tuple(of: leaving) == h.hosts["fw1"]!.table.records.values.first?.right)
        #expect(h.hosts["fw1"]!.table.records.values.first?.translated == nil)
    }

    @Test("the translated tuple survives a restart (the state file's record)")
    func persisted() throws {
        let h = harness()
        _ = try synThrough(h, egressSees: session, nat: masqueraded)
        let record = try #require(h.hosts["fw1"]!.table.records.values.first)
        let persisted = PersistedRecord(record)
        #expect(persisted.translated == masqueraded)
        var table = SessionTable(portRange: 20000...20999)
        try table.restore(persisted, now: 0)
        #expect(table.records[record.id]?.translated == masqueraded)
        #expect(table.egress[masqueraded]?.id == record.id)
        #expect(table.bySession[masqueraded] == record.id)
    }

    @Test("§2.1: the SYN the box sends on says the session was renamed upstream; the right end keeps that (and persists it)")
    func renamedUpstream() throws {
        let h = harness()
        let syn = try synThrough(h, egressSees: session, nat: masqueraded)
        let right = try #require(h.hosts["fw1"]!.table.records.values.first?.right)
        let trailer = try #require(decodedTrailer(syn, tuple: right))
        #expect(trailer.renamedUpstream && trailer.session == masqueraded)
        _ = run(h, "server", syn, .ingress)
        let atServer = try #require(h.hosts["server"]!.table.records.values.first)
        #expect(atServer.renamedUpstream && atServer.session == masqueraded)
        #expect(h.hosts["fw1"]!.table.records.values.first?.renamedUpstream == false, "the box itself knows both names")
        let persisted = PersistedRecord(atServer)
        #expect(persisted.renamedUpstream == true)
        var table = SessionTable(portRange: 20000...20999)
        try table.restore(persisted, now: 0)
        #expect(table.records[atServer.id]?.renamedUpstream == true)
        // A plain chain's right end is not renamed.
        let plain = harness(natBox: false)
        let (_, out1, _) = run(plain, "client", PacketBuilder(tuple: session, flags: [.syn], seq: 7000).build(), .egress)
        let (_, inside, _) = run(plain, "fw1", out1, .ingress)
        let (_, leaving, _) = run(plain, "fw1", inside, .egress)
        _ = run(plain, "server", leaving, .ingress)
        #expect(plain.hosts["server"]!.table.records.values.first?.renamedUpstream == false)
    }

    @Test("§3.5 with §2.1: a new box whose imported entry carries the NAT binding re-keys its right side to the translated tuple")
    func newBoxAdoptsImportedTranslation() throws {
        let h = harness()
        let fw2 = IPAddress("10.77.0.102")!
        let identity = SessionIdentity(chainID: 0xfeed, nonce: 7)
        // newPathSyn made the session at fw2 with the untranslated tuple (the left anchor's name for it).
        let left = FiveTuple(srcAddr: client, srcPort: 30001, dstAddr: fw2, dstPort: 80)
        var box = h.hosts["fw1"]!
        let right = try box.createFromNewPath(identity: identity, session: session, left: left, next: server, now: h.now).get()
        let id = try #require(box.table.byChain[identity.chainID])
        #expect(box.table.records[id]?.carrier == .slow)
        let effects = box.adoptTranslation(chainID: identity.chainID, masqueraded)
        let record = try #require(box.table.records[id])
        #expect(record.translated == masqueraded && record.right == right, "the right subsession stays; its tuple re-keys")
        #expect(record.fastPathTranslations.contains(.init(hook: .egress, key: masqueraded, target: right, afterQueueRules: true)))
        #expect(record.fastPathTranslations.contains(.init(hook: .ingress, key: right.reversed, target: masqueraded.reversed)))
        #expect(record.fastPathTranslations.contains(.init(hook: .ingress, key: left, target: session)))
        #expect(!record.fastPathTranslations.contains(where: { $0.hook == .egress && $0.key == session && $0.target == right }))
        #expect(effects.fastPath == [.remove(id, []), .install(id, record.fastPathTranslations)],
                "the kernel carries it (the egress rule runs before the NAT), committed by the flush before the answer")
        #expect(FastPathAction.splitForFlush(effects.fastPath).now == effects.fastPath)
        #expect(record.carrier == .pending)
        #expect(box.counters.translationsAdopted == 1)
        // Again, or the same tuple: nothing more.
        #expect(box.adoptTranslation(chainID: identity.chainID, masqueraded).fastPath.isEmpty)
        #expect(box.counters.translationsAdopted == 1)
    }
}
