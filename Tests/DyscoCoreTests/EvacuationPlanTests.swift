@testable import DyscoCore
import Testing

@Suite("Drain: cordons, batches, bundled control messages")
struct EvacuationPlanTests {
    static let fw1 = IPAddress(10, 77, 0, 101), fw2 = IPAddress(10, 77, 0, 102), fw3 = IPAddress(10, 77, 0, 103)
    static let fw4 = IPAddress(10, 77, 0, 104)

    // MARK: Cordons

    @Test("a cordoned hop of a new chain takes the replacements in turn; other hops and uncordoned chains stay")
    func cordonRoundRobin() throws {
        var cordons = Cordons()
        let r1 = cordons.apply([Self.fw1, Self.fw4])
        #expect(r1 == [Self.fw1, Self.fw4])
        try cordons.cordon(Self.fw1, replacements: [Self.fw2, Self.fw3])
        let r2 = cordons.apply([Self.fw1, Self.fw4])
        #expect(r2 == [Self.fw2, Self.fw4])
        let r3 = cordons.apply([Self.fw1, Self.fw4])
        #expect(r3 == [Self.fw3, Self.fw4])
        let r4 = cordons.apply([Self.fw1])
        #expect(r4 == [Self.fw2])
        let r5 = cordons.apply([Self.fw4])
        #expect(r5 == [Self.fw4])
        // A replacement already on the chain is skipped (a chain never visits a box twice).
        let r6 = cordons.apply([Self.fw1, Self.fw2])
        #expect(r6 == [Self.fw3, Self.fw2])
        let r7 = cordons.uncordon(Self.fw1)
        #expect(r7)
        let r8 = cordons.uncordon(Self.fw1)
        #expect(!r8)
        let r9 = cordons.apply([Self.fw1])
        #expect(r9 == [Self.fw1])
    }

    @Test("a cordon needs a replacement that is not itself and not cordoned; refused cordons change nothing")
    func cordonRules() throws {
        var cordons = Cordons()
        let r10 = Self.refusal(&cordons, Self.fw1, [])
        #expect(r10 == Cordons.CordonError.noReplacement(Self.fw1))
        let r11 = Self.refusal(&cordons, Self.fw1, [Self.fw1])
        #expect(r11 == Cordons.CordonError.replacesItself(Self.fw1))
        try cordons.cordon(Self.fw1, replacements: [Self.fw2])
        let r12 = Self.refusal(&cordons, Self.fw3, [Self.fw1])
        #expect(r12 == Cordons.CordonError.replacementIsCordoned(Self.fw1))
        // fw2 is fw1's replacement: cordoning it would leave fw1's new sessions nowhere to go.
        let r13 = Self.refusal(&cordons, Self.fw2, [Self.fw3])
        #expect(r13 == Cordons.CordonError.replacementIsCordoned(Self.fw2))
        #expect(cordons.cordons == [Cordons.Cordon(address: Self.fw1, replacements: [Self.fw2])])
        // Cordoning again updates the replacements.
        try cordons.cordon(Self.fw1, replacements: [Self.fw3])
        #expect(cordons.cordons == [Cordons.Cordon(address: Self.fw1, replacements: [Self.fw3])])
    }

    @Test("a processor with a cordon sends a new session's SYN to the replacement (existing sessions keep theirs)")
    func processorUsesCordon() throws {
        let client = IPAddress(10, 77, 0, 10), server = IPAddress(10, 77, 0, 201)
        let policy = Policy(name: "web", match: SessionPredicate(dport: [PortRange("80")!]), chain: [Self.fw1])
        let h = ChainHarness()
        h.hosts["client"] = PacketProcessor(config: AgentConfig(policies: [policy]), portRange: 10000...10999, trust: TestKeys.group)
        func syn(_ port: UInt16) -> [UInt8] {
            PacketBuilder(tuple: FiveTuple(srcAddr: client, srcPort: port, dstAddr: server, dstPort: 80), flags: [.syn]).build()
        }
        let (_, before) = h.run("client", syn(40000), .egress)
        #expect(tuple(of: before).dstAddr == Self.fw1)
        try h.hosts["client"]!.cordons.cordon(Self.fw1, replacements: [Self.fw2])
        let (_, after) = h.run("client", syn(40001), .egress)
        #expect(tuple(of: after).dstAddr == Self.fw2)
        // The first session's SYN, retransmitted, still goes to fw1: its chain was fixed when it started.
        let (_, again) = h.run("client", syn(40000), .egress)
        #expect(tuple(of: again).dstAddr == Self.fw1)
    }

    static func refusal(_ cordons: inout Cordons, _ address: IPAddress, _ replacements: [IPAddress]) -> Cordons.CordonError? {
        do throws(Cordons.CordonError) {
            try cordons.cordon(address, replacements: replacements)
            return nil
        } catch { return error }
    }

    // MARK: EvacuationPlan

    static func candidates(_ n: Int, left: IPAddress = IPAddress(10, 77, 0, 11), firstChain: UInt64 = 1000) -> [EvacuationPlan.Candidate] {
        (0..<n).map { i in
            EvacuationPlan.Candidate(chainID: firstChain + UInt64(i),
                                session: FiveTuple(srcAddr: left, srcPort: UInt16(40000 + i), dstAddr: IPAddress(10, 77, 0, 201), dstPort: 80),
                                leftAnchor: left, rightAnchor: IPAddress(10, 77, 0, 201))
        }
    }

    @Test("sessions are spread over the targets in turn and batched by (left anchor, right anchor, target), at most batchSize")
    func planBatches() {
        let a = Self.candidates(10), b = Self.candidates(5, left: IPAddress(10, 77, 0, 12), firstChain: 2000)
        let plan = EvacuationPlan(a + b, targets: [Self.fw2, Self.fw3], batchSize: 4)
        #expect(plan.sessionCount == 15)
        let all = plan.batches.flatMap(\.sessions).map(\.chainID)
        #expect(Set(all).count == 15)
        for batch in plan.batches {
            #expect(batch.sessions.count <= 4 && !batch.sessions.isEmpty)
            #expect(batch.sessions.allSatisfy { $0.leftAnchor == batch.leftAnchor && $0.rightAnchor == batch.rightAnchor })
        }
        let toFW2 = plan.batches.filter { $0.target == Self.fw2 }.reduce(0) { $0 + $1.sessions.count }
        let toFW3 = plan.batches.filter { $0.target == Self.fw3 }.reduce(0) { $0 + $1.sessions.count }
        #expect(abs(toFW2 - toFW3) <= 1)
        // Targets alternate in the batch order.
        #expect(plan.batches[0].target != plan.batches[1].target)
        // Batch size 1 (--concurrency 1): one batch per session.
        #expect(EvacuationPlan(a, targets: [Self.fw2], batchSize: 1).batches.count == 10)
        // Same input, same plan (a second run of drain moves the same session to the same box).
        #expect(EvacuationPlan((a + b).reversed(), targets: [Self.fw2, Self.fw3], batchSize: 4) == plan)
    }

    // MARK: Bundles

    static func message(_ chain: UInt64, _ body: ControlBody) -> ControlMessage {
        ControlMessage(identity: SessionIdentity(chainID: chain, nonce: 7), requestID: 1, session: ControlMessageTests.session,
                       leftAnchor: IPAddress(10, 77, 0, 11), rightAnchor: IPAddress(10, 77, 0, 201), body: body)
    }

    @Test("several messages in one datagram decode one by one; a bad MAC spoils only its own message")
    func bundleFrames() throws {
        let trust = ControlMessageTests.trust
        let messages = (1...5).map { Self.message(UInt64($0), .requestLock(rightDelta: Int32($0))) }
        let datagrams = ControlMessage.bundle(messages.map { $0.encode(trust: trust) })
        #expect(datagrams.count == 1)
        let decoded = ControlMessage.decodeAll(datagrams[0], trust: trust)
        #expect(decoded.compactMap { try? $0.get() } == messages)

        var tampered = datagrams[0]
        let second = messages[0].encode(trust: trust).count
        tampered[second + 20] ^= 0xFF  // inside the second message's header
        let results = ControlMessage.decodeAll(tampered, trust: trust)
        #expect(results.count == 5)
        #expect(results.compactMap { try? $0.get() } == [messages[0]] + messages[2...])
        #expect(throws: ControlMessageError.badMAC) { try results[1].get() }
    }

    @Test("a forged length or trailing garbage makes one refused frame of the rest; a datagram of one message is one frame")
    func bundleForgedLength() throws {
        let trust = ControlMessageTests.trust
        let one = Self.message(9, .drained).encode(trust: trust)
        #expect(ControlMessage.decodeAll(one, trust: trust).count == 1)
        var forged = one + one
        forged[one.count + 6] = 0xFF  // second message claims a longer body than the datagram holds
        let results = ControlMessage.decodeAll(forged, trust: trust)
        #expect(results.count == 2)
        #expect((try? results[0].get()) != nil)
        #expect((try? results[1].get()) == nil)
        let garbage = ControlMessage.decodeAll(one + [1, 2, 3], trust: trust)
        #expect(garbage.count == 2)
        #expect(throws: ControlMessageError.truncated(length: 3)) { try garbage[1].get() }
    }

    @Test("bundles stay within the limit; a single message longer than the limit goes alone")
    func bundleLimit() {
        let small = [UInt8](repeating: 1, count: 100)
        let big = [UInt8](repeating: 2, count: 20_000)
        let datagrams = ControlMessage.bundle([small, small, big, small], limit: 250)
        #expect(datagrams.map(\.count) == [200, 20_000, 100])
    }
}
