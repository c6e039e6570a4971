/// A segment's facts as the processor's bookkeeping (``PacketProcessor/track(_:segment:hook:now:)``) reads them:
/// taken from a queued packet, or from what the kernel reported about one it carried (``KernelEvent``).
struct TrackedSegment {
    struct TCP {
        var flags: TCPFlags
        var sequenceNumber: UInt32
        var acknowledgmentNumber: UInt32
        var window: UInt16
        /// Only read for a SYN (parsed only for one).
        var windowScaleOption: UInt8?
    }
    var tcp: TCP
    /// The IP length.
    var length: Int
    var payloadLength: Int

    @inline(__always)
    init(_ packet: some TCPPacketView) {
        let header = packet.tcp
        let flags = header.flags
        tcp = TCP(flags: flags, sequenceNumber: header.sequenceNumber, acknowledgmentNumber: header.acknowledgmentNumber,
                  window: header.window, windowScaleOption: flags.contains(.syn) ? header.windowScaleOption : nil)
        length = packet.length
        payloadLength = packet.payloadLength
    }

    init(_ event: KernelEvent) {
        tcp = TCP(flags: event.flags, sequenceNumber: event.sequenceNumber, acknowledgmentNumber: event.acknowledgmentNumber,
                  window: 0, windowScaleOption: nil)
        length = 0
        payloadLength = 0
    }
}

/// What the kernel fast path reported about a packet it carried (the BPF datapath's ring buffer, docs/BPF.md
/// "`dysco_events`"): the session, the translation it passed (its key: the packet's tuple as it arrived at the
/// hook, before the rewrite), and the packet's TCP facts. Pure: the agent decodes a `BPFEvent` into it.
public struct KernelEvent: Sendable, Hashable {
    public enum Kind: Sendable, Hashable {
        /// The first FIN through the translation.
        case fin
        /// The first RST through it.
        case reset
        /// The first packet with ACK and without SYN through a translation installed as opening.
        case established
        /// A SYN this agent tagged at ingress (a box that translates tuples, ``PacketProcessor/Settings/natBox``)
        /// reached the kernel's egress after the box's NAT and was dropped there: `key` is its tuple after the NAT,
        /// `sessionID` 0. The agent sends it on (``PacketProcessor/natSynLeft(_:now:)``).
        case natSyn
    }
    public var kind: Kind
    public var sessionID: SessionTable.SessionID
    public var hook: HookPoint
    public var key: FiveTuple
    public var sequenceNumber: UInt32
    public var acknowledgmentNumber: UInt32
    public var flags: TCPFlags

    public init(kind: Kind, sessionID: SessionTable.SessionID, hook: HookPoint, key: FiveTuple, sequenceNumber: UInt32,
                acknowledgmentNumber: UInt32, flags: TCPFlags) {
        self.kind = kind
        self.sessionID = sessionID
        self.hook = hook
        self.key = key
        self.sequenceNumber = sequenceNumber
        self.acknowledgmentNumber = acknowledgmentNumber
        self.flags = flags
    }
}

extension PacketProcessor {
    /// A packet the kernel carried and reported (``KernelEvent``): the same teardown bookkeeping as a queued or
    /// observed packet of the session (``track(_:segment:hook:now:)``), found by the translation's key at its hook
    /// (the processor's own ingress/egress tables, which give the direction) and checked against the event's
    /// session id. An event of a session that is gone, or whose key now belongs to another session (the event
    /// waited in the ring while the tuple was reused), is counted and ignored. Returns whether a session took it.
    public mutating func observe(_ event: KernelEvent, now: UInt64) -> (taken: Bool, effects: DataplaneEffects) {
        counters.kernelEvents &+= 1
        let translation = event.hook == .ingress ? table.ingress[event.key] : table.egress[event.key]
        guard let translation, translation.id == event.sessionID else {
            counters.kernelEventsStale &+= 1
            return (false, takeEffects())
        }
        if event.kind == .established, table.records[translation.id]?.established == true {
            // Already established (the other forward translation's report, or a rescan after lost events).
            return (true, takeEffects())
        }
        if event.kind == .established, translation.direction == .forward {
            // A session installed with its SYN (Settings.installAtSyn): the SYN-ACK and the ACK stayed in the
            // kernel, which reports the first forward segment with ACK and without SYN through an opening
            // translation. That is the handshake the slow path would have watched: the SYN-ACK came (from the right
            // subsession, where there is one) and was answered (paper §2.1: the session is established).
            table.update(translation.id) { record in
                record.synAckSeen = true
                if record.right != nil { record.rightEstablished = true }
                // The SYN-ACK stayed in the kernel: its sequence number is what this segment acknowledges, less one
                // (a proxy's deltas need it, ``splice(from:to:delta:)``).
                if record.sequence.reverse.isn == nil, event.flags.contains(.ack) {
                    record.sequence.reverse.isn = event.acknowledgmentNumber &- 1
                }
            }
        }
        var segment = TrackedSegment(event)
        // The program reports the ingress sequence number as it arrived: into the endpoint's numbering (§3.4).
        if event.hook == .ingress, !event.flags.contains(.syn) {
            segment.tcp.sequenceNumber &+= UInt32(bitPattern: translation.seqDelta)
        }
        track(translation, segment: segment, hook: event.hook, now: now)
        return (true, takeEffects())
    }
}
