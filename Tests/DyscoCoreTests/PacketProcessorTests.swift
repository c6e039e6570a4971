import DyscoCore
import Testing

/// Passes packets through PacketProcessors as the hosts of a chain would (no kernel involved).
final class ChainHarness {
    var hosts: [String: PacketProcessor] = [:]

    /// client (10.77.0.10) → fw1 (10.77.0.101) → server (10.77.0.201) for port 80, every session on the kernel fast
    /// path from its first packet (`fastPathAfterPackets` 0): the chain of the fast-path and kernel-event tests.
    /// `installAtSyn`: the BPF datapath's setting (sessions go to the kernel with their SYN).
    static func fastPathChain(client: IPAddress, fw1: IPAddress, installAtSyn: Bool = false) -> ChainHarness {
        let policy = Policy(name: "web", match: SessionPredicate(dport: [PortRange("80")!]), chain: [fw1])
        var settings = PacketProcessor.Settings()
        settings.fastPath = true
        settings.fastPathAfterPackets = 0
        settings.installAtSyn = installAtSyn
        let h = ChainHarness()
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: TestKeys.group, settings: settings)
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: TestKeys.group, settings: settings)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 30000...30999, trust: TestKeys.group, settings: settings)
        return h
    }
    var now: UInt64 = 1_000_000_000
    /// What each host's processor produced besides its verdicts, gathered as its shell would take it.
    var effects: [String: DataplaneEffects] = [:]

    /// The fast-path work `host` produced since the last ``takeFastPathActions(_:)``.
    func fastPathActions(_ host: String) -> [FastPathAction] { effects[host]?.fastPath ?? [] }

    /// Hands over the fast-path work `host` produced (as the shell takes it).
    func takeFastPathActions(_ host: String) -> [FastPathAction] {
        defer { effects[host]?.fastPath = [] }
        return fastPathActions(host)
    }

    func run(_ host: String, _ bytes: [UInt8], _ hook: HookPoint, checksum: ChecksumState = .complete)
        -> (Verdict, [UInt8]) {
        var buffer = bytes + [UInt8](repeating: 0, count: 256)
        let outcome = buffer.withUnsafeMutableBytes { raw in
            hosts[host]!.process(raw.baseAddress!, count: bytes.count, capacity: raw.count, hook: hook,
                                 checksum: checksum, now: now)
        }
        effects[host, default: DataplaneEffects()].append(outcome.effects)
        let verdict = outcome.verdict
        switch verdict {
        case .accept: return (verdict, bytes)
        case .acceptModified(let length): return (verdict, Array(buffer[0..<length]))
        case .drop, .hold: return (verdict, [])
        }
    }

    /// Egress at `from`, then ingress at each later host in `path` (egress too, unless it is the last).
    func send(_ bytes: [UInt8], along path: [String]) -> [UInt8]? {
        var packet = bytes
        for (index, host) in path.enumerated() {
            if index > 0 {
                let (verdict, out) = run(host, packet, .ingress)
                guard verdict.delivers else { return nil }
                packet = out
            }
            if index < path.count - 1 {
                let (verdict, out) = run(host, packet, .egress)
                guard verdict.delivers else { return nil }
                packet = out
            }
        }
        return packet
    }
}

extension Verdict {
    /// The packet goes on now (accepted, possibly rewritten); not dropped or held.
    var delivers: Bool {
        switch self {
        case .accept, .acceptModified: true
        case .drop, .hold: false
        }
    }
}

/// Runs `body` on the packet `bytes` parsed as its version says (IPv4 or IPv6).
func withParsed<R>(_ bytes: [UInt8], _ body: (any TCPPacketView, UnsafeMutableRawBufferPointer) -> R) -> R {
    var copy = bytes
    return copy.withUnsafeMutableBytes { raw in
        if raw[0] >> 4 == 6 {
            guard case .success(let p) = IPv6TCPPacket.parse(raw.baseAddress!, count: raw.count) else { fatalError() }
            return body(p, raw)
        }
        guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { fatalError() }
        return body(p, raw)
    }
}

func tuple(of bytes: [UInt8]) -> FiveTuple { withParsed(bytes) { p, _ in p.tuple } }

func payload(of bytes: [UInt8]) -> [UInt8] { withParsed(bytes) { p, raw in Array(raw[p.payloadOffset..<p.length]) } }

/// Whether the TCP checksum of the packet `bytes` (either family) verifies.
func tcpChecksumValid(_ bytes: [UInt8]) -> Bool { withParsed(bytes) { p, _ in p.isTCPChecksumValid } }

/// Why the trailer of the SYN `bytes` does not decode for `tuple` under `trust` (nil: it decodes).
func trailerError(_ bytes: [UInt8], tuple: FiveTuple, trust: TrustGroup = TestKeys.group) -> DyscoSynPayload.DecodeError? {
    payload(of: bytes).withUnsafeBytes { raw in
        do throws(DyscoSynPayload.DecodeError) {
            _ = try DyscoSynPayload.decode(trailerOf: raw, tuple: tuple, trust: trust)
            return nil
        } catch { return error }
    }
}

/// The trailer of the SYN `bytes`, decoded for `tuple` (nil: it does not decode).
func decodedTrailer(_ bytes: [UInt8], tuple: FiveTuple, trust: TrustGroup = TestKeys.group) -> DyscoSynPayload? {
    payload(of: bytes).withUnsafeBytes { raw in try? DyscoSynPayload.decode(trailerOf: raw, tuple: tuple, trust: trust).0 }
}

@Suite("Packet processor: a chain of agents in memory (paper §2.1)")
struct PacketProcessorTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!
    let fw2 = IPAddress("10.77.0.102")!, server = IPAddress("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    /// Every host shares ``TestKeys/group`` unless `trust` names another group for it.
    func harness(chain: [IPAddress], trust: [String: TrustGroup] = [:]) -> ChainHarness {
        let policy = Policy(name: "web", match: SessionPredicate(dst: IPPrefix("10.77.0.201/32"), dport: [PortRange("80")!]),
                            chain: chain)
        let h = ChainHarness()
        func keys(_ host: String) -> TrustGroup { trust[host] ?? TestKeys.group }
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: keys("client"))
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: keys("fw1"))
        h.hosts["fw2"] = PacketProcessor(config: AgentConfig(), portRange: 30000...30999, trust: keys("fw2"))
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 40000...40999, trust: keys("server"))
        return h
    }

    @Test("a session's SYN comes with a sessionCreated event; a data packet of the established session has no effects")
    func effectsAsValues() throws {
        let h = harness(chain: [fw1])
        let path = ["client", "fw1", "server"]
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: path))
        for host in path {
            let created = h.effects[host]?.events.filter { if case .sessionCreated = $0 { true } else { false } }
            #expect(created?.count == 1, "\(host)")
        }
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: path.reversed()))
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: path))
        h.effects = [:]
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.ack], payload: [1, 2, 3]).build(), along: path))
        for host in path { #expect(h.effects[host]?.isEmpty ?? true, "\(host): nothing for the shell") }
    }

    @Test("SYN gets the trailer on the wire, each middlebox sees the session tuple, the server a plain SYN")
    func synThroughTwoMiddleboxes() throws {
        let h = harness(chain: [fw1, fw2])
        let mss: [UInt8] = [2, 4, 0x05, 0xb4, 1, 3, 3, 7]
        let syn = PacketBuilder(tuple: session, flags: [.syn], options: mss).build()

        let (v1, onWire1) = h.run("client", syn, .egress)
        #expect(v1 != .drop)
        let wire1 = tuple(of: onWire1)
        #expect(wire1.srcAddr == client && wire1.dstAddr == fw1 && wire1.srcPort != session.srcPort)
        let trailer = try payload(of: onWire1).withUnsafeBytes { raw in
            try DyscoSynPayload.decode(trailerOf: raw, tuple: wire1, trust: TestKeys.group)
        }.0
        #expect(trailer.session == session)
        #expect(trailer.remaining == [fw2, server])
        #expect(trailer.identity == h.hosts["client"]!.table.records.values.first?.identity)
        #expect(Reference.tcpChecksumValid(onWire1) && Reference.ipChecksumValid(onWire1))

        // fw1 ingress: the firewall must see the session tuple and no payload.
        let (_, atFw1) = h.run("fw1", onWire1, .ingress)
        #expect(tuple(of: atFw1) == session)
        #expect(payload(of: atFw1).isEmpty)
        #expect(Reference.tcpChecksumValid(atFw1))
        let (_, onWire2) = h.run("fw1", atFw1, .egress)
        #expect(tuple(of: onWire2).srcAddr == fw1 && tuple(of: onWire2).dstAddr == fw2)
        // fw1 re-signs the trailer for its right subsession's tuple (not the one it received).
        let relayed = try payload(of: onWire2).withUnsafeBytes { raw in
            try DyscoSynPayload.decode(trailerOf: raw, tuple: tuple(of: onWire2), trust: TestKeys.group)
        }.0
        #expect(relayed.identity == trailer.identity && relayed.remaining == [server])
        #expect(trailerError(onWire2, tuple: wire1) == .badMAC)
        let (_, atFw2) = h.run("fw2", onWire2, .ingress)
        #expect(tuple(of: atFw2) == session)
        let (_, onWire3) = h.run("fw2", atFw2, .egress)
        #expect(tuple(of: onWire3).srcAddr == fw2 && tuple(of: onWire3).dstAddr == server)
        let (_, delivered) = h.run("server", onWire3, .ingress)
        #expect(delivered == syn, "the server gets the client's SYN byte for byte (options included)")

        // The SYN-ACK goes back through the same hosts, and the client sees the server's reply tuple.
        let synAck = PacketBuilder(tuple: session.reversed, flags: [.syn, .ack], options: mss).build()
        let back = try #require(h.send(synAck, along: ["server", "fw2", "fw1", "client"]))
        #expect(back == synAck)
        #expect(h.hosts.values.allSatisfy { $0.table.count == 1 })
        #expect(h.hosts["fw1"]!.table.records.values.first?.rightEstablished == true)
        // One chain-wide identity, fixed by the left end (paper §2.3).
        #expect(Set(h.hosts.values.compactMap { $0.table.records.values.first?.identity }) == [trailer.identity])
        #expect(trailer.identity.chainID != 0)
    }

    @Test("data both ways after the handshake arrives byte-exact with valid checksums")
    func dataBothWays() throws {
        let h = harness(chain: [fw1])
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        var rng = SplitMix64(state: 9)
        for _ in 0..<50 {
            let data = (0..<Int.random(in: 0...3000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let forward = PacketBuilder(tuple: session, flags: [.ack, .psh], payload: data).build()
            #expect(h.send(forward, along: ["client", "fw1", "server"]) == forward)
            let reverse = PacketBuilder(tuple: session.reversed, flags: [.ack], payload: data).build()
            #expect(h.send(reverse, along: ["server", "fw1", "client"]) == reverse)
        }
        #expect(h.hosts["fw1"]!.counters.translatedIngress == 102)
    }

    @Test("a CHECKSUM_PARTIAL packet leaves with a full, correct checksum")
    func partialChecksum() throws {
        let h = harness(chain: [fw1])
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        var packet = PacketBuilder(tuple: session, payload: Array(repeating: 1, count: 1000)).build()
        put16(&packet, 36, 0xbeef)  // garbage: only the pseudo-header sum would be there
        let (_, out) = h.run("client", packet, .egress, checksum: .partial)
        #expect(Reference.tcpChecksumValid(out))
        #expect(h.hosts["client"]!.counters.fullChecksums >= 2)
    }

    @Test("retransmitted SYN carries the trailer again and maps to the same subsession")
    func synRetransmission() throws {
        let h = harness(chain: [fw1])
        let syn = PacketBuilder(tuple: session, flags: [.syn]).build()
        let first = try #require(h.send(syn, along: ["client", "fw1", "server"]))
        let second = try #require(h.send(syn, along: ["client", "fw1", "server"]))
        #expect(first == syn && second == syn)
        #expect(["client", "fw1", "server"].allSatisfy { h.hosts[$0]!.table.count == 1 && h.hosts[$0]!.counters.collisions == 0 })
    }

    @Test("a malformed Dysco trailer is counted and the SYN dropped (documented rule)")
    func malformedTrailer() {
        let h = harness(chain: [fw1])
        let wire = FiveTuple.t("10.77.0.10", 10000, "10.77.0.101", 80)
        var trailer = DyscoSynPayload(identity: .random(), session: session, remaining: [server])
            .encoded(tuple: wire, trust: TestKeys.group)
        trailer[0] = 99  // unknown version
        let bad = PacketBuilder(tuple: wire, flags: [.syn], payload: trailer).build()
        let (verdict, _) = h.run("fw1", bad, .ingress)
        #expect(verdict == .drop)
        #expect(h.hosts["fw1"]!.counters.malformedDyscoSyn == 1)
        #expect(h.hosts["fw1"]!.counters.trailerBadMAC == 0 && h.hosts["fw1"]!.counters.trailerVersionOneRefused == 0)
        #expect(h.hosts["fw1"]!.table.count == 0)
    }

    @Test("traffic outside every policy, and garbage, passes untouched")
    func outsidePolicy() {
        let h = harness(chain: [fw1])
        let other = PacketBuilder(tuple: .t("10.77.0.10", 40001, "10.77.0.201", 8080), flags: [.syn]).build()
        #expect(h.run("client", other, .egress).0 == .accept)
        #expect(h.run("fw1", other, .ingress).0 == .accept)
        #expect(h.hosts["client"]!.table.count == 0)
        #expect(h.hosts["client"]!.counters.passedThrough == 1)
        let garbage: [UInt8] = [0x45, 0, 0, 10, 1, 2, 3]
        #expect(h.run("client", garbage, .egress).0 == .accept)
        #expect(h.hosts["client"]!.counters.malformedPackets == 1)
    }

    @Test("FIN both ways closes the session after the linger; RST sooner; idle sessions expire")
    func teardown() throws {
        let fresh = harness(chain: [fw1])
        _ = try #require(fresh.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(fresh.send(PacketBuilder(tuple: session, flags: [.fin, .ack]).build(), along: ["client", "fw1", "server"]))
        #expect(fresh.hosts["fw1"]!.expire(now: fresh.now + 1).removed == 0, "one FIN is a half-close: keep going")
        _ = try #require(fresh.send(PacketBuilder(tuple: session.reversed, flags: [.fin, .ack]).build(), along: ["server", "fw1", "client"]))
        // The last ACK still needs the translation during the linger.
        #expect(fresh.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]) != nil)
        #expect(fresh.hosts["fw1"]!.table.count == 1)
        let linger = fresh.hosts["fw1"]!.settings.closeLinger
        #expect(fresh.hosts["fw1"]!.expire(now: fresh.now + linger).removed == 1)
        #expect(fresh.hosts["fw1"]!.table.count == 0)
        #expect(fresh.hosts["fw1"]!.table.ingress.isEmpty && fresh.hosts["fw1"]!.table.egress.isEmpty)

        let idle = harness(chain: [fw1])
        _ = try #require(idle.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        // Established (a SYN-only record would go after the SYN timeout: BoundsTests).
        _ = try #require(idle.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        _ = try #require(idle.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]))
        let timeout = idle.hosts["client"]!.settings.idleTimeout
        #expect(idle.hosts["client"]!.expire(now: idle.now + timeout - 1).removed == 0)
        #expect(idle.hosts["client"]!.expire(now: idle.now + timeout).removed == 1)
        #expect(idle.hosts["client"]!.table.ports.inUse == 0)
    }

    @Test("a new SYN reusing a closing session's tuple starts a fresh session")
    func tupleReuse() throws {
        let h = harness(chain: [fw1])
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.rst]).build(), along: ["client", "fw1", "server"]))
        let syn = PacketBuilder(tuple: session, flags: [.syn], seq: 999_999).build()
        #expect(h.send(syn, along: ["client", "fw1", "server"]) == syn)
        #expect(["client", "fw1", "server"].allSatisfy { h.hosts[$0]!.table.count == 1 && h.hosts[$0]!.counters.sessionsCreated == 2 })
    }

    @Test("100 concurrent sessions get distinct subsession ports and all translate")
    func manySessions() throws {
        let h = harness(chain: [fw1])
        for i in 0..<100 {
            let s = FiveTuple(srcAddr: client, srcPort: UInt16(41000 + i), dstAddr: server, dstPort: 80)
            let syn = PacketBuilder(tuple: s, flags: [.syn]).build()
            #expect(h.send(syn, along: ["client", "fw1", "server"]) == syn)
        }
        let rights = h.hosts["client"]!.table.records.values.compactMap(\.right)
        #expect(Set(rights.map(\.srcPort)).count == 100)
        #expect(h.hosts["server"]!.table.count == 100)
    }
}

@Suite("Packet processor: trust (paper §2.3) — forged, replayed, old and hostile trailers create nothing")
struct PacketProcessorTrustTests {
    let client = IPAddress("10.77.0.10")!, fw1 = IPAddress("10.77.0.101")!
    let server = IPAddress("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }
    /// What a host on the segment sends to fw1 (its own port; any tuple would do).
    let attack = FiveTuple.t("10.77.0.51", 10000, "10.77.0.101", 80)

    func fw1(_ trust: TrustGroup = TestKeys.group) -> PacketProcessor {
        PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: trust)
    }

    /// Runs `bytes` through ingress then (if it survived) egress of `host`; returns both verdicts.
    func relay(_ host: inout PacketProcessor, _ bytes: [UInt8]) -> (Verdict, Verdict?) {
        var effects = DataplaneEffects()
        return relay(&host, bytes, effects: &effects)
    }

    /// ``relay(_:_:)`` gathering what the processor produced besides its verdicts.
    func relay(_ host: inout PacketProcessor, _ bytes: [UInt8], effects: inout DataplaneEffects) -> (Verdict, Verdict?) {
        var buffer = bytes + [UInt8](repeating: 0, count: 256)
        let capacity = buffer.count
        let ingress = buffer.withUnsafeMutableBytes { raw in
            host.process(raw.baseAddress!, count: bytes.count, capacity: capacity, hook: .ingress, checksum: .complete, now: 1)
        }
        effects.append(ingress.effects)
        guard case .acceptModified(let length) = ingress.verdict else { return (ingress.verdict, nil) }
        let egress = buffer.withUnsafeMutableBytes { raw in
            host.process(raw.baseAddress!, count: length, capacity: capacity, hook: .egress, checksum: .complete, now: 1)
        }
        effects.append(egress.effects)
        return (ingress.verdict, egress.verdict)
    }

    func expectNothingCreated(_ p: PacketProcessor, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(p.table.count == 0, sourceLocation: sourceLocation)
        #expect(p.table.ingress.isEmpty && p.table.egress.isEmpty, sourceLocation: sourceLocation)
        #expect(p.counters.sessionsCreated == 0 && p.counters.translatedIngress == 0, sourceLocation: sourceLocation)
        #expect(p.table.ports.inUse == 0, sourceLocation: sourceLocation)
    }

    @Test("a trailer signed with another key is dropped at the middlebox, counted in trailerBadMAC")
    func forged() {
        var p = fw1()
        let syn = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server], trust: TestKeys.wrong)
        var effects = DataplaneEffects()
        #expect(relay(&p, syn, effects: &effects).0 == .drop)
        #expect(p.counters.trailerBadMAC == 1)
        #expect(p.counters.malformedDyscoSyn == 0)
        expectNothingCreated(p)
        let events = effects.events
        #expect(events.count == 1)
        if case .untrustedDyscoSyn(let t, let error) = events.first {
            #expect(t == attack && error == .badMAC)
        } else {
            Issue.record("expected an untrustedDyscoSyn event, got \(events)")
        }
    }

    @Test("a valid trailer replayed on another tuple is dropped (trailerBadMAC)")
    func replayed() {
        var p = fw1()
        let other = FiveTuple(srcAddr: attack.srcAddr, srcPort: attack.srcPort + 1, dstAddr: attack.dstAddr, dstPort: 80)
        let syn = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server], signedFor: other)
        #expect(relay(&p, syn).0 == .drop)
        #expect(p.counters.trailerBadMAC == 1)
        expectNothingCreated(p)
    }

    @Test("a version-1 trailer is dropped, counted in trailerVersionOneRefused")
    func versionOne() {
        var p = fw1()
        let syn = PacketBuilder(tuple: attack, flags: [.syn], payload: versionOneTrailer(session: session, remaining: [server])).build()
        #expect(relay(&p, syn).0 == .drop)
        #expect(p.counters.trailerVersionOneRefused == 1)
        #expect(p.counters.malformedDyscoSyn == 0 && p.counters.trailerBadMAC == 0)
        expectNothingCreated(p)
    }

    @Test("a correctly signed trailer naming a forbidden next hop or session address is dropped",
          arguments: ["127.0.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0"])
    func forbiddenHop(text: String) {
        let bad = IPAddress(text)!
        var p = fw1()
        #expect(relay(&p, PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [bad])).0 == .drop)
        #expect(relay(&p, PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [bad, server])).0 == .drop)
        let toBad = FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: bad, dstPort: 80)
        #expect(relay(&p, PacketBuilder.dyscoSyn(tuple: attack, session: toBad, remaining: [])).0 == .drop)
        #expect(p.counters.trailerForbiddenAddress == 3)
        expectNothingCreated(p)
    }

    @Test("a correctly signed trailer with a zero chain id is malformed (dropped, malformedDyscoSyn)")
    func zeroIdentity() {
        var p = fw1()
        let syn = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server],
                                         identity: SessionIdentity(chainID: 0, nonce: 5))
        #expect(relay(&p, syn).0 == .drop)
        #expect(p.counters.malformedDyscoSyn == 1)
        expectNothingCreated(p)
    }

    @Test("a valid trailer is relayed with its identity; a retransmission is verified too")
    func retransmission() throws {
        var p = fw1()
        let identity = SessionIdentity(chainID: 77, nonce: 78)
        let syn = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server], identity: identity)
        let (ingress, egress) = relay(&p, syn)
        #expect(ingress != .drop && egress != .drop)
        #expect(p.table.records.values.first?.identity == identity)
        #expect(relay(&p, syn).0 != .drop, "the same SYN again (retransmission) passes")
        // Retransmissions on the same left tuple with a forged, a v1 or a hostile trailer are dropped.
        let forged = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server], identity: identity,
                                            trust: TestKeys.wrong)
        #expect(relay(&p, forged).0 == .drop)
        #expect(p.counters.trailerBadMAC == 1)
        let v1 = PacketBuilder(tuple: attack, flags: [.syn], payload: versionOneTrailer(session: session, remaining: [server])).build()
        #expect(relay(&p, v1).0 == .drop)
        #expect(p.counters.trailerVersionOneRefused == 1)
        let hostile = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [IPAddress("127.0.0.1")!],
                                             identity: identity)
        #expect(relay(&p, hostile).0 == .drop)
        #expect(p.counters.trailerForbiddenAddress == 1)
        // Signed, but for another session or identity than this subsession's: refused.
        let other = PacketBuilder.dyscoSyn(tuple: attack, session: session, remaining: [server],
                                           identity: SessionIdentity(chainID: 99, nonce: 1))
        #expect(relay(&p, other).0 == .drop)
        #expect(p.table.count == 1 && p.counters.sessionsCreated == 1)
        #expect(p.table.records.values.first?.identity == identity)
    }

    @Test("rotation: a chain where agents hold different current keys works while each accepts the other's")
    func rotation() throws {
        let old = TestKeys.current, new = TestKeys.previous
        let tests = PacketProcessorTests()
        // Mid-rotation: the client signs with NEW; fw1 still signs with OLD but accepts NEW; the server
        // signs with NEW and accepts OLD.
        let mixed = tests.harness(chain: [fw1], trust: [
            "client": TrustGroup(current: new, previous: old), "fw1": TrustGroup(current: old, previous: new),
            "server": TrustGroup(current: new, previous: old),
        ])
        let syn = PacketBuilder(tuple: session, flags: [.syn]).build()
        #expect(mixed.send(syn, along: ["client", "fw1", "server"]) == syn)
        #expect(["client", "fw1", "server"].allSatisfy { mixed.hosts[$0]!.table.count == 1 })

        // Without the previous key configured, the same mix is refused at the first agent holding only OLD.
        let unprepared = tests.harness(chain: [fw1], trust: ["client": TrustGroup(current: new), "fw1": TrustGroup(current: old)])
        #expect(unprepared.send(syn, along: ["client", "fw1", "server"]) == nil)
        #expect(unprepared.hosts["fw1"]!.counters.trailerBadMAC == 1)
        #expect(unprepared.hosts["fw1"]!.table.count == 0)
    }
}
