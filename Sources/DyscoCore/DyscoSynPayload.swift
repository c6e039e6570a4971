/// What an agent appends to the payload of a chained SYN (paper §2.1, §2.3): the session's chain-wide
/// identity, the session 5-tuple, the addresses of the hops still to come and a MAC that proves an agent of
/// the trust group wrote it for exactly this packet's tuple. Our own format, version 2, big-endian. An address
/// takes `a` bytes: 4 in family 4 (IPv4), 16 in family 6 (IPv6); the session, its hops and the packet are of one
/// family. The offsets below are family 4's; family 6 moves everything after byte 20 by the longer addresses
/// (session ports at 52, hops from 56, fixed length 78).
///
/// ```
///   offset  size  field
///   0       1     version (2)
///   1       1     address family (4 = IPv4, 6 = IPv6)
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
/// 0 ..< 32+4n followed by the 12 bytes (IPv6: 36) of the packet's own subsession tuple as on the wire — source
/// address, destination address, source port, destination port, big-endian — so a trailer cannot be replayed on
/// another tuple. The receiver accepts the current and, during a rotation, the previous key.
///
/// The block is a *trailer*: it ends the SYN's payload, so a receiver finds it from the end (whatever data a
/// TCP Fast Open SYN carries before it stays untouched) and strips exactly `block length` bytes.
///
/// Decoding rule: no magic at the end → not a Dysco SYN (left alone). Magic present: only the block length,
/// the version byte and the family byte (which fixes the layout; neither 4 nor 6, or not the packet's own family,
/// is ``DecodeError/unsupportedFamily(_:)``) are read before the MAC is verified; version 1 (the unauthenticated format:
/// `version(1)=1 family n reserved | session(12) | n × address | length = 22+4n | magic`) is refused with
/// ``DecodeError/versionOneRefused``. After a valid MAC: family, count, reserved byte, chain id ≠ 0, ports ≠ 0,
/// and no session address or remaining hop for which ``IPAddress/isForbiddenHop`` (loopback, multicast,
/// broadcast, 0/8, link-local). Any ``DecodeError`` → the agent counts and drops the packet
/// (docs/ARCHITECTURE.md, "Malformed input").
public struct DyscoSynPayload: Equatable, Sendable {
    public static let version: UInt8 = 2
    public static let familyIPv4: UInt8 = 4
    public static let familyIPv6: UInt8 = 6
    public static let magic: UInt32 = 0x4459_5343
    /// Bytes of an IPv4 trailer with no addresses: header 4, identity 16, session 12, MAC 16, length 2, magic 4.
    public static let fixedLength = 54
    public static let maxAddresses = 16
    /// The longest trailer of either family (IPv6: 78 + 16 × 16), the room a SYN must have for it.
    public static var maxLength: Int { layout(ipv6: true).fixedLength + 16 * maxAddresses }

    /// Where the fields lie for one family (addresses of `size` bytes).
    struct Layout {
        let family: UInt8
        let size: Int
        var sessionPorts: Int { 20 + 2 * size }
        /// Offset of the first hop address (the end of the fixed signed part).
        var addressesOffset: Int { 24 + 2 * size }
        var fixedLength: Int { addressesOffset + 22 }
        func length(hops: Int) -> Int { fixedLength + size * hops }
    }

    static func layout(ipv6: Bool) -> Layout {
        ipv6 ? Layout(family: familyIPv6, size: 16) : Layout(family: familyIPv4, size: 4)
    }

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

    var layout: Layout { Self.layout(ipv6: !session.srcAddr.isIPv4) }

    public var encodedLength: Int { layout.length(hops: remaining.count) }

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
        guard declared >= 2 else { throw .badLength(declared: declared, addresses: -1) }
        let family = payload[start + 1]
        guard family == familyIPv4 || family == familyIPv6, (family == familyIPv4) == tuple.srcAddr.isIPv4 else {
            throw .unsupportedFamily(family)
        }
        let layout = Self.layout(ipv6: family == familyIPv6)
        guard declared >= layout.fixedLength, declared <= layout.length(hops: maxAddresses),
              (declared - layout.fixedLength) % layout.size == 0 else {
            throw .badLength(declared: declared, addresses: -1)
        }
        let signedLength = declared - 22  // everything before MAC, length and magic
        let count = (signedLength - layout.addressesOffset) / layout.size
        // Nothing beyond the length, the version and the family is trusted before this.
        let signed = UnsafeRawBufferPointer(rebasing: payload[start..<start + signedLength])
        let tag = UnsafeRawBufferPointer(rebasing: payload[start + signedLength..<start + signedLength + TrustGroup.macLength])
        let valid = withTupleBytes(tuple) { tupleBytes in trust.verify(tag, signed, tupleBytes) }
        guard valid else { throw .badMAC }

        let declaredCount = Int(payload[start + 2])
        guard declaredCount <= maxAddresses else { throw .tooManyAddresses(declaredCount) }
        guard declaredCount == count else { throw .badLength(declared: declared, addresses: declaredCount) }
        guard payload[start + 3] & ~Self.renamedUpstreamFlag == 0 else { throw .reservedNotZero }
        let renamed = payload[start + 3] & Self.renamedUpstreamFlag != 0
        let identity = SessionIdentity(chainID: readBE64(payload, start + 4), nonce: readBE64(payload, start + 12))
        guard identity.chainID != 0 else { throw .zeroIdentity }
        func address(_ at: Int) -> IPAddress {
            layout.size == 4 ? IPAddress(readBE32(payload, start + at))
                : IPAddress(networkBytes: UnsafeRawBufferPointer(rebasing: payload[start + at..<start + at + 16]))
        }
        let session = FiveTuple(srcAddr: address(20), srcPort: readBE16(payload, start + layout.sessionPorts),
                                dstAddr: address(20 + layout.size), dstPort: readBE16(payload, start + layout.sessionPorts + 2))
        guard session.srcPort != 0, session.dstPort != 0 else { throw .zeroAddress }
        for address in [session.srcAddr, session.dstAddr] where address.isForbiddenHop || address.family != tuple.srcAddr.family {
            throw .forbiddenAddress(address)
        }
        var remaining: [IPAddress] = []
        remaining.reserveCapacity(count)
        for i in 0..<count {
            let address = address(layout.addressesOffset + layout.size * i)
            guard !address.isForbiddenHop, address.family == tuple.srcAddr.family else { throw .forbiddenAddress(address) }
            remaining.append(address)
        }
        return (DyscoSynPayload(identity: identity, session: session, remaining: remaining, renamedUpstream: renamed), declared)
    }

    /// Writes the encoded trailer, signed for a packet with `tuple` under the current key of `trust`, into
    /// `buffer` (which must hold ``encodedLength`` bytes). Encoding checks nothing but the address count: a
    /// receiver refuses what it must not trust.
    public func encode(into buffer: UnsafeMutableRawBufferPointer, tuple: FiveTuple, trust: TrustGroup) {
        let layout = self.layout
        precondition(buffer.count >= encodedLength && remaining.count <= Self.maxAddresses)
        precondition(([session.dstAddr, tuple.srcAddr] + remaining).allSatisfy { $0.isIPv4 == session.srcAddr.isIPv4 },
                     "a trailer's session, hops and packet are of one family")
        buffer[0] = Self.version
        buffer[1] = layout.family
        buffer[2] = UInt8(remaining.count)
        buffer[3] = renamedUpstream ? Self.renamedUpstreamFlag : 0
        writeBE64(buffer, 4, identity.chainID)
        writeBE64(buffer, 12, identity.nonce)
        writeAddress(buffer, 20, session.srcAddr)
        writeAddress(buffer, 20 + layout.size, session.dstAddr)
        writeBE16(buffer, layout.sessionPorts, session.srcPort)
        writeBE16(buffer, layout.sessionPorts + 2, session.dstPort)
        for (i, address) in remaining.enumerated() { writeAddress(buffer, layout.addressesOffset + layout.size * i, address) }
        let signedLength = layout.addressesOffset + layout.size * remaining.count
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

    /// The bytes the MAC covers after the trailer: src addr, dst addr, src port, dst port, big-endian (12 bytes for
    /// IPv4, 36 for IPv6).
    static func withTupleBytes<R>(_ tuple: FiveTuple, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        let size = tuple.srcAddr.isIPv4 ? 4 : 16
        return withUnsafeTemporaryAllocation(byteCount: 2 * size + 4, alignment: 1) { raw in
            writeAddress(raw, 0, tuple.srcAddr)
            writeAddress(raw, size, tuple.dstAddr)
            writeBE16(raw, 2 * size, tuple.srcPort)
            writeBE16(raw, 2 * size + 2, tuple.dstPort)
            return body(UnsafeRawBufferPointer(raw))
        }
    }
}

/// An address in its family's wire size: 4 bytes for IPv4, 16 for IPv6.
@inline(__always) private func writeAddress(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ address: IPAddress) {
    if address.isIPv4 { writeBE32(b, at, address.value) } else { address.store(to: b.baseAddress! + at) }
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
