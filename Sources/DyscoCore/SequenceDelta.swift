/// Sequence-number deltas on the wire (paper §3.4): a reconfiguration that takes out a box which changed a byte
/// stream (a proxy's two sessions, a box inserting or deleting bytes) leaves the anchors translating that
/// stream's numbers for the rest of the session. The delta belongs to a subsession
/// (``SessionTable/Subsession/seqDelta``); these are the per-packet operations.
extension TCPHeaderView {
    /// Calls `body(kind, offset, length)` for each option up to the end-of-options (kind 0); stops early when it
    /// returns false. A malformed option list (a length below 2 or past the header) ends the walk.
    public func forEachOption(_ body: (_ kind: UInt8, _ offset: Int, _ length: Int) -> Bool) {
        let end = headerLength
        var offset = TCPHeaderView.minimumLength
        while offset < end {
            let kind = base.load(fromByteOffset: offset, as: UInt8.self)
            if kind == 0 { return }
            if kind == 1 { offset += 1; continue }
            guard offset + 1 < end else { return }
            let length = Int(base.load(fromByteOffset: offset + 1, as: UInt8.self))
            guard length >= 2, offset + length <= end else { return }
            guard body(kind, offset, length) else { return }
            offset += length
        }
    }

    static let sackKind: UInt8 = 5

    /// The timestamps option's TSval (RFC 7323 §3), if the header carries the option.
    public var timestampValue: UInt32? {
        var value: UInt32?
        forEachOption { kind, offset, length in
            guard kind == 8, length == 10 else { return true }
            value = UInt32(bigEndian: base.loadUnaligned(fromByteOffset: offset + 2, as: UInt32.self))
            return false
        }
        return value
    }
}

extension TCPPacketView {
    /// A packet arriving on a subsession with delta `delta`: its sequence number moves into the local endpoint's
    /// numbering. SYNs carry the subsession's own initial number and are left alone.
    /// `timestamps`: the subsession's timestamp delta, added to the TSval (RFC 7323; ``SessionTable/Subsession/tsDelta``).
    public func applyIngressDelta(_ delta: Int32, timestamps: Int32 = 0) {
        guard !tcp.flags.contains(.syn) else { return }
        if delta != 0 { tcp.setSequenceNumber(tcp.sequenceNumber &+ UInt32(bitPattern: delta)) }
        if timestamps != 0 { shiftTimestamp(at: 2, by: timestamps) }
    }

    /// Adds `shift` to one of the timestamps option's fields (offset 2 in the option: TSval; 6: TSecr), with the
    /// checksum updated (RFC 1624), or recomputed when the field is at an odd offset (no NOP padding).
    func shiftTimestamp(at field: Int, by shift: Int32) {
        let header = tcp.base
        var recompute = false
        tcp.forEachOption { kind, offset, length in
            guard kind == 8, length == 10 else { return true }
            let at = offset + field
            let old = header.loadUnaligned(fromByteOffset: at, as: UInt32.self)
            let new = (UInt32(bigEndian: old) &+ UInt32(bitPattern: shift)).bigEndian
            header.storeBytes(of: new, toByteOffset: at, as: UInt32.self)
            if at % 2 == 0 { tcp.updateChecksumForAddress(oldRaw: old, newRaw: new) } else { recompute = true }
            return false
        }
        if recompute { recomputeTCPChecksum() }
    }

    /// A packet leaving on a subsession with delta `delta`: its acknowledgment number and SACK blocks (RFC 2018,
    /// both edges) move back into the far side's numbering. The TCP checksum is updated incrementally; a SACK block
    /// at an odd offset (no NOP padding) gets the checksum recomputed over the segment.
    /// `timestamps`: the subsession's timestamp delta, subtracted from the TSecr.
    public func applyEgressDelta(_ delta: Int32, timestamps: Int32 = 0) {
        guard tcp.flags.contains(.ack), !tcp.flags.contains(.syn) else { return }
        if timestamps != 0 { shiftTimestamp(at: 6, by: 0 &- timestamps) }
        guard delta != 0 else { return }
        let shift = UInt32(bitPattern: delta)
        tcp.setAcknowledgmentNumber(tcp.acknowledgmentNumber &- shift)
        var recompute = false
        let header = tcp.base
        tcp.forEachOption { kind, offset, length in
            guard kind == TCPHeaderView.sackKind else { return true }
            var edge = offset + 2
            while edge + 4 <= offset + length {
                let old = header.loadUnaligned(fromByteOffset: edge, as: UInt32.self)
                let new = (UInt32(bigEndian: old) &- shift).bigEndian
                header.storeBytes(of: new, toByteOffset: edge, as: UInt32.self)
                if edge % 2 == 0 { tcp.updateChecksumForAddress(oldRaw: old, newRaw: new) } else { recompute = true }
                edge += 4
            }
            return false
        }
        if recompute { recomputeTCPChecksum() }
    }
}

extension PacketProcessor {
    /// The middlebox on this host reports what it does to a session's byte streams (§3.4; the box's side of the
    /// paper's `dysco_splice`): `session` as the box sees it (either direction). An old-path hop adds the delta to
    /// the lock messages when a reconfiguration takes the box out. False if no session here has that tuple.
    public mutating func setBoxDelta(session: FiveTuple, _ delta: SessionTable.BoxDelta) -> Bool {
        let forward = table.bySession[session] != nil
        guard let id = table.bySession[session] ?? table.bySession[session.reversed] else { return false }
        // Reported from the server's side: its forward stream is the session's reverse one.
        let box = forward ? delta : SessionTable.BoxDelta(forward: delta.reverse, reverse: delta.forward)
        table.update(id) { $0.boxDelta = box }
        return true
    }
}
