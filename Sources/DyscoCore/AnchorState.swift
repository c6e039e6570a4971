/// What an anchor's data plane does with a session while it anchors a reconfiguration (paper §3.5; the
/// stateful variant from §3.5's last paragraph). Held in the session's record; the protocol decisions that
/// move it from phase to phase are MigrationCoordinator's, the per-packet rules are here.
public struct AnchorState: Sendable, Equatable {
    public enum Phase: String, Sendable, Codable {
        /// Lock granted or pending: the session is on the slow path and still uses the old path only.
        case locked
        /// Stateful: new data from the local side is held (AnchorBuffer) while the old path drains and the
        /// state moves; retransmissions and pure ACKs still use the old path.
        case buffering
        /// Stateful: the state is installed at the new box; window-opening probes are being exchanged
        /// (docs/ARCHITECTURE.md, "After the import"); data still held.
        case probing
        /// New data goes on the new path (stateless: the two-path rules of §3.5 for old bytes).
        case released
    }

    /// The side of this host the reconfigured segment is on: right at the left anchor, left at the right one.
    public var side: SessionTable.Side
    public var phase: Phase = .locked
    public var stateful: Bool
    /// Whether egress has been switched to the new path (``SessionTable/promote(_:_:)``).
    public var promoted = false

    // The local side's byte stream towards the segment (sequence numbers as on the wire).
    /// Highest seq + length (SYN/FIN count one) sent towards the segment on the old path.
    public var sentEnd: UInt32?
    /// oldSent (§3.5): fixed when new data stops using the old path; bytes below it stay on the old path.
    public var cutoff: UInt32?
    /// The local side's latest acknowledgment number and raw window field (for probes).
    public var lastAck: UInt32?
    public var lastWindow: UInt16?

    // From the segment (the far side's stream).
    /// Highest acknowledgment received from the segment on the old path: oldSentAcked (§3.5).
    public var peerAcked: UInt32?
    /// Highest seq + length received from the segment on the old path: oldRcvd (§3.5).
    public var oldRcvd: UInt32?
    /// Highest seq + length of any segment (pure ACKs too) received from the segment on the old path: once
    /// drained, the far side's next sequence number, i.e. the local side's acknowledgment number.
    public var peerSeqEnd: UInt32?
    /// The far side's latest raw window field.
    public var peerWindow: UInt16?
    /// The far side's numbers on the new path after the release.
    public var latestPeerAcked: UInt32?
    public var latestPeerSeqEnd: UInt32?
    /// Lowest sequence number of data received on the new path: firstNewRcvd (§3.5).
    public var firstNewRcvd: UInt32?
    /// Last time a packet of the session crossed this anchor (either way), for the quiet rule.
    public var lastPacketAt: UInt64
    /// The drained event was emitted (once per reconfiguration).
    public var drainedReported = false
    /// Zero-window clamp (docs/ARCHITECTURE.md, "Anchor buffering"): from the lock until the release or the
    /// cancel, packets from the segment reach the local endpoint with window 0, so it sends no new data that
    /// would wait in the buffer (long enough, a sender's tail-loss probe would retransmit it). The real
    /// window is restored by a window update at the end. The paper clamps to 64 KiB (§5.3).
    public var clampWindow = true
    /// The sum of the removed boxes' deltas (§3.4) the lock messages brought: the new path's subsession applies the
    /// old path's delta plus this one (``SessionTable/Subsession/seqDelta``, docs/ARCHITECTURE.md "Sequence deltas").
    public var delta: Int32 = 0
    /// The removed proxy's timestamp delta for this anchor's new path (``SessionTable/Subsession/tsDelta``).
    public var tsDelta: Int32 = 0
    /// A session-terminating proxy on the segment announced itself (its `splice` notice): once released, the old
    /// path brings only duplicates from it (it was empty at the release), which the anchor drops.
    public var proxyOnSegment = false

    public init(side: SessionTable.Side, stateful: Bool, now: UInt64) {
        self.side = side
        self.stateful = stateful
        lastPacketAt = now
    }

    // MARK: - The two-path rules (§3.5)

    public enum PathChoice: Equatable, Sendable { case old, new, hold }

    /// Where an outgoing segment with `seq`, payload `length` (FIN counted) goes. Rules:
    /// - `locked`: old path.
    /// - `buffering` / `probing` (stateful): bytes below the cutoff (retransmissions) on the old path; a segment
    ///   carrying any byte at or above it is held; pure ACKs on the old path until a segment came in on the new one.
    /// - Pure ACKs once a segment with data or a FIN came in on the new path (`firstNewRcvd`), in any phase: the new
    ///   path. The far anchor released, so the new box holds the state; its segments reach this anchor's endpoint
    ///   before the `newPathPacket` event changes the phase, and the endpoint's acknowledgment of them on the old
    ///   path acknowledged bytes the old box never saw: its conntrack drops it as INVALID ("ACK is over the upper
    ///   bound"; issue 19's soak and RoundTripReplayTests, the server's ACK of the client's FIN).
    /// - `released`, stateful: everything on the new path (the old path is empty, §3.5 last paragraph).
    /// - `released`, stateless (§3.5 table): a byte below oldSent goes on the old path, at or above on the new
    ///   one. A segment straddling the cutoff (a retransmission repacketized with new bytes) is sent whole on the
    ///   **new** path: the old path never carries a byte at or above the cutoff, and the receiving anchor's
    ///   predicate uses `firstNewRcvd <= oldRcvd` (no gap) instead of equality (docs/ARCHITECTURE.md).
    /// - Pure ACKs after release: the new path (stateless boxes need not see them; the paper's "also ack
    ///   oldRcvd on the old path" is not needed by a conntrack firewall, which accepts old ACKs).
    public func egressPath(seq: UInt32, length: UInt32) -> PathChoice {
        if length == 0, firstNewRcvd != nil { return .new }
        switch phase {
        case .locked: return .old
        case .buffering, .probing:
            guard length > 0 else { return .old }
            guard let cutoff else { return .hold }
            return Self.seqLE(seq &+ length, cutoff) ? .old : .hold
        case .released:
            guard !stateful, length > 0, let cutoff else { return .new }
            return Self.seqLE(seq &+ length, cutoff) ? .old : .new
        }
    }

    /// The sender-side half of the drain predicate (§3.5: oldSentAcked = oldSent): everything the local side
    /// sent on the old path is acknowledged.
    public var sentDrained: Bool {
        guard let cutoff, let peerAcked else { return false }
        return Self.seqLE(cutoff, peerAcked)
    }

    /// The receiver-side half (§3.5: oldRcvdAcked = oldRcvd ∧ oldRcvd = firstNewRcvd, with ≤ for the
    /// straddling rule above): everything received on the old path is acknowledged and the new path starts
    /// without a gap after it.
    public var receivedDrained: Bool {
        guard let oldRcvd, let lastAck, let firstNewRcvd else { return false }
        return Self.seqLE(oldRcvd, lastAck) && Self.seqLE(firstNewRcvd, oldRcvd)
    }

    /// Records an outgoing segment (towards the segment) that is sent on the old path, or held.
    public mutating func noteEgress(seq: UInt32, length: UInt32, ack: UInt32?, window: UInt16, choice: PathChoice,
                                    now: UInt64) {
        lastPacketAt = now
        if let ack { lastAck = ack }
        lastWindow = window
        switch phase {
        case .locked:
            sentEnd = Self.seqMax(sentEnd, seq &+ length)
        case .buffering, .probing, .released:
            // The cutoff is the local side's next sequence number when new data stopped using the old path;
            // if nothing was seen before, the first segment after tells it (its start is that number).
            if cutoff == nil { cutoff = sentEnd ?? seq }
            if choice == .old { sentEnd = Self.seqMax(sentEnd, seq &+ length) }
        }
    }

    /// Records an incoming segment from the segment side.
    public mutating func noteIngress(seq: UInt32, length: UInt32, ack: UInt32?, window: UInt16? = nil, onNewPath: Bool,
                                     now: UInt64) {
        lastPacketAt = now
        if onNewPath {
            if length > 0 { firstNewRcvd = firstNewRcvd.map { Self.seqLE($0, seq) ? $0 : seq } ?? seq }
            // After the release the far side's numbers move on the new path (the window update needs them).
            if phase == .released {
                if let ack { latestPeerAcked = Self.seqMax(latestPeerAcked, ack) }
                latestPeerSeqEnd = Self.seqMax(latestPeerSeqEnd, seq &+ length)
                if let window { peerWindow = window }
            }
        } else {
            if let ack { peerAcked = Self.seqMax(peerAcked, ack) }
            if length > 0 { oldRcvd = Self.seqMax(oldRcvd, seq &+ length) }
            peerSeqEnd = Self.seqMax(peerSeqEnd, seq &+ length)
            if let window { peerWindow = window }
        }
    }

    /// Fixes the cutoff at a phase change that stops new data on the old path.
    public mutating func enter(_ phase: Phase) {
        if phase != .locked, self.phase == .locked, cutoff == nil { cutoff = sentEnd }
        self.phase = phase
    }

    /// The numbers of a window-opening probe from the local side (after the drain): its next sequence number
    /// and its acknowledgment number. The sequence number is what the local side sent, failing that (a silent
    /// endpoint) what the far side acknowledged of it. The acknowledgment number is only ever one the local
    /// side itself sent (``lastAck``): a probe can reach the far endpoint (one that arrives after the other
    /// anchor finished is an ordinary ACK to it), and an acknowledgment the local side did not send — say the
    /// far side's sequence end, with a segment lost or still in flight before it — would make the far side free
    /// data the local side never received: it then retransmits only above the forged number and the session
    /// stalls for good (issue 20: seen after back-to-back moves, the server's `bytes_acked` 62,640 above what
    /// the client had received). Nil until the local side's acknowledgment is known (the anchor elicits it).
    public var probeNumbers: (seq: UInt32, ack: UInt32)? {
        guard let ack = lastAck, let seq = sentEnd ?? cutoff ?? peerAcked else { return nil }
        return (seq, ack)
    }

    /// a ≤ b in sequence space (RFC 793 modular comparison).
    public static func seqLE(_ a: UInt32, _ b: UInt32) -> Bool { Int32(bitPattern: b &- a) >= 0 }
    static func seqMax(_ a: UInt32?, _ b: UInt32) -> UInt32 { guard let a else { return b }; return seqLE(a, b) ? b : a }
}
