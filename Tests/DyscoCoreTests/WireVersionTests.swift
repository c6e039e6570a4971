@testable import DyscoCore
import Foundation
import Testing

/// Rolling upgrade (issue 19 item 3; docs/CONTROL-PROTOCOL.md "Versions"): an agent takes the previous release's
/// control-protocol version beside its own and sends each message as the oldest version that carries it, never below
/// what the previous release takes; the agents' JSON replies are read across releases. 0.19 and 0.20 both speak 4;
/// the codec also knows version 3's layout (4 without the held mode and the splice notice), the pair these tests use
/// to check the rule that the next wire change relies on. The real previous release: RollingUpgradeTests.
@Suite("Control protocol versions and JSON replies across releases (rolling upgrade)")
struct WireVersionTests {
    typealias T = ControlMessageTests

    /// A version-3 trigger assembled byte by byte from the version-3 layout (docs/CONTROL-PROTOCOL.md, the
    /// previous release's codec): header as in every version since 2, body deadline u32, oldBox u32, `stateful`
    /// as a boolean byte, newPath as a count byte and addresses; HMAC-SHA256 truncated to 16 bytes appended.
    static func versionThreeTrigger(stamp: ControlStamp) -> [UInt8] {
        var b: [UInt8] = []
        func u8(_ v: UInt8) { b.append(v) }
        func u16(_ v: UInt16) { b += [UInt8(v >> 8), UInt8(truncatingIfNeeded: v)] }
        func u32(_ v: UInt32) { for shift in stride(from: 24, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) } }
        func u64(_ v: UInt64) { u32(UInt32(v >> 32)); u32(UInt32(truncatingIfNeeded: v)) }
        u32(0x4459_434D); u8(3); u8(1); u16(18)
        u64(T.identity.chainID); u64(T.identity.nonce); u32(0xDEAD_BEEF)
        u32(T.session.srcAddr.value); u32(T.session.dstAddr.value); u16(T.session.srcPort); u16(T.session.dstPort)
        u32(IPAddress(10, 77, 0, 10).value); u32(IPAddress(10, 77, 0, 200).value)
        u64(stamp.sender); u32(stamp.receiver.value); u32(stamp.counter); u64(stamp.sentAt)
        u32(5000); u32(IPAddress(10, 77, 0, 104).value); u8(1)
        u8(2); u32(IPAddress(10, 77, 0, 105).value); u32(IPAddress(10, 77, 0, 200).value)
        let tag = b.withUnsafeBytes { T.trust.mac($0) }
        return b + tag
    }

    static let stamp = ControlStamp(sender: 0x1122_3344_5566_7788, receiver: IPAddress(10, 77, 0, 10), counter: 7,
                                    sentAt: 1_780_000_000_000_000)

    @Test("version 3's trigger (boolean stateful) is what the codec writes for a stateful trigger at version 3, and reads back")
    func versionThreeBytes() throws {
        var message = T.sample(.trigger)
        message.stamp = Self.stamp
        let golden = Self.versionThreeTrigger(stamp: Self.stamp)
        #expect(message.encode(trust: T.trust, version: 3) == golden)
        #expect(try ControlMessage.decode(golden, trust: T.trust, accepting: 3...3) == message, "an agent that takes 3")
        #expect(T.decodeError(golden) == .unsupportedVersion(3), "0.20 takes what 0.19 takes: 4 only")
        var four = golden
        four[4] = 4
        #expect(T.decodeError(four) == .badMAC, "the version byte is signed")
        // Version 4's trigger differs from version 3's in the version byte only (mode 1 = true).
        let current = message.encode(trust: T.trust)
        #expect(current[4] == 4 && Array(current[5..<(current.count - TrustGroup.macLength)]) == Array(golden[5..<(golden.count - TrustGroup.macLength)]))
    }

    @Test("emit rule: the oldest version that carries the message, never below what the previous release takes (4 now); an IPv4 session's messages go as 4 though the agent takes 5")
    func emitRule() throws {
        #expect(ControlMessage.versions == 4...5 && ControlMessage.previousReleaseVersion == 4)
        for type in ControlMessageType.allCases {
            let message = T.sample(type)
            let minimum: UInt8 = type == .splice ? 4 : 3
            #expect(message.minimumVersion == minimum, "\(type)")
            #expect(message.emitVersion == 4, "\(type)")
            let encoded = message.encode(trust: T.trust)
            #expect(encoded[4] == 4, "\(type)")
            #expect(try ControlMessage.decode(encoded, trust: T.trust) == message, "\(type)")
            // Each version it can go as decodes to the same message, at an agent that takes only that version.
            for version in minimum...ControlMessage.version {
                let bytes = message.encode(trust: T.trust, version: version)
                #expect(try ControlMessage.decode(bytes, trust: T.trust, accepting: version...version) == message, "\(type) v\(version)")
            }
        }
        let held = T.message(.trigger(Trigger(newPath: [IPAddress(10, 77, 0, 200)], oldBox: IPAddress(10, 77, 0, 104),
                                              mode: .held, deadlineMilliseconds: 3000)))
        #expect(held.minimumVersion == 4)
        let stateless = T.message(.trigger(Trigger(newPath: [IPAddress(10, 77, 0, 200)], oldBox: IPAddress(10, 77, 0, 104),
                                                   mode: .stateless, deadlineMilliseconds: 3000)))
        #expect(stateless.minimumVersion == 3 && stateless.encode(trust: T.trust, version: 3)[4] == 3)
    }

    @Test("an agent that takes one version refuses the other as bad-version; version 3 has no splice type and no held mode")
    func refusals() throws {
        let drained = T.sample(.drained)
        let three = drained.encode(trust: T.trust, version: 3)
        let four = drained.encode(trust: T.trust, version: 4)
        func error(_ bytes: [UInt8], _ accepting: ClosedRange<UInt8>) -> ControlMessageError? {
            do { _ = try ControlMessage.decode(bytes, trust: T.trust, accepting: accepting); return nil } catch { return error }
        }
        #expect(error(four, 3...3) == .unsupportedVersion(4), "an agent that takes only 3 drops 4")
        #expect(error(three, 4...4) == .unsupportedVersion(3))
        #expect(error(three, 3...4) == nil && error(four, 3...4) == nil)
        #expect(error(four, 4...5) == nil && error(four, 5...5) == .unsupportedVersion(4), "a version the codec does not know")
        // A splice notice or a held trigger with the version byte 3, validly signed: what version 3 did not have.
        func resigned(_ message: ControlMessage) -> [UInt8] {
            var bytes = message.encode(trust: T.trust)
            bytes.removeLast(TrustGroup.macLength)
            bytes[4] = 3
            return bytes + bytes.withUnsafeBytes { T.trust.mac($0) }
        }
        #expect(error(resigned(T.sample(.splice)), 3...4) == .unknownType(ControlMessageType.splice.rawValue))
        let held = T.message(.trigger(Trigger(newPath: [IPAddress(10, 77, 0, 200)], oldBox: IPAddress(10, 77, 0, 104),
                                              mode: .held, deadlineMilliseconds: 3000)))
        #expect(error(resigned(held), 3...4)?.counterName == "bad-body")
    }

    // MARK: - JSON replies

    @Test("a snapshot of an older agent (no agentVersion, counters it did not have) reads; unknown fields are ignored")
    func olderSnapshot() throws {
        let older = #"""
            {"netns":"fw1","pid":42,"queue":0,"fastPath":true,"uptimeSeconds":1.5,
             "counters":{"packets":10,"sessionsCreated":2,"aCounterOfAnotherRelease":9},
             "control":{"sent.requestLock":3},"sessions":[],"total":0,"aFieldOfAnotherRelease":{"x":1}}
            """#
        let snapshot = try JSONDecoder().decode(AgentSnapshot.self, from: Data(older.utf8))
        #expect(snapshot.agentVersion == nil && snapshot.wireVersions == nil)
        #expect(snapshot.counters.packets == 10 && snapshot.counters.sessionsCreated == 2)
        #expect(snapshot.counters.resetsRefuted == 0 && snapshot.counters.synTimeouts == 0, "missing counters read as 0")
        #expect(snapshot.control["sent.requestLock"] == 3)
        let wrongType = #"{"packets":"ten"}"#
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(DataplaneCounters.self, from: Data(wrongType.utf8)) }
    }

    @Test("every data-plane counter survives encode → decode (the lenient decoder reads each one)")
    func countersRoundTrip() throws {
        var counters = DataplaneCounters()
        // Distinct values through the encoded form: a counter the decoder forgot would come back as 0.
        let encoded = try JSONEncoder().encode(counters)
        var dictionary = try #require(try JSONSerialization.jsonObject(with: encoded) as? [String: Any])
        for (i, key) in dictionary.keys.sorted().enumerated() { dictionary[key] = i + 1 }
        counters = try JSONDecoder().decode(DataplaneCounters.self, from: JSONSerialization.data(withJSONObject: dictionary))
        let again = try #require(try JSONSerialization.jsonObject(with: JSONEncoder().encode(counters)) as? [String: Int])
        #expect(again.count == dictionary.count)
        #expect(again.values.allSatisfy { $0 > 0 }, "\(again.filter { $0.value == 0 }.keys.sorted())")
        #expect(Set(again.values).count == again.count)
    }

    @Test("this release's snapshot names its release and the versions it takes")
    func currentSnapshot() throws {
        var snapshot = AgentSnapshot(netns: nil, pid: 1, queue: 0, fastPath: true, uptimeSeconds: 0,
                                     counters: DataplaneCounters(), sessions: [])
        snapshot.wireVersions = Array(ControlMessage.versions)
        let read = try JSONDecoder().decode(AgentSnapshot.self, from: JSONEncoder().encode(snapshot))
        #expect(read.agentVersion == DyscoVersion.string)
        #expect(read.wireVersions == [4, 5])
    }

    /// An IPv6 session's messages: every sample body with IPv6 addresses in the header and body.
    static func ipv6Message(_ type: ControlMessageType) -> ControlMessage {
        func v6(_ low: UInt64) -> IPAddress { IPAddress(high: 0xfd00_0077_0000_0000, low: low) }
        let session = FiveTuple(srcAddr: v6(0x10), srcPort: 43210, dstAddr: v6(0xc9), dstPort: 80)
        let subsession = FiveTuple(srcAddr: v6(0x101), srcPort: 40001, dstAddr: v6(0x202), dstPort: 40002)
        var body = T.sampleBody(type)
        switch body {
        case .trigger(var t):
            t.newPath = [v6(0x69), v6(0xc9)]
            t.oldBox = v6(0x68)
            body = .trigger(t)
        case .newPathSyn: body = .newPathSyn(subsession: subsession, remaining: [v6(0xc8)])
        case .newPathSynAck: body = .newPathSynAck(subsession: subsession)
        case .stateRequest: body = .stateRequest(newBox: v6(0x69))
        case .splice: body = .splice(SpliceNotice(tsDelta: -77, alias: (T.identity, subsession)))
        default: break
        }
        var message = T.message(body, session: session, left: v6(0x10), right: v6(0xc8))
        message.stamp = ControlStamp(sender: 7, receiver: v6(0x65), counter: 3, sentAt: 1_700_000_000_000_000)
        return message
    }

    @Test("version 5 (issue 18): a message naming an IPv6 address goes as 5, with 16-byte addresses (132-byte header); every type round-trips; an agent taking only 4 refuses it as bad-version; every byte flip is refused", arguments: ControlMessageType.allCases)
    func ipv6Layout(type: ControlMessageType) throws {
        let message = Self.ipv6Message(type)
        #expect(message.minimumVersion == 5 && message.emitVersion == 5)
        let bytes = message.encode(trust: T.trust)
        #expect(bytes[4] == 5)
        #expect(Int(bytes[6]) << 8 | Int(bytes[7]) == bytes.count - 132 - TrustGroup.macLength, "a 132-byte header")
        #expect(Array(bytes[28..<44]) == message.session.srcAddr.ipv6Bytes && Array(bytes[64..<80]) == message.leftAnchor.ipv6Bytes)
        #expect(try ControlMessage.decode(bytes, trust: T.trust) == message)
        #expect(throws: ControlMessageError.unsupportedVersion(5)) { try ControlMessage.decode(bytes, trust: T.trust, accepting: 4...4) }
        for index in stride(from: 0, to: bytes.count, by: 3) {
            var flipped = bytes
            flipped[index] ^= 0x24
            #expect(T.decodeError(flipped) != nil, "byte \(index)")
        }
    }

    @Test("version 5: IPv6 addresses a hop may never be (::1, fe80::/10, ff00::/8) are refused after the MAC; a bundle of a version-4 and a version-5 message splits into both")
    func ipv6Refusals() throws {
        var message = Self.ipv6Message(.drained)
        message.rightAnchor = IPAddress("fe80::1")!
        #expect(T.decodeError(message.encode(trust: T.trust)) == .forbiddenAddress(IPAddress("fe80::1")!))
        message.rightAnchor = IPAddress("::1")!
        #expect(T.decodeError(message.encode(trust: T.trust)) == .forbiddenAddress(IPAddress("::1")!))
        let v4 = T.sample(.ackLock).encode(trust: T.trust), v6 = Self.ipv6Message(.newPathSyn).encode(trust: T.trust)
        let results = ControlMessage.decodeAll(v4 + v6 + v4, trust: T.trust)
        #expect(results.count == 3 && results.allSatisfy { (try? $0.get()) != nil })
        #expect((try? results[1].get()) == Self.ipv6Message(.newPathSyn))
    }
}
