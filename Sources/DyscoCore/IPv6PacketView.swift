import Foundation

// IPv6 beside IPv4 (issue 18, item 3): the fixed header as a view over bytes, the extension-header walk
// and its documented rule, the TCP pseudo-header. Not yet wired into the session table, the queue or the BPF
// datapath: IPv6 still passes untouched (docs/ARCHITECTURE.md, "Limits today").

/// The 40-byte IPv6 fixed header at the start of a buffer (RFC 8200 §3). Getters return host-order values; IPv6 has
/// no header checksum, so a changed address is folded into the upper layer's checksum by the caller.
public struct IPv6HeaderView {
    public let base: UnsafeMutableRawPointer

    public static let length = 40

    enum Offset {
        static let versionClassFlow = 0, payloadLength = 4, nextHeader = 6, hopLimit = 7, source = 8, destination = 24
    }

    public init(_ base: UnsafeMutableRawPointer) { self.base = base }

    public var version: UInt8 { base.load(fromByteOffset: Offset.versionClassFlow, as: UInt8.self) >> 4 }
    /// Bytes after the fixed header (extension headers and upper layer); 0 in a jumbogram (RFC 2675).
    public var payloadLength: Int {
        Int(UInt16(bigEndian: base.loadUnaligned(fromByteOffset: Offset.payloadLength, as: UInt16.self)))
    }
    public var nextHeader: UInt8 { base.load(fromByteOffset: Offset.nextHeader, as: UInt8.self) }
    public var hopLimit: UInt8 { base.load(fromByteOffset: Offset.hopLimit, as: UInt8.self) }

    public var sourceAddress: IPAddress { address(at: Offset.source) }
    public var destinationAddress: IPAddress { address(at: Offset.destination) }

    public func setSourceAddress(_ address: IPAddress) { address.store(to: base + Offset.source) }
    public func setDestinationAddress(_ address: IPAddress) { address.store(to: base + Offset.destination) }

    public func setPayloadLength(_ length: Int) {
        base.storeBytes(of: UInt16(truncatingIfNeeded: length).bigEndian, toByteOffset: Offset.payloadLength,
                        as: UInt16.self)
    }

    private func address(at offset: Int) -> IPAddress {
        IPAddress(networkBytes: UnsafeRawBufferPointer(start: base + offset, count: 16))
    }
}

/// What the agent does with an IPv6 packet's extension headers (RFC 8200 §4), the documented rule: the walk follows
/// Hop-by-Hop Options, Routing and Destination Options headers (each `8 × (length + 1)` bytes) to at most
/// ``maximumExtensionHeaders`` of them and ``maximumChainBytes`` bytes; a TCP segment behind them is the session's
/// and is handled like one without (the rewrite touches only the fixed header's addresses and the TCP header, so the
/// chain passes unchanged). Everything else is not a session's segment and passes untouched, counted by its reason:
/// a Fragment header (the agent never reassembles, as for IPv4 fragments), ESP or AH (the ports are hidden or
/// covered by the ICV), No Next Header, any other upper layer, a chain longer than the limits, and a jumbogram
/// (payload length 0: Hop-by-Hop Jumbo Payload, never on the Ethernet links the agents serve). A header that runs
/// past the packet is `truncated`: dropped by the caller as malformed, like a truncated IPv4 header.
public enum IPv6ExtensionHeaders {
    public static let hopByHop: UInt8 = 0, routing: UInt8 = 43, fragment: UInt8 = 44, encapsulatingSecurity: UInt8 = 50
    public static let authentication: UInt8 = 51, noNextHeader: UInt8 = 59, destinationOptions: UInt8 = 60
    public static let tcp: UInt8 = 6

    /// Limits of the walk: a longer chain is not followed (counted `extension-chain`), so a forged packet cannot make
    /// the agent walk far. Eight covers every chain RFC 8200 §4.1 recommends with room to spare.
    public static let maximumExtensionHeaders = 8
    public static let maximumChainBytes = 512

    /// The upper-layer header the walk found: its protocol number, offset from the start of the packet, and the
    /// extension headers it skipped.
    public struct UpperLayer: Equatable, Sendable {
        public var protocolNumber: UInt8
        public var offset: Int
        public var extensionHeaders: Int
    }

    public enum WalkError: Error, Equatable, Sendable {
        /// A header runs past the packet's bytes.
        case truncated
        case fragment
        /// ESP or AH.
        case encrypted
        case noNextHeader
        /// More than ``maximumExtensionHeaders`` headers or ``maximumChainBytes`` bytes.
        case chainTooLong
    }

    /// Walks the chain that starts after the fixed header, within `length` bytes of `base`.
    public static func walk(_ base: UnsafeRawPointer, length: Int, first: UInt8) -> Result<UpperLayer, WalkError> {
        var next = first
        var offset = IPv6HeaderView.length
        var count = 0
        while true {
            switch next {
            case hopByHop, routing, destinationOptions:
                guard count < maximumExtensionHeaders else { return .failure(.chainTooLong) }
                guard offset + 2 <= length else { return .failure(.truncated) }
                let size = 8 * (Int(base.load(fromByteOffset: offset + 1, as: UInt8.self)) + 1)
                guard offset + size - IPv6HeaderView.length <= maximumChainBytes else { return .failure(.chainTooLong) }
                guard offset + size <= length else { return .failure(.truncated) }
                next = base.load(fromByteOffset: offset, as: UInt8.self)
                offset += size
                count += 1
            case fragment: return .failure(.fragment)
            case encapsulatingSecurity, authentication: return .failure(.encrypted)
            case noNextHeader: return .failure(.noNextHeader)
            default: return .success(UpperLayer(protocolNumber: next, offset: offset, extensionHeaders: count))
            }
        }
    }
}

extension InternetChecksum {
    /// The unfolded sum of the TCP/UDP IPv6 pseudo-header (RFC 8200 §8.1: addresses, upper-layer length, next header).
    @inlinable
    public static func pseudoHeaderSum(source: IPAddress, destination: IPAddress, protocolNumber: UInt8,
                                       length: Int) -> UInt64 {
        source.wireSum &+ destination.wireSum &+ UInt64(UInt32(truncatingIfNeeded: length).bigEndian)
            &+ UInt64(UInt32(protocolNumber).bigEndian)
    }

    /// RFC 1624 for a changed IPv6 address in a pseudo-header: the eight 16-bit words out, the new eight in.
    public static func update(_ checksum: UInt16, old: IPAddress, new: IPAddress) -> UInt16 {
        var sum = UInt64(~checksum)
        for (o, n) in [(old.high, new.high), (old.low, new.low)] {
            for shift in stride(from: 48, through: 0, by: -16) {
                sum &+= UInt64(~UInt16(truncatingIfNeeded: o >> UInt64(shift)).bigEndian)
                sum &+= UInt64(UInt16(truncatingIfNeeded: n >> UInt64(shift)).bigEndian)
            }
        }
        return ~fold(sum)
    }
}

/// An IPv6 packet carrying a TCP segment (behind zero or more extension headers that ``IPv6ExtensionHeaders``
/// follows), validated once on parse.
public struct IPv6TCPPacket {
    public let ip: IPv6HeaderView
    public let tcp: TCPHeaderView
    /// Offset of the TCP header (40 plus the extension headers) and the packet's bytes (40 + payload length).
    public let tcpOffset: Int
    public internal(set) var length: Int

    public enum ParseError: Error, Equatable, Sendable {
        case truncated, notIPv6, jumbogram, notTCP, badTCPHeaderLength
        case extensionHeaders(IPv6ExtensionHeaders.WalkError)
    }

    /// Validates the fixed header, the extension-header chain and the TCP header against `count` buffer bytes.
    public static func parse(_ base: UnsafeMutableRawPointer, count: Int) -> Result<IPv6TCPPacket, ParseError> {
        guard count >= IPv6HeaderView.length else { return .failure(.truncated) }
        let ip = IPv6HeaderView(base)
        guard ip.version == 6 else { return .failure(.notIPv6) }
        guard ip.payloadLength != 0 else { return .failure(.jumbogram) }
        let length = IPv6HeaderView.length + ip.payloadLength
        guard length <= count else { return .failure(.truncated) }
        let upper: IPv6ExtensionHeaders.UpperLayer
        switch IPv6ExtensionHeaders.walk(UnsafeRawPointer(base), length: length, first: ip.nextHeader) {
        case .success(let found): upper = found
        case .failure(let error): return .failure(.extensionHeaders(error))
        }
        guard upper.protocolNumber == IPv6ExtensionHeaders.tcp else { return .failure(.notTCP) }
        guard length >= upper.offset + TCPHeaderView.minimumLength else { return .failure(.truncated) }
        let tcp = TCPHeaderView(base + upper.offset)
        let thl = tcp.headerLength
        guard thl >= TCPHeaderView.minimumLength, upper.offset + thl <= length else {
            return .failure(.badTCPHeaderLength)
        }
        return .success(IPv6TCPPacket(ip: ip, tcp: tcp, tcpOffset: upper.offset, length: length))
    }

    /// Rewrites addresses and ports, touching only the fields that change, with the TCP checksum updated
    /// incrementally (`.complete`) or recomputed over the whole segment (`.partial`).
    public func rewrite(source: IPAddress, sourcePort: UInt16, destination: IPAddress, destinationPort: UInt16,
                        checksum: ChecksumState) {
        let incremental = checksum == .complete
        let oldSource = ip.sourceAddress, oldDestination = ip.destinationAddress
        if oldSource != source {
            ip.setSourceAddress(source)
            if incremental { tcp.rawChecksum = InternetChecksum.update(tcp.rawChecksum, old: oldSource, new: source) }
        }
        if oldDestination != destination {
            ip.setDestinationAddress(destination)
            if incremental {
                tcp.rawChecksum = InternetChecksum.update(tcp.rawChecksum, old: oldDestination, new: destination)
            }
        }
        if tcp.sourcePort != sourcePort { tcp.setSourcePort(sourcePort, updateChecksum: incremental) }
        if tcp.destinationPort != destinationPort { tcp.setDestinationPort(destinationPort, updateChecksum: incremental) }
        if !incremental { recomputeTCPChecksum() }
    }

    /// The full TCP checksum over the IPv6 pseudo-header, header and payload, as it should be stored (raw).
    /// (Extension headers lie between the fixed header and the TCP header; the pseudo-header is the same.)
    public func computeTCPChecksum() -> UInt16 {
        let segmentLength = length - tcpOffset
        return tcp.computeChecksum(segmentLength: segmentLength, pseudoHeaderSum: InternetChecksum.pseudoHeaderSum(
            source: ip.sourceAddress, destination: ip.destinationAddress, protocolNumber: IPv6ExtensionHeaders.tcp,
            length: segmentLength))
    }
}
