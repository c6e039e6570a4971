import CLinux
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// The agent's data plane as the rest of the agent uses it: the packet state machine (``PacketProcessor``, behind
/// the packet lock), the kernel fast path (a ``KernelPath``: ``BPFKernelPath``), the state file (``AgentJournal``) and the packet
/// thread's mailbox. What a processor call produces besides its result (``DataplaneEffects``) is handled here, in
/// one place (``apply(_:ownership:)``). The migration engine reaches it as its ``MigrationDataplane``.
final class AgentDataplane: @unchecked Sendable {
    let processor: Mutex<PacketProcessor>
    /// Set once in `init` (its outcome callback needs `self`).
    private(set) var fastPath: (any KernelPath)?
    /// The state file and the kernel's owned keys; used under the processor's lock.
    let journal = AgentJournal()
    /// Work for the packet thread (buffer releases) and its wake-up.
    let mailbox: PacketMailbox
    /// Receives the anchors' observations and full buffers (set once, before the packet thread starts; the engine
    /// holds this data plane, not the other way round).
    weak var migration: MigrationEngine?
    /// Ticks every 5 ms while a session is anchored here (the drain's quiet rule).
    private(set) var quietTimer: QuietTimer!
    private let quietNanoseconds: UInt64
    /// The expiry compacted the table; the expiry timer gives freed memory back to the OS.
    private let compactedPending = Atomic<Bool>(false)
    private let logger: Logger
    private let logLimiter = Mutex(LogRateLimiter())
    /// Sends the SYNs of a box that translates tuples on, after its NAT (``PacketProcessor/natSynLeft(_:sequence:now:)``);
    /// nil unless `--nat`.
    private let natSender: RawPacketSender?

    typealias OwnershipChange = (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)

    /// `makeFastPath` builds the kernel path (nil: none, `--no-fastpath`) with the nudge that wakes the packet thread, the callback that reports
    /// installs back to the processor, and a query of sessions' carriers (nil: no such session; the BPF path tells
    /// a hold from a teardown with it).
    init(processor: PacketProcessor, quietNanoseconds: UInt64, logger: Logger,
         makeFastPath: (_ nudge: @escaping @Sendable () -> Void,
                        _ outcome: @escaping @Sendable (KernelPathOutcome) -> Void,
                        _ carriers: @escaping @Sendable ([SessionTable.SessionID]) -> [SessionTable.SessionID: SessionTable.Carrier])
            throws -> (any KernelPath)?) throws {
        natSender = processor.settings.natBox ? try RawPacketSender() : nil
        self.processor = Mutex(processor)
        self.quietNanoseconds = quietNanoseconds
        self.logger = logger
        let mailbox = try PacketMailbox()
        self.mailbox = mailbox
        fastPath = try makeFastPath({ mailbox.wakeup.signal() }, { [weak self] outcome in
            self?.processor.withLock { state in
                state.fastPathInstalled(outcome.installed)
                state.fastPathFailed(outcome.failed)
            }
        }, { [weak self] ids in
            self?.processor.withLock { state in
                var carriers: [SessionTable.SessionID: SessionTable.Carrier] = [:]
                for id in ids { carriers[id] = state.table.records[id]?.carrier }
                return carriers
            } ?? [:]
        })
        quietTimer = QuietTimer { [weak self] in self?.quietTick() }
    }

    // MARK: - The one place for effects

    /// Everything a processor call produced besides its result: anchor observations to the migration engine,
    /// kernel work (and owned-key changes) to the fast-path worker, events to the log, a compacted table to the
    /// expiry timer (which gives the memory back).
    @inline(__always)
    func apply(_ effects: DataplaneEffects, ownership: OwnershipChange? = nil) {
        if effects.isEmpty, ownership == nil { return }
        if !effects.anchor.isEmpty { migration?.anchorEvents(effects.anchor) }
        fastPath?.submit(effects.fastPath, ownership: ownership)
        if !effects.events.isEmpty { log(effects.events) }
        if effects.compacted { compactedPending.store(true, ordering: .relaxed) }
    }

    /// A packet's effects that open a session in the kernel with its SYN (``FastPathAction/open(_:_:syn:)``) are
    /// committed now, before the SYN's verdict, so that the answer (the SYN-ACK) finds the translations; a new
    /// session has no other packet waiting in the queue, so the hand-over reorders nothing. True if it applied
    /// them (the caller must not apply them again).
    func applyOpenings(_ effects: DataplaneEffects) -> Bool {
        guard effects.fastPath.contains(where: { if case .open = $0 { true } else { false } }) else { return false }
        apply(effects)
        fastPath?.flush()
        return true
    }

    /// Runs a table operation off the packet path and handles its effects: the state file gets its changes at
    /// once, installs go at the packet thread's quiet point; ``commitHolds()`` commits removals (a hold) at once.
    /// Starts the quiet timer when the operation left a session anchored. The migration engine flushes once per
    /// batch.
    func change(_ body: (inout PacketProcessor) -> DataplaneEffects) {
        let (effects, owned, startQuiet) = processor.withLock { state in
            let effects = body(&state)
            let startQuiet = state.anchoring > 0 && quietTimer.claimStart()
            return (effects, journal.persist(&state), startQuiet)
        }
        apply(effects, ownership: owned)
        if startQuiet { quietTimer.start() }
    }

    /// The end of a packet-thread turn: its table changes go to the state file once, after its verdicts (a record
    /// changed by several packets of the turn is one line), and its owned-key changes to the worker.
    func persistTurn() {
        guard let owned = processor.withLock({ journal.persist(&$0) }) else { return }
        fastPath?.submit([], ownership: owned)
    }

    /// Whether the expiry compacted the table since the last call.
    func takeCompacted() -> Bool { compactedPending.exchange(false, ordering: .relaxed) }

    // MARK: - Operations of the other threads

    /// Takes sessions back to the slow path; returns once the kernel no longer rewrites them.
    func hold(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        let (held, owned) = processor.withLock { state in (state.hold(ids), journal.persist(&state)) }
        apply(held.effects, ownership: owned)
        fastPath?.flush()
        return held.held
    }

    /// Returns held sessions to the fast path, installed before this returns.
    func release(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        let (released, owned) = processor.withLock { state in (state.release(ids), journal.persist(&state)) }
        apply(released.effects, ownership: owned)
        fastPath?.commitAll()
        return released.released
    }

    /// The expiry timer's turn, first: an RST still provisional at this end host is settled by the local stack's own
    /// judgement (``PacketProcessor/resetProbes(limit:)``): the session's socket gone or closed means the stack took
    /// the RST. The queries run outside the packet lock (one sock_diag lookup each, at most 256 a turn).
    func probeResets(now: UInt64) {
        let probes = processor.withLock { $0.resetProbes(limit: 256) }
        guard !probes.isEmpty else { return }
        let taken = probes.filter { probe in
            // Only a definite answer settles it: a failed lookup leaves the RST provisional.
            let info: TCPSocketInfo?
            do { info = try TCPSocketDiag.query(local: probe.local) } catch { return false }
            guard info == nil || info?.state == .close else { return false }
            logger.info("RST confirmed by the local stack: the session's socket is gone", metadata: [
                "session.id": "\(probe.id)", "session.socket": "\(probe.local)", "socket.state": "\(info.map { "\($0.state)" } ?? "none")"])
            return true
        }
        guard !taken.isEmpty else { return }
        let owned = processor.withLock { state in
            for probe in taken { state.confirmProbedReset(probe.id, now: now) }
            return journal.persist(&state)
        }
        apply(DataplaneEffects(), ownership: owned)
    }

    /// The expiry timer's turn: sessions past their linger or timeouts go.
    func expire(now: UInt64) {
        let (effects, owned) = processor.withLock { state in (state.expire(now: now).effects, journal.persist(&state)) }
        apply(effects, ownership: owned)
    }

    /// What the kernel reported about packets it carried (the packet thread, BPF datapath): each event gets the
    /// processor's bookkeeping of an observed packet (``PacketProcessor/observe(_:now:)``); lost reports are counted
    /// (``DataplaneCounters/kernelEventsLost``). The state file gets the changes at the end of the turn.
    func kernelEvents(_ taken: (events: [KernelEvent], lost: UInt64)) {
        guard !taken.events.isEmpty || taken.lost > 0 else { return }
        let now = dysco_monotonic_coarse_ns()
        var syns: [[UInt8]] = []
        let effects = processor.withLock { state in
            state.counters.kernelEventsLost &+= taken.lost
            var effects = DataplaneEffects()
            for event in taken.events {
                if event.kind == .natSyn {
                    let (packet, more) = state.natSynLeft(event.key, sequence: event.sequenceNumber, now: now)
                    if let packet { syns.append(packet) }
                    effects.append(more)
                } else {
                    effects.append(state.observe(event, now: now).effects)
                }
            }
            return effects
        }
        // A session opened in the kernel with a SYN the agent sends itself reaches the map before the SYN leaves.
        if !applyOpenings(effects) { apply(effects) }
        sendNATSyns(syns)
    }

    /// The SYNs of a box that translates, in the tuples its NAT gave them, with their trailers (the raw socket's
    /// packets carry the egress mark: the queue rules let them pass).
    private func sendNATSyns(_ syns: [[UInt8]]) {
        guard let natSender else { return }
        for syn in syns {
            syn.withUnsafeBytes { bytes in
                guard bytes.count >= IPv6HeaderView.length else { return }
                let destination = PureAck.destination(of: bytes.baseAddress!)
                do { try natSender.send(bytes, to: destination) } catch {
                    logger.warning("sending a SYN after the box's NAT failed", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    /// A full anchor buffer: the reconfiguration is cancelled (which releases the buffer there too).
    func bufferFull(_ chainID: UInt64) { migration?.bufferFull(chainID) }

    /// The quiet timer's tick: anchors whose session was quiet for the quiet interval are drained; with no session
    /// anchored any more, the timer stops.
    private func quietTick() {
        let now = dysco_monotonic_coarse_ns()
        let effects = processor.withLock { state -> DataplaneEffects? in
            guard state.anchoring > 0 else {
                quietTimer.endTicking()
                return nil
            }
            return state.checkQuietAnchors(now: now, quiet: quietNanoseconds)
        }
        guard let effects else {
            // Unless an anchor started since (its start, queued behind this tick, schedules the timer again).
            quietTimer.pauseUnlessTicking()
            return
        }
        apply(effects)
    }

    // MARK: - Logging

    private func log(_ events: [DataplaneEvent]) {
        for event in events {
            switch event {
            case .sessionCreated(let record):
                // Per-session events are debug: at info, formatting and writing them would sit between a
                // SYN's verdict and the SYN-ACK on a busy agent (connect latency).
                logger.debug("session created", metadata: [
                    "session.id": "\(record.id)", "session.role": "\(record.role.rawValue)",
                    "session.tuple": "\(record.session)", "subsession.left": "\(record.left.map { "\($0)" } ?? "-")",
                    "subsession.right": "\(record.right.map { "\($0)" } ?? "-")",
                ])
            case .sessionRemoved(let record, let reason):
                logger.debug("session removed", metadata: [
                    "session.id": "\(record.id)", "session.tuple": "\(record.session)", "session.reason": "\(reason)",
                    "session.packets": "\(record.packets)",
                ])
            case .malformedDyscoSyn(let tuple, let error):
                warnLimited("dropped malformed Dysco SYN", ["packet.tuple": "\(tuple)", "error": "\(error)"])
            case .untrustedDyscoSyn(let tuple, let error):
                warnLimited("dropped untrusted Dysco SYN", ["packet.tuple": "\(tuple)", "error": "\(error)"])
            case .rejected(let tuple, let reason):
                warnLimited("dropped SYN", ["packet.tuple": "\(tuple)", "reason": "\(reason)"])
            }
        }
    }

    /// A warning anyone on the segment can trigger: rate-limited per message (``LogRateLimiter``), the lines
    /// left out counted in `log.suppressed` of the next one (or in a line of their own once the window ends).
    private func warnLimited(_ message: Logger.Message, _ metadata: Logger.Metadata) {
        let decision = logLimiter.withLock { $0.admit(message.description, now: dysco_monotonic_coarse_ns()) }
        guard case .log(let suppressed) = decision else { return }
        var metadata = metadata
        if suppressed > 0 { metadata["log.suppressed"] = "\(suppressed)" }
        logger.warning(message, metadata: metadata)
    }

    /// Lines suppressed in windows that ended without another line of their kind (the expiry timer calls it).
    func reportSuppressedLogs() {
        for report in logLimiter.withLock({ $0.takeReports(now: dysco_monotonic_coarse_ns()) }) {
            logger.warning("log lines suppressed", metadata: ["log.message": "\(report.kind)", "log.suppressed": "\(report.suppressed)"])
        }
    }
}
