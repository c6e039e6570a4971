/// A TCP segment in an IP packet of either family, as the packet processor handles it: the processor's rules are
/// written once, generic over this (specialised per family, so IPv4 pays nothing for IPv6), and each family's view
/// (``IPv4TCPPacket``, ``IPv6TCPPacket``) says how its header holds addresses and lengths.
public protocol TCPPacketView {
    var tcp: TCPHeaderView { get }
    /// The first byte of the IP header.
    var base: UnsafeMutableRawPointer { get }
    /// Bytes of the packet (from the IP header to the end of the payload).
    var length: Int { get }
    /// Offset of the TCP header from ``base``.
    var tcpOffset: Int { get }
    var tuple: FiveTuple { get }
    /// Rewrites addresses and ports to `tuple` (of the packet's family), touching only the fields that change: the
    /// TCP checksum updated incrementally (`.complete`) or recomputed over the whole segment (`.partial`).
    func rewrite(to tuple: FiveTuple, checksum: ChecksumState)
    /// The full TCP checksum over pseudo-header, header and payload, as it should be stored (raw).
    func computeTCPChecksum() -> UInt16
    /// Cuts the packet to `newLength` bytes (payload removed from the end), fixing the IP length fields. The TCP
    /// checksum must be recomputed afterwards.
    mutating func truncate(to newLength: Int)
    /// Grows the packet by `bytes` of payload written at the end (the buffer must have room), fixing the IP length
    /// fields. The TCP checksum must be recomputed afterwards.
    mutating func append(_ bytes: UnsafeRawBufferPointer)
}

extension TCPPacketView {
    public var payloadOffset: Int { tcpOffset + tcp.headerLength }
    public var payloadLength: Int { length - payloadOffset }
    public func recomputeTCPChecksum() { tcp.rawChecksum = computeTCPChecksum() }
    public var isTCPChecksumValid: Bool { computeTCPChecksum() == tcp.rawChecksum }
}

extension IPv4TCPPacket: TCPPacketView {
    public var base: UnsafeMutableRawPointer { ip.base }
}

extension IPv6TCPPacket: TCPPacketView {
    public var base: UnsafeMutableRawPointer { ip.base }

    public var tuple: FiveTuple {
        FiveTuple(srcAddr: ip.sourceAddress, srcPort: tcp.sourcePort, dstAddr: ip.destinationAddress,
                  dstPort: tcp.destinationPort)
    }

    public func rewrite(to tuple: FiveTuple, checksum: ChecksumState) {
        rewrite(source: tuple.srcAddr, sourcePort: tuple.srcPort, destination: tuple.dstAddr,
                destinationPort: tuple.dstPort, checksum: checksum)
    }

    public mutating func truncate(to newLength: Int) {
        precondition(newLength >= payloadOffset && newLength <= length)
        ip.setPayloadLength(newLength - IPv6HeaderView.length)
        length = newLength
    }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        (ip.base + length).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        length += bytes.count
        ip.setPayloadLength(length - IPv6HeaderView.length)
    }
}

extension IPv6TCPPacket {
    public static let pureAckLength = IPv6HeaderView.length + TCPHeaderView.minimumLength

    /// Writes a pure ACK (40-byte IPv6 header, hop limit 64, no extension headers; 20-byte TCP header, no options)
    /// with its full checksum into `buffer` (at least ``pureAckLength`` bytes, one more with `payloadByte`).
    public static func buildPureAck(into buffer: UnsafeMutableRawPointer, tuple: FiveTuple, seq: UInt32, ack: UInt32,
                                    window: UInt16, flags: TCPFlags = .ack, payloadByte: Bool = false) -> IPv6TCPPacket {
        let length = pureAckLength + (payloadByte ? 1 : 0)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: length)
        buffer.storeBytes(of: 0x60, toByteOffset: 0, as: UInt8.self)
        let ip = IPv6HeaderView(buffer)
        ip.setPayloadLength(length - IPv6HeaderView.length)
        buffer.storeBytes(of: IPv6ExtensionHeaders.tcp, toByteOffset: 6, as: UInt8.self)
        buffer.storeBytes(of: 64, toByteOffset: 7, as: UInt8.self)
        ip.setSourceAddress(tuple.srcAddr)
        ip.setDestinationAddress(tuple.dstAddr)
        TCPHeaderView.writePureAck(at: buffer + IPv6HeaderView.length, tuple: tuple, seq: seq, ack: ack, window: window,
                                   flags: flags)
        guard case .success(let packet) = IPv6TCPPacket.parse(buffer, count: length) else {
            preconditionFailure("a pure ACK we built does not parse")
        }
        packet.recomputeTCPChecksum()
        return packet
    }
}

extension TCPHeaderView {
    /// The 20 bytes of a pure ACK's TCP header (no options; the checksum left 0 for the caller).
    static func writePureAck(at base: UnsafeMutableRawPointer, tuple: FiveTuple, seq: UInt32, ack: UInt32,
                             window: UInt16, flags: TCPFlags) {
        base.storeBytes(of: tuple.srcPort.bigEndian, toByteOffset: 0, as: UInt16.self)
        base.storeBytes(of: tuple.dstPort.bigEndian, toByteOffset: 2, as: UInt16.self)
        base.storeBytes(of: seq.bigEndian, toByteOffset: 4, as: UInt32.self)
        base.storeBytes(of: ack.bigEndian, toByteOffset: 8, as: UInt32.self)
        base.storeBytes(of: 0x50, toByteOffset: 12, as: UInt8.self)
        base.storeBytes(of: flags.rawValue, toByteOffset: 13, as: UInt8.self)
        base.storeBytes(of: window.bigEndian, toByteOffset: 14, as: UInt16.self)
    }
}

/// The anchors' own packets (window-opening probes, keep-alives, elicits), built in the session's family.
public enum PureAck {
    /// Room for the largest packet ``build(into:tuple:seq:ack:window:flags:payloadByte:)`` writes: an IPv6 pure ACK
    /// with one payload byte.
    public static let maxLength = IPv6TCPPacket.pureAckLength + 1

    /// Writes the packet into `buffer` (``maxLength`` bytes) and returns its length.
    public static func build(into buffer: UnsafeMutableRawPointer, tuple: FiveTuple, seq: UInt32, ack: UInt32,
                             window: UInt16, flags: TCPFlags = .ack, payloadByte: Bool = false) -> Int {
        if tuple.srcAddr.isIPv4 {
            return IPv4TCPPacket.buildPureAck(into: buffer, tuple: tuple, seq: seq, ack: ack, window: window, flags: flags,
                                              payloadByte: payloadByte).length
        }
        return IPv6TCPPacket.buildPureAck(into: buffer, tuple: tuple, seq: seq, ack: ack, window: window, flags: flags,
                                          payloadByte: payloadByte).length
    }

    /// The destination of a packet ``build`` wrote (or any IPv4 or IPv6 packet at `base`).
    public static func destination(of base: UnsafeRawPointer) -> IPAddress {
        if base.load(as: UInt8.self) >> 4 == 6 {
            return IPAddress(networkBytes: UnsafeRawBufferPointer(start: base + 24, count: 16))
        }
        return IPAddress(UInt32(bigEndian: base.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
    }
}

/// A TCP packet of either family, by its version nibble.
public enum TCPPacketTuple {
    /// The tuple of the IPv4 or IPv6 TCP packet at `base`; nil for anything the views refuse (an IPv6 extension
    /// header included).
    public static func parse(_ base: UnsafeMutableRawPointer, count: Int) -> FiveTuple? {
        if count > 0, base.load(as: UInt8.self) >> 4 == 6 {
            guard case .success(let packet) = IPv6TCPPacket.parse(base, count: count) else { return nil }
            return packet.tuple
        }
        guard case .success(let packet) = IPv4TCPPacket.parse(base, count: count) else { return nil }
        return packet.tuple
    }
}
