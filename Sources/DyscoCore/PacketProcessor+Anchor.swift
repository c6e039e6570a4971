/// What an anchor's data plane tells the reconfiguration protocol (MigrationCoordinator events).
public enum AnchorEvent: Sendable, Equatable {
    /// Everything this anchor sent on the old path is acknowledged (§3.5 oldSentAcked = oldSent), or the
    /// session was quiet for the quiet interval (nothing can be in flight on a LAN after it).
    case drained(chainID: UInt64)
    /// A packet of the session arrived on the new path before this anchor released (a probe, or data).
    case newPathPacket(chainID: UInt64)
}

/// The anchor's per-packet rules during a reconfiguration (paper §3.5) and the table operations the
/// reconfiguration protocol asks for. The rules themselves are ``AnchorState``'s.
extension PacketProcessor {
    /// Hold the packet, or send it to `target` with the acknowledgment delta of that subsession
    /// (``SessionTable/Subsession/seqDelta``).
    public enum AnchorDecision: Equatable { case hold, target(FiveTuple, seqDelta: Int32, tsDelta: Int32) }

    /// The subsession of the anchor's side that is the old path and the one that is the new path.
    private func paths(_ record: SessionTable.Record, _ m: AnchorState) -> (old: SessionTable.Subsession?, new: SessionTable.Subsession?) {
        guard let link = record.link(m.side) else { return (nil, nil) }
        return m.promoted ? (link.other, link.active) : (link.active, link.other)
    }

    /// The tuple a packet leaving towards the segment carries on subsession `sub`.
    private func egressTuple(_ sub: SessionTable.Subsession, side: SessionTable.Side) -> FiveTuple {
        side == .right ? sub.tuple : sub.tuple.reversed
    }

    /// A packet leaving towards the segment (left anchor: forward; right anchor: reverse).
    mutating func anchorEgress(_ packet: inout some TCPPacketView, translation: SessionTable.Translation, flags: TCPFlags,
                               now: UInt64) -> AnchorDecision {
        guard let record = table.records[translation.id], var m = record.migration,
              (m.side == .right) == (translation.direction == .forward) else {
            return .target(translation.target, seqDelta: translation.seqDelta, tsDelta: translation.tsDelta)
        }
        if flags.contains(.syn) || flags.contains(.rst) {
            return .target(translation.target, seqDelta: translation.seqDelta, tsDelta: translation.tsDelta)
        }
        let seq = packet.tcp.sequenceNumber
        let length = UInt32(packet.payloadLength) + (flags.contains(.fin) ? 1 : 0)
        let choice = m.egressPath(seq: seq, length: length)
        m.noteEgress(seq: seq, length: length, ack: flags.contains(.ack) ? packet.tcp.acknowledgmentNumber : nil,
                     window: packet.tcp.window, choice: choice, now: now)
        let (old, new) = paths(record, m)
        var decision = AnchorDecision.target(translation.target, seqDelta: translation.seqDelta, tsDelta: translation.tsDelta)
        switch choice {
        case .hold: decision = .hold
        case .old: if let old { decision = .target(egressTuple(old, side: m.side), seqDelta: old.seqDelta, tsDelta: old.tsDelta) }
        case .new:
            // §3.4: going out on the new path, its delta (the old path's plus the removed boxes') is subtracted
            // from the acknowledgment number (the caller applies it).
            if let new { decision = .target(egressTuple(new, side: m.side), seqDelta: new.seqDelta, tsDelta: new.tsDelta) }
        }
        store(m, for: record, now: now)
        return decision
    }

    /// A packet arriving from the segment (left anchor: from the right; right anchor: from the left). Returns
    /// `.drop` for a probe this anchor keeps from its endpoint.
    mutating func anchorIngress(_ packet: inout some TCPPacketView, translation: SessionTable.Translation, flags: TCPFlags,
                                now: UInt64) -> Verdict? {
        guard let record = table.records[translation.id], var m = record.migration,
              (m.side == .right) == translation.fromRight else { return nil }
        let (old, _) = paths(record, m)
        let onNewPath = translation.pathTag != old?.pathTag
        let seq = packet.tcp.sequenceNumber
        let length = UInt32(packet.payloadLength) + (flags.contains(.fin) ? 1 : 0)
        m.noteIngress(seq: seq, length: length, ack: flags.contains(.ack) ? packet.tcp.acknowledgmentNumber : nil,
                      window: packet.tcp.window, onNewPath: onNewPath, now: now)
        var verdict: Verdict?
        if m.clampWindow, flags.isDisjoint(with: [.syn, .rst]), packet.tcp.window != 0 {
            packet.tcp.setWindow(0)
        }
        if !onNewPath, m.proxyOnSegment, m.phase == .released, !flags.contains(.syn) {
            // A spliced-out proxy's old path after the release: the proxy was empty (its `drained`), everything it
            // sent is acknowledged, so only duplicates come this way — its answers to the anchors' pokes, a tail-loss
            // probe that left before the acknowledgment reached it — stamped by its own clock, which the new path's
            // shifted timestamps have overtaken (RFC 7323 PAWS would drop them at the endpoint, and count it). Its
            // FIN or RST must not reach the endpoint either: the proxy is out of the session.
            counters.droppedAfterLeaving &+= 1
            verdict = .drop
        }
        if onNewPath {
            if m.phase != .released {
                pending.anchor.append(.newPathPacket(chainID: record.identity.chainID))
                if length == 0, flags.isDisjoint(with: [.syn, .rst]) {
                    // A window-opening probe from the other anchor: it taught the new firewall; the endpoint
                    // must not see it (docs/ARCHITECTURE.md, "After the import").
                    counters.probesReceived &+= 1
                    verdict = .drop
                }
            }
        }
        store(m, for: record, now: now)
        return verdict
    }

    private mutating func store(_ m: AnchorState, for record: SessionTable.Record, now: UInt64) {
        var m = m
        if !m.drainedReported, m.phase == .buffering || (m.phase == .released && !m.stateful), m.sentDrained {
            m.drainedReported = true
            pending.anchor.append(.drained(chainID: record.identity.chainID))
        }
        table.update(record.id) { $0.migration = m }
    }

    // MARK: - Operations of the reconfiguration protocol (the shell calls them for MigrationCoordinator's actions)

    /// The session as the coordinator needs it (nil: unknown here).
    /// Stops holding a session's new data (its buffer is full): from now on it goes on the old path, and the
    /// shell reports `bufferFull`, which cancels the reconfiguration.
    public mutating func anchorStopHolding(chainID: UInt64) {
        guard let id = id(chainID) else { return }
        table.update(id) { $0.migration?.phase = .locked }
    }

    public func context(chainID: UInt64) -> (SessionTable.Record, me: IPAddress)? {
        guard let id = table.byChain[chainID], let record = table.records[id] else { return nil }
        let me = record.left?.dstAddr ?? record.right?.srcAddr ?? record.session.srcAddr
        return (record, me)
    }

    private func id(_ chainID: UInt64) -> SessionTable.SessionID? { table.byChain[chainID] }

    /// Starts anchor tracking and takes the session off the kernel fast path (apply the returned effects).
    public mutating func anchorHold(chainID: UInt64, side: SessionTable.Side, stateful: Bool, now: UInt64) -> DataplaneEffects {
        guard let id = id(chainID), let record = table.records[id] else { return takeEffects() }
        if record.migration == nil { anchoring += 1 }
        var m = AnchorState(side: side, stateful: stateful, now: now)
        // What the slow path last saw the local side acknowledge (fresh only while the agent carries the session,
        // e.g. right after an earlier move): a number the local side really sent, so the anchor's keep-alives,
        // pokes and probes can use it before the endpoint speaks again.
        let local = side == .right ? record.sequence.forward : record.sequence.reverse
        if local.hasAck {
            m.lastAck = local.ack
            m.lastWindow = UInt16(truncatingIfNeeded: local.window)
        }
        table.update(id) { $0.migration = m }
        _ = holdSessions([id])
        return takeEffects()
    }

    /// Returns what the anchor observed on entering the phase (it may be drained already).
    public mutating func anchorSetPhase(chainID: UInt64, _ phase: AnchorState.Phase, now: UInt64) -> DataplaneEffects {
        guard let id = id(chainID), let record = table.records[id], var m = record.migration else { return takeEffects() }
        if phase == .released, m.phase == .buffering || m.phase == .probing { releasing[chainID] = m.side }
        if phase == .released, m.phase == .locked { m.stateful = false }
        if phase == .buffering { m.stateful = true }
        m.enter(phase)
        m.lastPacketAt = now
        store(m, for: record, now: now)
        return takeEffects()
    }

    /// The reconfiguration's delta sum over the removed boxes (§3.4, from the lock messages): the new-path
    /// subsession on the anchor's side adds it to the old path's (now, or when it is created).
    public mutating func anchorSetDelta(chainID: UInt64, _ delta: Int32) {
        guard let id = id(chainID), let side = table.records[id]?.migration?.side else { return }
        table.update(id) { $0.migration?.delta = delta }
        table.updateNewPathDelta(id, side)
    }

    /// Egress switches to the new path.
    public mutating func anchorPromote(chainID: UInt64) {
        guard let id = id(chainID), let m = table.records[id]?.migration, !m.promoted else { return }
        table.promote(id, m.side)
        table.update(id) { $0.migration?.promoted = true }
    }

    /// A window-opening probe for the new path: a pure ACK with the local side's numbers, towards the segment
    /// on the new subsession (at most ``PureAck/maxLength`` bytes written). Nil when this anchor has
    /// not seen enough of the session to know them (documented: such a session's migration falls back on
    /// the deadline).
    public func anchorProbe(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> Int? {
        guard let id = id(chainID), let record = table.records[id], let m = record.migration,
              let new = paths(record, m).new else { return nil }
        guard let (seq, ack) = m.probeNumbers else { return nil }
        let length = PureAck.build(into: buffer, tuple: egressTuple(new, side: m.side), seq: seq,
                                                ack: ack &- UInt32(bitPattern: new.seqDelta), window: m.lastWindow ?? 0xffff)
        return length
    }

    /// A SYN towards the anchor's own endpoint side, as if from the far end of the session, which makes that
    /// endpoint's TCP answer at once with an ACK carrying its current sequence, acknowledgment and window
    /// (RFC 5961 §4.2 challenge ACK; Linux rate-limits them to one per 500 ms per socket). The anchor learns
    /// the numbers the drain and the probes need without waiting for the endpoint to send (an idle or
    /// window-limited session). At an end host it is delivered locally; at a middlebox anchor it travels the
    /// adjacent subsession to the endpoint's side. Returns the packet's length and destination.
    public func anchorElicit(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)? {
        guard let id = id(chainID), let record = table.records[id], let m = record.migration else { return nil }
        guard let (tuple, shift) = localSide(record, m) else { return nil }
        if let received = m.lastAck.map({ $0 &+ shift.seq }), let peerAcked = m.peerAcked.map({ $0 &- shift.ack }) {
            // Knowing what the endpoint acknowledged: a keep-alive (one byte just below it, RFC 1122 §4.2.3.6),
            // which the endpoint discards as old and acknowledges at once, without the rate limit Linux puts on
            // challenge ACKs. Never below what merely crossed towards it (the far side's sequence end): with a
            // segment missing before it, that byte would be new data to the endpoint, and the ack number of a
            // packet as from the far side is only ever one the far side sent (``AnchorState/probeNumbers``).
            let length = PureAck.build(into: buffer, tuple: tuple, seq: received &- 1, ack: peerAcked,
                                                    window: m.peerWindow ?? 0xffff, payloadByte: true)
            return (length, tuple.dstAddr)
        }
        let length = PureAck.build(into: buffer, tuple: tuple, seq: 0, ack: 0, window: 0, flags: .syn)
        return (length, tuple.dstAddr)
    }

    /// Where a packet as from the far side goes to reach the anchor's local endpoint, and how its numbers move from
    /// the segment side's into that endpoint's (§3.4): at a middlebox anchor the packet leaves on the local side's
    /// subsession (its delta applies to the local stream, the acknowledgment number) and does not cross the host's
    /// own box (its reported ``SessionTable/Record/boxDelta``: the far stream it changes gains it, the local stream
    /// it changes loses it). `seq` is added to the sequence number, `ack` subtracted from the acknowledgment number.
    private func localSide(_ record: SessionTable.Record, _ m: AnchorState) -> (FiveTuple, shift: (seq: UInt32, ack: UInt32))? {
        switch (m.side, record.role) {
        case (.right, .leftEnd): return (record.session.reversed, (0, 0))
        case (.left, .rightEnd): return (record.session, (0, 0))
        case (.right, _):
            guard let left = record.leftLink?.active else { return nil }
            let box = record.boxDelta
            return (left.tuple.reversed, (UInt32(bitPattern: box.reverse), UInt32(bitPattern: left.seqDelta &+ box.forward)))
        case (.left, _):
            guard let right = record.rightLink?.active else { return nil }
            let box = record.boxDelta
            return (right.tuple, (UInt32(bitPattern: box.forward), UInt32(bitPattern: right.seqDelta &+ box.reverse)))
        }
    }

    public enum PokeResult: Equatable, Sendable { case stop, unknownNumbers, sent(length: Int, to: IPAddress, drained: Bool) }

    /// While draining: a keep-alive towards the far endpoint along the old path (one byte just below what it
    /// acknowledged; RFC 1122 §4.2.3.6). It makes the far endpoint acknowledge at once everything it has
    /// received instead of after its delayed-ACK timer (up to 40 ms on Linux), so the drain ends one round trip
    /// after the last old-path byte; and it carries this side's numbers past the other anchor, which learns
    /// them even when this endpoint is silent. The shell sends one on entering the drain and more while this
    /// side is not drained.
    public func anchorPoke(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> PokeResult {
        guard let id = id(chainID), let record = table.records[id], let m = record.migration,
              m.phase == .buffering || (m.phase == .released && !m.stateful), let old = paths(record, m).old else { return .stop }
        // The acknowledgment number is the local side's own (never the far side's sequence end: the far endpoint
        // would free data the local side may not have, ``AnchorState/probeNumbers``); until it is known, none.
        guard let peerAcked = m.peerAcked, let ack = m.lastAck else { return .unknownNumbers }
        let tuple = egressTuple(old, side: m.side)
        let length = PureAck.build(into: buffer, tuple: tuple, seq: peerAcked &- 1,
                                                ack: ack &- UInt32(bitPattern: old.seqDelta),
                                                window: m.lastWindow ?? 0xffff, payloadByte: true)
        return .sent(length: length, to: tuple.dstAddr, drained: m.drainedReported)
    }

    /// Whether the anchor is anchoring the session and cannot build a probe yet (it elicits again, issue 20).
    public func anchorLacksProbeNumbers(chainID: UInt64) -> Bool {
        guard let id = id(chainID), let m = table.records[id]?.migration else { return false }
        return m.probeNumbers == nil
    }

    /// Whether the anchor still lacks the local side's next sequence number (it then elicits it again).
    public func anchorNeedsNumbers(chainID: UInt64) -> Bool {
        guard let id = id(chainID), let m = table.records[id]?.migration else { return false }
        return m.sentEnd == nil && m.cutoff == nil
    }

    /// Ends the zero-window clamp and builds the window update that reopens the local endpoint's send window:
    /// a pure ACK as from the far side with its latest numbers and real window, towards the local endpoint
    /// (like ``anchorElicit(chainID:into:)``'s packet). Nil if there is nothing to reopen or nothing known.
    public mutating func anchorUnclamp(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)? {
        guard let id = id(chainID), var m = table.records[id]?.migration, m.clampWindow else { return nil }
        m.clampWindow = false
        table.update(id) { $0.migration = m }
        let seq = AnchorState.seqMax(m.latestPeerSeqEnd, m.peerSeqEnd ?? 0)
        let ack = AnchorState.seqMax(m.latestPeerAcked, m.peerAcked ?? 0)
        guard m.peerSeqEnd != nil || m.latestPeerSeqEnd != nil, m.peerAcked != nil || m.latestPeerAcked != nil,
              let window = m.peerWindow else { return nil }
        guard let record = table.records[id], let (tuple, shift) = localSide(record, m) else { return nil }
        let length = PureAck.build(into: buffer, tuple: tuple, seq: seq &+ shift.seq, ack: ack &- shift.ack,
                                                window: window)
        return (length, tuple.dstAddr)
    }

    /// Success: the old path's subsession goes, tracking ends, the session may return to the fast path.
    public mutating func anchorFinish(chainID: UInt64, now: UInt64) -> DataplaneEffects {
        guard let id = id(chainID), let m = table.records[id]?.migration else { return takeEffects() }
        if m.promoted { dropOtherDeparting(id, m.side, now: now) }
        endTracking(id)
        return takeEffects()
    }

    /// Cancel: back on the old path, the new path's subsession goes, tracking ends (the shell then releases
    /// the buffer, which this processor now translates onto the old path).
    public mutating func anchorCancel(chainID: UInt64, now: UInt64) -> DataplaneEffects {
        guard let id = id(chainID), let m = table.records[id]?.migration else { return takeEffects() }
        releasing[chainID] = m.side
        if m.promoted { table.promote(id, m.side) }
        dropOtherDeparting(id, m.side, now: now)
        endTracking(id)
        return takeEffects()
    }

    /// Drops the side's other subsession and keeps its ingress tuple as departed for the close linger (as
    /// ``leave(chainID:reason:now:)`` does for a whole session): the other anchor may still send on it until it
    /// hears of the cancel or teardown (its probe, released data, a retransmission), and a packet that reached
    /// this host's stack on a tuple no agent knows would be answered with a reset whose sequence number is
    /// exactly the sender's rcv_nxt; the other anchor, still holding that subsession, translates it into the
    /// session and its endpoint drops the connection ("Connection reset by peer" after cancelled insertions).
    private mutating func dropOtherDeparting(_ id: SessionTable.SessionID, _ side: SessionTable.Side, now: UInt64) {
        if let other = table.records[id]?.link(side)?.other {
            let key = side == .right ? other.tuple.reversed : other.tuple
            departed[key] = now &+ settings.closeLinger
        }
        table.dropOther(id, side)
    }

    private mutating func endTracking(_ id: SessionTable.SessionID) {
        table.update(id) { $0.migration = nil }
        anchoring = max(0, anchoring - 1)
        _ = releaseSessions([id])
    }

    /// Left anchor: a new-path subsession from this host to `next`.
    public mutating func openPath(chainID: UInt64, next: IPAddress) -> Result<FiveTuple, SessionTable.InsertError> {
        guard let (record, me) = context(chainID: chainID) else { return .failure(.collision(.zero)) }
        return Result { () throws(SessionTable.InsertError) in try table.openOtherRight(record.id, local: me, next: next).tuple }
    }

    /// Right anchor: the new path's last subsession, from the left.
    public mutating func addPath(chainID: UInt64, subsession: FiveTuple) -> Result<FiveTuple, SessionTable.InsertError> {
        guard let id = id(chainID) else { return .failure(.collision(subsession)) }
        return Result { () throws(SessionTable.InsertError) in try table.addOtherLeft(id, tuple: subsession).tuple }
    }

    /// New box: the session from a new-path SYN (no TCP SYN crosses this host: paper §3.3), with its right
    /// subsession to `next`. Returns the right subsession.
    public mutating func createFromNewPath(identity: SessionIdentity, session: FiveTuple, left: FiveTuple,
                                           next: IPAddress, now: UInt64) -> Result<FiveTuple, SessionTable.InsertError> {
        Result { () throws(SessionTable.InsertError) in
            let id = try table.insertFromLeft(session: session, left: left, remaining: [next], identity: identity, now: now)
            do throws(SessionTable.InsertError) {
                try table.openRight(id, local: left.dstAddr, next: next)
            } catch {
                table.remove(id)
                throw error
            }
            // No TCP handshake crosses a new box (§3.3): the session is established already.
            table.update(id) { $0.remaining.removeAll(); $0.established = true }
            counters.sessionsCreated &+= 1
            guard let right = table.records[id]?.right else { throw .portsExhausted }
            return right
        }
    }

    public mutating func markEstablished(chainID: UInt64) {
        guard let id = id(chainID) else { return }
        table.update(id) { $0.rightEstablished = true; $0.established = true }
    }

    /// This host leaves the session (its record, kernel entries and ports).
    public mutating func leave(chainID: UInt64, reason: String, now: UInt64) -> DataplaneEffects {
        guard let id = id(chainID), let record = table.records[id] else { return takeEffects() }
        let until = now &+ settings.closeLinger
        for key in table.ingressKeys(of: record) { departed[key] = until }
        if record.spliced != nil { spliceOut(record, until: until) }
        if table.records[id]?.migration != nil { anchoring = max(0, anchoring - 1) }
        removeSession(id, reason: reason)
        return takeEffects()
    }

    /// Anchors whose session was quiet for `quiet` nanoseconds while draining: drained (nothing can be in
    /// flight any more). Called by the shell's timer; returns their ``AnchorEvent/drained(chainID:)``.
    public mutating func checkQuietAnchors(now: UInt64, quiet: UInt64) -> DataplaneEffects {
        guard anchoring > 0 else { return takeEffects() }
        for record in table.records.values {
            guard var m = record.migration, !m.drainedReported,
                  m.phase == .buffering || (m.phase == .released && !m.stateful),
                  now >= m.lastPacketAt, now - m.lastPacketAt >= quiet else { continue }
            m.drainedReported = true
            pending.anchor.append(.drained(chainID: record.identity.chainID))
            table.update(record.id) { $0.migration = m }
        }
        return takeEffects()
    }

    /// The shell starts releasing a session's held packets (on the packet thread): later packets are no longer
    /// held behind them.
    public mutating func endRelease(chainID: UInt64) {
        releasing.removeValue(forKey: chainID)
    }

}
