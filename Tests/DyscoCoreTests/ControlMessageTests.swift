@testable import DyscoCore
import Testing

@Suite("Control message codec (paper §3.3: control signaling as UDP packets, not in the TCP byte stream)")
struct ControlMessageTests {
    static let keyA = TrustKey(bytes: Array(repeating: 0xA1, count: 32))
    static let keyB = TrustKey(bytes: (0..<32).map { UInt8($0) })
    static let keyC = TrustKey(bytes: Array(repeating: 0x5C, count: 16))
    static let trust = TrustGroup(current: keyA)

    static let session = FiveTuple(srcAddr: IPAddress(10, 77, 0, 10), srcPort: 43210,
                                   dstAddr: IPAddress(10, 77, 0, 201), dstPort: 80)
    static let subsession = FiveTuple(srcAddr: IPAddress(10, 77, 1, 1), srcPort: 40001,
                                      dstAddr: IPAddress(10, 77, 2, 2), dstPort: 40002)
    static let identity = SessionIdentity(chainID: 0x0123_4567_89AB_CDEF, nonce: 0xFEDC_BA98_7654_3210)

    /// A typical body of each type. The switch is exhaustive, so a new type does not compile without a sample.
    static func sampleBody(_ type: ControlMessageType) -> ControlBody {
        switch type {
        case .trigger:
            .trigger(Trigger(newPath: [IPAddress(10, 77, 0, 105), IPAddress(10, 77, 0, 200)],
                             oldBox: IPAddress(10, 77, 0, 104), stateful: true, deadlineMilliseconds: 5000))
        case .triggerResult:
            .triggerResult(TriggerResult(outcome: .cancelled, reason: "new path: no answer from 10.77.0.105",
                                         failedStep: .newPath,
                                         phases: PhaseTimes(lockEnd: 120, newPathEnd: 4_000_000, drainEnd: 0xFFFF_FFFF)))
        case .requestLock: .requestLock(rightDelta: -1234)
        case .ackLock: .ackLock(leftDelta: Int32.min, rightDelta: Int32.max)
        case .nackLock: .nackLock(reason: .contention)
        case .cancelLock: .cancelLock(reason: "deadline passed — année")
        case .ackCancel: .ackCancel
        case .newPathSyn: .newPathSyn(subsession: subsession, remaining: [IPAddress(10, 77, 0, 200)])
        case .newPathSynAck: .newPathSynAck(subsession: subsession)
        case .newPathCancel: .newPathCancel
        case .newPathCancelAck: .newPathCancelAck
        case .newPathRefused: .newPathRefused(reason: "this box is on the session's path already")
        case .drainStart: .drainStart(stateful: true)
        case .drained: .drained
        case .stateRequest: .stateRequest(newBox: IPAddress(10, 77, 0, 105))
        case .statePut: .statePut(document: Array(#"{"format":"dysco-conntrack-state","version":1,"entries":[]}"#.utf8))
        case .stateInstalled: .stateInstalled(ok: false, times: StateTimes(exportMicroseconds: 1500, importMicroseconds: 2),
                                              reason: "conntrack: EEXIST")
        case .oldPathFin: .oldPathFin
        case .oldPathFinAck: .oldPathFinAck
        case .splice: .splice(SpliceNotice(tsDelta: -77, alias: (identity, subsession)))
        }
    }

    /// The body length each sample must encode to (the layouts of docs/CONTROL-PROTOCOL.md).
    static func expectedBodyLength(_ body: ControlBody) -> Int {
        switch body {
        case .trigger(let t): 10 + 4 * t.newPath.count
        case .triggerResult(let r): 4 + r.reason.utf8.count + (r.phases == nil ? 0 : 36)
        case .requestLock: 4
        case .ackLock: 8
        case .nackLock: 1
        case .cancelLock(let reason), .newPathRefused(let reason): 1 + reason.utf8.count
        case .newPathSyn(_, let remaining): 13 + 4 * remaining.count
        case .newPathSynAck: 12
        case .drainStart: 1
        case .stateRequest: 4
        case .statePut(let document): 2 + document.count
        case .stateInstalled(_, _, let reason): 10 + reason.utf8.count
        case .ackCancel, .newPathCancel, .newPathCancelAck, .drained, .oldPathFin, .oldPathFinAck: 0
        case .splice(let n): 5 + (n.alias == nil ? 0 : 28)
        }
    }

    static func message(_ body: ControlBody, session: FiveTuple = session,
                        left: IPAddress = IPAddress(10, 77, 0, 10),
                        right: IPAddress = IPAddress(10, 77, 0, 200),
                        identity: SessionIdentity = identity) -> ControlMessage {
        ControlMessage(identity: identity, requestID: 0xDEAD_BEEF, session: session,
                       leftAnchor: left, rightAnchor: right, body: body)
    }

    static func sample(_ type: ControlMessageType) -> ControlMessage { message(sampleBody(type)) }

    /// The error decode throws, or nil when it decodes.
    static func decodeError(_ bytes: [UInt8], trust: TrustGroup = trust) -> ControlMessageError? {
        do {
            _ = try ControlMessage.decode(bytes, trust: trust)
            return nil
        } catch {
            return error
        }
    }

    /// `bytes`' header (first 72 bytes) with `type` and `body`, bodyLength fixed and signed under `trust`:
    /// crafts messages that pass every check up to the MAC.
    static func resigned(_ bytes: [UInt8], type: ControlMessageType? = nil, body: [UInt8], trust: TrustGroup = trust) -> [UInt8] {
        var out = Array(bytes[0..<ControlMessage.headerLength])
        if let type { out[5] = type.rawValue }
        out[6] = UInt8(body.count >> 8)
        out[7] = UInt8(body.count & 0xFF)
        out += body
        out += out.withUnsafeBytes { trust.mac($0) }
        return out
    }

    static func bodyBytes(_ encoded: [UInt8]) -> [UInt8] {
        Array(encoded[ControlMessage.headerLength..<(encoded.count - TrustGroup.macLength)])
    }

    static func crafted(_ type: ControlMessageType, _ body: [UInt8]) -> [UInt8] {
        resigned(sample(.ackCancel).encode(trust: trust, version: ControlMessage.ipv4Version), type: type, body: body)
    }

    static func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    // MARK: Round trips

    @Test("every type round-trips, with the documented body length", arguments: ControlMessageType.allCases)
    func roundTrip(type: ControlMessageType) throws {
        let message = Self.sample(type)
        #expect(message.body.type == type)
        let encoded = message.encode(trust: Self.trust)
        let bodyLength = Self.expectedBodyLength(message.body)
        #expect(encoded.count == ControlMessage.headerLength + bodyLength + TrustGroup.macLength)
        #expect(Int(encoded[6]) << 8 | Int(encoded[7]) == bodyLength)
        #expect(encoded[5] == type.rawValue)
        let decoded = try ControlMessage.decode(encoded, trust: Self.trust)
        #expect(decoded == message)
        #expect(decoded.encode(trust: Self.trust) == encoded)
    }

    @Test("the samples cover every type exactly once; raw values and names are the documented ones")
    func typeTable() {
        #expect(ControlMessageType.allCases.count == 20)
        #expect(Set(ControlMessageType.allCases.map { Self.sampleBody($0).type }) == Set(ControlMessageType.allCases))
        #expect(ControlMessageType.allCases.map(\.rawValue) == [1, 2, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 30, 31, 40, 41, 42, 50, 51, 60])
        #expect(ControlMessageType.requestLock.description == "requestLock")
        #expect(ControlMessageType.newPathCancelAck.description == "newPathCancelAck")
        #expect(Set(ControlMessageType.allCases.map(\.description)).count == 20)
        #expect(NackReason.contention.rawValue == 1 && NackReason.busy.rawValue == 4)
    }

    @Test("header layout: big-endian fields at their documented offsets")
    func headerLayout() {
        let encoded = Self.sample(.requestLock).encode(trust: Self.trust)
        #expect(Array(encoded[0..<4]) == Array("DYCM".utf8))
        #expect(encoded[4] == 4)
        #expect(encoded[5] == 10)
        #expect(Array(encoded[6..<8]) == [0, 4])
        #expect(Array(encoded[8..<16]) == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF])
        #expect(Array(encoded[16..<24]) == [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10])
        #expect(Array(encoded[24..<28]) == [0xDE, 0xAD, 0xBE, 0xEF])
        #expect(Array(encoded[28..<32]) == [10, 77, 0, 10])
        #expect(Array(encoded[32..<36]) == [10, 77, 0, 201])
        #expect(Array(encoded[36..<38]) == Self.be16(43210))
        #expect(Array(encoded[38..<40]) == [0, 80])
        #expect(Array(encoded[40..<44]) == [10, 77, 0, 10])
        #expect(Array(encoded[44..<48]) == [10, 77, 0, 200])
        #expect(Array(encoded[48..<72]) == [UInt8](repeating: 0, count: 24))  // unstamped (the agent stamps at send)
        #expect(Array(encoded[72..<76]) == Self.be32(UInt32(bitPattern: -1234)))
        let tag = encoded.withUnsafeBytes { Self.trust.mac(UnsafeRawBufferPointer(rebasing: $0[0..<76])) }
        #expect(Array(encoded[76...]) == tag)
        #expect(ControlMessage.port == 7411)
    }

    @Test("body layouts, byte for byte")
    func bodyLayouts() throws {
        func body(_ b: ControlBody) -> [UInt8] { Self.bodyBytes(Self.message(b).encode(trust: Self.trust)) }
        #expect(body(.trigger(Trigger(newPath: [IPAddress(10, 0, 0, 1)], oldBox: IPAddress(10, 0, 0, 2),
                                      stateful: true, deadlineMilliseconds: 0x0102_0304)))
                == [1, 2, 3, 4, 10, 0, 0, 2, 1, 1, 10, 0, 0, 1])
        // Version 4 (issue 17): byte 8 is the mode; held (2) is a deletion's or an insertion's default.
        #expect(body(.trigger(Trigger(newPath: [IPAddress(10, 0, 0, 1)], oldBox: IPAddress(10, 0, 0, 2),
                                      mode: .held, deadlineMilliseconds: 0x0102_0304)))
                == [1, 2, 3, 4, 10, 0, 0, 2, 2, 1, 10, 0, 0, 1])
        for mode in TransferMode.allCases {
            let m = Self.message(.trigger(Trigger(newPath: [IPAddress(10, 0, 0, 1)], oldBox: IPAddress(10, 0, 0, 2),
                                                  mode: mode, deadlineMilliseconds: 5)))
            #expect(try ControlMessage.decode(m.encode(trust: Self.trust), trust: Self.trust) == m, "\(mode)")
        }
        // Version 3: failedStep is a code (0 none, 1 lock ... 6 teardown), the phase times nine named u32 fields.
        #expect(body(.triggerResult(TriggerResult(outcome: .refused, reason: "ab", failedStep: .lock,
                                                  phases: PhaseTimes(lockEnd: 7, exportMicroseconds: 0x0102_0304, newPathSynToUse: 9))))
                == [2, 2, 0x61, 0x62, 1, 1] + [0, 0, 0, 7] + [UInt8](repeating: 0, count: 20) + [1, 2, 3, 4]
                + [0, 0, 0, 0] + [0, 0, 0, 9])
        #expect(body(.triggerResult(TriggerResult(outcome: .moved))) == [0, 0, 0, 0])
        #expect(body(.triggerResult(TriggerResult(outcome: .cancelled, failedStep: .teardown))) == [1, 0, 6, 0])
        #expect(body(.ackLock(leftDelta: -1, rightDelta: 2)) == [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 2])
        #expect(body(.nackLock(reason: .notOnPath)) == [3])
        #expect(body(.cancelLock(reason: "x")) == [1, 0x78])
        #expect(body(.newPathSyn(subsession: Self.subsession, remaining: [IPAddress(10, 0, 0, 9)]))
                == [10, 77, 1, 1, 10, 77, 2, 2] + Self.be16(40001) + Self.be16(40002) + [1, 10, 0, 0, 9])
        #expect(body(.newPathSynAck(subsession: Self.subsession))
                == [10, 77, 1, 1, 10, 77, 2, 2] + Self.be16(40001) + Self.be16(40002))
        #expect(body(.drainStart(stateful: false)) == [0])
        #expect(body(.stateRequest(newBox: IPAddress(10, 1, 2, 3))) == [10, 1, 2, 3])
        #expect(body(.statePut(document: [0x7B, 0x7D])) == [0, 2, 0x7B, 0x7D])
        #expect(body(.stateInstalled(ok: true, times: StateTimes(), reason: "")) == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(body(.stateInstalled(ok: false, times: StateTimes(exportMicroseconds: 0x0102_0304, importMicroseconds: 5),
                                     reason: "x"))
                == [0, 1, 2, 3, 4, 0, 0, 0, 5, 1, 0x78])
    }

    @Test("limits round-trip: 15 addresses, 200-byte reasons, every step, full phase times, a 60,000-byte document")
    func limits() throws {
        let path15 = (1...15).map { IPAddress(10, 77, 3, UInt8($0)) }
        let reason200 = String(repeating: "é", count: 100)  // 200 bytes
        let bodies: [ControlBody] = [
            .trigger(Trigger(newPath: path15, oldBox: IPAddress(10, 77, 0, 104), stateful: false, deadlineMilliseconds: 0)),
            .triggerResult(TriggerResult(outcome: .moved, reason: "", failedStep: nil, phases: nil)),
            .triggerResult(TriggerResult(outcome: .refused, reason: reason200, failedStep: .teardown,
                                         phases: PhaseTimes(lockEnd: .max, newPathEnd: 1, drainEnd: 2, stateEnd: 3, releaseEnd: 4,
                                                            teardownEnd: 5, exportMicroseconds: 6, importMicroseconds: 7,
                                                            newPathSynToUse: .max))),
            .newPathSyn(subsession: Self.subsession, remaining: []),
            .newPathSyn(subsession: Self.subsession, remaining: path15),
            .cancelLock(reason: reason200),
            .cancelLock(reason: ""),
            .stateInstalled(ok: true, times: StateTimes(exportMicroseconds: .max, importMicroseconds: .max), reason: reason200),
            .statePut(document: (0..<60_000).map { UInt8(truncatingIfNeeded: $0) }),
            .statePut(document: []),
        ]
        for body in bodies {
            let message = Self.message(body)
            #expect(message.encodingProblem == nil)
            let decoded = try ControlMessage.decode(message.encode(trust: Self.trust), trust: Self.trust)
            #expect(decoded == message)
        }
    }

    @Test("encode truncates over-long strings at a UTF-8 boundary; encodingProblem names over-long lists")
    func encodeLimits() throws {
        let long = Self.message(.cancelLock(reason: "a" + String(repeating: "é", count: 150)))  // 301 bytes
        let decoded = try ControlMessage.decode(long.encode(trust: Self.trust), trust: Self.trust)
        guard case .cancelLock(let reason) = decoded.body else { Issue.record("wrong body"); return }
        #expect(reason == "a" + String(repeating: "é", count: 99))  // 199 bytes: the 200th would split an é
        for step in MigrationStep.allCases {
            let message = Self.message(.triggerResult(TriggerResult(outcome: .refused, reason: "r", failedStep: step)))
            guard case .triggerResult(let r) = try ControlMessage.decode(message.encode(trust: Self.trust), trust: Self.trust).body
            else { Issue.record("wrong body"); return }
            #expect(r.failedStep == step)
        }

        #expect(Self.message(.trigger(Trigger(newPath: [], oldBox: IPAddress(10, 0, 0, 1), stateful: false,
                                              deadlineMilliseconds: 1))).encodingProblem != nil)
        #expect(Self.message(.newPathSyn(subsession: Self.subsession,
                                         remaining: Array(repeating: IPAddress(10, 0, 0, 1), count: 16))).encodingProblem != nil)
        #expect(Self.message(.statePut(document: Array(repeating: 0x20, count: 60_001))).encodingProblem != nil)
    }

    // MARK: Framing and MAC

    @Test("every truncation of a valid message fails with a typed error; so does one extra byte", arguments: ControlMessageType.allCases)
    func truncations(type: ControlMessageType) {
        let encoded = Self.sample(type).encode(trust: Self.trust)
        for length in 0..<encoded.count {
            let error = Self.decodeError(Array(encoded[0..<length]))
            if length < ControlMessage.headerLength + TrustGroup.macLength {
                #expect(error == .truncated(length: length), "length \(length)")
            } else {
                #expect(error == .lengthMismatch(declared: encoded.count, actual: length), "length \(length)")
            }
        }
        #expect(Self.decodeError(encoded + [0]) == .lengthMismatch(declared: encoded.count, actual: encoded.count + 1))
    }

    @Test("every single-byte flip of a valid message fails at the MAC or an earlier check", arguments: ControlMessageType.allCases)
    func byteFlips(type: ControlMessageType) {
        let encoded = Self.sample(type).encode(trust: Self.trust)
        #expect(Self.decodeError(encoded) == nil)
        for index in encoded.indices {
            for mask: UInt8 in [0x01, 0x80, 0xFF] {
                var bytes = encoded
                bytes[index] ^= mask
                let error = Self.decodeError(bytes)
                let allowed: Bool = switch error {
                case .badMAC, .badMagic, .unsupportedVersion, .unknownType, .lengthMismatch: true
                default: false
                }
                #expect(allowed, "flip \(mask) at \(index): \(String(describing: error))")
                if index >= 8 { #expect(error == .badMAC, "flip at \(index) past the framing fields") }
            }
        }
    }

    @Test("key rotation: the previous key is accepted only while the group holds it; only the current key signs")
    func keyRotation() throws {
        let oldSigned = Self.sample(.requestLock).encode(trust: TrustGroup(current: Self.keyA))
        let rotating = TrustGroup(current: Self.keyB, previous: Self.keyA)
        let rotated = TrustGroup(current: Self.keyB)
        #expect(try ControlMessage.decode(oldSigned, trust: rotating) == Self.sample(.requestLock))
        #expect(Self.decodeError(oldSigned, trust: rotated) == .badMAC)

        let newSigned = Self.sample(.requestLock).encode(trust: rotating)
        #expect(newSigned != oldSigned)
        #expect(try ControlMessage.decode(newSigned, trust: rotated) == Self.sample(.requestLock))
        #expect(Self.decodeError(newSigned, trust: TrustGroup(current: Self.keyA)) == .badMAC)
        // A group whose previous key is A still signs with B, never with A.
        #expect(newSigned == Self.sample(.requestLock).encode(trust: rotated))
    }

    @Test("a message under a key outside the group is rejected", arguments: ControlMessageType.allCases)
    func wrongKey(type: ControlMessageType) {
        let encoded = Self.sample(type).encode(trust: TrustGroup(current: Self.keyC))
        #expect(Self.decodeError(encoded) == .badMAC)
        #expect(Self.decodeError(encoded, trust: TrustGroup(current: Self.keyB, previous: Self.keyA)) == .badMAC)
        var zeroTag = encoded
        for i in (zeroTag.count - TrustGroup.macLength)..<zeroTag.count { zeroTag[i] = 0 }
        #expect(Self.decodeError(zeroTag) == .badMAC)
    }

    @Test("framing errors: magic, version, type, too long")
    func framing() {
        let good = Self.sample(.drained).encode(trust: Self.trust, version: ControlMessage.ipv4Version)
        var bytes = good
        bytes[0] = 0x45
        #expect(Self.decodeError(bytes) == .badMagic)
        bytes = good
        bytes[4] = 1  // version 1 (no freshness stamp, issue 20) is refused
        #expect(Self.decodeError(bytes) == .unsupportedVersion(1))
        bytes = good
        bytes[4] = 2  // version 2 (phase times inside strings, issue 15) is refused
        #expect(Self.decodeError(bytes) == .unsupportedVersion(2))
        bytes = good
        bytes[4] = 3  // version 3 (the trigger's boolean stateful, issue 17) is refused: 0.19 and 0.20 speak 4
        #expect(Self.decodeError(bytes) == .unsupportedVersion(3))
        bytes = good
        bytes[4] = 5  // a version-4 message relabelled 5: its 16-byte-address header would be longer than the datagram
        #expect(Self.decodeError(bytes) == .lengthMismatch(declared: bytes.count + 60, actual: bytes.count))
        bytes = good
        bytes[4] = 6
        #expect(Self.decodeError(bytes) == .unsupportedVersion(6))
        for raw: UInt8 in [0, 3, 9, 15, 25, 32, 43, 52, 255] {
            bytes = good
            bytes[5] = raw
            #expect(Self.decodeError(bytes) == .unknownType(raw))
        }
        #expect(Self.decodeError(Array(repeating: 0, count: ControlMessage.maxLength + 1))
                == .tooLong(length: ControlMessage.maxLength + 1))
        // A header declaring a huge body that the datagram does not hold.
        bytes = good
        bytes[6] = 0xFF
        bytes[7] = 0xFF
        #expect(Self.decodeError(bytes) == .lengthMismatch(declared: 72 + 0xFFFF + 16, actual: good.count))
    }

    // MARK: Authenticated content

    @Test("a zero chain ID is rejected even when signed")
    func zeroIdentity() {
        let encoded = Self.message(.ackCancel, identity: SessionIdentity(chainID: 0, nonce: 5)).encode(trust: Self.trust)
        #expect(Self.decodeError(encoded) == .zeroIdentity)
        #expect(Self.decodeError(encoded)?.counterName == "zero-identity")
        let nonceZero = Self.message(.ackCancel, identity: SessionIdentity(chainID: 1, nonce: 0))
        #expect(Self.decodeError(nonceZero.encode(trust: Self.trust)) == nil)
    }

    static let forbidden = [IPAddress(127, 0, 0, 1), IPAddress(224, 0, 0, 1), IPAddress(255, 255, 255, 255),
                            IPAddress(0, 0, 0, 0), IPAddress(169, 254, 1, 1), IPAddress(240, 0, 0, 1)]

    @Test("forbidden addresses in the header, the tuples and the lists are rejected even when signed", arguments: ControlMessageTests.forbidden)
    func forbiddenAddresses(bad: IPAddress) {
        let ok = IPAddress(10, 77, 0, 105)
        func tuple(src: IPAddress = IPAddress(10, 77, 1, 1), dst: IPAddress = IPAddress(10, 77, 2, 2)) -> FiveTuple {
            FiveTuple(srcAddr: src, srcPort: 1000, dstAddr: dst, dstPort: 2000)
        }
        let messages: [(String, ControlMessage)] = [
            ("header session src", Self.message(.ackCancel, session: tuple(src: bad))),
            ("header session dst", Self.message(.ackCancel, session: tuple(dst: bad))),
            ("left anchor", Self.message(.ackCancel, left: bad)),
            ("right anchor", Self.message(.ackCancel, right: bad)),
            ("trigger oldBox", Self.message(.trigger(Trigger(newPath: [ok], oldBox: bad, stateful: true, deadlineMilliseconds: 1)))),
            ("trigger newPath", Self.message(.trigger(Trigger(newPath: [ok, bad, ok], oldBox: ok, stateful: true,
                                                              deadlineMilliseconds: 1)))),
            ("newPathSyn subsession src", Self.message(.newPathSyn(subsession: tuple(src: bad), remaining: [ok]))),
            ("newPathSyn subsession dst", Self.message(.newPathSyn(subsession: tuple(dst: bad), remaining: [ok]))),
            ("newPathSyn remaining", Self.message(.newPathSyn(subsession: tuple(), remaining: [ok, bad]))),
            ("newPathSynAck subsession", Self.message(.newPathSynAck(subsession: tuple(dst: bad)))),
            ("stateRequest newBox", Self.message(.stateRequest(newBox: bad))),
        ]
        for (place, message) in messages {
            let error = Self.decodeError(message.encode(trust: Self.trust))
            #expect(error == .forbiddenAddress(bad), "\(bad) as \(place)")
            #expect(error?.counterName == "forbidden-address")
        }
        #expect(bad.isForbiddenHop)
    }

    @Test("zero ports in the header session and in tuples are rejected")
    func zeroPorts() {
        let noPort = FiveTuple(srcAddr: IPAddress(10, 0, 0, 1), srcPort: 0, dstAddr: IPAddress(10, 0, 0, 2), dstPort: 80)
        let noDstPort = FiveTuple(srcAddr: IPAddress(10, 0, 0, 1), srcPort: 80, dstAddr: IPAddress(10, 0, 0, 2), dstPort: 0)
        #expect(Self.decodeError(Self.message(.drained, session: noPort).encode(trust: Self.trust))?.counterName == "bad-body")
        for t in [noPort, noDstPort] {
            guard case .badBody(let type, _)? = Self.decodeError(Self.message(.newPathSyn(subsession: t, remaining: []))
                .encode(trust: Self.trust)) else { Issue.record("zero port accepted in newPathSyn"); continue }
            #expect(type == .newPathSyn)
            guard case .badBody(.newPathSynAck, _)? = Self.decodeError(Self.message(.newPathSynAck(subsession: t))
                .encode(trust: Self.trust)) else { Issue.record("zero port accepted in newPathSynAck"); continue }
        }
    }

    @Test("the crafting helper itself produces accepted messages when the body is valid", arguments: ControlMessageType.allCases)
    func craftingSanity(type: ControlMessageType) throws {
        let encoded = Self.sample(type).encode(trust: Self.trust)
        #expect(Self.resigned(encoded, body: Self.bodyBytes(encoded)) == encoded)
        #expect(try ControlMessage.decode(Self.crafted(type, Self.bodyBytes(encoded)), trust: Self.trust).body == Self.sampleBody(type))
    }

    @Test("a body with a trailing byte or missing its last byte is rejected, correctly signed", arguments: ControlMessageType.allCases)
    func bodyLength(type: ControlMessageType) {
        let encoded = Self.sample(type).encode(trust: Self.trust)
        let body = Self.bodyBytes(encoded)
        guard case .badBody(let t, _)? = Self.decodeError(Self.resigned(encoded, body: body + [0])) else {
            Issue.record("trailing byte accepted for \(type)"); return
        }
        #expect(t == type)
        if !body.isEmpty {
            guard case .badBody(let t2, _)? = Self.decodeError(Self.resigned(encoded, body: Array(body.dropLast()))) else {
                Issue.record("short body accepted for \(type)"); return
            }
            #expect(t2 == type)
        }
    }

    static func isBadBody(_ error: ControlMessageError?, _ type: ControlMessageType) -> Bool {
        if case .badBody(let t, _)? = error { return t == type }
        return false
    }

    @Test("over-long strings, lists and documents are rejected at decode even when correctly signed")
    func overLong() {
        let a201 = [UInt8](repeating: 0x61, count: 201)
        let cases: [(String, ControlMessageType, [UInt8])] = [
            ("cancelLock reason 201", .cancelLock, [201] + a201),
            ("cancelLock reason 255", .cancelLock, [255] + [UInt8](repeating: 0x61, count: 255)),
            ("stateInstalled reason 201", .stateInstalled, [1, 0, 0, 0, 0, 0, 0, 0, 0, 201] + a201),
            ("triggerResult reason 201", .triggerResult, [1, 201] + a201 + [0, 0]),
            ("triggerResult step 7", .triggerResult, [1, 0, 7, 0]),
            ("triggerResult phases present 2", .triggerResult, [1, 0, 0, 2] + [UInt8](repeating: 0, count: 36)),
            ("triggerResult phase times cut short", .triggerResult, [1, 0, 0, 1] + [UInt8](repeating: 0, count: 32)),
            ("stateInstalled times cut short", .stateInstalled, [1, 0, 0, 0, 0]),
            ("trigger 16 addresses", .trigger, [0, 0, 0, 1, 10, 0, 0, 1, 0, 16] + Array((0..<16).flatMap { [10, 0, 1, UInt8($0 + 1)] })),
            ("trigger 0 addresses", .trigger, [0, 0, 0, 1, 10, 0, 0, 1, 0, 0]),
            ("newPathSyn 16 remaining", .newPathSyn, [10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2, 16]
                + Array((0..<16).flatMap { [10, 0, 1, UInt8($0 + 1)] })),
            ("statePut 60,001 bytes", .statePut, Self.be16(60_001) + [UInt8](repeating: 0x20, count: 60_001)),
            ("string length past the body", .cancelLock, [10, 0x61, 0x62]),
            ("document length past the body", .statePut, Self.be16(10) + [0x7B]),
            ("list count past the body", .newPathSyn, [10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2, 2, 10, 0, 0, 3]),
        ]
        for (name, type, body) in cases {
            let error = Self.decodeError(Self.crafted(type, body))
            #expect(Self.isBadBody(error, type), "\(name): \(String(describing: error))")
            #expect(error?.counterName == "bad-body")
        }
        // The same shapes at their limits are accepted, so the cases above fail for the reason they name.
        let a200 = [UInt8](repeating: 0x61, count: 200)
        #expect(Self.decodeError(Self.crafted(.cancelLock, [200] + a200)) == nil)
        #expect(Self.decodeError(Self.crafted(.triggerResult, [1, 200] + a200 + [6, 1] + [UInt8](repeating: 0, count: 36))) == nil)
        #expect(Self.decodeError(Self.crafted(.stateInstalled, [1, 0, 0, 0, 0, 0, 0, 0, 0, 200] + a200)) == nil)
        #expect(Self.decodeError(Self.crafted(.statePut, Self.be16(60_000) + [UInt8](repeating: 0x20, count: 60_000))) == nil)
    }

    @Test("invalid UTF-8, booleans other than 0/1 and out-of-range enum values are rejected, correctly signed")
    func invalidValues() {
        let cases: [(String, ControlMessageType, [UInt8])] = [
            ("lone 0xFF", .cancelLock, [1, 0xFF]),
            ("truncated sequence", .cancelLock, [1, 0xC3]),
            ("overlong NUL", .cancelLock, [2, 0xC0, 0x80]),
            ("surrogate", .stateInstalled, [0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0xED, 0xA0, 0x80]),
            ("step code 255", .triggerResult, [1, 0, 255, 0]),
            ("drainStart stateful 2", .drainStart, [2]),
            ("stateInstalled ok 255", .stateInstalled, [255, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ("trigger mode 3", .trigger, [0, 0, 0, 1, 10, 0, 0, 1, 3, 1, 10, 0, 0, 2]),
            ("nack reason 0", .nackLock, [0]),
            ("nack reason 5", .nackLock, [5]),
            ("outcome 3", .triggerResult, [3, 0, 0, 0]),
            ("body on an empty type", .oldPathFin, [0]),
        ]
        for (name, type, body) in cases {
            let error = Self.decodeError(Self.crafted(type, body))
            #expect(Self.isBadBody(error, type), "\(name): \(String(describing: error))")
        }
        #expect(Self.decodeError(Self.crafted(.cancelLock, [2, 0xC3, 0xA9])) == nil)  // "é" is fine
    }

    @Test("counter names are the documented ones")
    func counterNames() {
        let errors: [(ControlMessageError, String)] = [
            (.truncated(length: 3), "truncated"), (.tooLong(length: 70_000), "too-long"), (.badMagic, "bad-magic"),
            (.unsupportedVersion(9), "bad-version"), (.unknownType(99), "unknown-type"),
            (.lengthMismatch(declared: 1, actual: 2), "bad-length"), (.badMAC, "bad-mac"),
            (.badBody(.ackLock, "x"), "bad-body"), (.forbiddenAddress(IPAddress(127, 0, 0, 1)), "forbidden-address"),
            (.zeroIdentity, "zero-identity"),
        ]
        for (error, name) in errors {
            #expect(error.counterName == name)
            #expect(!error.description.isEmpty)
        }
        #expect(Set(ControlMessageError.counterNames) == Set(errors.map(\.1)))
    }

    // MARK: Robustness

    @Test("10,000 random buffers never crash and are never accepted")
    func randomBuffers() {
        var rng = ControlTestRandom(seed: 0xC0FFEE)
        var accepted = 0
        var reasons: [String: Int] = [:]
        for i in 0..<10_000 {
            let length = Int.random(in: 0...160, using: &rng)
            var bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // Half of them get plausible framing so they reach the MAC check.
            if i % 2 == 0, length >= 88 {
                bytes[0...3] = [0x44, 0x59, 0x43, 0x4D]
                bytes[4] = ControlMessage.ipv4Version
                bytes[5] = ControlMessageType.allCases.randomElement(using: &rng)!.rawValue
                let bodyLength = length - 88
                bytes[6] = UInt8(bodyLength >> 8)
                bytes[7] = UInt8(bodyLength & 0xFF)
            }
            if let error = Self.decodeError(bytes) { reasons[error.counterName, default: 0] += 1 } else { accepted += 1 }
        }
        #expect(accepted == 0)
        #expect((reasons["bad-mac"] ?? 0) > 1000)
    }

    @Test("10,000 random mutations of valid messages never crash and are never accepted")
    func randomMutations() {
        var rng = ControlTestRandom(seed: 42)
        let valid = ControlMessageType.allCases.map { Self.sample($0).encode(trust: Self.trust) }
        var accepted = 0
        for _ in 0..<10_000 {
            var bytes = valid.randomElement(using: &rng)!
            switch Int.random(in: 0..<4, using: &rng) {
            case 0, 1:
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    bytes[Int.random(in: bytes.indices, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                }
            case 2:
                bytes.removeLast(Int.random(in: 1...bytes.count, using: &rng))
            default:
                bytes += (0..<Int.random(in: 1...32, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            if Self.decodeError(bytes) == nil { accepted += 1 }
        }
        #expect(accepted == 0)
    }

    @Test("10,000 random correctly signed bodies never crash; whatever decodes re-encodes to the same bytes")
    func randomSignedBodies() throws {
        var rng = ControlTestRandom(seed: 7)
        let template = Self.sample(.ackCancel).encode(trust: Self.trust, version: ControlMessage.ipv4Version)
        var decoded = 0
        for _ in 0..<10_000 {
            let type = ControlMessageType.allCases.randomElement(using: &rng)!
            // Start from the sample body, then mutate or replace it, so many survive the layout checks.
            var body = Self.bodyBytes(Self.sample(type).encode(trust: Self.trust))
            switch Int.random(in: 0..<3, using: &rng) {
            case 0 where !body.isEmpty:
                body[Int.random(in: body.indices, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            case 1:
                body = (0..<Int.random(in: 0...40, using: &rng)).map { _ in UInt8.random(in: 0...20, using: &rng) }
            default:
                body = (0..<Int.random(in: 0...40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            let bytes = Self.resigned(template, type: type, body: body)
            do {
                let message = try ControlMessage.decode(bytes, trust: Self.trust)
                decoded += 1
                #expect(message.body.type == type)
                #expect(message.encode(trust: Self.trust, version: ControlMessage.ipv4Version) == bytes)
            } catch {
                switch error {
                case .badBody(let t, _): #expect(t == type)
                case .forbiddenAddress: break
                default: Issue.record("unexpected \(error) for a correctly framed, signed \(type)")
                }
            }
        }
        #expect(decoded > 500)
    }
}

/// Deterministic SplitMix64, private to this suite.
private struct ControlTestRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1330_11EB
        return z ^ (z >> 31)
    }
}
