import DyscoCore

/// A lab middlebox that changes the byte stream (paper §3.4's case, issue 17 test (e)): it inserts a line right after
/// the first line (the HTTP status line) of each server's response, as a header-injecting box does, and keeps
/// both ends' sequence numbers consistent from then on: the server's segments after the insertion point move up by
/// the inserted length, the client's acknowledgments and SACK blocks move down. The client gets a valid response
/// with one more header and the body unchanged. SYNs have their MSS option lowered by the inserted length, so a
/// full-sized segment with the line added still fits the path MTU.
///
/// Pure: `process` rewrites one packet (as the box's NFQUEUE hands it over) into an output buffer; the shell
/// (`dysco-migrate lab inserter`) issues the verdicts and reports each session's delta to the agent once.
public struct HeaderInserter: Sendable {
    public let text: [UInt8]
    /// The server's TCP port: packets to it are the client's, packets from it the server's.
    public let port: UInt16

    struct Flow: Sendable {
        /// The server's initial sequence number (from its SYN-ACK).
        var serverISN: UInt32?
        /// The server's sequence number where the text goes (after the first CRLF of its first data segment).
        var at: UInt32?
        /// The first data segment had no CRLF: nothing is inserted in this session.
        var passThrough = false
    }
    private(set) var flows: [FiveTuple: Flow] = [:]

    public init(text: [UInt8], port: UInt16) {
        precondition(!text.isEmpty && text.count < 512)
        self.text = text
        self.port = port
    }

    public var delta: Int32 { Int32(text.count) }

    public enum Result: Equatable, Sendable {
        /// Not this box's traffic, or nothing to change: accept as it is.
        case unchanged
        /// Accept the `length` bytes written to the output buffer. `inserted`: the text went into this session for
        /// the first time (its client→server tuple): report the delta.
        case modified(length: Int, inserted: FiveTuple?)
        /// A server segment after the first one arrived before it (reordering, loss): its numbers depend on where
        /// the text goes, which the first segment decides; dropped (the server sends it again).
        case drop
    }

    /// Rewrites the packet at `input` (`count` bytes) into `output` (room for `count` + ``text``'s length).
    public mutating func process(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer) -> Result {
        output.copyMemory(from: input.baseAddress!, byteCount: input.count)
        guard case .success(var packet) = IPv4TCPPacket.parse(output, count: input.count) else { return .unchanged }
        let flags = packet.tcp.flags
        let fromServer = packet.tcp.sourcePort == port
        guard fromServer || packet.tcp.destinationPort == port else { return .unchanged }
        let key = fromServer ? packet.tuple.reversed : packet.tuple
        if flags.contains(.syn) {
            if fromServer, flags.contains(.ack) { flows[key, default: Flow()].serverISN = packet.tcp.sequenceNumber }
            if !fromServer, !flags.contains(.ack) { flows[key] = Flow() }
            guard lowerMSS(packet) else { return .unchanged }
            packet.recomputeTCPChecksum()
            return .modified(length: packet.length, inserted: nil)
        }
        guard var flow = flows[key], let isn = flow.serverISN, !flow.passThrough else { return .unchanged }
        let n = UInt32(text.count)
        var inserted: FiveTuple?
        if fromServer {
            let seq = packet.tcp.sequenceNumber
            if flow.at == nil, packet.payloadLength > 0, seq == isn &+ 1 {
                // The first data segment: the text goes after its first CRLF.
                if let crlf = Self.firstCRLF(output + packet.payloadOffset, count: packet.payloadLength) {
                    flow.at = seq &+ UInt32(crlf + 2)
                    inserted = key
                } else {
                    flow.passThrough = true
                }
                flows[key] = flow
            }
            guard let at = flow.at else {
                return packet.payloadLength > 0 && !flow.passThrough && Self.before(isn &+ 1, seq) ? .drop : .unchanged
            }
            let end = seq &+ UInt32(packet.payloadLength)
            if Self.before(seq, at), !Self.before(end, at) {
                // The segment holds the insertion point (the first one, or its retransmission): put the text in.
                let offset = packet.payloadOffset + Int(at &- seq)
                (output + offset + text.count).copyMemory(from: input.baseAddress! + offset, byteCount: input.count - offset)
                text.withUnsafeBytes { (output + offset).copyMemory(from: $0.baseAddress!, byteCount: text.count) }
                packet = Self.grown(packet, by: text.count)
            } else if !Self.before(seq, at) {
                packet.tcp.setSequenceNumber(seq &+ n, updateChecksum: false)
            }
        } else if let at = flow.at, flags.contains(.ack) {
            // The client's numbers back into the server's: above the text down by its length, inside it (part of
            // the text acknowledged or SACKed) to where it starts. Every SACK edge too, whatever the ack.
            func back(_ e: UInt32) -> UInt32 { !Self.before(e, at &+ n) ? e &- n : Self.before(at, e) ? at : e }
            packet.tcp.setAcknowledgmentNumber(back(packet.tcp.acknowledgmentNumber), updateChecksum: false)
            let header = packet.tcp.base
            packet.tcp.forEachOption { kind, offset, length in
                guard kind == 5 else { return true }
                var edge = offset + 2
                while edge + 4 <= offset + length {
                    let value = UInt32(bigEndian: header.loadUnaligned(fromByteOffset: edge, as: UInt32.self))
                    header.storeBytes(of: back(value).bigEndian, toByteOffset: edge, as: UInt32.self)
                    edge += 4
                }
                return false
            }
        } else {
            return .unchanged
        }
        packet.recomputeTCPChecksum()
        return .modified(length: packet.length, inserted: inserted)
    }

    /// The packet re-parsed with `extra` more bytes (IP total length and header checksum fixed).
    private static func grown(_ packet: IPv4TCPPacket, by extra: Int) -> IPv4TCPPacket {
        packet.ip.setTotalLength(packet.length + extra)
        guard case .success(let p) = IPv4TCPPacket.parse(packet.ip.base, count: packet.length + extra) else { return packet }
        return p
    }

    /// Lowers the MSS option by the text's length; false if the SYN has none.
    private func lowerMSS(_ packet: IPv4TCPPacket) -> Bool {
        var found = false
        let base = packet.tcp.base
        packet.tcp.forEachOption { kind, offset, length in
            guard kind == 2, length == 4 else { return true }
            let mss = UInt16(bigEndian: base.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self))
            let lowered = mss > UInt16(text.count) + 64 ? mss - UInt16(text.count) : mss
            base.storeBytes(of: lowered.bigEndian, toByteOffset: offset + 2, as: UInt16.self)
            found = true
            return false
        }
        return found
    }

    static func firstCRLF(_ p: UnsafeMutableRawPointer, count: Int) -> Int? {
        guard count >= 2 else { return nil }
        for i in 0..<(count - 1) where p.load(fromByteOffset: i, as: UInt8.self) == 13
            && p.load(fromByteOffset: i + 1, as: UInt8.self) == 10 {
            return i
        }
        return nil
    }

    /// a < b in sequence space.
    static func before(_ a: UInt32, _ b: UInt32) -> Bool { Int32(bitPattern: a &- b) < 0 }
}
