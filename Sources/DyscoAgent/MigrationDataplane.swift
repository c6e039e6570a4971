import CLinux
import DyscoCore

/// What the migration engine needs of the data plane whose sessions it reconfigures (paper §3): look sessions up,
/// take a session off the kernel and hold its new data, open and switch its paths, hand it back, leave it, and
/// build the packets an anchor sends (elicits, window updates, probes, pokes) into a caller's buffer of
/// ``PureAck/maxLength`` bytes. ``AgentDataplane`` (NFQUEUE + nftables) implements it; another datapath
/// (BPF) would implement the same operations. The engine holds its data plane; the data plane reports back
/// (anchor observations, a full buffer) through ``MigrationEngine/anchorEvents(_:)`` and
/// ``MigrationEngine/bufferFull(_:)`` without owning the engine.
protocol MigrationDataplane: AnyObject, Sendable {
    // MARK: Lookup

    /// The session of `chainID` and this host's address on its path (nil: unknown here).
    func session(chainID: UInt64) -> (record: SessionTable.Record, me: IPAddress)?
    /// The sessions `include` selects (one pass over the table, under the data plane's lock: keep it cheap).
    func sessions(where include: (SessionTable.Record) -> Bool) -> [SessionTable.Record]

    // MARK: Anchoring (paper §3.4, §3.5)

    /// Starts anchoring the session on `side` and takes it off the kernel path; effective once ``commitHolds()``
    /// returns (the engine commits once per turn, before its messages go).
    func hold(chainID: UInt64, side: SessionTable.Side, stateful: Bool, now: UInt64)
    /// Makes every hold queued so far effective: from its return no packet of a held session bypasses the agent.
    func commitHolds()
    /// Enters `phase`; returns whether the anchor still lacks the local side's numbers (it then elicits them).
    func setPhase(chainID: UInt64, _ phase: AnchorState.Phase) -> Bool
    func setDelta(chainID: UInt64, _ delta: Int32)
    /// Egress switches to the new path.
    func promote(chainID: UInt64)
    /// Issues the session's held packets, in order, with the translations now in force.
    func releaseHeld(chainID: UInt64)
    /// Success: the old path goes, the session may return to the kernel path.
    func finish(chainID: UInt64)
    /// Cancel: back on the old path, the new one goes (release the held packets after it).
    func cancel(chainID: UInt64)
    /// Whether the anchor cannot build a probe yet (it elicits again).
    func lacksProbeNumbers(chainID: UInt64) -> Bool

    // MARK: Paths (paper §3.3)

    /// Left anchor: a new-path subsession from this host to `next`.
    func openPath(chainID: UInt64, next: IPAddress) -> Result<FiveTuple, SessionTable.InsertError>
    /// Right anchor: the new path's last subsession, from the left.
    func addPath(chainID: UInt64, subsession: FiveTuple) -> Result<FiveTuple, SessionTable.InsertError>
    /// New box: the session from a new-path SYN, with its right subsession to `next`.
    func createSession(identity: SessionIdentity, session: FiveTuple, left: FiveTuple,
                       next: IPAddress) -> Result<FiveTuple, SessionTable.InsertError>
    func markEstablished(chainID: UInt64)
    /// New box: the imported NAT binding's tuple becomes the right side's (``PacketProcessor/adoptTranslation(chainID:_:)``).
    func translate(chainID: UInt64, _ tuple: FiveTuple)
    /// This host leaves the session (its record, kernel entries and ports).
    func leave(chainID: UInt64, reason: String)
    /// A spliced-out proxy's notice: alias and timestamp delta (``PacketProcessor/spliceNotice(chainID:alias:tsDelta:)``).
    func spliceNotice(chainID: UInt64, alias: SessionTable.ChainAlias?, tsDelta: Int32) -> Bool
    /// A spliced-out proxy's sockets (``PacketProcessor/splicedOut``), and the bookkeeping of closing them.
    func splicedOut(_ sockets: [FiveTuple]) -> [FiveTuple: SplicedOutSocket]
    func splicedOutFinSent(_ socket: FiveTuple, next: UInt32)
    func forgetSplicedOut(_ sockets: [FiveTuple])

    // MARK: Packets an anchor sends

    /// Makes the local endpoint announce its numbers (``PacketProcessor/anchorElicit(chainID:into:)``).
    func buildElicit(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)?
    /// Ends the zero-window clamp (``PacketProcessor/anchorUnclamp(chainID:into:)``).
    func buildWindowUpdate(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)?
    /// A window-opening probe on the new path (``PacketProcessor/anchorProbe(chainID:into:)``).
    func buildProbe(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> Int?
    /// A keep-alive along the old path while draining (``PacketProcessor/anchorPoke(chainID:into:)``).
    func buildPoke(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> PacketProcessor.PokeResult
}

/// The NFQUEUE + nftables data plane serves the migration engine: table operations under the packet lock, kernel
/// work through the fast-path worker, held packets released on the packet thread.
extension AgentDataplane: MigrationDataplane {
    func session(chainID: UInt64) -> (record: SessionTable.Record, me: IPAddress)? {
        processor.withLock { $0.context(chainID: chainID) }.map { (record: $0.0, me: $0.me) }
    }

    func sessions(where include: (SessionTable.Record) -> Bool) -> [SessionTable.Record] {
        processor.withLock { state in state.table.records.values.filter(include) }
    }

    func hold(chainID: UInt64, side: SessionTable.Side, stateful: Bool, now: UInt64) {
        change { $0.anchorHold(chainID: chainID, side: side, stateful: stateful, now: now) }
    }

    func commitHolds() { fastPath?.flush() }

    func setPhase(chainID: UInt64, _ phase: AnchorState.Phase) -> Bool {
        let (effects, needsNumbers) = processor.withLock { state in
            (state.anchorSetPhase(chainID: chainID, phase, now: dysco_monotonic_coarse_ns()),
             state.anchorNeedsNumbers(chainID: chainID))
        }
        apply(effects)
        return needsNumbers
    }

    func setDelta(chainID: UInt64, _ delta: Int32) {
        processor.withLock { $0.anchorSetDelta(chainID: chainID, delta) }
    }

    func promote(chainID: UInt64) {
        processor.withLock { $0.anchorPromote(chainID: chainID) }
    }

    func releaseHeld(chainID: UInt64) { mailbox.post(release: chainID) }

    func finish(chainID: UInt64) {
        // Back to the kernel on the new path: committed at the packet thread's quiet point (no wait here).
        change { $0.anchorFinish(chainID: chainID, now: dysco_monotonic_coarse_ns()) }
    }

    func cancel(chainID: UInt64) {
        change { $0.anchorCancel(chainID: chainID, now: dysco_monotonic_coarse_ns()) }
    }

    func lacksProbeNumbers(chainID: UInt64) -> Bool {
        processor.withLock { $0.anchorLacksProbeNumbers(chainID: chainID) }
    }

    func openPath(chainID: UInt64, next: IPAddress) -> Result<FiveTuple, SessionTable.InsertError> {
        processor.withLock { $0.openPath(chainID: chainID, next: next) }
    }

    func addPath(chainID: UInt64, subsession: FiveTuple) -> Result<FiveTuple, SessionTable.InsertError> {
        processor.withLock { $0.addPath(chainID: chainID, subsession: subsession) }
    }

    func createSession(identity: SessionIdentity, session: FiveTuple, left: FiveTuple,
                       next: IPAddress) -> Result<FiveTuple, SessionTable.InsertError> {
        processor.withLock {
            $0.createFromNewPath(identity: identity, session: session, left: left, next: next, now: dysco_monotonic_coarse_ns())
        }
    }

    func markEstablished(chainID: UInt64) {
        processor.withLock { $0.markEstablished(chainID: chainID) }
    }

    func translate(chainID: UInt64, _ tuple: FiveTuple) {
        change { $0.adoptTranslation(chainID: chainID, tuple) }
    }

    func leave(chainID: UInt64, reason: String) {
        change { $0.leave(chainID: chainID, reason: reason, now: dysco_monotonic_coarse_ns()) }
    }

    func splicedOut(_ sockets: [FiveTuple]) -> [FiveTuple: SplicedOutSocket] {
        processor.withLock { state in
            var found: [FiveTuple: SplicedOutSocket] = [:]
            for socket in sockets { if let s = state.splicedOut[socket] { found[socket] = s } }
            return found
        }
    }

    func splicedOutFinSent(_ socket: FiveTuple, next: UInt32) {
        processor.withLock { $0.splicedOutFinSent(socket, next: next) }
    }

    func forgetSplicedOut(_ sockets: [FiveTuple]) {
        processor.withLock { $0.forgetSplicedOut(sockets) }
    }

    func spliceNotice(chainID: UInt64, alias: SessionTable.ChainAlias?, tsDelta: Int32) -> Bool {
        var known = false
        change { state in
            known = state.spliceNotice(chainID: chainID, alias: alias, tsDelta: tsDelta)
            return state.takeEffects()
        }
        return known
    }

    func buildElicit(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)? {
        processor.withLock { $0.anchorElicit(chainID: chainID, into: buffer) }
    }

    func buildWindowUpdate(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> (Int, IPAddress)? {
        processor.withLock { $0.anchorUnclamp(chainID: chainID, into: buffer) }
    }

    func buildProbe(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> Int? {
        processor.withLock { $0.anchorProbe(chainID: chainID, into: buffer) }
    }

    func buildPoke(chainID: UInt64, into buffer: UnsafeMutableRawPointer) -> PacketProcessor.PokeResult {
        processor.withLock { $0.anchorPoke(chainID: chainID, into: buffer) }
    }
}
