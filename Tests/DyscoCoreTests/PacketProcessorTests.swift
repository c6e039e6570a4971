import DyscoCore
import Testing

/// Passes packets through PacketProcessors as the hosts of a chain would (no kernel involved).
final class ChainHarness {
    var hosts: [String: PacketProcessor] = [:]
    var now: UInt64 = 1_000_000_000

    func run(_ host: String, _ bytes: [UInt8], _ hook: HookPoint, checksum: ChecksumState = .complete)
        -> (Verdict, [UInt8]) {
        var buffer = bytes + [UInt8](repeating: 0, count: 256)
        let verdict = buffer.withUnsafeMutableBytes { raw in
            hosts[host]!.process(raw.baseAddress!, count: bytes.count, capacity: raw.count, hook: hook,
                                 checksum: checksum, now: now)
        }
        switch verdict {
        case .accept: return (verdict, bytes)
        case .acceptModified(let length): return (verdict, Array(buffer[0..<length]))
        case .drop: return (verdict, [])
        }
    }

    /// Egress at `from`, then ingress at each later host in `path` (egress too, unless it is the last).
    func send(_ bytes: [UInt8], along path: [String]) -> [UInt8]? {
        var packet = bytes
        for (index, host) in path.enumerated() {
            if index > 0 {
                let (verdict, out) = run(host, packet, .ingress)
                guard verdict != .drop else { return nil }
                packet = out
            }
            if index < path.count - 1 {
                let (verdict, out) = run(host, packet, .egress)
                guard verdict != .drop else { return nil }
                packet = out
            }
        }
        return packet
    }
}

func tuple(of bytes: [UInt8]) -> FiveTuple {
    var copy = bytes
    return copy.withUnsafeMutableBytes { raw in
        guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { fatalError() }
        return p.tuple
    }
}

func payload(of bytes: [UInt8]) -> [UInt8] {
    var copy = bytes
    return copy.withUnsafeMutableBytes { raw in
        guard case .success(let p) = IPv4TCPPacket.parse(raw.baseAddress!, count: raw.count) else { fatalError() }
        return Array(raw[p.payloadOffset..<p.length])
    }
}

@Suite("Packet processor: a chain of agents in memory (paper §2.1)")
struct PacketProcessorTests {
    let client = IPv4Address("10.77.0.10")!, fw1 = IPv4Address("10.77.0.101")!
    let fw2 = IPv4Address("10.77.0.102")!, server = IPv4Address("10.77.0.201")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    func harness(chain: [IPv4Address]) -> ChainHarness {
        let policy = Policy(name: "web", match: SessionPredicate(dst: IPv4Prefix("10.77.0.201/32"), dport: [PortRange("80")!]),
                            chain: chain)
        let h = ChainHarness()
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999)
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999)
        h.hosts["fw2"] = PacketProcessor(config: AgentConfig(), portRange: 30000...30999)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 40000...40999)
        return h
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
        let trailer = try payload(of: onWire1).withUnsafeBytes { raw in try DyscoSynPayload.decode(trailerOf: raw) }.0
        #expect(trailer.session == session)
        #expect(trailer.remaining == [fw2, server])
        #expect(Reference.tcpChecksumValid(onWire1) && Reference.ipChecksumValid(onWire1))

        // fw1 ingress: the firewall must see the session tuple and no payload.
        let (_, atFw1) = h.run("fw1", onWire1, .ingress)
        #expect(tuple(of: atFw1) == session)
        #expect(payload(of: atFw1).isEmpty)
        #expect(Reference.tcpChecksumValid(atFw1))
        let (_, onWire2) = h.run("fw1", atFw1, .egress)
        #expect(tuple(of: onWire2).srcAddr == fw1 && tuple(of: onWire2).dstAddr == fw2)
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
        var trailer = DyscoSynPayload(session: session, remaining: [server]).encoded()
        trailer[0] = 99  // unknown version
        let bad = PacketBuilder(tuple: .t("10.77.0.10", 10000, "10.77.0.101", 80), flags: [.syn], payload: trailer).build()
        let (verdict, _) = h.run("fw1", bad, .ingress)
        #expect(verdict == .drop)
        #expect(h.hosts["fw1"]!.counters.malformedDyscoSyn == 1)
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
        #expect(fresh.hosts["fw1"]!.expire(now: fresh.now + 1) == 0, "one FIN is a half-close: keep going")
        _ = try #require(fresh.send(PacketBuilder(tuple: session.reversed, flags: [.fin, .ack]).build(), along: ["server", "fw1", "client"]))
        // The last ACK still needs the translation during the linger.
        #expect(fresh.send(PacketBuilder(tuple: session, flags: [.ack]).build(), along: ["client", "fw1", "server"]) != nil)
        #expect(fresh.hosts["fw1"]!.table.count == 1)
        let linger = fresh.hosts["fw1"]!.settings.closeLinger
        #expect(fresh.hosts["fw1"]!.expire(now: fresh.now + linger) == 1)
        #expect(fresh.hosts["fw1"]!.table.count == 0)
        #expect(fresh.hosts["fw1"]!.table.ingress.isEmpty && fresh.hosts["fw1"]!.table.egress.isEmpty)

        let idle = harness(chain: [fw1])
        _ = try #require(idle.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        let timeout = idle.hosts["client"]!.settings.idleTimeout
        #expect(idle.hosts["client"]!.expire(now: idle.now + timeout - 1) == 0)
        #expect(idle.hosts["client"]!.expire(now: idle.now + timeout) == 1)
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
