// MARK: - Types

public enum ControlMessageType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case trigger = 1, triggerResult = 2
    case requestLock = 10, ackLock = 11, nackLock = 12, cancelLock = 13, ackCancel = 14
    case newPathSyn = 20, newPathSynAck = 21, newPathCancel = 22, newPathCancelAck = 23, newPathRefused = 24
    case drainStart = 30, drained = 31
    case stateRequest = 40, statePut = 41, stateInstalled = 42
    case oldPathFin = 50, oldPathFinAck = 51
    case splice = 60

    /// The version that added the type: 4 for `splice`, 3 (the oldest the codec knows) for the others.
    public var since: UInt8 { self == .splice ? 4 : 3 }

    public var description: String {
        switch self {
        case .trigger: "trigger"
        case .triggerResult: "triggerResult"
        case .requestLock: "requestLock"
        case .ackLock: "ackLock"
        case .nackLock: "nackLock"
        case .cancelLock: "cancelLock"
        case .ackCancel: "ackCancel"
        case .newPathSyn: "newPathSyn"
        case .newPathSynAck: "newPathSynAck"
        case .newPathCancel: "newPathCancel"
        case .newPathCancelAck: "newPathCancelAck"
        case .newPathRefused: "newPathRefused"
        case .drainStart: "drainStart"
        case .drained: "drained"
        case .stateRequest: "stateRequest"
        case .statePut: "statePut"
        case .stateInstalled: "stateInstalled"
        case .oldPathFin: "oldPathFin"
        case .oldPathFinAck: "oldPathFinAck"
        case .splice: "splice"
        }
    }
}

/// Why a lock request was refused (paper §3.2).
public enum NackReason: UInt8, Sendable, Equatable, CustomStringConvertible {
    /// The segment is locked or lock-pending for another request (§3.2).
    case contention = 1
    case unknownSession = 2
    case notOnPath = 3
    case busy = 4

    public var description: String {
        switch self {
        case .contention: "contention"
        case .unknownSession: "unknown-session"
        case .notOnPath: "not-on-path"
        case .busy: "busy"
        }
    }
}

/// What moves with a reconfigured session besides its packets (paper §3.5; issue 17).
public enum TransferMode: UInt8, Sendable, CaseIterable, Codable, CustomStringConvertible {
    /// No state, no holding: new data takes the new path at once, the old path carries what it still must
    /// (the two-path rules of §3.5). For boxes without per-session state.
    case stateless = 0
    /// Both anchors hold new data while the old path drains; the old box's (or a donor's) state is exported and
    /// imported at the first new box; then the held data is released on the new path (§3.5, last paragraph).
    case stateful = 1
    /// Held like ``stateful``, but no state moves: the release follows the drain. Insertion of a box that needs no
    /// state, and removal (no box is left to take state): no byte on both paths at once, so no reordering.
    case held = 2

    public var description: String {
        switch self {
        case .stateless: "stateless"
        case .stateful: "stateful"
        case .held: "held"
        }
    }
}

/// Asks a left anchor to replace the segment between it and the right anchor by a new path. The old path is
/// whatever the session's path between the anchors is (zero or more middleboxes); the new path has zero or more
/// middleboxes (§3: zero old ones is an insertion, zero new ones a deletion).
public struct Trigger: Sendable, Equatable {
    /// [new middleboxes..., right anchor], 1...15 addresses (one: the new path has no middlebox, a deletion).
    public var newPath: [IPAddress]
    /// The box whose state moves to the first new middlebox (``TransferMode/stateful``): the box being replaced,
    /// or a donor that keeps its own copy (an anchor, for an insertion). Unused otherwise (the controller's
    /// address by convention).
    public var oldBox: IPAddress
    public var mode: TransferMode
    public var deadlineMilliseconds: UInt32

    /// Both anchors hold new data until the old path is drained (stateful and held).
    public var stateful: Bool { mode != .stateless }

    public init(newPath: [IPAddress], oldBox: IPAddress, mode: TransferMode, deadlineMilliseconds: UInt32) {
        self.newPath = newPath
        self.oldBox = oldBox
        self.mode = mode
        self.deadlineMilliseconds = deadlineMilliseconds
    }

    public init(newPath: [IPAddress], oldBox: IPAddress, stateful: Bool, deadlineMilliseconds: UInt32) {
        self.init(newPath: newPath, oldBox: oldBox, mode: stateful ? .stateful : .stateless,
                  deadlineMilliseconds: deadlineMilliseconds)
    }
}

/// What a left anchor reports back for one trigger.
public struct TriggerResult: Sendable, Equatable {
    public enum Outcome: UInt8, Sendable { case moved = 0, cancelled = 1, refused = 2 }

    public var outcome: Outcome
    /// At most 200 bytes of UTF-8; "" when moved cleanly, or starting with ``teardownUnanswered`` when moved but
    /// the old path never acknowledged its teardown (docs/CONTROL-PROTOCOL.md, "triggerResult").
    public var reason: String
    /// The step the reconfiguration failed at; nil when moved.
    public var failedStep: MigrationStep?
    /// The left anchor's phase times (nil when it refused before starting, or the controller gave up).
    public var phases: PhaseTimes?

    public init(outcome: Outcome, reason: String = "", failedStep: MigrationStep? = nil, phases: PhaseTimes? = nil) {
        self.outcome = outcome
        self.reason = reason
        self.failedStep = failedStep
        self.phases = phases
    }

    /// The prefix of the reason of a move whose teardown (oldPathFin) was never acknowledged after the
    /// retransmissions (issue 19): the data is on the new path, the old path's agents expire the session by
    /// idleness (their locks by their silence timeout).
    public static let teardownUnanswered = "teardown unanswered"

    /// Moved, but the old path did not acknowledge the teardown.
    public var teardownUnanswered: Bool { outcome == .moved && reason.hasPrefix(Self.teardownUnanswered) }
}

public enum ControlBody: Sendable, Equatable {
    case trigger(Trigger)
    case triggerResult(TriggerResult)
    case requestLock(rightDelta: Int32)
    case ackLock(leftDelta: Int32, rightDelta: Int32)
    case nackLock(reason: NackReason)
    /// UTF-8, at most 200 bytes.
    case cancelLock(reason: String)
    case ackCancel
    /// remaining: 0...15 addresses.
    case newPathSyn(subsession: FiveTuple, remaining: [IPAddress])
    case newPathSynAck(subsession: FiveTuple)
    case newPathCancel
    case newPathCancelAck
    /// A hop of the new path cannot take the session (issue 20: it answers with the reason instead of staying
    /// silent); sent to the left anchor. reason: at most 200 bytes.
    case newPathRefused(reason: String)
    case drainStart(stateful: Bool)
    case drained
    case stateRequest(newBox: IPAddress)
    /// A JSON state document (docs/STATE-FORMAT.md), at most 60,000 bytes, carried opaquely.
    case statePut(document: [UInt8])
    /// The state transfer's result, from the new box to the old one and from the old box to the left anchor,
    /// with the boxes' export/import durations as typed fields (version 3; version 2 carried them inside the
    /// reason). reason: at most 200 bytes.
    case stateInstalled(ok: Bool, times: StateTimes, reason: String)
    case oldPathFin
    case oldPathFinAck
    /// From a session-terminating proxy spliced out of the session (§4) to an anchor of its removal, with its
    /// ackLock: the timestamp delta for the anchor's new path and, to the right anchor, the identity the client's
    /// chain has for the session (``SpliceNotice``). Handled by the agent's engine, not the protocol.
    case splice(SpliceNotice)

    /// Limits of the body fields (decode rejects anything beyond them; encode truncates strings to them).
    public static let maxReasonBytes = 200
    /// `Trigger.newPath` holds 1...15 addresses, `newPathSyn`'s `remaining` 0...15.
    public static let maxPathAddresses = 15
    public static let maxDocumentBytes = 60_000

    public var type: ControlMessageType {
        switch self {
        case .trigger: .trigger
        case .triggerResult: .triggerResult
        case .requestLock: .requestLock
        case .ackLock: .ackLock
        case .nackLock: .nackLock
        case .cancelLock: .cancelLock
        case .ackCancel: .ackCancel
        case .newPathSyn: .newPathSyn
        case .newPathSynAck: .newPathSynAck
        case .newPathCancel: .newPathCancel
        case .newPathCancelAck: .newPathCancelAck
        case .newPathRefused: .newPathRefused
        case .drainStart: .drainStart
        case .drained: .drained
        case .stateRequest: .stateRequest
        case .statePut: .statePut
        case .stateInstalled: .stateInstalled
        case .oldPathFin: .oldPathFin
        case .oldPathFinAck: .oldPathFinAck
        case .splice: .splice
        }
    }
}

public enum ControlMessageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Shorter than header + MAC.
    case truncated(length: Int)
    case tooLong(length: Int)
    case badMagic
    case unsupportedVersion(UInt8)
    case unknownType(UInt8)
    /// `declared` = 72 + bodyLength + 16, `actual` = the datagram's length.
    case lengthMismatch(declared: Int, actual: Int)
    case badMAC
    /// The body does not have the layout of its type (or the header's session has a zero port).
    case badBody(ControlMessageType, String)
    /// Loopback, multicast, broadcast, unspecified or link-local anywhere in the message.
    case forbiddenAddress(IPAddress)
    /// chainID == 0.
    case zeroIdentity

    /// A short stable name for counters.
    public var counterName: String {
        switch self {
        case .truncated: "truncated"
        case .tooLong: "too-long"
        case .badMagic: "bad-magic"
        case .unsupportedVersion: "bad-version"
        case .unknownType: "unknown-type"
        case .lengthMismatch: "bad-length"
        case .badMAC: "bad-mac"
        case .badBody: "bad-body"
        case .forbiddenAddress: "forbidden-address"
        case .zeroIdentity: "zero-identity"
        }
    }

    /// Every counter name, in validation order.
    public static let counterNames = ["truncated", "too-long", "bad-magic", "bad-version", "unknown-type",
                                      "bad-length", "bad-mac", "zero-identity", "forbidden-address", "bad-body"]

    public var description: String {
        switch self {
        case .truncated(let n):
            "control message: \(n) bytes, shorter than header and MAC (\(ControlMessage.headerLength + TrustGroup.macLength))"
        case .tooLong(let n): "control message: \(n) bytes, longer than \(ControlMessage.maxLength)"
        case .badMagic: "control message: bad magic"
        case .unsupportedVersion(let v): "control message: unsupported version \(v)"
        case .unknownType(let t): "control message: unknown type \(t)"
        case .lengthMismatch(let d, let a): "control message: header declares \(d) bytes, datagram has \(a)"
        case .badMAC: "control message: MAC does not verify under the current or previous trust key"
        case .badBody(let t, let why): "control message \(t): \(why)"
        case .forbiddenAddress(let a): "control message: forbidden address \(a)"
        case .zeroIdentity: "control message: chain ID is zero"
        }
    }
}

/// The body of a ``ControlBody/splice(_:)`` message.
public struct SpliceNotice: Sendable, Equatable {
    /// Added to the TSval of the stream the anchor receives from the segment on its new path.
    public var tsDelta: Int32
    /// To the right anchor: the client chain's identity and session for this session (the left anchor uses them).
    public var alias: (identity: SessionIdentity, session: FiveTuple)?
    public init(tsDelta: Int32, alias: (identity: SessionIdentity, session: FiveTuple)? = nil) {
        self.tsDelta = tsDelta
        self.alias = alias
    }
    public static func == (a: SpliceNotice, b: SpliceNotice) -> Bool {
        a.tsDelta == b.tsDelta && a.alias?.identity == b.alias?.identity && a.alias?.session == b.alias?.session
    }
}

// MARK: - Message

/// The agents' UDP control messages (paper §3.3: "we implement control signals as UDP packets, rather than
/// introducing extra data into the TCP byte stream"): the reconfiguration protocol's requestLock / ackLock /
/// nackLock / cancelLock handshake (§3.2, §3.4), the new-path SYN handshake (§3.3), its cancellation (§3.6),
/// draining and state transfer (§3.5) and the old path's FIN handshake (§3.3, §3.5), plus the trigger that starts
/// a reconfiguration at a left anchor and the result it reports.
///
/// A pure codec: no I/O. Wire format (all integers big-endian; the full tables are in docs/CONTROL-PROTOCOL.md):
///
/// ```
///   offset  size  field
///   0       4     magic "DYCM" (0x4459434D)
///   4       1     version (4, ``versions``; 1, 2 and 3 are refused: 1 carries no freshness, 2 no typed phase times, 3 no trigger mode)
///   5       1     type (ControlMessageType)
///   6       2     bodyLength
///   8       8     chainID
///   16      8     nonce
///   24      4     requestID
///   28      4     session source address
///   32      4     session destination address
///   36      2     session source port
///   38      2     session destination port
///   40      4     left anchor
///   44      4     right anchor
///   48      8     stamp: sender id (random per agent run)          (ControlStamp, issue 20)
///   56      4     stamp: receiver address
///   60      4     stamp: counter (per sender and receiver, from 1)
///   64      8     stamp: sentAt (sender's CLOCK_REALTIME, µs)
///   72      n     body (bodyLength bytes, layout by type)
///   72+n    16    MAC: HMAC-SHA256 (TrustGroup, current key) over bytes 0..<72+n, truncated to 16 bytes
/// ```
///
/// Version 5 is the same with every address 16 bytes (IPv6; an IPv4 address in its mapped form): the header is 132
/// bytes (session addresses at 28 and 44, ports at 60, anchors at 64 and 80, stamp sender at 96, receiver at 104,
/// counter at 120, sentAt at 124), and every body address and tuple is wide too. A message goes out as version 5 only
/// when it names an IPv6 address (``minimumVersion``), so an IPv4 session's messages keep version 4's layout.
///
/// Rule: a message that fails any check is dropped, counted by ``ControlMessageError/counterName`` and changes
/// nothing. The MAC is checked before anything of the body is read, and before the header's identity and
/// addresses are looked at.
public struct ControlMessage: Sendable, Equatable {
    public static let magic: UInt32 = 0x4459_434D  // "DYCM"
    /// 2 since issue 20 (the freshness stamp); 3 since issue 15 (typed failedStep, phase times and the boxes'
    /// export/import durations in triggerResult and stateInstalled, instead of strings). Versions outside
    /// ``versions`` are refused (`bad-version`).
    /// 4 since issue 17 (the trigger's mode byte: stateless, stateful or held, was a 0/1 `stateful`; the splice
    /// notice).
    /// 5 since issue 18 (IPv6: 16-byte addresses, for the messages that name an IPv6 address).
    public static let version: UInt8 = 5
    /// The version the previous release (0.19.0) speaks: 4. This one adds 5 for IPv6 sessions only and sends every
    /// IPv4 session's messages as 4.
    public static let previousReleaseVersion: UInt8 = 4
    /// The first version with 16-byte addresses (``wideAddresses(_:)``), and the newest with 4-byte ones.
    public static let ipv6Version: UInt8 = 5
    public static let ipv4Version: UInt8 = 4
    /// What an agent of this release takes, and the lowest it sends (issue 19, rolling upgrade): the previous
    /// release's version and its own, so that agents of adjacent releases reconfigure sessions together while a
    /// deployment is upgraded host by host (docs/CONTROL-PROTOCOL.md "Versions"). 4...5 in this release.
    public static let versions: ClosedRange<UInt8> = previousReleaseVersion...version
    /// The layouts the codec reads and writes (``encode(trust:version:)``, ``decode(_:trust:accepting:)``): version
    /// 3 is version 4 without the held mode and the splice notice (``ControlMessageType/since``); version 5 is
    /// version 4 with 16-byte addresses.
    public static let knownVersions: ClosedRange<UInt8> = 3...version

    /// Whether `version` writes addresses in 16 bytes.
    public static func wideAddresses(_ version: UInt8) -> Bool { version >= ipv6Version }

    /// Bytes of the header in `version`: 72, or 132 with 16-byte addresses.
    public static func headerLength(version: UInt8) -> Int { wideAddresses(version) ? 132 : headerLength }

    /// The oldest version that carries this message: 4 for what version 4 added (a held trigger, a splice
    /// notice), 3 for everything else. The emit rule: a message goes out as the oldest version that carries it, but
    /// never below what the previous release takes (``versions``), so that an agent of the previous release takes
    /// every message it understands. When a release changes the wire (version 5), it takes 4 and 5 and sends 4
    /// wherever 4 carries the message.
    public var minimumVersion: UInt8 {
        let addresses = [session.srcAddr, session.dstAddr, leftAnchor, rightAnchor, stamp.receiver] + body.addresses
        if addresses.contains(where: { !$0.isIPv4 }) { return Self.ipv6Version }
        if case .trigger(let t) = body, t.mode == .held { return 4 }
        return body.type.since
    }

    /// The version ``encode(trust:version:)`` sends by default: ``minimumVersion``, at least the lowest of ``versions``.
    public var emitVersion: UInt8 { max(minimumVersion, Self.versions.lowerBound) }
    public static let headerLength = 72
    /// One UDP datagram (65,535 − 8 UDP − 20 IPv4).
    public static let maxLength = 65_507
    /// The agents' control port (UDP).
    public static let port: UInt16 = 7411

    /// chainID + nonce.
    public var identity: SessionIdentity
    /// One reconfiguration attempt, chosen by its left anchor.
    public var requestID: UInt32
    /// The session as the endpoints see it.
    public var session: FiveTuple
    public var leftAnchor: IPAddress
    public var rightAnchor: IPAddress
    public var body: ControlBody
    /// Freshness (``ControlStamp``): set by the sending agent just before it encodes (the protocol layer never
    /// looks at it); checked by the receiving agent (``FreshnessChecker``) after the MAC.
    public var stamp: ControlStamp

    public init(identity: SessionIdentity, requestID: UInt32, session: FiveTuple,
                leftAnchor: IPAddress, rightAnchor: IPAddress, body: ControlBody, stamp: ControlStamp = .unstamped) {
        self.stamp = stamp
        self.identity = identity
        self.requestID = requestID
        self.session = session
        self.leftAnchor = leftAnchor
        self.rightAnchor = rightAnchor
        self.body = body
    }

    /// Why ``encode(trust:)`` would refuse this message (a list count or the state document beyond its limit),
    /// or nil. Over-long strings are not a problem: encode truncates them at a UTF-8 scalar boundary. Addresses
    /// and identities are not checked here (the receiver's decode does).
    public var encodingProblem: String? {
        switch body {
        case .trigger(let t):
            guard (1...ControlBody.maxPathAddresses).contains(t.newPath.count) else {
                return "trigger: newPath has \(t.newPath.count) addresses (1...\(ControlBody.maxPathAddresses))"
            }
        case .newPathSyn(_, let remaining):
            guard remaining.count <= ControlBody.maxPathAddresses else {
                return "newPathSyn: \(remaining.count) remaining addresses (at most \(ControlBody.maxPathAddresses))"
            }
        case .statePut(let document):
            guard document.count <= ControlBody.maxDocumentBytes else {
                return "statePut: document of \(document.count) bytes (at most \(ControlBody.maxDocumentBytes))"
            }
        default: break
        }
        return nil
    }

    /// Encodes and signs (HMAC under trust.current, appended). Strings longer than their limit are truncated at a
    /// UTF-8 scalar boundary; a list or document beyond its limit is a programmer error (check
    /// ``encodingProblem`` first when the size is not known to fit).
    ///
    /// `version`: the version byte; nil sends ``emitVersion``.
    /// The body's layout is the same in versions 3 and 4 for every message version 3 has (its trigger's boolean
    /// `stateful` is the mode byte 0 or 1); asking for a version that cannot carry the message is a programmer
    /// error.
    public func encode(trust: TrustGroup, version: UInt8? = nil) -> [UInt8] {
        if let problem = encodingProblem { preconditionFailure("ControlMessage.encode: \(problem)") }
        let version = version ?? emitVersion
        precondition(Self.knownVersions.contains(version) && version >= minimumVersion,
                     "ControlMessage.encode: \(body.type) cannot go out as version \(version)")
        var out = ControlWriter(wide: Self.wideAddresses(version))
        let headerLength = Self.headerLength(version: version)
        out.reserve(headerLength + 64 + TrustGroup.macLength)
        out.u32(Self.magic)
        out.u8(version)
        out.u8(body.type.rawValue)
        out.u16(0)  // bodyLength, patched below
        out.u64(identity.chainID)
        out.u64(identity.nonce)
        out.u32(requestID)
        out.tupleHeader(session)
        out.address(leftAnchor)
        out.address(rightAnchor)
        out.u64(stamp.sender)
        out.address(stamp.receiver)
        out.u32(stamp.counter)
        out.u64(stamp.sentAt)
        precondition(out.bytes.count == headerLength)
        encodeBody(into: &out)
        let bodyLength = out.bytes.count - headerLength
        out.bytes[6] = UInt8(bodyLength >> 8)
        out.bytes[7] = UInt8(truncatingIfNeeded: bodyLength)
        let tag = out.bytes.withUnsafeBytes { trust.mac($0) }
        out.bytes.append(contentsOf: tag)
        return out.bytes
    }

    private func encodeBody(into out: inout ControlWriter) {
        switch body {
        case .trigger(let t):
            out.u32(t.deadlineMilliseconds)
            out.address(t.oldBox)
            out.u8(t.mode.rawValue)
            out.addresses(t.newPath)
        case .triggerResult(let r):
            out.u8(r.outcome.rawValue)
            out.string(r.reason, max: ControlBody.maxReasonBytes)
            out.u8(r.failedStep?.wireCode ?? 0)
            if let phases = r.phases {
                out.u8(1)
                for value in phases.wireValues { out.u32(value) }
            } else {
                out.u8(0)
            }
        case .requestLock(let rightDelta):
            out.u32(UInt32(bitPattern: rightDelta))
        case .ackLock(let leftDelta, let rightDelta):
            out.u32(UInt32(bitPattern: leftDelta))
            out.u32(UInt32(bitPattern: rightDelta))
        case .nackLock(let reason):
            out.u8(reason.rawValue)
        case .cancelLock(let reason):
            out.string(reason, max: ControlBody.maxReasonBytes)
        case .newPathSyn(let subsession, let remaining):
            out.tupleHeader(subsession)
            out.addresses(remaining)
        case .newPathSynAck(let subsession):
            out.tupleHeader(subsession)
        case .newPathRefused(let reason):
            out.string(reason, max: ControlBody.maxReasonBytes)
        case .drainStart(let stateful):
            out.bool(stateful)
        case .stateRequest(let newBox):
            out.address(newBox)
        case .statePut(let document):
            out.u16(UInt16(document.count))
            out.bytes.append(contentsOf: document)
        case .stateInstalled(let ok, let times, let reason):
            out.bool(ok)
            out.u32(times.exportMicroseconds)
            out.u32(times.importMicroseconds)
            out.string(reason, max: ControlBody.maxReasonBytes)
        case .splice(let notice):
            out.u32(UInt32(bitPattern: notice.tsDelta))
            if let alias = notice.alias {
                out.u8(1)
                out.u64(alias.identity.chainID)
                out.u64(alias.identity.nonce)
                out.tupleHeader(alias.session)
            } else {
                out.u8(0)
            }
        case .ackCancel, .newPathCancel, .newPathCancelAck, .drained, .oldPathFin, .oldPathFinAck:
            break
        }
    }

    /// Validates everything and decodes. Order (the first failing check is the error):
    /// length ≥ 88 (`truncated`), length ≤ 65,507 (`tooLong`), magic, version, type, 72 + bodyLength + 16 ==
    /// length (`lengthMismatch`), MAC under the current or previous key (`badMAC`), chainID ≠ 0
    /// (`zeroIdentity`), header addresses (`forbiddenAddress`), header session ports ≠ 0 (`badBody`), body
    /// layout (`badBody`), body addresses (`forbiddenAddress`). Nothing past the fixed framing fields is read
    /// before the MAC verifies.
    ///
    /// `accepting`: the versions taken (default ``versions``). A version-3 message is read as version 3 defined it:
    /// no splice type (`unknown-type`), a trigger's byte 8 a boolean (`bad-body` otherwise).
    public static func decode(_ bytes: UnsafeRawBufferPointer, trust: TrustGroup,
                              accepting: ClosedRange<UInt8> = versions) throws(ControlMessageError) -> ControlMessage {
        let length = bytes.count
        guard length >= headerLength + TrustGroup.macLength else { throw .truncated(length: length) }
        guard length <= maxLength else { throw .tooLong(length: length) }
        guard cmReadBE32(bytes, 0) == magic else { throw .badMagic }
        let version = bytes[4]
        guard accepting.contains(version), knownVersions.contains(version) else { throw .unsupportedVersion(version) }
        guard let type = ControlMessageType(rawValue: bytes[5]), version >= type.since else { throw .unknownType(bytes[5]) }
        let bodyLength = Int(cmReadBE16(bytes, 6))
        let wide = wideAddresses(version)
        let headerLength = headerLength(version: version)
        let declared = headerLength + bodyLength + TrustGroup.macLength
        guard declared == length else { throw .lengthMismatch(declared: declared, actual: length) }

        let signed = UnsafeRawBufferPointer(rebasing: bytes[0..<(headerLength + bodyLength)])
        let tag = UnsafeRawBufferPointer(rebasing: bytes[(headerLength + bodyLength)...])
        guard trust.verify(tag, signed) else { throw .badMAC }

        // Authenticated from here on. The header is read in order, like the body (its lengths are fixed per version).
        var header = ControlReader(bytes: UnsafeRawBufferPointer(rebasing: bytes[8..<headerLength]), type: type, wide: wide)
        let identity = SessionIdentity(chainID: try header.u64("chainID"), nonce: try header.u64("nonce"))
        guard identity.chainID != 0 else { throw .zeroIdentity }
        let requestID = try header.u32("requestID")
        let session = try header.rawTuple("session")
        let leftAnchor = try header.address("leftAnchor")
        let rightAnchor = try header.address("rightAnchor")
        let stamp = ControlStamp(sender: try header.u64("stamp sender"), receiver: try header.address("stamp receiver"),
                                 counter: try header.u32("stamp counter"), sentAt: try header.u64("stamp sentAt"))
        for address in [session.srcAddr, session.dstAddr, leftAnchor, rightAnchor] where address.isForbiddenHop {
            throw .forbiddenAddress(address)
        }
        guard session.srcPort != 0, session.dstPort != 0 else { throw .badBody(type, "header session has port 0") }

        var reader = ControlReader(bytes: UnsafeRawBufferPointer(rebasing: bytes[headerLength..<(headerLength + bodyLength)]),
                                   type: type, wide: wide)
        let body = try decodeBody(type, &reader)
        guard reader.atEnd else { throw .badBody(type, "\(reader.remaining) trailing bytes") }
        if case .trigger(let t) = body, t.mode == .held, version < 4 { throw .badBody(type, "mode is 2, not 0 or 1 (version \(version))") }
        for address in body.addresses where address.isForbiddenHop { throw .forbiddenAddress(address) }

        return ControlMessage(identity: identity, requestID: requestID, session: session,
                              leftAnchor: leftAnchor, rightAnchor: rightAnchor, body: body, stamp: stamp)
    }

    /// Convenience: ``decode(_:trust:)-(UnsafeRawBufferPointer,_)`` over an array.
    public static func decode(_ bytes: [UInt8], trust: TrustGroup,
                              accepting: ClosedRange<UInt8> = versions) throws(ControlMessageError) -> ControlMessage {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(ControlMessageError) in try decode(raw, trust: trust, accepting: accepting) }
        }
        return try result.get()
    }

    private static func decodeBody(_ type: ControlMessageType, _ r: inout ControlReader) throws(ControlMessageError) -> ControlBody {
        switch type {
        case .trigger:
            let deadline = try r.u32("deadline")
            let oldBox = try r.address("oldBox")
            let modeByte = try r.u8("mode")
            guard let mode = TransferMode(rawValue: modeByte) else { throw r.fail("mode is \(modeByte), not 0, 1 or 2") }
            let newPath = try r.addresses("newPath", 1...ControlBody.maxPathAddresses)
            return .trigger(Trigger(newPath: newPath, oldBox: oldBox, mode: mode, deadlineMilliseconds: deadline))
        case .triggerResult:
            let raw = try r.u8("outcome")
            guard let outcome = TriggerResult.Outcome(rawValue: raw) else { throw r.fail("outcome \(raw) is not 0, 1 or 2") }
            let reason = try r.string("reason", max: ControlBody.maxReasonBytes)
            let code = try r.u8("failedStep")
            var failedStep: MigrationStep?
            if code != 0 {
                guard let step = MigrationStep(wireCode: code) else { throw r.fail("failedStep \(code) is not 0...6") }
                failedStep = step
            }
            let hasPhases = try r.u8("phases present")
            guard hasPhases <= 1 else { throw r.fail("phases present \(hasPhases) is not 0 or 1") }
            var phases: PhaseTimes?
            if hasPhases == 1 {
                var values: [UInt32] = []
                values.reserveCapacity(PhaseTimes.wireFields)
                for _ in 0..<PhaseTimes.wireFields { values.append(try r.u32("phase time")) }
                phases = PhaseTimes(wireValues: values)
            }
            return .triggerResult(TriggerResult(outcome: outcome, reason: reason, failedStep: failedStep, phases: phases))
        case .requestLock:
            return .requestLock(rightDelta: Int32(bitPattern: try r.u32("rightDelta")))
        case .ackLock:
            let left = Int32(bitPattern: try r.u32("leftDelta"))
            let right = Int32(bitPattern: try r.u32("rightDelta"))
            return .ackLock(leftDelta: left, rightDelta: right)
        case .nackLock:
            let raw = try r.u8("reason")
            guard let reason = NackReason(rawValue: raw) else { throw r.fail("nack reason \(raw) is not 1...4") }
            return .nackLock(reason: reason)
        case .cancelLock:
            return .cancelLock(reason: try r.string("reason", max: ControlBody.maxReasonBytes))
        case .ackCancel: return .ackCancel
        case .newPathSyn:
            let subsession = try r.tuple("subsession")
            let remaining = try r.addresses("remaining", 0...ControlBody.maxPathAddresses)
            return .newPathSyn(subsession: subsession, remaining: remaining)
        case .newPathSynAck:
            return .newPathSynAck(subsession: try r.tuple("subsession"))
        case .newPathCancel: return .newPathCancel
        case .newPathCancelAck: return .newPathCancelAck
        case .newPathRefused:
            return .newPathRefused(reason: try r.string("reason", max: ControlBody.maxReasonBytes))
        case .drainStart:
            return .drainStart(stateful: try r.bool("stateful"))
        case .drained: return .drained
        case .stateRequest:
            return .stateRequest(newBox: try r.address("newBox"))
        case .statePut:
            let count = Int(try r.u16("document length"))
            guard count <= ControlBody.maxDocumentBytes else {
                throw r.fail("document of \(count) bytes (at most \(ControlBody.maxDocumentBytes))")
            }
            return .statePut(document: try r.raw("document", count))
        case .stateInstalled:
            let ok = try r.bool("ok")
            let times = StateTimes(exportMicroseconds: try r.u32("exportMicroseconds"),
                                   importMicroseconds: try r.u32("importMicroseconds"))
            let reason = try r.string("reason", max: ControlBody.maxReasonBytes)
            return .stateInstalled(ok: ok, times: times, reason: reason)
        case .oldPathFin: return .oldPathFin
        case .oldPathFinAck: return .oldPathFinAck
        case .splice:
            let ts = Int32(bitPattern: try r.u32("tsDelta"))
            let hasAlias = try r.u8("alias present")
            guard hasAlias <= 1 else { throw r.fail("alias present \(hasAlias) is not 0 or 1") }
            guard hasAlias == 1 else { return .splice(SpliceNotice(tsDelta: ts)) }
            let chain = UInt64(try r.u32("alias chainID")) << 32 | UInt64(try r.u32("alias chainID"))
            let nonce = UInt64(try r.u32("alias nonce")) << 32 | UInt64(try r.u32("alias nonce"))
            guard chain != 0 else { throw r.fail("alias chain ID is zero") }
            let session = try r.tuple("alias session")
            guard session.srcPort != 0, session.dstPort != 0 else { throw r.fail("alias session has port 0") }
            return .splice(SpliceNotice(tsDelta: ts, alias: (SessionIdentity(chainID: chain, nonce: nonce), session)))
        }
    }
}

extension ControlBody {
    /// Every address the body names (checked against ``IPAddress/isForbiddenHop`` on decode).
    var addresses: [IPAddress] {
        switch self {
        case .trigger(let t): [t.oldBox] + t.newPath
        case .newPathSyn(let s, let remaining): [s.srcAddr, s.dstAddr] + remaining
        case .newPathSynAck(let s): [s.srcAddr, s.dstAddr]
        case .stateRequest(let box): [box]
        case .splice(let n): n.alias.map { [$0.session.srcAddr, $0.session.dstAddr] } ?? []
        default: []
        }
    }
}

// MARK: - Private helpers (big-endian)

private struct ControlWriter {
    var bytes: [UInt8] = []
    /// Version 5's 16-byte addresses (else 4 bytes: the encoder only asks for a narrow layout when every address is
    /// IPv4, ``ControlMessage/minimumVersion``).
    let wide: Bool

    init(wide: Bool) { self.wide = wide }

    mutating func reserve(_ n: Int) { bytes.reserveCapacity(n) }
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) {
        bytes.append(UInt8(v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }
    mutating func u32(_ v: UInt32) {
        u16(UInt16(v >> 16))
        u16(UInt16(truncatingIfNeeded: v))
    }
    mutating func u64(_ v: UInt64) {
        u32(UInt32(v >> 32))
        u32(UInt32(truncatingIfNeeded: v))
    }
    mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    mutating func address(_ a: IPAddress) {
        if wide { bytes.append(contentsOf: a.ipv6Bytes) } else { u32(a.value) }
    }
    /// srcAddr, dstAddr, srcPort, dstPort (the header's order).
    mutating func tupleHeader(_ t: FiveTuple) {
        address(t.srcAddr)
        address(t.dstAddr)
        u16(t.srcPort)
        u16(t.dstPort)
    }
    /// u8 count, then the addresses.
    mutating func addresses(_ list: [IPAddress]) {
        u8(UInt8(list.count))
        for a in list { address(a) }
    }
    /// u8 length, then the UTF-8 bytes, truncated to `max` at a scalar boundary.
    mutating func string(_ s: String, max: Int) {
        var utf8 = Array(s.utf8)
        if utf8.count > max {
            var cut = max
            while cut > 0, utf8[cut] & 0xC0 == 0x80 { cut -= 1 }
            utf8.removeSubrange(cut...)
        }
        u8(UInt8(utf8.count))
        bytes.append(contentsOf: utf8)
    }
}

private struct ControlReader {
    let bytes: UnsafeRawBufferPointer
    let type: ControlMessageType
    /// 16-byte addresses (version 5).
    let wide: Bool
    var offset = 0

    init(bytes: UnsafeRawBufferPointer, type: ControlMessageType, wide: Bool) {
        self.bytes = bytes
        self.type = type
        self.wide = wide
    }

    var remaining: Int { bytes.count - offset }
    var atEnd: Bool { offset == bytes.count }

    func fail(_ why: String) -> ControlMessageError { .badBody(type, why) }

    private mutating func need(_ n: Int, _ field: String) throws(ControlMessageError) -> Int {
        guard remaining >= n else { throw fail("body ends inside \(field)") }
        defer { offset += n }
        return offset
    }

    mutating func u8(_ field: String) throws(ControlMessageError) -> UInt8 {
        bytes[try need(1, field)]
    }
    mutating func u16(_ field: String) throws(ControlMessageError) -> UInt16 {
        cmReadBE16(bytes, try need(2, field))
    }
    mutating func u32(_ field: String) throws(ControlMessageError) -> UInt32 {
        cmReadBE32(bytes, try need(4, field))
    }
    mutating func bool(_ field: String) throws(ControlMessageError) -> Bool {
        switch try u8(field) {
        case 0: return false
        case 1: return true
        case let v: throw fail("\(field) is \(v), not 0 or 1")
        }
    }
    mutating func raw(_ field: String, _ n: Int) throws(ControlMessageError) -> [UInt8] {
        let at = try need(n, field)
        return Array(bytes[at..<(at + n)])
    }
    mutating func string(_ field: String, max: Int) throws(ControlMessageError) -> String {
        let n = Int(try u8("\(field) length"))
        guard n <= max else { throw fail("\(field) of \(n) bytes (at most \(max))") }
        let at = try need(n, field)
        guard let s = String(validating: UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)]), as: UTF8.self) else {
            throw fail("\(field) is not valid UTF-8")
        }
        return s
    }
    mutating func u64(_ field: String) throws(ControlMessageError) -> UInt64 {
        cmReadBE64(bytes, try need(8, field))
    }
    mutating func address(_ field: String) throws(ControlMessageError) -> IPAddress {
        guard wide else { return IPAddress(try u32(field)) }
        let at = try need(16, field)
        return IPAddress(networkBytes: UnsafeRawBufferPointer(rebasing: bytes[at..<(at + 16)]))
    }
    /// srcAddr, dstAddr, srcPort, dstPort, ports not checked.
    mutating func rawTuple(_ field: String) throws(ControlMessageError) -> FiveTuple {
        let src = try address(field), dst = try address(field)
        return FiveTuple(srcAddr: src, srcPort: try u16(field), dstAddr: dst, dstPort: try u16(field))
    }
    mutating func tuple(_ field: String) throws(ControlMessageError) -> FiveTuple {
        let t = try rawTuple(field)
        guard t.srcPort != 0, t.dstPort != 0 else { throw fail("\(field) has port 0") }
        return t
    }
    mutating func addresses(_ field: String, _ allowed: ClosedRange<Int>) throws(ControlMessageError) -> [IPAddress] {
        let n = Int(try u8("\(field) count"))
        guard allowed.contains(n) else { throw fail("\(field) has \(n) addresses (\(allowed.lowerBound)...\(allowed.upperBound))") }
        var list: [IPAddress] = []
        list.reserveCapacity(n)
        for _ in 0..<n { list.append(try address(field)) }
        return list
    }
}

@inline(__always) private func cmReadBE16(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt16 {
    UInt16(b[at]) << 8 | UInt16(b[at + 1])
}
@inline(__always) private func cmReadBE32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
    UInt32(cmReadBE16(b, at)) << 16 | UInt32(cmReadBE16(b, at + 2))
}
@inline(__always) private func cmReadBE64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
    UInt64(cmReadBE32(b, at)) << 32 | UInt64(cmReadBE32(b, at + 4))
}
// MARK: - Bundles: several messages in one datagram

extension ControlMessage {
    /// Datagrams the agents write carry at most this many bytes of concatenated messages (a single message
    /// longer than this, a large `statePut`, goes alone). About 11 Ethernet fragments: a lost fragment loses the
    /// bundle, which the left anchor's retransmission covers.
    public static let bundleBytes = 16_384

    /// Splits a datagram into the messages it carries back to back (each then checked on its own by
    /// ``decode(_:trust:)-(UnsafeRawBufferPointer,_)``). Rule: at each offset, if at least 8 bytes remain and
    /// they start with the magic, the frame is 72 + bodyLength + 16 bytes when that fits in what remains;
    /// otherwise the rest of the datagram is one last frame (which decode then refuses: `truncated`,
    /// `bad-magic` or `bad-length`). A datagram of one message is one frame. A forged length can only spoil the
    /// rest of its own datagram: each frame's MAC is still checked. The header's length is its version's (72, or 132 for
    /// version 5).
    public static func frames(in count: Int, readingHeader header: (Int) -> (magic: UInt32, version: UInt8, bodyLength: Int)?)
        -> [Range<Int>] {
        var frames: [Range<Int>] = []
        var offset = 0
        while offset < count {
            let remaining = count - offset
            if remaining >= 8, let h = header(offset), h.magic == magic {
                let length = headerLength(version: h.version) + h.bodyLength + TrustGroup.macLength
                if length <= remaining {
                    frames.append(offset..<(offset + length))
                    offset += length
                    continue
                }
            }
            frames.append(offset..<count)
            break
        }
        return frames
    }

    /// ``frames(in:readingHeader:)`` over bytes.
    public static func frames(in bytes: UnsafeRawBufferPointer) -> [Range<Int>] {
        frames(in: bytes.count) { offset in
            (cmReadBE32(bytes, offset), bytes[offset + 4], Int(cmReadBE16(bytes, offset + 6)))
        }
    }

    /// Decodes every message of a datagram: each frame's result, in order.
    public static func decodeAll(_ bytes: [UInt8], trust: TrustGroup,
                                 accepting: ClosedRange<UInt8> = versions) -> [Result<ControlMessage, ControlMessageError>] {
        bytes.withUnsafeBytes { raw in
            frames(in: raw).map { range in
                Result { () throws(ControlMessageError) in
                    try decode(UnsafeRawBufferPointer(rebasing: raw[range]), trust: trust, accepting: accepting)
                }
            }
        }
    }

    /// Packs encoded messages (in order) into as few datagrams as fit in `limit` bytes each.
    public static func bundle(_ encoded: [[UInt8]], limit: Int = bundleBytes) -> [[UInt8]] {
        var datagrams: [[UInt8]] = []
        var current: [UInt8] = []
        for message in encoded {
            if !current.isEmpty, current.count + message.count > limit {
                datagrams.append(current)
                current = []
            }
            current.append(contentsOf: message)
        }
        if !current.isEmpty { datagrams.append(current) }
        return datagrams
    }
}
