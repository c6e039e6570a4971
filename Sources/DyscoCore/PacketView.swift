/// Views over packet bytes with named accessors (gvisor netstack style). Getters return host-order values;
/// setters write network order and keep the header checksum right with RFC 1624 incremental updates.
/// No view checks bounds on access: ``IPv4TCPPacket/parse(_:count:)`` validates lengths once, up front.

/// The IPv4 header at the start of a buffer.
public struct IPv4HeaderView {
    public let base: UnsafeMutableRawPointer

    public static let minimumLength = 20
    public static let protocolTCP: UInt8 = 6

    enum Offset {
        static let versionIHL = 0, totalLength = 2, fragment = 6, ttl = 8, protocolNumber = 9, checksum = 10
        static let source = 12, destination = 16
    }

    public init(_ base: UnsafeMutableRawPointer) { self.base = base }

    public var version: UInt8 { base.load(fromByteOffset: Offset.versionIHL, as: UInt8.self) >> 4 }
    public var headerLength: Int { Int(base.load(fromByteOffset: Offset.versionIHL, as: UInt8.self) & 0x0f) * 4 }
    public var totalLength: Int { Int(loadBE16(Offset.totalLength)) }
    public var protocolNumber: UInt8 { base.load(fromByteOffset: Offset.protocolNumber, as: UInt8.self) }
    /// More-fragments flag set or a non-zero fragment offset.
    public var isFragment: Bool { loadBE16(Offset.fragment) & 0x3fff != 0 }
    public var checksum: UInt16 { loadBE16(Offset.checksum) }

    public var sourceAddress: IPAddress { IPAddress(UInt32(bigEndian: rawSource)) }
    public var destinationAddress: IPAddress { IPAddress(UInt32(bigEndian: rawDestination)) }
    var rawSource: UInt32 { base.loadUnaligned(fromByteOffset: Offset.source, as: UInt32.self) }
    var rawDestination: UInt32 { base.loadUnaligned(fromByteOffset: Offset.destination, as: UInt32.self) }

    public func setSourceAddress(_ address: IPAddress) { setAddress(address, at: Offset.source) }
    public func setDestinationAddress(_ address: IPAddress) { setAddress(address, at: Offset.destination) }

    public func setTotalLength(_ length: Int) {
        let old = base.loadUnaligned(fromByteOffset: Offset.totalLength, as: UInt16.self)
        let new = UInt16(truncatingIfNeeded: length).bigEndian
        base.storeBytes(of: new, toByteOffset: Offset.totalLength, as: UInt16.self)
        updateChecksum { InternetChecksum.update($0, old: old, new: new) }
    }

    /// Recomputes the header checksum from scratch.
    public func recomputeChecksum() {
        base.storeBytes(of: 0, toByteOffset: Offset.checksum, as: UInt16.self)
        let sum = InternetChecksum.checksum(UnsafeRawPointer(base), count: headerLength)
        base.storeBytes(of: sum, toByteOffset: Offset.checksum, as: UInt16.self)
    }

    /// True when the header checksum verifies.
    public var isChecksumValid: Bool {
        InternetChecksum.fold(InternetChecksum.accumulate(UnsafeRawPointer(base), count: headerLength)) == 0xffff
    }

    private func setAddress(_ address: IPAddress, at offset: Int) {
        let old = base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
        let new = address.value.bigEndian
        base.storeBytes(of: new, toByteOffset: offset, as: UInt32.self)
        updateChecksum { InternetChecksum.update($0, old: old, new: new) }
    }

    private func updateChecksum(_ transform: (UInt16) -> UInt16) {
        let raw = base.loadUnaligned(fromByteOffset: Offset.checksum, as: UInt16.self)
        base.storeBytes(of: transform(raw), toByteOffset: Offset.checksum, as: UInt16.self)
    }

    private func loadBE16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
}

/// TCP flag bits (RFC 9293 §3.1).
public struct TCPFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let fin = TCPFlags(rawValue: 0x01)
    public static let syn = TCPFlags(rawValue: 0x02)
    public static let rst = TCPFlags(rawValue: 0x04)
    public static let psh = TCPFlags(rawValue: 0x08)
    public static let ack = TCPFlags(rawValue: 0x10)
}

/// The TCP header at `base`. Port setters update the TCP checksum incrementally unless told not to (a
/// packet whose checksum will be recomputed in full).
public struct TCPHeaderView {
    public let base: UnsafeMutableRawPointer

    public static let minimumLength = 20

    enum Offset {
        static let sourcePort = 0, destinationPort = 2, sequence = 4, acknowledgment = 8, dataOffset = 12
        static let flags = 13, window = 14, checksum = 16
    }

    public init(_ base: UnsafeMutableRawPointer) { self.base = base }

    public var sourcePort: UInt16 { loadBE16(Offset.sourcePort) }
    public var destinationPort: UInt16 { loadBE16(Offset.destinationPort) }
    public var sequenceNumber: UInt32 { UInt32(bigEndian: base.loadUnaligned(fromByteOffset: Offset.sequence, as: UInt32.self)) }
    public var acknowledgmentNumber: UInt32 {
        UInt32(bigEndian: base.loadUnaligned(fromByteOffset: Offset.acknowledgment, as: UInt32.self))
    }
    public var headerLength: Int { Int(base.load(fromByteOffset: Offset.dataOffset, as: UInt8.self) >> 4) * 4 }
    public var flags: TCPFlags { TCPFlags(rawValue: base.load(fromByteOffset: Offset.flags, as: UInt8.self) & 0x3f) }
    public var window: UInt16 { loadBE16(Offset.window) }
    public var checksum: UInt16 { loadBE16(Offset.checksum) }
    var rawChecksum: UInt16 {
        get { base.loadUnaligned(fromByteOffset: Offset.checksum, as: UInt16.self) }
        nonmutating set { base.storeBytes(of: newValue, toByteOffset: Offset.checksum, as: UInt16.self) }
    }

    public func setSourcePort(_ port: UInt16, updateChecksum: Bool = true) {
        setPort(port, at: Offset.sourcePort, updateChecksum: updateChecksum)
    }

    public func setDestinationPort(_ port: UInt16, updateChecksum: Bool = true) {
        setPort(port, at: Offset.destinationPort, updateChecksum: updateChecksum)
    }

    public func setWindow(_ value: UInt16, updateChecksum: Bool = true) {
        let old = base.loadUnaligned(fromByteOffset: Offset.window, as: UInt16.self)
        let new = value.bigEndian
        base.storeBytes(of: new, toByteOffset: Offset.window, as: UInt16.self)
        if updateChecksum { rawChecksum = InternetChecksum.update(rawChecksum, old: old, new: new) }
    }

    public func setSequenceNumber(_ value: UInt32, updateChecksum: Bool = true) {
        setWord(value, at: Offset.sequence, updateChecksum: updateChecksum)
    }

    public func setAcknowledgmentNumber(_ value: UInt32, updateChecksum: Bool = true) {
        setWord(value, at: Offset.acknowledgment, updateChecksum: updateChecksum)
    }

    private func setWord(_ value: UInt32, at offset: Int, updateChecksum: Bool) {
        let old = base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
        let new = value.bigEndian
        base.storeBytes(of: new, toByteOffset: offset, as: UInt32.self)
        if updateChecksum { rawChecksum = InternetChecksum.update(rawChecksum, old: old, new: new) }
    }

    /// The full checksum of the `segmentLength` bytes of header and payload at `base` with a pseudo-header's sum, as
    /// it should be stored (raw); the checksum field counts as zero and is left as it was.
    func computeChecksum(segmentLength: Int, pseudoHeaderSum: UInt64) -> UInt16 {
        let saved = rawChecksum
        rawChecksum = 0
        defer { rawChecksum = saved }
        return InternetChecksum.checksum(UnsafeRawPointer(base), count: segmentLength, initial: pseudoHeaderSum)
    }

    /// Folds a changed IPv4 address of the pseudo-header into the TCP checksum (raw values).
    func updateChecksumForAddress(oldRaw: UInt32, newRaw: UInt32) {
        rawChecksum = InternetChecksum.update(rawChecksum, old: oldRaw, new: newRaw)
    }

    private func setPort(_ port: UInt16, at offset: Int, updateChecksum: Bool) {
        let old = base.loadUnaligned(fromByteOffset: offset, as: UInt16.self)
        let new = port.bigEndian
        base.storeBytes(of: new, toByteOffset: offset, as: UInt16.self)
        if updateChecksum { rawChecksum = InternetChecksum.update(rawChecksum, old: old, new: new) }
    }

    private func loadBE16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
}

/// How the TCP checksum of a queued packet must be treated after a rewrite.
public enum ChecksumState: Sendable {
    /// The checksum field holds a full checksum (verified or not): update it incrementally.
    case complete
    /// CHECKSUM_PARTIAL (NFQA_SKB_CSUMNOTREADY): the field holds only the pseudo-header sum. The kernel marks
    /// a mangled packet CHECKSUM_NONE, so after any change the full checksum must be computed.
    case partial
}

/// An IPv4 packet carrying an unfragmented TCP segment, validated once on parse.
public struct IPv4TCPPacket {
    public let ip: IPv4HeaderView
    public let tcp: TCPHeaderView
    /// Bytes of the packet (IP total length; may be less than the buffer).
    public private(set) var length: Int

    public enum ParseError: Error, Equatable, Sendable {
        case truncated, notIPv4, badHeaderLength, notTCP, fragment, badTCPHeaderLength
    }

    /// Validates the IPv4 and TCP headers' lengths against `count` buffer bytes.
    public static func parse(_ base: UnsafeMutableRawPointer, count: Int) -> Result<IPv4TCPPacket, ParseError> {
        guard count >= IPv4HeaderView.minimumLength else { return .failure(.truncated) }
        let ip = IPv4HeaderView(base)
        guard ip.version == 4 else { return .failure(.notIPv4) }
        let ihl = ip.headerLength
        let total = ip.totalLength
        guard ihl >= IPv4HeaderView.minimumLength, total >= ihl else { return .failure(.badHeaderLength) }
        // GSO packets handed over with NFQA_CFG_F_GSO may carry total length 0 (> 64 KiB is not possible
        // on IPv4 without it); treat 0 as "the buffer".
        let length = total == 0 ? count : total
        guard length <= count else { return .failure(.truncated) }
        guard ip.protocolNumber == IPv4HeaderView.protocolTCP else { return .failure(.notTCP) }
        guard !ip.isFragment else { return .failure(.fragment) }
        guard length >= ihl + TCPHeaderView.minimumLength else { return .failure(.truncated) }
        let tcp = TCPHeaderView(base + ihl)
        let thl = tcp.headerLength
        guard thl >= TCPHeaderView.minimumLength, ihl + thl <= length else { return .failure(.badTCPHeaderLength) }
        return .success(IPv4TCPPacket(ip: ip, tcp: tcp, length: length))
    }

    public var tcpOffset: Int { ip.headerLength }

    public var tuple: FiveTuple {
        FiveTuple(srcAddr: ip.sourceAddress, srcPort: tcp.sourcePort,
                  dstAddr: ip.destinationAddress, dstPort: tcp.destinationPort)
    }

    /// Rewrites addresses and ports to `tuple`, touching only the fields that change. With `.complete` the
    /// TCP checksum is updated incrementally; with `.partial` it is recomputed over the whole segment.
    public func rewrite(to tuple: FiveTuple, checksum: ChecksumState) {
        let incremental = checksum == .complete
        let oldSrc = ip.rawSource, newSrc = tuple.srcAddr.value.bigEndian
        if oldSrc != newSrc {
            ip.setSourceAddress(tuple.srcAddr)
            if incremental { tcp.updateChecksumForAddress(oldRaw: oldSrc, newRaw: newSrc) }
        }
        let oldDst = ip.rawDestination, newDst = tuple.dstAddr.value.bigEndian
        if oldDst != newDst {
            ip.setDestinationAddress(tuple.dstAddr)
            if incremental { tcp.updateChecksumForAddress(oldRaw: oldDst, newRaw: newDst) }
        }
        if tcp.sourcePort != tuple.srcPort { tcp.setSourcePort(tuple.srcPort, updateChecksum: incremental) }
        if tcp.destinationPort != tuple.dstPort { tcp.setDestinationPort(tuple.dstPort, updateChecksum: incremental) }
        if !incremental { recomputeTCPChecksum() }
    }

    /// The full TCP checksum over pseudo-header, header and payload, as it should be stored (raw).
    public func computeTCPChecksum() -> UInt16 {
        let segmentLength = length - tcpOffset
        return tcp.computeChecksum(segmentLength: segmentLength, pseudoHeaderSum: InternetChecksum.pseudoHeaderSum(
            sourceRaw: ip.rawSource, destinationRaw: ip.rawDestination, protocolNumber: IPv4HeaderView.protocolTCP,
            length: segmentLength))
    }

    /// Cuts the packet to `newLength` bytes (removing payload from the end), fixing the IP total length and
    /// header checksum. The TCP checksum must be recomputed afterwards by the caller.
    public mutating func truncate(to newLength: Int) {
        precondition(newLength >= payloadOffset && newLength <= length)
        ip.setTotalLength(newLength)
        length = newLength
    }

    /// Grows the packet by `count` bytes of payload written at the end (the buffer must have room), fixing
    /// the IP total length and header checksum. The TCP checksum must be recomputed afterwards.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        (ip.base + length).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        length += bytes.count
        ip.setTotalLength(length)
    }
}

extension IPv4TCPPacket {
    public static let pureAckLength = 40

    /// Writes a pure ACK (20-byte IPv4 header with DF, TTL 64; 20-byte TCP header, no options) with full
    /// checksums into `buffer` (at least ``pureAckLength`` bytes). Anchors send these as window-opening probes.
    public static func buildPureAck(into buffer: UnsafeMutableRawPointer, tuple: FiveTuple, seq: UInt32, ack: UInt32,
                                    window: UInt16, flags: TCPFlags = .ack, payloadByte: Bool = false) -> IPv4TCPPacket {
        let length = pureAckLength + (payloadByte ? 1 : 0)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: length)
        func put16(_ offset: Int, _ value: UInt16) { buffer.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self) }
        func put32(_ offset: Int, _ value: UInt32) { buffer.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self) }
        buffer.storeBytes(of: 0x45, toByteOffset: 0, as: UInt8.self)
        put16(2, UInt16(length))
        put16(6, 0x4000)
        buffer.storeBytes(of: 64, toByteOffset: 8, as: UInt8.self)
        buffer.storeBytes(of: IPv4HeaderView.protocolTCP, toByteOffset: 9, as: UInt8.self)
        put32(12, tuple.srcAddr.value)
        put32(16, tuple.dstAddr.value)
        TCPHeaderView.writePureAck(at: buffer + 20, tuple: tuple, seq: seq, ack: ack, window: window, flags: flags)
        guard case .success(let packet) = IPv4TCPPacket.parse(buffer, count: length) else {
            preconditionFailure("a pure ACK we built does not parse")
        }
        packet.ip.recomputeChecksum()
        packet.recomputeTCPChecksum()
        return packet
    }
}
