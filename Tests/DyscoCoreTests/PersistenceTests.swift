import DyscoCore
import Foundation
import Testing

/// The state file's codec, the journal fold, restore into a table, the restart's kernel reconcile, owned keys and
/// the observed FIN/RST (docs/ARCHITECTURE.md, "Agent crash and restart"). No root, no kernel.
@Suite("Persistence: state file, restore, reconcile, owned keys")
struct PersistenceTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!, server = IPAddress("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    func harness() -> ChainHarness {
        let policy = Policy(name: "web", match: SessionPredicate(dst: IPPrefix("10.77.0.201/32"), dport: [PortRange("80")!]),
                            chain: [fw1])
        let h = ChainHarness()
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: TestKeys.group)
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: TestKeys.group)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 40000...40999, trust: TestKeys.group)
        for host in h.hosts.keys { h.hosts[host]!.table.changed = [] }
        return h
    }

    /// A session set up through client → fw1 → server, with a few data packets.
    func established(_ h: ChainHarness, sessionPort: UInt16 = 40000) throws {
        let s = FiveTuple(srcAddr: client, srcPort: sessionPort, dstAddr: server, dstPort: 80)
        _ = try #require(h.send(PacketBuilder(tuple: s, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: s.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        _ = try #require(h.send(PacketBuilder(tuple: s, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: s, flags: [.ack, .psh], payload: [1, 2, 3]).build(), along: ["client", "fw1", "server"]))
    }

    /// Every change of a host's table as journal lines, from a header on (what the agent writes).
    func journal(_ processor: inout PacketProcessor, into file: inout [UInt8]) {
        if file.isEmpty { file = Array((SessionStateFile.header + "\n").utf8) }
        let changed = processor.table.changed ?? []
        processor.table.changed = []
        // The ids the file holds (what the agent's journal remembers as written).
        var written = Set((try? SessionStateFile.decode(Data(file)))?.records.keys.map { $0 } ?? [])
        for entry in SessionStateFile.entries(for: changed, in: processor.table, written: &written) {
            file += SessionStateFile.encode(entry)
        }
    }

    /// A record with every optional field present or absent at random, and extreme numbers.
    /// A random record, all of one family (`ipv6` nil: either, at random); IPv6 addresses as their text.
    static func randomRecord(_ rng: inout some RandomNumberGenerator, ipv6: Bool? = nil) throws -> PersistedRecord {
        let v6 = ipv6 ?? Bool.random(using: &rng)
        func address() -> String {
            guard v6 else { return (0..<4).map { _ in "\(UInt8.random(in: 0...255, using: &rng))" }.joined(separator: ".") }
            var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
            bytes[0] = 0xfd  // never IPv4-mapped
            if Bool.random(using: &rng) { bytes[4..<14] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0] }  // a "::" to compress
            return IPAddress.v6(bytes).description
        }
        func port() -> UInt16 { [0, 1, 65535, UInt16.random(in: 0...65535, using: &rng)].randomElement(using: &rng)! }
        func tuple() -> [String: Any] { ["src": address(), "dst": address(), "sport": port(), "dport": port()] }
        func sub() -> [String: Any] {
            var s: [String: Any] = ["tuple": tuple(), "path": UInt8.random(in: 0...255, using: &rng)]
            if Bool.random(using: &rng) { s["port"] = port() }
            if Bool.random(using: &rng) { s["delta"] = delta() }
            if Bool.random(using: &rng) { s["ts"] = delta() }
            return s
        }
        func link() -> [String: Any] {
            var l: [String: Any] = ["active": sub()]
            if Bool.random(using: &rng) { l["other"] = sub() }
            return l
        }
        func delta() -> Int32 { [Int32.min, -1, 1, Int32.max, Int32.random(in: .min ... .max, using: &rng)].randomElement(using: &rng)! }
        func big() -> UInt64 { [0, 1, UInt64.max, UInt64.random(in: 0...UInt64.max, using: &rng)].randomElement(using: &rng)! }
        var r: [String: Any] = [
            "id": big(), "chainID": big(), "nonce": big(), "session": tuple(),
            "role": ["left-end", "middlebox", "right-end"].randomElement(using: &rng)!,
            "remaining": (0..<Int.random(in: 0...3, using: &rng)).map { _ in address() },
        ]
        for flag in ["rightEstablished", "finForward", "finReverse", "reset", "fastPathFailed", "established"] {
            r[flag] = Bool.random(using: &rng)
        }
        if Bool.random(using: &rng) { r["left"] = link() }
        if Bool.random(using: &rng) { r["right"] = link() }
        if Bool.random(using: &rng) { r["closeDeadline"] = big() }
        if Bool.random(using: &rng) { r["resetSeen"] = Bool.random(using: &rng) }
        if Bool.random(using: &rng) { r["boxDelta"] = ["forward": delta(), "reverse": delta()] }
        if Bool.random(using: &rng) {  // a joined proxy (ProxySpliceTests)
            r["rightSession"] = tuple()
            r["rightChainID"] = big()
            r["rightNonce"] = big()
        }
        return try JSONDecoder().decode(PersistedRecord.self, from: JSONSerialization.data(withJSONObject: r))
    }

    @Test("journal lines are byte for byte what JSONEncoder with sorted keys writes, and decode to the same record; IPv4 and IPv6 records (an IPv6 session's addresses were written as their low 32 bits: a restart lost them)")
    func lineEncoderMatchesJSONEncoder() throws {
        struct Line: Encodable { var put: PersistedRecord?; var del: UInt64? }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let record = try Self.randomRecord(&rng)
            let fast = SessionStateFile.encode(.put(record))
            let reference = Array(try encoder.encode(Line(put: record))) + [0x0A]
            #expect(fast == reference, "\(String(decoding: fast, as: UTF8.self))")
            let file = Array((SessionStateFile.header + "\n").utf8) + fast
            // A record that cannot be a session (random roles and links) is skipped as a bad line; any other comes back.
            let contents = try SessionStateFile.decode(Data(file))
            #expect(contents.records.isEmpty ? contents.badLines == 1 : contents.records.values.first == record)
        }
        for id: UInt64 in [0, 1, 12345, .max] {
            #expect(SessionStateFile.encode(.del(id)) == Array(try encoder.encode(Line(del: id))) + [0x0A])
        }
    }

    @Test("a journal replayed into an empty table gives back ids, identities, subsessions, ports, hops and flags")
    func roundTrip() throws {
        let h = harness()
        var files: [String: [UInt8]] = [:]
        try established(h)
        for host in ["client", "fw1", "server"] { journal(&h.hosts[host]!, into: &files[host, default: []]) }
        for host in ["client", "fw1", "server"] {
            let original = h.hosts[host]!.table
            let contents = try SessionStateFile.decode(Data(files[host]!))
            #expect(contents.badLines == 0)
            var table = SessionTable(portRange: original.ports.range)
            let result = SessionStateFile.restore(contents, into: &table, now: 5)
            #expect(result.restored.count == 1 && result.refused.isEmpty)
            let (a, b) = (try #require(original.records.values.first), try #require(table.records.values.first))
            #expect(PersistedRecord(a) == PersistedRecord(b), "\(host)")
            #expect(a.id == b.id && a.identity == b.identity && a.role == b.role && a.left == b.left && a.right == b.right)
            #expect(table.ingress.keys.sorted(by: { "\($0)" < "\($1)" }) == original.ingress.keys.sorted(by: { "\($0)" < "\($1)" }))
            #expect(Set(table.egress.keys) == Set(original.egress.keys))
            #expect(b.established, "\(host): past the handshake before, past it after")
            // The allocated port is taken again, and a new session gets a fresh id and port.
            if let port = a.rightLink?.active.allocatedPort {
                #expect(table.ports.isInUse(port))
                let id = try table.insertLeftEnd(session: FiveTuple.t("10.77.0.10", 40001, "10.77.0.201", 80), hops: [fw1], now: 6)
                #expect(id > a.id)
                #expect(table.records[id]!.right!.srcPort != port)
            }
        }
    }

    @Test("a session in its handshake costs no journal line; it is written once established, and a del only follows a put")
    func handshakeNotJournaled() throws {
        let h = harness()
        let syn = PacketBuilder(tuple: session, flags: [.syn]).build()
        _ = try #require(h.send(syn, along: ["client", "fw1", "server"]))
        var written = Set<SessionTable.SessionID>()
        let changed = try #require(h.hosts["fw1"]!.table.changed)
        #expect(!changed.isEmpty, "the SYN created a record")
        #expect(SessionStateFile.entries(for: changed, in: h.hosts["fw1"]!.table, written: &written).isEmpty)
        // The SYN-only record goes (its SYN timeout): nothing to delete either.
        let id = try #require(changed.first)
        h.hosts["fw1"]!.table.remove(id)
        #expect(SessionStateFile.entries(for: [id], in: h.hosts["fw1"]!.table, written: &written).isEmpty)
        // An established one: a put, then a del once removed.
        h.hosts["fw1"]!.table.changed = []
        try established(h, sessionPort: 40002)
        let fw1 = h.hosts["fw1"]!.table
        let live = try #require(fw1.records.values.first { $0.established })
        #expect(SessionStateFile.entries(for: fw1.changed ?? [], in: fw1, written: &written) == [.put(PersistedRecord(live))])
        h.hosts["fw1"]!.table.remove(live.id)
        #expect(SessionStateFile.entries(for: [live.id], in: h.hosts["fw1"]!.table, written: &written) == [.del(live.id)])
        #expect(written.isEmpty)
    }

    @Test("the journal is folded: the last put wins, a del forgets, a torn last line is skipped and counted")
    func fold() throws {
        let h = harness()
        var file: [UInt8] = []
        try established(h)
        try established(h, sessionPort: 40001)
        journal(&h.hosts["fw1"]!, into: &file)
        // FIN both ways, then the linger ends: flags change, then the record goes.
        let fin = PacketBuilder(tuple: session, flags: [.fin, .ack]).build()
        _ = try #require(h.send(fin, along: ["client", "fw1", "server"]))
        journal(&h.hosts["fw1"]!, into: &file)
        var contents = try SessionStateFile.decode(Data(file))
        let first = try #require(h.hosts["fw1"]!.table.bySession[session])
        #expect(contents.records.count == 2 && contents.records[first]?.finForward == true)
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.fin, .ack]).build(), along: ["server", "fw1", "client"]))
        h.now += 20_000_000_000
        _ = h.hosts["fw1"]!.expire(now: h.now)
        journal(&h.hosts["fw1"]!, into: &file)
        contents = try SessionStateFile.decode(Data(file))
        #expect(contents.records.count == 1 && contents.records[first] == nil)
        // A torn write at the end, and a line that is JSON but no entry.
        let torn = file + Array(#"{"put":{"id":7,"ro"#.utf8)
        let damaged = try SessionStateFile.decode(Data(torn + Array("\n{\"x\":1}\n".utf8)))
        #expect(damaged.records == contents.records && damaged.badLines == 2 && damaged.firstError != nil)
        // The compacted form holds the same records.
        var written = Set<SessionTable.SessionID>()
        let compacted = try SessionStateFile.decode(Data(SessionStateFile.snapshot(h.hosts["fw1"]!.table, written: &written)))
        #expect(Set(compacted.records.keys) == written)
        #expect(compacted.records == contents.records && compacted.lines == 2)
    }

    @Test("not a state file: refused with the reason; an inconsistent record is skipped, not restored")
    func refusals() throws {
        #expect(throws: SessionStateFile.ReadError.self) { try SessionStateFile.decode(Data()) }
        #expect(throws: SessionStateFile.ReadError.self) { try SessionStateFile.decode(Data("hello\n".utf8)) }
        #expect(throws: SessionStateFile.ReadError.self) { try SessionStateFile.decode(Data("{\"dyscoState\":2}\n".utf8)) }
        let h = harness()
        try established(h)
        var record = PersistedRecord(h.hosts["fw1"]!.table.records.values.first!)
        record.left = nil  // a middlebox without its left subsession
        let file = Array((SessionStateFile.header + "\n").utf8) + SessionStateFile.encode(.put(record))
        let contents = try SessionStateFile.decode(Data(file))
        #expect(contents.records.isEmpty && contents.badLines == 1)
        #expect(contents.firstError?.contains("left subsession") == true, "\(contents.firstError ?? "")")
    }

    @Test("two records claiming one port: the second is refused, the first keeps it")
    func portCollision() throws {
        let h = harness()
        try established(h)
        let original = try #require(h.hosts["client"]!.table.records.values.first)
        var twin = PersistedRecord(original)
        twin.id += 100
        twin.chainID ^= 0xff
        twin.session.srcPort += 1
        var contents = SessionStateFile.Contents()
        contents.records = [original.id: PersistedRecord(original), twin.id: twin]
        var table = SessionTable(portRange: 10000...10999)
        let result = SessionStateFile.restore(contents, into: &table, now: 1)
        #expect(result.restored == [original.id] && result.refused == [twin.id])
        #expect(table.ports.inUse == 1)
    }

    @Test("reconcile: a session the kernel carried goes back to it; others, closing ones and fast path off stay slow")
    func reconcile() throws {
        let h = harness()
        try established(h)
        try established(h, sessionPort: 40001)
        try established(h, sessionPort: 40002)
        var table = h.hosts["fw1"]!.table
        let ids = table.records.keys.sorted()
        table.update(ids[2]) { $0.closeDeadline = 99 }
        let carried = SessionStateFile.reconcile(ids, table: &table, inKernel: [ids[0], ids[2], 999], fastPath: true)
        #expect(carried.map(\.0) == [ids[0]])
        #expect(carried[0].1 == table.records[ids[0]]!.fastPathTranslations && carried[0].1.count == 4)
        #expect(table.records[ids[0]]!.carrier == .kernel && table.records[ids[1]]!.carrier == .slow && table.records[ids[2]]!.carrier == .slow)
        var off = h.hosts["fw1"]!.table
        #expect(SessionStateFile.reconcile(ids, table: &off, inKernel: Set(ids), fastPath: false).isEmpty)
    }

    @Test("owned keys: none during the handshake, all once it is done, none while the kernel carries it or once it is closing")
    func ownership() throws {
        let h = harness()
        for host in h.hosts.keys { h.hosts[host]!.table.ownershipChanged = [] }
        var owned = KernelOwnership()
        func take() -> (add: KernelOwnership.Keys, remove: KernelOwnership.Keys) {
            defer { h.hosts["fw1"]!.table.ownershipChanged = [] }
            return owned.update(h.hosts["fw1"]!.table.ownershipChanged ?? [], table: h.hosts["fw1"]!.table)
        }
        let syn = PacketBuilder(tuple: session, flags: [.syn]).build()
        _ = try #require(h.send(syn, along: ["client", "fw1", "server"]))
        var change = take()
        #expect(change.add.isEmpty && change.remove.isEmpty, "SYN only: nothing owned")
        try established(h)
        change = take()
        let record = try #require(h.hosts["fw1"]!.table.records.values.first)
        let ingressKeys = Set(h.hosts["fw1"]!.table.ingressKeys(of: record))
        #expect(Set(change.add.ingress) == ingressKeys && change.add.ingress.count == 2)
        #expect(Set(change.add.egress) == [session, session.reversed])
        // The kernel carries it: its map entries rewrite it with no agent, so nothing is owned; held again: owned.
        h.hosts["fw1"]!.table.update(record.id) { $0.carrier = .kernel }
        change = take()
        #expect(Set(change.remove.ingress) == ingressKeys && change.add.isEmpty && owned.owned.isEmpty)
        h.hosts["fw1"]!.table.update(record.id) { $0.carrier = .held }
        change = take()
        #expect(Set(change.add.ingress) == ingressKeys && change.remove.isEmpty)
        // Closing (a FIN each way): no longer owned; the removal after the linger changes nothing more.
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.fin, .ack]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.fin, .ack]).build(), along: ["server", "fw1", "client"]))
        change = take()
        #expect(Set(change.remove.ingress) == ingressKeys && change.add.isEmpty, "closing: disowned")
        h.hosts["fw1"]!.table.remove(record.id)
        change = take()
        #expect(change.add.isEmpty && change.remove.isEmpty && owned.owned.isEmpty)
    }

    @Test("owned-key batches send only the net difference: a session opened and closed within one batch costs nothing")
    func ownershipDelta() throws {
        let a = session, b = FiveTuple(srcAddr: client, srcPort: 40001, dstAddr: server, dstPort: 80)
        var kernel: Set<FiveTuple> = [b]
        var delta = OwnershipDelta()
        // a: added then removed in the same batch; b (in the kernel): removed then added again.
        delta.apply((add: .init(ingress: [a], egress: [a.reversed]), remove: .init()))
        delta.apply((add: .init(), remove: .init(ingress: [a], egress: [a.reversed])))
        delta.apply((add: .init(), remove: .init(ingress: [b])))
        delta.apply((add: .init(ingress: [b]), remove: .init()))
        #expect(!delta.isEmpty)
        let ingress = delta.ingress.diff(against: &kernel)
        #expect(ingress.add.isEmpty && ingress.remove.isEmpty && kernel == [b])
        var egressKernel: Set<FiveTuple> = []
        let egress = delta.egress.diff(against: &egressKernel)
        #expect(egress.add.isEmpty && egress.remove.isEmpty)
        // A change's removals come before its additions (KernelOwnership.update's order): the key stays.
        var moved = OwnershipDelta()
        moved.apply((add: .init(ingress: [a]), remove: .init(ingress: [a, b])))
        var k2: Set<FiveTuple> = [b]
        let d2 = moved.ingress.diff(against: &k2)
        #expect(d2.add == [a] && d2.remove == [b] && k2 == [a])
    }
}
