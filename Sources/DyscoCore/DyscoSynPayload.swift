/// What an agent appends to the payload of a chained SYN (paper §2.1, §2.3): the session's chain-wide
/// identity, the session 5-tuple, the addresses of the hops still to come and a MAC that proves an agent of
/// the trust group wrote it for exactly this packet's tuple. Our own format, version 2, big-endian:
///
/// ```
///   offset  size  field
///   0       1     version (2)
///   1       1     address family (4 = IPv4)
///   2       1     n: number of remaining addresses (0...16)
///   3       1     flags: bit 0 = renamed upstream (a box before this hop translated the session's tuple,
///                 ``renamedUpstream``); the other bits reserved, 0
///   4       8     chain id   (SessionIdentity.chainID, fixed by the left end; never 0)
///   12      8     nonce      (SessionIdentity.nonce, fixed by the left end)
///   20      4     session source address
///   24      4     session destination address
///   28      2     session source port
///   30      2     session destination port
///   32      4n    remaining hop addresses, next hop first; the last one is the session's right end
///   32+4n   16    MAC = TrustGroup.mac(bytes 0 ..< 32+4n, packet tuple)
///   48+4n   2     block length = 54 + 4n (this trailer included)
///   50+4n   4     magic "DYSC" (0x44595343)
/// ```
///
/// The MAC (HMAC-SHA256 under the deployment's key, truncated to 16 bytes, ``TrustGroup``) covers bytes
/// 0 ..< 32+4n followed by the 12 bytes of the packet's own subsession tuple as on the wire — source address,
/// destination address, source port, destination port, big-endian — so a trailer cannot be replayed on
/// another tuple. The receiver accepts the current and, during a rotation, the previous key.
///
/// The block is a *trailer*: it ends the SYN's payload, so a receiver finds it from the end (whatever data a
/// TCP Fast Open SYN carries before it stays untouched) and strips exactly `block length` bytes.
///
/// Decoding rule: no magic at the end → not a Dysco SYN (left alone). Magic present: only the block length
/// and the version byte are read before the MAC is verified; version 1 (the unauthenticated format:
/// `version(1)=1 family n reserved | session(12) | n × address | length = 22+4n | magic`) is refused with
/// ``DecodeError/versionOneRefused``. After a valid MAC: family, count, reserved byte, chain id ≠ 0, ports ≠ 0,
/// and no session address or remaining hop for which ``IPAddress/isForbiddenHop`` (loopback, multicast,
/// broadcast, 0/8, link-local). Any ``DecodeError`` → the agent counts and drops the packet
/// (docs/ARCHITECTURE.md, "Malformed input").
public struct DyscoSynPayload: Equatable, Sendable {
    public static let version: UInt8 = 2
    public static let familyIPv4: UInt8 = 4
    public static let magic: UInt32 = 0x4459_5343
    /// Bytes of a trailer with no addresses: header 4, identity 16, session 12, MAC 16, length 2, magic 4.
    public static let fixedLength = 54
    public static let maxAddresses = 16
    public static var maxLength: Int { fixedLength + 4 * maxAddresses }
    /// Offset of the first hop address (the end of the fixed signed part).
    static let addressesOffset = 32

    /// Flag bit of byte 3: ``renamedUpstream``.
    static let renamedUpstreamFlag: UInt8 = 0x01

    public var identity: SessionIdentity
    public var session: FiveTuple
    public var remaining: [IPAddress]
    /// A box before this hop translated the session's tuple (paper §2.1, "Middleboxes that modify the five-tuple"):
    /// `session` is the tuple as that box made it, and the chain's left end knows the session by another tuple. The
    /// hops from here on accept the reconfiguration messages that name it so (docs/CONTROL-PROTOCOL.md, "Sessions
    /// a box renamed").
    public var renamedUpstream: Bool

    public init(identity: SessionIdentity, session: FiveTuple, remaining: [IPAddress], renamedUpstream: Bool = false) {
        self.identity = identity
        self.session = session
        self.remaining = remaining
        self.renamedUpstream = renamedUpstream
    }

    public var encodedLength: Int { Self.fixedLength + 4 * remaining.count }

    public enum DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
        case tooShort(available: Int)
        case noMagic
        case badLength(declared: Int, addresses: Int)
        /// A version-1 trailer (unauthenticated): refused (paper §2.3).
        case versionOneRefused
        case unsupportedVersion(UInt8)
        /// The MAC is not valid under the current or previous key for this trailer on this packet's tuple.
        case badMAC
        case unsupportedFamily(UInt8)
        case tooManyAddresses(Int)
        case reservedNotZero
        /// A session port is zero.
        case zeroAddress
        /// The chain id is zero.
        case zeroIdentity
        /// A session address or remaining hop is loopback, multicast, broadcast, 0/8 or link-local.
        case forbiddenAddress(IPAddress)

        public var description: String {
            switch self {
            case .tooShort(let n): "Dysco trailer: only \(n) bytes of payload"
            case .noMagic: "Dysco trailer: no magic at the end of the payload"
            case .badLength(let d, let n): "Dysco trailer: declared length \(d) does not fit \(n) addresses"
            case .versionOneRefused: "Dysco trailer: version 1 (unauthenticated) refused; agents must send version 2"
            case .unsupportedVersion(let v): "Dysco trailer: unsupported version \(v)"
            case .badMAC: "Dysco trailer: MAC invalid (wrong trust key, altered, or replayed on another tuple)"
            case .unsupportedFamily(let f): "Dysco trailer: unsupported address family \(f)"
            case .tooManyAddresses(let n): "Dysco trailer: \(n) addresses (at most \(DyscoSynPayload.maxAddresses))"
            case .reservedNotZero: "Dysco trailer: a reserved flag bit is set"
            case .zeroAddress: "Dysco trailer: a session port is zero"
            case .zeroIdentity: "Dysco trailer: chain id is zero"
            case .forbiddenAddress(let a): "Dysco trailer: forbidden address \(a) (loopback, multicast, broadcast, unspecified or link-local)"
            }
        }
    }

    /// Whether `payload` ends with the Dysco magic (then it is ours, valid or not).
    public static func hasTrailer(_ payload: UnsafeRawBufferPointer) -> Bool {
        payload.count >= 4 && readBE32(payload, payload.count - 4) == magic
    }

    /// Decodes and authenticates the trailer at the end of `payload`, which arrived in a packet with `tuple`
    /// (as on the wire). Returns the trailer and its total length.
    public static func decode(trailerOf payload: UnsafeRawBufferPointer, tuple: FiveTuple,
                              trust: TrustGroup) throws(DecodeError) -> (DyscoSynPayload, Int) {
        let end = payload.count
        guard end >= 6 else { throw .tooShort(available: end) }
        guard readBE32(payload, end - 4) == magic else { throw .noMagic }
        let declared = Int(readBE16(payload, end - 6))
        guard declared >= 6, declared <= end else { throw .badLength(declared: declared, addresses: -1) }
        let start = end - declared
        let version = payload[start]
        if version == 1 { throw .versionOneRefused }
        guard version == Self.version else { throw .unsupportedVersion(version) }
        guard declared >= fixedLength, declared <= maxLength, (declared - fixedLength) % 4 == 0 else {
            throw .badLength(declared: declared, addresses: -1)
        }
        let signedLength = declared - 22  // everything before MAC, length and magic
        let count = (signedLength - addressesOffset) / 4
        // Nothing beyond the length and the version is trusted before this.
        let signed = UnsafeRawBufferPointer(rebasing: payload[start..<start + signedLength])
        let tag = UnsafeRawBufferPointer(rebasing: payload[start + signedLength..<start + signedLength + TrustGroup.macLength])
        let valid = withTupleBytes(tuple) { tupleBytes in trust.verify(tag, signed, tupleBytes) }
        guard valid else { throw .badMAC }

        let family = payload[start + 1], declaredCount = Int(payload[start + 2])
        guard family == familyIPv4 else { throw .unsupportedFamily(family) }
        guard declaredCount <= maxAddresses else { throw .tooManyAddresses(declaredCount) }
        guard declaredCount == count else { throw .badLength(declared: declared, addresses: declaredCount) }
        guard payload[start + 3] & ~Self.renamedUpstreamFlag == 0 else { throw .reservedNotZero }
        let renamed = payload[start + 3] & Self.renamedUpstreamFlag != 0
        let identity = SessionIdentity(chainID: readBE64(payload, start + 4), nonce: readBE64(payload, start + 12))
        guard identity.chainID != 0 else { throw .zeroIdentity }
        let session = FiveTuple(srcAddr: IPAddress(readBE32(payload, start + 20)), srcPort: readBE16(payload, start + 28),
                                dstAddr: IPAddress(readBE32(payload, start + 24)), dstPort: readBE16(payload, start + 30))
        guard session.srcPort != 0, session.dstPort != 0 else { throw .zeroAddress }
        for address in [session.srcAddr, session.dstAddr] where address.isForbiddenHop {
            throw .forbiddenAddress(address)
        }
        var remaining: [IPAddress] = []
        remaining.reserveCapacity(count)
        for i in 0..<count {
            let address = IPAddress(readBE32(payload, start + addressesOffset + 4 * i))
            guard !address.isForbiddenHop else { throw .forbiddenAddress(address) }
            remaining.append(address)
        }
        return (DyscoSynPayload(identity: identity, session: session, remaining: remaining, renamedUpstream: renamed), declared)
    }

    /// Writes the encoded trailer, signed for a packet with `tuple` under the current key of `trust`, into
    /// `buffer` (which must hold ``encodedLength`` bytes). Encoding checks nothing but the address count: a
    /// receiver refuses what it must not trust.
    public func encode(into buffer: UnsafeMutableRawBufferPointer, tuple: FiveTuple, trust: TrustGroup) {
        precondition(buffer.count >= encodedLength && remaining.count <= Self.maxAddresses)
        buffer[0] = Self.version
        buffer[1] = Self.familyIPv4
        buffer[2] = UInt8(remaining.count)
        buffer[3] = renamedUpstream ? Self.renamedUpstreamFlag : 0
        writeBE64(buffer, 4, identity.chainID)
        writeBE64(buffer, 12, identity.nonce)
        writeBE32(buffer, 20, session.srcAddr.value)
        writeBE32(buffer, 24, session.dstAddr.value)
        writeBE16(buffer, 28, session.srcPort)
        writeBE16(buffer, 30, session.dstPort)
        for (i, address) in remaining.enumerated() { writeBE32(buffer, Self.addressesOffset + 4 * i, address.value) }
        let signedLength = Self.addressesOffset + 4 * remaining.count
        let mac = Self.withTupleBytes(tuple) { tupleBytes in
            trust.mac(UnsafeRawBufferPointer(rebasing: buffer[0..<signedLength]), tupleBytes)
        }
        for (i, byte) in mac.enumerated() { buffer[signedLength + i] = byte }
        let end = encodedLength
        writeBE16(buffer, end - 6, UInt16(end))
        writeBE32(buffer, end - 4, Self.magic)
    }

    public func encoded(tuple: FiveTuple, trust: TrustGroup) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: encodedLength) { buffer, count in
            encode(into: UnsafeMutableRawBufferPointer(buffer), tuple: tuple, trust: trust)
            count = encodedLength
        }
    }

    /// The 12 bytes the MAC covers after the trailer: src addr, dst addr, src port, dst port, big-endian.
    static func withTupleBytes<R>(_ tuple: FiveTuple, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        withUnsafeTemporaryAllocation(byteCount: 12, alignment: 1) { raw in
            writeBE32(raw, 0, tuple.srcAddr.value)
            writeBE32(raw, 4, tuple.dstAddr.value)
            writeBE16(raw, 8, tuple.srcPort)
            writeBE16(raw, 10, tuple.dstPort)
            return body(UnsafeRawBufferPointer(raw))
        }
    }
}

@inline(__always) private func readBE16(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt16 {
    UInt16(b[at]) << 8 | UInt16(b[at + 1])
}
@inline(__always) private func readBE32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
    UInt32(readBE16(b, at)) << 16 | UInt32(readBE16(b, at + 2))
}
@inline(__always) private func readBE64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
    UInt64(readBE32(b, at)) << 32 | UInt64(readBE32(b, at + 4))
}
@inline(__always) private func writeBE16(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt16) {
    b[at] = UInt8(v >> 8)
    b[at + 1] = UInt8(truncatingIfNeeded: v)
}
@inline(__always) private func writeBE32(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt32) {
    writeBE16(b, at, UInt16(v >> 16))
    writeBE16(b, at + 2, UInt16(truncatingIfNeeded: v))
}
@inline(__always) private func writeBE64(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt64) {
    writeBE32(b, at, UInt32(v >> 32))
    writeBE32(b, at + 4, UInt32(truncatingIfNeeded: v))
}
