import DyscoCore
import Testing

@Suite("Dysco SYN trailer v2 (paper §2.1 session and hops; §2.3 authenticated, nonce, no forbidden hops)")
struct DyscoSynPayloadTests {
    let session = FiveTuple.t("10.77.0.10", 43210, "10.77.0.201", 80)
    /// The subsession the SYN carrying the trailer travels on.
    let wire = FiveTuple.t("10.77.0.10", 10001, "10.77.0.101", 80)
    let identity = SessionIdentity(chainID: 0x0123_4567_89ab_cdef, nonce: 0xfedc_ba98_7654_3210)
    let fw2 = IPAddress(10, 77, 0, 102)

    func trailer(_ remaining: [IPAddress], session: FiveTuple? = nil, identity: SessionIdentity? = nil,
                 tuple: FiveTuple? = nil, trust: TrustGroup = TestKeys.group) -> [UInt8] {
        DyscoSynPayload(identity: identity ?? self.identity, session: session ?? self.session, remaining: remaining)
            .encoded(tuple: tuple ?? wire, trust: trust)
    }

    func decode(_ bytes: [UInt8], tuple: FiveTuple? = nil, trust: TrustGroup = TestKeys.group)
        throws(DyscoSynPayload.DecodeError) -> (DyscoSynPayload, Int) {
        let tuple = tuple ?? wire
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(DyscoSynPayload.DecodeError) in try DyscoSynPayload.decode(trailerOf: raw, tuple: tuple, trust: trust) }
        }
        return try result.get()
    }

    func decodeError(_ bytes: [UInt8], tuple: FiveTuple? = nil, trust: TrustGroup = TestKeys.group)
        -> DyscoSynPayload.DecodeError? {
        do { _ = try decode(bytes, tuple: tuple, trust: trust); return nil } catch { return error }
    }

    /// Recomputes the MAC of a (mutated) trailer ending `bytes`, as an agent of the group would have signed it.
    func resigned(_ bytes: [UInt8], tuple: FiveTuple? = nil, trust: TrustGroup = TestKeys.group) -> [UInt8] {
        var copy = bytes
        let n = bytes.count, declared = Int(get16(bytes, n - 6)), start = n - declared, signed = declared - 22
        let tupleBytes = be32((tuple ?? wire).srcAddr.value) + be32((tuple ?? wire).dstAddr.value)
            + be16((tuple ?? wire).srcPort) + be16((tuple ?? wire).dstPort)
        let mac = Array(bytes[start..<start + signed]).withUnsafeBytes { a in
            tupleBytes.withUnsafeBytes { b in trust.mac(a, b) }
        }
        copy.replaceSubrange(start + signed..<start + signed + 16, with: mac)
        return copy
    }

    @Test("the group's MAC is HMAC-SHA256 truncated to 16 bytes (RFC 4231 test case 2), the same on every call from one pre-keyed state")
    func macIsHMACSHA256() throws {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?" (the key padded: a TrustKey has ≥ 16 bytes,
        // and HMAC pads a short key with zeros, so "Jefe" + 12 zero bytes gives the same MAC).
        let key = TrustKey(bytes: Array("Jefe".utf8) + [UInt8](repeating: 0, count: 12))
        let group = TrustGroup(current: key)
        let expected: [UInt8] = [0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7]
        let data = Array("what do ya want for nothing?".utf8)
        for _ in 0..<3 {
            #expect(data.withUnsafeBytes { group.mac($0) } == expected)
            // Split into two parts: the same MAC (the parts are concatenated).
            #expect(data[..<10].withUnsafeBytes { a in data[10...].withUnsafeBytes { b in group.mac(a, b) } } == expected)
            #expect(expected.withUnsafeBytes { tag in data.withUnsafeBytes { group.verify(tag, $0) } })
        }
        // Under rotation the previous key still verifies, and never signs.
        let rotated = TrustGroup(current: TestKeys.current, previous: key)
        #expect(expected.withUnsafeBytes { tag in data.withUnsafeBytes { rotated.verify(tag, $0) } })
        #expect(data.withUnsafeBytes { rotated.mac($0) } != expected)
    }

    @Test("round trip with 0, 1 and 16 addresses, after arbitrary leading payload (TFO data)", arguments: [0, 1, 16])
    func roundTrip(count: Int) throws {
        let hops = (0..<count).map { IPAddress(10, 77, 0, UInt8(100 + $0)) }
        let encoded = trailer(hops)
        #expect(encoded.count == 54 + 4 * count)
        let leading: [UInt8] = [9, 8, 7]
        let (decoded, length) = try decode(leading + encoded)
        #expect(decoded == DyscoSynPayload(identity: identity, session: session, remaining: hops))
        #expect(length == encoded.count)
        #expect((leading + encoded).withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
    }

    @Test("layout: fields at the documented offsets; the MAC is HMAC-SHA256/16 over bytes 0..<32+4n and the tuple")
    func layout() throws {
        let key = TrustKey(hex: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")!
        let bytes = trailer([fw2, session.dstAddr], trust: TrustGroup(current: key))
        let hex = bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        // Golden vector; the MAC part was computed independently with Python's hmac/hashlib:
        // hmac.new(key, bytes[0:40] + inet_aton("10.77.0.10") + inet_aton("10.77.0.101")
        //          + pack(">HH", 10001, 80), sha256).digest()[:16]
        let expected = "02040200" + "0123456789abcdef" + "fedcba9876543210" + "0a4d000a" + "0a4d00c9" + "a8ca" + "0050"
            + "0a4d0066" + "0a4d00c9"
        #expect(hex.prefix(80) == expected, "header, identity, session and hops")
        #expect(hex.suffix(12) == "003e44595343", "block length 62, magic")
        #expect(bytes.count == 62)
        #expect(hex == goldenTrailerHex, "MAC as computed by Python (interoperability with the lab's forger)")
    }

    @Test("§2.1 renamed upstream: flag bit 0 of byte 3, under the MAC; absent by default; flipping it breaks the MAC")
    func renamedUpstream() throws {
        let plain = trailer([fw2])
        var flagged = DyscoSynPayload(identity: identity, session: session, remaining: [fw2], renamedUpstream: true)
        let bytes = flagged.encoded(tuple: wire, trust: TestKeys.group)
        #expect(plain[3] == 0 && bytes[3] == 1)
        #expect(try decode(plain).0.renamedUpstream == false)
        let (decoded, length) = try decode(bytes)
        #expect(decoded == flagged && length == bytes.count)
        var forged = plain
        forged[3] = 1  // an on-path rewrite of the flag without the key
        #expect(decodeError(forged) == .badMAC)
        flagged.renamedUpstream = false
        #expect(try decode(plain).0 == flagged)
    }

    @Test("IPv6 (family 6): 16-byte addresses, fixed length 78, the MAC over the 36-byte tuple; round trip with 0, 1 and 16 hops",
          arguments: [0, 1, 16])
    func ipv6RoundTrip(count: Int) throws {
        let session6 = FiveTuple.t("fd00:77::10", 43210, "fd00:77::c9", 80)
        let wire6 = FiveTuple.t("fd00:77::10", 10001, "fd00:77::65", 80)
        let hops = (0..<count).map { IPAddress(high: 0xfd00_0077_0000_0000, low: UInt64(0x100 + $0)) }
        let payload = DyscoSynPayload(identity: identity, session: session6, remaining: hops)
        let encoded = payload.encoded(tuple: wire6, trust: TestKeys.group)
        #expect(encoded.count == 78 + 16 * count && encoded.count <= DyscoSynPayload.maxLength)
        #expect(encoded[1] == 6)
        #expect(Array(encoded[20..<36]) == session6.srcAddr.ipv6Bytes && Array(encoded[52..<54]) == [0xa8, 0xca])
        if count > 0 { #expect(Array(encoded[56..<72]) == hops[0].ipv6Bytes) }
        let (decoded, length) = try decode([1, 2] + encoded, tuple: wire6)
        #expect(decoded == payload && length == encoded.count)
        // Replayed on another IPv6 tuple, or under the IPv4 packet's tuple: refused.
        #expect(decodeError(encoded, tuple: FiveTuple.t("fd00:77::11", 10001, "fd00:77::65", 80)) == .badMAC)
        #expect(decodeError(encoded, tuple: wire) == .unsupportedFamily(6))
        #expect(decodeError(trailer([fw2]), tuple: wire6) == .unsupportedFamily(4))
        // Every single-byte change is refused.
        for index in encoded.indices {
            var bytes = encoded
            bytes[index] ^= 0x41
            #expect(decodeError(bytes, tuple: wire6) != nil, "byte \(index) accepted")
        }
    }

    @Test("IPv6 forbidden hops (::1, fe80::/10, ff00::/8, ::) and an IPv4 hop in an IPv6 trailer are refused after the MAC")
    func ipv6ForbiddenHops() throws {
        let session6 = FiveTuple.t("fd00:77::10", 43210, "fd00:77::c9", 80)
        let wire6 = FiveTuple.t("fd00:77::10", 10001, "fd00:77::65", 80)
        for bad in ["::1", "fe80::1", "ff02::1", "::", "::5"] {
            let hop = try #require(IPAddress(bad))
            let bytes = DyscoSynPayload(identity: identity, session: session6, remaining: [hop])
                .encoded(tuple: wire6, trust: TestKeys.group)
            #expect(decodeError(bytes, tuple: wire6) == .forbiddenAddress(hop), "\(bad)")
        }
        // An IPv4-mapped hop written by a (buggy) peer into a family-6 trailer: its 16 bytes decode to the IPv4
        // address, which is not of the trailer's family.
        var bytes = DyscoSynPayload(identity: identity, session: session6, remaining: [session6.dstAddr])
            .encoded(tuple: wire6, trust: TestKeys.group)
        bytes.replaceSubrange(56..<72, with: IPAddress(10, 77, 0, 1).ipv6Bytes)
        bytes = resigned6(bytes, tuple: wire6)
        #expect(decodeError(bytes, tuple: wire6) == .forbiddenAddress(IPAddress(10, 77, 0, 1)))
    }

    func resigned6(_ bytes: [UInt8], tuple: FiveTuple) -> [UInt8] {
        var copy = bytes
        let n = bytes.count, declared = Int(get16(bytes, n - 6)), start = n - declared, signed = declared - 22
        let tupleBytes = tuple.srcAddr.ipv6Bytes + tuple.dstAddr.ipv6Bytes + be16(tuple.srcPort) + be16(tuple.dstPort)
        let mac = Array(bytes[start..<start + signed]).withUnsafeBytes { a in tupleBytes.withUnsafeBytes { b in TestKeys.group.mac(a, b) } }
        copy.replaceSubrange(start + signed..<start + signed + 16, with: mac)
        return copy
    }

    @Test("no magic: not a Dysco SYN, and decode says so")
    func noMagic() {
        var bytes = trailer([])
        bytes[bytes.count - 1] ^= 0xff
        #expect(!bytes.withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
        #expect(![UInt8]().withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
        #expect(decodeError(bytes) == .noMagic)
    }

    @Test("every single-byte change of a valid trailer is rejected, with or without leading payload",
          arguments: [0, 2])
    func everyByteFlip(hops: Int) {
        let good = trailer(Array([fw2, session.dstAddr].prefix(hops)))
        for leading in [[UInt8](), [UInt8](repeating: 2, count: 70)] {
            let base = leading + good
            for index in leading.count..<base.count {
                for mask: UInt8 in [0x01, 0x02, 0x10, 0x80, 0xff] {
                    var bytes = base
                    bytes[index] ^= mask
                    let error = decodeError(bytes)
                    #expect(error != nil, "byte \(index - leading.count) ^ \(mask) accepted")
                }
            }
            #expect(decodeError(base) == nil)
        }
    }

    @Test("the same trailer on another tuple is rejected (badMAC): no replay on another subsession")
    func otherTuple() {
        let bytes = trailer([session.dstAddr])
        var others = [wire.reversed]
        others.append(FiveTuple(srcAddr: wire.srcAddr, srcPort: wire.srcPort + 1, dstAddr: wire.dstAddr, dstPort: wire.dstPort))
        others.append(FiveTuple(srcAddr: wire.srcAddr, srcPort: wire.srcPort, dstAddr: wire.dstAddr, dstPort: 81))
        others.append(FiveTuple(srcAddr: IPAddress(10, 77, 0, 66), srcPort: wire.srcPort, dstAddr: wire.dstAddr, dstPort: 80))
        others.append(FiveTuple(srcAddr: wire.srcAddr, srcPort: wire.srcPort, dstAddr: fw2, dstPort: 80))
        for other in others { #expect(decodeError(bytes, tuple: other) == .badMAC, "\(other)") }
        #expect(decodeError(bytes, tuple: wire) == nil)
    }

    @Test("a wrong key is rejected (badMAC)")
    func wrongKey() {
        #expect(decodeError(trailer([session.dstAddr], trust: TestKeys.wrong)) == .badMAC)
        #expect(decodeError(trailer([session.dstAddr]), trust: TestKeys.wrong) == .badMAC)
    }

    @Test("rotation: the previous key is accepted only when configured, and never signs")
    func rotation() throws {
        let old = TestKeys.current, new = TestKeys.previous
        let signedOld = trailer([session.dstAddr], trust: TrustGroup(current: old))
        let signedNew = trailer([session.dstAddr], trust: TrustGroup(current: new))
        let rotating = TrustGroup(current: new, previous: old)
        #expect(decodeError(signedOld, trust: rotating) == nil)
        #expect(decodeError(signedNew, trust: rotating) == nil)
        #expect(decodeError(signedOld, trust: TrustGroup(current: new)) == .badMAC)
        // An agent in the first step of a rotation (signs OLD, also accepts NEW).
        #expect(decodeError(signedNew, trust: TrustGroup(current: old, previous: new)) == nil)
        // What a rotating agent sends is signed with its current key only.
        let fromRotating = trailer([session.dstAddr], trust: rotating)
        #expect(decodeError(fromRotating, trust: TrustGroup(current: new)) == nil)
        #expect(decodeError(fromRotating, trust: TrustGroup(current: old)) == .badMAC)
    }

    @Test("version 1 trailers are refused with their own error", arguments: [0, 1, 3])
    func versionOne(hops: Int) {
        let v1 = versionOneTrailer(session: session, remaining: Array(repeating: session.dstAddr, count: hops))
        #expect(v1.count == 22 + 4 * hops)
        #expect(v1.withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
        #expect(decodeError(v1) == .versionOneRefused)
        #expect(decodeError([1, 2, 3] + v1) == .versionOneRefused)
    }

    @Test("forbidden addresses (loopback, multicast, broadcast, unspecified, link-local) are refused after the MAC",
          arguments: ["127.0.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0", "169.254.1.1", "240.0.0.1"])
    func forbidden(text: String) {
        let bad = IPAddress(text)!
        let dst = FiveTuple(srcAddr: session.srcAddr, srcPort: session.srcPort, dstAddr: bad, dstPort: 80)
        let src = FiveTuple(srcAddr: bad, srcPort: session.srcPort, dstAddr: session.dstAddr, dstPort: 80)
        #expect(decodeError(trailer([], session: dst)) == .forbiddenAddress(bad), "session destination")
        #expect(decodeError(trailer([bad], session: dst)) == .forbiddenAddress(bad), "session destination and hop")
        #expect(decodeError(trailer([session.dstAddr], session: src)) == .forbiddenAddress(bad), "session source")
        #expect(decodeError(trailer([bad, session.dstAddr])) == .forbiddenAddress(bad), "next hop")
        #expect(decodeError(trailer([fw2, bad])) == .forbiddenAddress(bad), "a later hop")
    }

    @Test("structural errors behind a valid MAC are reported, never trusted")
    func malformed() {
        let good = trailer([fw2])
        func mutated(_ body: (inout [UInt8]) -> Void) -> [UInt8] {
            var copy = good
            body(&copy)
            return resigned(copy)
        }
        let n = good.count
        #expect(decodeError(Array(good.suffix(5))) == .tooShort(available: 5))
        #expect(decodeError(mutated { $0[0] = 3 }) == .unsupportedVersion(3))
        #expect(decodeError(mutated { $0[1] = 6 }) == .unsupportedFamily(6))
        #expect(decodeError(mutated { $0[2] = 2 }) == .badLength(declared: 58, addresses: 2))
        #expect(decodeError(mutated { $0[2] = 17 }) == .tooManyAddresses(17))
        #expect(decodeError(mutated { $0[3] = 2 }) == .reservedNotZero)
        #expect(decodeError(mutated { $0[3] = 0x81 }) == .reservedNotZero)
        #expect(decodeError(mutated { $0.replaceSubrange(4..<12, with: [UInt8](repeating: 0, count: 8)) }) == .zeroIdentity)
        #expect(decodeError(mutated { $0[28] = 0; $0[29] = 0 }) == .zeroAddress)
        #expect(decodeError(mutated { $0[30] = 0; $0[31] = 0 }) == .zeroAddress)
        // Declared length longer than the payload, or not 54 + 4n.
        var long = good
        long[n - 6] = 1
        #expect(decodeError(long) == .badLength(declared: 256 + Int(good[n - 5]), addresses: -1))
        var odd = good  // declared 67: its start falls on leading bytes (version 2, family 4), but 67 is not 54 + 4n
        odd[n - 5] = UInt8(n + 5)
        #expect(decodeError([2, 2, 2, 2, 2, 2, 4, 2, 2, 2] + odd) == .badLength(declared: n + 5, addresses: -1))
        // The family byte fixes the layout: anything but 4 or 6 is refused before the length is judged.
        #expect(decodeError([UInt8](repeating: 2, count: 10) + odd) == .unsupportedFamily(2))
        // Unchanged bytes re-signed still decode (the helper is right).
        #expect(decodeError(mutated { _ in }) == nil)
    }

    @Test("random buffers and random mutations never crash the decoder")
    func fuzz() {
        var rng = SplitMix64(state: 6)
        let magic: [UInt8] = [0x44, 0x59, 0x53, 0x43]
        for _ in 0..<20000 {
            var bytes = (0..<Int.random(in: 0...160, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if Bool.random(using: &rng) { bytes += magic }
            if bytes.count >= 6, Bool.random(using: &rng) {
                // Plausible length fields make the decoder go deeper.
                let declared = UInt16.random(in: 0...UInt16(bytes.count), using: &rng)
                bytes[bytes.count - 6] = UInt8(declared >> 8)
                bytes[bytes.count - 5] = UInt8(declared & 0xff)
                if declared > 0, Bool.random(using: &rng) { bytes[bytes.count - Int(declared)] = 2 }
            }
            if let (decoded, length) = try? decode(bytes) {
                Issue.record("random bytes decoded: \(decoded), \(length)")
            }
        }
        let hops = [fw2, IPAddress(10, 77, 0, 103), session.dstAddr]
        let good = [UInt8](repeating: 7, count: 20) + trailer(hops)
        for _ in 0..<20000 {
            var bytes = good
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let index = Int.random(in: 20..<bytes.count, using: &rng)
                bytes[index] ^= UInt8.random(in: 1...255, using: &rng)
            }
            if Int.random(in: 0..<8, using: &rng) == 0 { bytes.removeFirst(Int.random(in: 1...40, using: &rng)) }
            if let (decoded, _) = try? decode(bytes) {
                Issue.record("mutated trailer accepted: \(decoded)")
            }
        }
    }
}

/// The layout test's trailer (key 00 01 … 1f, identity 0123456789abcdef/fedcba9876543210, session
/// 10.77.0.10:43210 → 10.77.0.201:80, hops 10.77.0.102, 10.77.0.201, tuple 10.77.0.10:10001 → 10.77.0.101:80).
let goldenTrailerHex = "020402000123456789abcdeffedcba98765432100a4d000a0a4d00c9a8ca00500a4d00660a4d00c9"
    + "ceae56711f5140697d7699e89733e5ab003e44595343"
