import DyscoCore
import Testing

/// The packet processor's rules on IPv6 sessions (issue 18, item 3): the same rules as IPv4, generic over the
/// family's packet view. The agent does not queue IPv6 yet (docs/ARCHITECTURE.md, Limits); these run the processors
/// in memory, as ``PacketProcessorTests`` do for IPv4.
@Suite("IPv6 chains in memory (paper §2.1 over IPv6; trailer family 6; extension-header rule)")
struct IPv6ChainTests {
    let client = IPAddress("fd00:77::10")!, fw1 = IPAddress("fd00:77::65")!
    let fw2 = IPAddress("fd00:77::66")!, server = IPAddress("fd00:77::c9")!
    var session: FiveTuple { FiveTuple(srcAddr: client, srcPort: 40000, dstAddr: server, dstPort: 80) }

    func harness(chain: [IPAddress]) -> ChainHarness {
        let h = ChainHarness()
        let policies = [Policy(name: "web6", match: SessionPredicate(dport: [PortRange("80")!]), chain: chain)]
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: policies), portRange: 10000...10999, trust: TestKeys.group)
        h.hosts["fw1"] = PacketProcessor(config: AgentConfig(), portRange: 20000...20999, trust: TestKeys.group)
        h.hosts["fw2"] = PacketProcessor(config: AgentConfig(), portRange: 30000...30999, trust: TestKeys.group)
        h.hosts["server"] = PacketProcessor(config: AgentConfig(), portRange: 40000...40999, trust: TestKeys.group)
        return h
    }

    @Test("§2.1 over IPv6: the SYN carries a family-6 trailer; each box sees the session tuple; the server the client's SYN byte for byte")
    func synThroughTwoBoxes() throws {
        let h = harness(chain: [fw1, fw2])
        let syn = PacketBuilder(tuple: session, flags: [.syn], options: [2, 4, 0x05, 0xa0, 1, 3, 3, 7]).build()
        let (verdict, onWire1) = h.run("client", syn, .egress)
        #expect(verdict != .drop)
        let wire1 = tuple(of: onWire1)
        #expect(wire1.srcAddr == client && wire1.dstAddr == fw1 && wire1.srcPort != session.srcPort)
        #expect(tcpChecksumValid(onWire1))
        let trailer = try #require(decodedTrailer(onWire1, tuple: wire1))
        #expect(trailer.session == session && trailer.remaining == [fw2, server])
        #expect(payload(of: onWire1).count == 78 + 2 * 16 && payload(of: onWire1)[1] == 6)

        let (_, atFw1) = h.run("fw1", onWire1, .ingress)
        #expect(tuple(of: atFw1) == session && payload(of: atFw1).isEmpty && tcpChecksumValid(atFw1))
        let (_, onWire2) = h.run("fw1", atFw1, .egress)
        #expect(tuple(of: onWire2).srcAddr == fw1 && tuple(of: onWire2).dstAddr == fw2)
        #expect(trailerError(onWire2, tuple: wire1) == .badMAC, "re-signed for fw1's right subsession")
        let (_, atFw2) = h.run("fw2", onWire2, .ingress)
        #expect(tuple(of: atFw2) == session)
        let (_, onWire3) = h.run("fw2", atFw2, .egress)
        #expect(tuple(of: onWire3).srcAddr == fw2 && tuple(of: onWire3).dstAddr == server)
        #expect(h.run("server", onWire3, .ingress).1 == syn)

        let synAck = PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build()
        #expect(h.send(synAck, along: ["server", "fw2", "fw1", "client"]) == synAck)
        #expect(h.hosts["fw1"]!.table.records.values.first?.rightEstablished == true)
        #expect(Set(h.hosts.values.compactMap { $0.table.records.values.first?.identity }) == [trailer.identity])
    }

    @Test("data both ways, complete and CHECKSUM_PARTIAL, arrives byte-exact with valid checksums")
    func dataBothWays() throws {
        let h = harness(chain: [fw1])
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        var rng = SplitMix64(state: 6)
        for _ in 0..<30 {
            let data = (0..<Int.random(in: 0...3000, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let forward = PacketBuilder(tuple: session, flags: [.ack, .psh], payload: data).build()
            #expect(h.send(forward, along: ["client", "fw1", "server"]) == forward)
            let reverse = PacketBuilder(tuple: session.reversed, flags: [.ack], payload: data).build()
            #expect(h.send(reverse, along: ["server", "fw1", "client"]) == reverse)
        }
        var partial = PacketBuilder(tuple: session, payload: Array(repeating: 7, count: 900)).build()
        put16(&partial, 56, 0xbeef)  // only the pseudo-header sum would be there
        let (_, out) = h.run("client", partial, .egress, checksum: .partial)
        #expect(tcpChecksumValid(out) && tuple(of: out).dstAddr == fw1)
        #expect(h.hosts["fw1"]!.counters.translatedIngress == 62)
    }

    @Test("a segment behind Hop-by-Hop and Destination Options headers is the session's: translated, the headers kept")
    func extensionHeadersKept() throws {
        let h = harness(chain: [fw1])
        _ = try #require(h.send(PacketBuilder(tuple: session, flags: [.syn]).build(), along: ["client", "fw1", "server"]))
        _ = try #require(h.send(PacketBuilder(tuple: session.reversed, flags: [.syn, .ack]).build(), along: ["server", "fw1", "client"]))
        let hopByHop: [UInt8] = [0, 0, 1, 4, 0, 0, 0, 0]  // PadN
        let destination: [UInt8] = [60, 0, 1, 4, 0, 0, 0, 0]
        let packet = PacketBuilder(tuple: session, payload: Array("hello".utf8)).build6(extensionHeaders: [hopByHop, destination])
        let (verdict, out) = h.run("client", packet, .egress)
        #expect(verdict == .acceptModified(length: packet.count))
        #expect(tuple(of: out).dstAddr == fw1 && tcpChecksumValid(out) && payload(of: out) == Array("hello".utf8))
        #expect(Array(out[40..<56]) == Array(packet[40..<56]), "the extension headers pass unchanged")
    }

    @Test("the documented rule: fragments, ESP, other upper layers, long chains and jumbograms pass untouched, counted by reason; truncated ones count as malformed")
    func notSessionsSegments() {
        let h = harness(chain: [fw1])
        let plain = PacketBuilder(tuple: session, flags: [.syn]).build()
        func with(nextHeader: UInt8, _ extra: [UInt8]) -> [UInt8] {
            var b = Array(plain[0..<40]) + extra
            b[6] = nextHeader
            put16(&b, 4, UInt16(extra.count))
            return b
        }
        let cases: [([UInt8], KeyPath<DataplaneCounters, UInt64>)] = [
            (with(nextHeader: 44, [6, 0, 0, 1, 0, 0, 0, 1] + Array(plain[40...])), \.ipv6Fragment),
            (with(nextHeader: 50, [UInt8](repeating: 1, count: 24)), \.ipv6Encrypted),
            (with(nextHeader: 17, [UInt8](repeating: 1, count: 16)), \.ipv6NotTCP),
            (with(nextHeader: 59, [UInt8](repeating: 0, count: 8)), \.ipv6NotTCP),
            (with(nextHeader: 60, (0..<9).flatMap { _ in [60, 0, 1, 4, 0, 0, 0, 0] }), \.ipv6LongChain),
            (with(nextHeader: 6, Array(plain[40...])).enumerated().map { $0.offset == 4 || $0.offset == 5 ? 0 : $0.element }, \.ipv6Jumbogram),
            (Array(plain[0..<50]), \.malformedPackets),
            (with(nextHeader: 0, [6, 30, 0, 0]), \.malformedPackets),
        ]
        for (index, (bytes, counter)) in cases.enumerated() {
            let before = h.hosts["fw1"]!.counters[keyPath: counter]
            let (verdict, out) = h.run("fw1", bytes, .ingress)
            #expect(verdict == .accept && out == bytes, "case \(index)")
            #expect(h.hosts["fw1"]!.counters[keyPath: counter] == before + 1, "case \(index)")
        }
        #expect(h.hosts["fw1"]!.table.count == 0)
    }

    @Test("a policy whose chain is of the other family does not apply: an IPv6 SYN passes, an IPv4 one is chained")
    func chainFamily() {
        let v4box = IPAddress(10, 77, 0, 101)
        let h = harness(chain: [v4box])
        #expect(h.run("client", PacketBuilder(tuple: session, flags: [.syn]).build(), .egress).0 == .accept)
        #expect(h.hosts["client"]!.table.count == 0 && h.hosts["client"]!.counters.passedThrough == 1)
        let v4 = PacketBuilder(tuple: .t("10.77.0.10", 40000, "10.77.0.201", 80), flags: [.syn]).build()
        #expect(tuple(of: h.run("client", v4, .egress).1).dstAddr == v4box)
    }

    @Test("the anchors' own packets are built in the session's family: an IPv6 pure ACK parses, its checksum verifies")
    func pureAck() {
        var buffer = [UInt8](repeating: 0xee, count: PureAck.maxLength)
        let length = buffer.withUnsafeMutableBytes { raw in
            PureAck.build(into: raw.baseAddress!, tuple: session, seq: 7, ack: 9, window: 512, payloadByte: true)
        }
        #expect(length == 61)
        let packet = Array(buffer.prefix(length))
        #expect(tuple(of: packet) == session && tcpChecksumValid(packet) && payload(of: packet).count == 1)
        #expect(packet.withUnsafeBytes { PureAck.destination(of: $0.baseAddress!) } == server)
    }
}
