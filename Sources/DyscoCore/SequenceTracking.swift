/// What the slow path saw of a session's sequence space, per direction, to judge an RST the way RFC 5961 §3
/// prescribes (docs/ARCHITECTURE.md, "Forged resets"). Cheap: a few words per record, updated per slow-path packet.
///
/// While the kernel fast path carries a session the agent sees only its SYN/FIN/RST, so tracking is
/// ``invalidate()``d when a session goes to the kernel and resumes with the first packets seen afterwards.
public struct SequenceTracking: Sendable, Equatable {
    public struct Direction: Sendable, Equatable {
        /// Highest sequence end (seq + payload, SYN and FIN count one) sent this way since tracking resumed.
        public var sndEnd: UInt32 = 0
        public var hasSndEnd = false
        /// The last acknowledgment and (unscaled) window carried this way: what this direction's sender,
        /// as a receiver, expects of the other direction.
        public var ack: UInt32 = 0
        public var window: UInt32 = 0
        public var hasAck = false
        /// This direction's SYN was seen, and the window scale it offered (RFC 7323 §2.2; nil: none).
        public var synSeen = false
        public var windowScale: UInt8?
        /// This direction's initial sequence number (its SYN's; from the kernel's `established` event when the
        /// SYN-ACK stayed in the kernel): a proxy's deltas between its two sessions come from them
        /// (``PacketProcessor/splice(from:to:delta:)``). Not reset by ``invalidate()``.
        public var isn: UInt32?
    }

    public var forward = Direction()
    public var reverse = Direction()

    public init() {}

    /// What an RST is, judged against the receiver's window.
    public enum Judgement: Sendable, Equatable {
        /// Provably outside the receiver's window (RFC 5961 §3.2: the receiver drops it silently): drop it.
        case outside
        /// Exactly the receiver's next expected sequence number (RFC 5961 §3.2: the receiver resets).
        case exact
        /// In the window but not provably exact (the receiver answers with a challenge ACK), or tracking is
        /// not fresh: the endpoint judges it.
        case unknown
    }

    /// Serial-number order (RFC 1982): `a` is before `b`.
    static func before(_ a: UInt32, _ b: UInt32) -> Bool { Int32(bitPattern: a &- b) < 0 }

    /// Records one packet going `direction` (forward = client→server).
    public mutating func observe(_ direction: SessionTable.Direction, seq: UInt32, ack: UInt32?, window: UInt16,
                                 flags: TCPFlags, payloadLength: Int, windowScale: UInt8?) {
        var d = direction == .forward ? forward : reverse
        if flags.contains(.syn) {
            d.synSeen = true
            d.windowScale = windowScale
            if d.isn == nil { d.isn = seq }
        }
        if !flags.contains(.rst) {
            let end = seq &+ UInt32(payloadLength) &+ (flags.contains(.syn) ? 1 : 0) &+ (flags.contains(.fin) ? 1 : 0)
            if !d.hasSndEnd || Self.before(d.sndEnd, end) { d.sndEnd = end }
            d.hasSndEnd = true
            if let ack {
                if !d.hasAck || !Self.before(ack, d.ack) { d.ack = ack; d.window = UInt32(window) }
                d.hasAck = true
            }
        }
        if direction == .forward { forward = d } else { reverse = d }
    }

    /// The kernel carries the session from now on: the numbers will go stale (the SYNs' window scales stay).
    public mutating func invalidate() {
        for keyPath in [\SequenceTracking.forward, \SequenceTracking.reverse] {
            self[keyPath: keyPath].hasSndEnd = false
            self[keyPath: keyPath].hasAck = false
        }
    }

    /// Judges an RST going `direction` with sequence number `seq` (and acknowledgment `ack` if it has one).
    ///
    /// The receiver's window is [last ACK it sent, last ACK + its window << its scale]: its RCV.NXT is at least
    /// the last ACK it sent (RFC 5961 §3.2's lower edge), and a window edge does not move left (RFC 793
    /// §3.7), so no in-window sequence number lies below the last ACK. The right edge is widened to what the
    /// sender has sent (an ACK of the receiver may be on its way): an RST beyond both cannot come from the real
    /// sender, whose SND.NXT is at most what it sent. Unknown window scales count as the largest (14).
    /// In SYN-SENT (the receiver has sent no ACK yet) an RST is acceptable only if it acknowledges the SYN
    /// (RFC 793 §3.9, RFC 5961 §3.2 leaves that state alone).
    public func judge(_ direction: SessionTable.Direction, seq: UInt32, ack: UInt32?) -> Judgement {
        let sender = direction == .forward ? forward : reverse
        let receiver = direction == .forward ? reverse : forward
        guard receiver.hasAck else {
            // SYN-SENT: the receiver's SYN is all it sent. An RST without an ACK of it is dropped there.
            if receiver.hasSndEnd, receiver.synSeen {
                guard let ack else { return .outside }
                return ack == receiver.sndEnd ? .exact : .outside
            }
            return .unknown
        }
        let shift: UInt32
        if forward.synSeen, reverse.synSeen {
            shift = forward.windowScale != nil && reverse.windowScale != nil ? UInt32(min(receiver.windowScale ?? 0, 14)) : 0
        } else {
            shift = 14
        }
        let left = receiver.ack
        var span = receiver.window << shift
        if sender.hasSndEnd, Self.before(left &+ span, sender.sndEnd), !Self.before(sender.sndEnd, left) {
            span = sender.sndEnd &- left
        }
        let offset = seq &- left
        if offset > span { return .outside }
        if sender.hasSndEnd, sender.sndEnd == left, seq == left { return .exact }
        return .unknown
    }
}

extension TCPHeaderView {
    /// The window scale option's shift count (RFC 7323 §2.2) if the header carries one (SYNs only, by the RFC).
    public var windowScaleOption: UInt8? {
        var shift: UInt8?
        forEachOption { kind, offset, length in
            guard kind == 3, length == 3 else { return true }
            shift = base.load(fromByteOffset: offset + 2, as: UInt8.self)
            return false
        }
        return shift
    }
}
