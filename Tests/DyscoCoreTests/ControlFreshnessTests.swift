import DyscoCore
import Testing

/// The freshness of control messages (issue 20: a recorded trigger, sent again, started a lock round of a live
/// session; docs/CONTROL-PROTOCOL.md "Freshness"). The Dysco paper (SIGCOMM 2017, §2.3) authenticates agents but
/// says nothing about replay; the window is RFC 4303 §3.4.3's anti-replay window over a per-receiver counter.
@Suite struct ControlFreshnessTests {
    static let me = IPAddress(10, 77, 0, 101)
    static let other = IPAddress(10, 77, 0, 102)
    static let start: UInt64 = 1_800_000_000_000_000  // µs since 1970

    static func stamp(_ counter: UInt32, sender: UInt64 = 7, to receiver: IPAddress = me, at: UInt64 = start + 1_000) -> ControlStamp {
        ControlStamp(sender: sender, receiver: receiver, counter: counter, sentAt: at)
    }

    @Test("a message is accepted once: its copy is a duplicate (issue 20)")
    func onceOnly() {
        var checker = FreshnessChecker(startedAt: Self.start)
        #expect(checker.admit(Self.stamp(1), destination: Self.me, nowMicros: Self.start + 2_000) == nil)
        #expect(checker.admit(Self.stamp(1), destination: Self.me, nowMicros: Self.start + 3_000) == .duplicate)
        #expect(checker.admit(Self.stamp(2), destination: Self.me, nowMicros: Self.start + 3_000) == nil)
        #expect(checker.admit(Self.stamp(2), destination: Self.me, nowMicros: Self.start + 3_000) == .duplicate)
    }

    @Test("a dual-stack receiver: one sender counts per receiver address (IPv4 and IPv6), and each sequence has its own window; a copy is still a duplicate (issue 18)")
    func windowPerReceiverAddress() {
        var checker = FreshnessChecker(startedAt: Self.start)
        let me6 = IPAddress("fd00:77::65")!
        let now = Self.start + 2_000
        for c: UInt32 in 1...2000 {
            #expect(checker.admit(Self.stamp(c), destination: Self.me, nowMicros: now) == nil, "IPv4 \(c)")
        }
        // The sender's first messages to the receiver's IPv6 address: far below the IPv4 sequence, yet fresh.
        for c: UInt32 in 1...3 { #expect(checker.admit(Self.stamp(c, to: me6), destination: me6, nowMicros: now) == nil, "IPv6 \(c)") }
        #expect(checker.admit(Self.stamp(2, to: me6), destination: me6, nowMicros: now) == .duplicate)
        #expect(checker.admit(Self.stamp(2, to: me6), destination: nil, nowMicros: now) == .duplicate)
        #expect(checker.admit(Self.stamp(2000), destination: Self.me, nowMicros: now) == .duplicate)
        #expect(checker.senders == 2)
    }

    @Test("reordering inside the window is accepted, each counter once; below the window is refused (RFC 4303 §3.4.3)")
    func window() {
        var checker = FreshnessChecker(startedAt: Self.start)
        let now = Self.start + 2_000
        #expect(checker.admit(Self.stamp(10), destination: nil, nowMicros: now) == nil)
        for c: UInt32 in [9, 3, 1, 11, 5] { #expect(checker.admit(Self.stamp(c), destination: nil, nowMicros: now) == nil, "\(c)") }
        for c: UInt32 in [9, 3, 1, 11, 5, 10] { #expect(checker.admit(Self.stamp(c), destination: nil, nowMicros: now) == .duplicate, "\(c)") }
        // Move the window 1,000 on: 11 is still inside (1,011 − 11 = 1,000 < 1,024), 2 is not any more... at 1,030.
        #expect(checker.admit(Self.stamp(1_011), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(11), destination: nil, nowMicros: now) == .duplicate)
        #expect(checker.admit(Self.stamp(12), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(1_030), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(6), destination: nil, nowMicros: now) == .belowWindow)
        #expect(checker.admit(Self.stamp(1_011), destination: nil, nowMicros: now) == .duplicate)
        // A jump beyond the whole window clears it.
        #expect(checker.admit(Self.stamp(100_000), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(99_999), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(1_030), destination: nil, nowMicros: now) == .belowWindow)
    }

    @Test("every bit of the window is its own counter (shift across word boundaries)")
    func everyBit() {
        var checker = FreshnessChecker(startedAt: Self.start)
        let now = Self.start + 2_000
        // Odd counters first, then the even ones in between, out of order, in steps that cross 64-bit words.
        for c in stride(from: UInt32(1), through: 1_023, by: 2) { #expect(checker.admit(Self.stamp(c), destination: nil, nowMicros: now) == nil) }
        for c in stride(from: UInt32(1_022), through: 2, by: -2) { #expect(checker.admit(Self.stamp(c), destination: nil, nowMicros: now) == nil) }
        for c in UInt32(1)...1_023 { #expect(checker.admit(Self.stamp(c), destination: nil, nowMicros: now) == .duplicate) }
        for step: UInt32 in [1, 63, 64, 65, 127, 300] {
            var bits = [UInt64](repeating: 0, count: 16)
            bits[0] = 0b101
            bits[1] = 1 << 63
            FreshnessChecker.shift(&bits, by: step)
            var set: [UInt32] = []
            for i in 0..<1024 where bits[i / 64] & (1 << UInt64(i % 64)) != 0 { set.append(UInt32(i)) }
            #expect(set == [0, 2, 127].map { $0 + step }.filter { $0 < 1024 }, "shift \(step)")
        }
    }

    @Test("stale, future and sent-before-I-started messages are refused; a restarted sender's new id is accepted")
    func time() {
        var checker = FreshnessChecker(startedAt: Self.start)
        let s = checker.settings
        let now = Self.start + 60_000_000
        #expect(checker.admit(Self.stamp(1, at: now - s.maxAge - 1), destination: nil, nowMicros: now) == .stale)
        #expect(checker.admit(Self.stamp(1, at: now + s.maxSkew + 1), destination: nil, nowMicros: now) == .future)
        #expect(checker.admit(Self.stamp(1, at: now + s.maxSkew), destination: nil, nowMicros: now) == nil)
        // A receiver that just (re)started refuses what was sent before it started, less the skew.
        var fresh = FreshnessChecker(startedAt: now)
        #expect(fresh.admit(Self.stamp(5, at: now - s.maxSkew - 1), destination: nil, nowMicros: now + 10) == .stale)
        #expect(fresh.admit(Self.stamp(5, at: now - s.maxSkew + 1), destination: nil, nowMicros: now + 10) == nil)
        // The sender restarted: a new random id, counters from 1 again: accepted (its own new messages are never
        // refused), while the old id's copies stay refused.
        #expect(checker.admit(Self.stamp(1, sender: 8, at: now), destination: nil, nowMicros: now) == nil)
        #expect(checker.admit(Self.stamp(1, sender: 7, at: now), destination: nil, nowMicros: now) == .duplicate)
    }

    @Test("the stamp must name the datagram's destination, and be stamped at all")
    func receiver() {
        var checker = FreshnessChecker(startedAt: Self.start)
        let now = Self.start + 2_000
        #expect(checker.admit(Self.stamp(1, to: Self.other), destination: Self.me, nowMicros: now) == .wrongReceiver)
        #expect(checker.admit(Self.stamp(1), destination: Self.me, nowMicros: now) == nil)
        #expect(checker.admit(.unstamped, destination: nil, nowMicros: now) == .unstamped)
        #expect(checker.admit(Self.stamp(0), destination: nil, nowMicros: now) == .unstamped)
    }

    @Test("silent senders are forgotten once anything they could send is stale; the table is bounded")
    func forgetting() {
        var settings = FreshnessChecker.Settings()
        settings.maxSenders = 4
        var checker = FreshnessChecker(startedAt: Self.start, settings: settings)
        let now = Self.start + 2_000
        for sender: UInt64 in 1...4 { #expect(checker.admit(Self.stamp(1, sender: sender), destination: nil, nowMicros: now + sender) == nil) }
        #expect(checker.senders == 4)
        #expect(checker.admit(Self.stamp(1, sender: 5), destination: nil, nowMicros: now + 5) == nil)
        #expect(checker.senders == 4)  // the least recently heard (sender 1) went
        checker.forgetSilent(now: now + settings.maxAge + settings.maxSkew + 10)
        #expect(checker.senders == 0)
    }

    @Test("the stamper counts per receiver from 1 under one sender id")
    func stamper() {
        var stamper = ControlStamper(sender: 42)
        #expect(stamper.stamp(to: Self.me, nowMicros: 5) == ControlStamp(sender: 42, receiver: Self.me, counter: 1, sentAt: 5))
        #expect(stamper.stamp(to: Self.me, nowMicros: 6).counter == 2)
        #expect(stamper.stamp(to: Self.other, nowMicros: 6).counter == 1)
        #expect(ControlStamper().sender != 0)
    }

    @Test("the stamp travels inside the MAC'd header (since version 2): changing it breaks the MAC")
    func onTheWire() throws {
        let trust = TrustGroup(current: TrustKey(bytes: [UInt8](repeating: 3, count: 32)))
        let session = FiveTuple(srcAddr: IPAddress(10, 0, 0, 1), srcPort: 1000, dstAddr: IPAddress(10, 0, 0, 2), dstPort: 80)
        var m = ControlMessage(identity: SessionIdentity(chainID: 1, nonce: 2), requestID: 3, session: session,
                               leftAnchor: session.srcAddr, rightAnchor: session.dstAddr, body: .requestLock(rightDelta: 0))
        m.stamp = ControlStamp(sender: 0x0102_0304_0506_0708, receiver: Self.me, counter: 9, sentAt: Self.start)
        let bytes = m.encode(trust: trust)
        #expect(bytes[4] == ControlMessage.ipv4Version && bytes.count == 72 + 4 + 16)
        #expect(try ControlMessage.decode(bytes, trust: trust) == m)
        for offset in [48, 56, 60, 64, 71] {
            var tampered = bytes
            tampered[offset] ^= 1
            #expect(throws: ControlMessageError.badMAC) { try ControlMessage.decode(tampered, trust: trust) }
        }
        var old = bytes
        old[4] = 1
        #expect(throws: ControlMessageError.unsupportedVersion(1)) { try ControlMessage.decode(old, trust: trust) }
    }
}
