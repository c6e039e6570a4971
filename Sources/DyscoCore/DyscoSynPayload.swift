/// What an agent appends to the payload of a chained SYN (paper §2.1): the session 5-tuple and the
/// addresses of the hops still to come. Our own format, version 1, all integers big-endian:
///
/// ```
///   offset  size  field
///   0       1     version (1)
///   1       1     address family (4 = IPv4)
///   2       1     n: number of remaining addresses (0...16)
///   3       1     reserved, 0
///   4       4     session source address
///   8       4     session destination address
///   12      2     session source port
///   14      2     session destination port
///   16      4n    remaining hop addresses, next hop first; the last one is the session's right end
///   16+4n   2     block length = 22 + 4n (this trailer included)
///   18+4n   4     magic "DYSC" (0x44595343)
/// ```
///
/// The block is a *trailer*: it ends the SYN's payload, so a receiver finds it from the end (whatever data a
/// TCP Fast Open SYN carries before it stays untouched) and strips exactly `block length` bytes.
/// Decoding rule: no magic at the end → not a Dysco SYN (left alone). Magic present but anything else wrong →
/// ``DecodeError`` → the agent counts and drops the packet (docs/ARCHITECTURE.md, "Malformed input").
public struct DyscoSynPayload: Equatable, Sendable {
    public static let version: UInt8 = 1
    public static let familyIPv4: UInt8 = 4
    public static let magic: UInt32 = 0x4459_5343
    public static let fixedLength = 22
    public static let maxAddresses = 16
    public static var maxLength: Int { fixedLength + 4 * maxAddresses }

    public var session: FiveTuple
    public var remaining: [IPv4Address]

    public init(session: FiveTuple, remaining: [IPv4Address]) {
        self.session = session
        self.remaining = remaining
    }

    public var encodedLength: Int { Self.fixedLength + 4 * remaining.count }

    public enum DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
        case tooShort(available: Int)
        case badLength(declared: Int, addresses: Int)
        case unsupportedVersion(UInt8)
        case unsupportedFamily(UInt8)
        case tooManyAddresses(Int)
        case reservedNotZero
        case zeroAddress

        public var description: String {
            switch self {
            case .tooShort(let n): "Dysco trailer: only \(n) bytes of payload"
            case .badLength(let d, let n): "Dysco trailer: declared length \(d) does not fit \(n) addresses"
            case .unsupportedVersion(let v): "Dysco trailer: unsupported version \(v)"
            case .unsupportedFamily(let f): "Dysco trailer: unsupported address family \(f)"
            case .tooManyAddresses(let n): "Dysco trailer: \(n) addresses (at most \(DyscoSynPayload.maxAddresses))"
            case .reservedNotZero: "Dysco trailer: reserved byte is not zero"
            case .zeroAddress: "Dysco trailer: an address or port is zero"
            }
        }
    }

    /// Whether `payload` ends with the Dysco magic (then it is ours, valid or not).
    public static func hasTrailer(_ payload: UnsafeRawBufferPointer) -> Bool {
        payload.count >= 4 && readBE32(payload, payload.count - 4) == magic
    }

    /// Decodes the trailer at the end of `payload`. Returns the payload and the trailer's total length.
    public static func decode(trailerOf payload: UnsafeRawBufferPointer) throws(DecodeError) -> (DyscoSynPayload, Int) {
        guard payload.count >= fixedLength else { throw .tooShort(available: payload.count) }
        let end = payload.count
        let declared = Int(readBE16(payload, end - 6))
        guard declared >= fixedLength, declared <= end, (declared - fixedLength) % 4 == 0 else {
            throw .badLength(declared: declared, addresses: -1)
        }
        let start = end - declared
        let version = payload[start], family = payload[start + 1], count = Int(payload[start + 2])
        guard version == Self.version else { throw .unsupportedVersion(version) }
        guard family == familyIPv4 else { throw .unsupportedFamily(family) }
        guard count <= maxAddresses else { throw .tooManyAddresses(count) }
        guard declared == fixedLength + 4 * count else { throw .badLength(declared: declared, addresses: count) }
        guard payload[start + 3] == 0 else { throw .reservedNotZero }
        let session = FiveTuple(srcAddr: IPv4Address(readBE32(payload, start + 4)), srcPort: readBE16(payload, start + 12),
                                dstAddr: IPv4Address(readBE32(payload, start + 8)), dstPort: readBE16(payload, start + 14))
        guard session.srcAddr.value != 0, session.dstAddr.value != 0, session.srcPort != 0, session.dstPort != 0 else {
            throw .zeroAddress
        }
        var remaining: [IPv4Address] = []
        remaining.reserveCapacity(count)
        for i in 0..<count {
            let address = IPv4Address(readBE32(payload, start + 16 + 4 * i))
            guard address.value != 0 else { throw .zeroAddress }
            remaining.append(address)
        }
        return (DyscoSynPayload(session: session, remaining: remaining), declared)
    }

    /// Writes the encoded trailer into `buffer` (which must hold ``encodedLength`` bytes).
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= encodedLength && remaining.count <= Self.maxAddresses)
        buffer[0] = Self.version
        buffer[1] = Self.familyIPv4
        buffer[2] = UInt8(remaining.count)
        buffer[3] = 0
        writeBE32(buffer, 4, session.srcAddr.value)
        writeBE32(buffer, 8, session.dstAddr.value)
        writeBE16(buffer, 12, session.srcPort)
        writeBE16(buffer, 14, session.dstPort)
        for (i, address) in remaining.enumerated() { writeBE32(buffer, 16 + 4 * i, address.value) }
        let end = encodedLength
        writeBE16(buffer, end - 6, UInt16(end))
        writeBE32(buffer, end - 4, Self.magic)
    }

    public func encoded() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: encodedLength) { buffer, count in
            encode(into: UnsafeMutableRawBufferPointer(buffer))
            count = encodedLength
        }
    }
}

@inline(__always) private func readBE16(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt16 {
    UInt16(b[at]) << 8 | UInt16(b[at + 1])
}
@inline(__always) private func readBE32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
    UInt32(readBE16(b, at)) << 16 | UInt32(readBE16(b, at + 2))
}
@inline(__always) private func writeBE16(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt16) {
    b[at] = UInt8(v >> 8)
    b[at + 1] = UInt8(truncatingIfNeeded: v)
}
@inline(__always) private func writeBE32(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt32) {
    writeBE16(b, at, UInt16(v >> 16))
    writeBE16(b, at + 2, UInt16(truncatingIfNeeded: v))
}
