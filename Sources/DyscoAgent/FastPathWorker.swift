import DyscoCore
import CLinux
import Foundation
import Logging
import Synchronization

/// Applies ``FastPathAction``s to the kernel: actions queue up and go together in one transaction (batched),
/// committed by the packet thread when the NFQUEUE socket is empty (see ``submit(_:)``), serialized with
/// everything else on the worker's queue. Also polls the per-session counters so that idle expiry sees
/// kernel-carried traffic. The nftables ``KernelPath`` (`agent --datapath nftables`, the default).
final class FastPathWorker: KernelPath, @unchecked Sendable {
    typealias Outcome = KernelPathOutcome

    private let queue = DispatchQueue(label: "dysco-fastpath")
    // Used only on `queue`.
    private let nft: NftablesContext
    /// A second context for the counter poll, used only there (under `listingLock`): a listing never holds the
    /// worker's queue, on which the packet thread commits.
    private let listingNft: NftablesContext
    private let listingLock = NSLock()
    private let logger: Logger
    private var lastCounters: [SessionTable.SessionID: UInt64] = [:]
    /// Packets the kernel rewrote, summed from the per-session counters at each poll (``activeSessions()``, and
    /// ``sampleKernelPackets()`` at each metrics scrape): what a session carried between the last poll and its
    /// removal from the kernel is not counted.
    let kernelPackets = Atomic<UInt64>(0)
    var kernelPacketCount: UInt64 { kernelPackets.load(ordering: .relaxed) }
    /// The per-session counters ``kernelPackets`` was last summed from (used only on `queue`).
    private var packetTally = KernelPacketTally()
    private let report: @Sendable (Outcome) -> Void

    private let reroute: Bool
    /// The owned keys the kernel has (used only on `queue`): changes are computed against them, so the worker
    /// deletes only elements it added.
    private var kernelOwnedIngress = Set<FiveTuple>()
    private var kernelOwnedEgress = Set<FiveTuple>()

    /// Opens libnftables; the table is left as it is until ``reset()`` or ``rebuild(sessions:owned:)``.
    init(reroute: Bool, logger: Logger, nudge: (@Sendable () -> Void)? = nil,
         report: @escaping @Sendable (Outcome) -> Void) throws {
        self.logger = logger
        self.report = report
        self.nudge = nudge
        self.reroute = reroute
        nft = try NftablesContext()
        listingNft = try NftablesContext()
    }

    /// The table's chains and sets (names only), nil when there is no table.
    func listing() -> (any KernelListing)? {
        queue.sync {
            // `list tables` and `list sets` fill libnftables' whole cache (0.27 s with 1,000 sessions); chain names and
            // one base chain are cheap.
            guard let chains = try? nft.json("list chains ip") else { return nil }
            var listing = FastPathListing(chainsJSON: chains, setsJSON: Data())
            guard listing.chains.contains("pre") else { return nil }
            if let pre = try? nft.run("list chain ip \(FastPathScript.table) pre", operation: "list chain pre"),
               pre.contains("@owned_in") {
                listing.sets = ["owned_in", "owned_out"]  // the current format's base chains use both
            }
            return listing
        }
    }

    /// A restarted agent whose table is as it left it (``FastPathListing/matches(_:)``): only the owned keys are set
    /// again (one transaction); the sessions' chains and elements stay, so nothing changes for their packets.
    func keep(owned: KernelOwnership.Keys) throws {
        try queue.sync {
            try nft.run(FastPathScript.replaceOwned(ingress: owned.ingress, egress: owned.egress), operation: "set the owned keys")
            kernelOwnedIngress = Set(owned.ingress)
            kernelOwnedEgress = Set(owned.egress)
        }
    }

    /// Replaces whatever table a predecessor left with an empty one.
    func reset() throws {
        try queue.sync {
            try nft.run(FastPathScript.reset(reroute: reroute), operation: "create table ip \(FastPathScript.table)")
            kernelOwnedIngress = []
            kernelOwnedEgress = []
        }
    }

    /// A restarted agent: replaces the table, in one transaction, with one carrying `sessions` and the owned keys.
    func rebuild(sessions: [(SessionTable.SessionID, [FastPathScript.Translation])], owned: KernelOwnership.Keys) throws {
        try queue.sync {
            try nft.run(FastPathScript.rebuild(reroute: reroute, sessions: sessions, ownedIngress: owned.ingress,
                                               ownedEgress: owned.egress),
                        operation: "rebuild table ip \(FastPathScript.table) with \(sessions.count) session(s)")
            kernelOwnedIngress = Set(owned.ingress)
            kernelOwnedEgress = Set(owned.egress)
        }
    }

    /// How long the first queued action waits for others to join its transaction.
    static let batchDelayNanoseconds: UInt64 = 2_000_000
    /// Under load the queue may never be empty: changes are committed after this long anyway (a forced commit
    /// may reorder the packets still queued; waiting longer keeps more sessions on the busy slow path, which
    /// measured worse: 250 ms gave more reordering than 20 ms in the drain and replace tests).
    static let maxDelayNanoseconds: UInt64 = 20_000_000

    /// How long owned-key changes gather before they go to the kernel, in one transaction of their own on the
    /// worker's queue (never on the packet thread). A session's keys are owned at most this long (plus one
    /// transaction) after its handshake; a session that opens and closes within it never costs the kernel
    /// anything (issue 21: one owned-key transaction per connection on the packet thread cost milliseconds; at
    /// 50 ms, back-to-back short connections still cost every agent a libnftables transaction, 1–3 ms of CPU,
    /// 20 times a second, and the connections around each were slow).
    static let ownershipDelayNanoseconds: UInt64 = 250_000_000

    /// Pending changes (under `state`'s lock).
    private struct Queue {
        var actions: [FastPathAction] = []
        var since: UInt64 = 0
        /// Owned-key changes folded in order (each change removes, then adds): the membership each changed key
        /// should have once they are applied.
        var ownership = OwnershipDelta()
        var ownershipScheduled = false
    }
    private let state = Mutex(Queue())
    /// An owned-key transaction is running on the queue: the packet thread does not wait for it (it commits its
    /// installs at its next turn instead).
    private let ownershipRunning = Atomic<Bool>(false)
    /// Wakes the packet thread (set by the agent); nil: commits run on the worker's queue after the batch delay.
    private let nudge: (@Sendable () -> Void)?

    /// Queues actions. They are committed, in order, in one transaction with whatever else is waiting, by the
    /// packet thread at its next quiet point (``commitIfDue(queueEmpty:now:)``): when the NFQUEUE socket is
    /// empty, so that no packet of a session going to the kernel is still waiting in the queue when the kernel
    /// starts carrying the later ones (which would reorder them on the wire: the receiver then reports a gap
    /// and the sender retransmits).
    func submit(_ actions: [FastPathAction], ownership: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)?) {
        let owning = ownership.map { !$0.add.isEmpty || !$0.remove.isEmpty } ?? false
        guard !actions.isEmpty || owning else { return }
        let (firstAction, scheduleOwnership) = state.withLock { q in
            let firstAction = !actions.isEmpty && q.actions.isEmpty
            if firstAction { q.since = dysco_monotonic_ns() }
            q.actions.append(contentsOf: actions)
            guard owning, let ownership else { return (firstAction, false) }
            q.ownership.apply(ownership)
            defer { q.ownershipScheduled = true }
            return (firstAction, !q.ownershipScheduled)
        }
        if scheduleOwnership {
            queue.asyncAfter(deadline: .now() + .nanoseconds(Int(Self.ownershipDelayNanoseconds))) {
                self.ownershipRunning.store(true, ordering: .releasing)
                self.commit(.ownership)
                self.ownershipRunning.store(false, ordering: .releasing)
            }
        }
        guard firstAction else { return }
        if let nudge { nudge() } else {
            queue.asyncAfter(deadline: .now() + .nanoseconds(Int(Self.batchDelayNanoseconds))) { self.commit(.actions) }
        }
    }

    /// The packet thread, between reads: commits what is queued if it is due. `queueEmpty`: the last read found
    /// the socket empty (the quiet point).
    func commitIfDue(queueEmpty: Bool, now: UInt64) {
        let due = state.withLock { q in
            let wait = queueEmpty ? Self.batchDelayNanoseconds : Self.maxDelayNanoseconds
            return !q.actions.isEmpty && now &- q.since >= wait
        }
        // Never wait behind an owned-key transaction: the next turn (poll timeout 1 ms) commits.
        guard due, !ownershipRunning.load(ordering: .acquiring) else { return }
        queue.sync { commit(.actions) }
    }

    /// Milliseconds the packet thread may sleep in poll before a commit is due (-1: none pending).
    func pollTimeout(now: UInt64) -> Int32 {
        state.withLock { q in
            guard !q.actions.isEmpty else { return -1 }
            if ownershipRunning.load(ordering: .relaxed) { return 1 }
            let due = q.since &+ Self.batchDelayNanoseconds
            return due <= now ? 0 : Int32((due - now + 999_999) / 1_000_000)
        }
    }

    /// Takes sessions off the kernel now (hold and `path hold` wait on this): the queued changes of every
    /// session with a removal among them are committed at once by the caller; changes that only put sessions
    /// into the kernel stay for the packet thread's quiet point (``FastPathAction/splitForFlush(_:)``).
    func flush() {
        queue.sync { commit(.removals) }
    }

    /// Commits everything queued now (`path release`, which promises the kernel has the session on return).
    func commitAll() {
        queue.sync { commit() }
    }

    /// Agent exit: commits what is queued, then deletes the table unless `keep` (live sessions stay in the kernel
    /// for the next agent).
    func shutdown(keep: Bool) {
        queue.sync {
            commit()
            guard !keep else { return }
            do { try nft.run(FastPathScript.destroy, operation: "delete table") } catch {
                logger.error("could not delete the fast-path table", metadata: ["error": "\(error)"])
            }
        }
    }

    /// The owned-set changes queued, against what the kernel has: only real differences go out (O(changed keys)).
    private func ownershipScript(_ delta: OwnershipDelta) -> String {
        let ingress = delta.ingress.diff(against: &kernelOwnedIngress)
        let egress = delta.egress.diff(against: &kernelOwnedEgress)
        return FastPathScript.disown(ingress: ingress.remove, egress: egress.remove)
            + FastPathScript.own(ingress: ingress.add, egress: egress.add)
    }

    /// What a commit takes from the queue.
    private enum CommitScope {
        case all
        /// The packet thread's commit (or the batch timer's): the actions; owned keys keep their own clock.
        case actions
        /// A hold's flush: the changes of sessions with a removal.
        case removals
        /// Only the owned-key changes (their timer).
        case ownership
    }

    private func commit(_ what: CommitScope = .all) {
        let (taken, ownership) = state.withLock { q -> ([FastPathAction], OwnershipDelta) in
            switch what {
            case .all:
                defer { q.actions.removeAll(); q.ownership = OwnershipDelta() }
                return (q.actions, q.ownership)
            case .actions:
                defer { q.actions.removeAll() }
                return (q.actions, OwnershipDelta())
            case .removals:
                let (now, later) = FastPathAction.splitForFlush(q.actions)
                q.actions = later
                return (now, OwnershipDelta())
            case .ownership:
                defer { q.ownership = OwnershipDelta(); q.ownershipScheduled = false }
                return ([], q.ownership)
            }
        }
        let owned = ownershipScript(ownership)
        if !owned.isEmpty {
            // Its own transaction: an ownership change never keeps a session's install out (or the reverse).
            do { try nft.run(owned, operation: "update owned keys") } catch {
                logger.warning("fast path refused an owned-key change", metadata: ["error": "\(error)"])
            }
        }
        let actions = FastPathAction.coalesce(taken)
        guard !actions.isEmpty else { return }
        var outcome = Outcome()
        let script = actions.map(Self.script).joined()
        do {
            try nft.run(script, operation: "apply \(actions.count) change(s)")
            outcome.installed = actions.compactMap { $0.installing != nil ? $0.session : nil }
        } catch {
            // One bad session must not keep the others out: apply them one by one.
            for action in actions {
                do {
                    try nft.run(Self.script(action), operation: "apply one change")
                    if action.installing != nil { outcome.installed.append(action.session) }
                } catch {
                    if action.installing != nil { outcome.failed.append(action.session) }
                    logger.warning("fast path refused a change", metadata: ["session.id": "\(Self.id(action))",
                                                                         "error": "\(error)"])
                }
            }
        }
        report(outcome)
    }

    private static func script(_ action: FastPathAction) -> String {
        switch action {
        // `.open` is the BPF datapath's (Settings.installAtSyn is never set for this path): an install here.
        case .install(let id, let translations), .open(let id, let translations, _):
            FastPathScript.install(session: id, translations)
        case .remove(let id, let translations): FastPathScript.remove(session: id, translations)
        }
    }

    private static func id(_ action: FastPathAction) -> SessionTable.SessionID { action.session }

    /// Reads the kernel's counters now and adds what they moved to ``kernelPackets`` (a metrics scrape).
    func sampleKernelPackets() {
        queue.sync {
            guard let data = try? nft.json("list table ip \(FastPathScript.table)") else { return }
            accumulate(FastPathCounters.packetsBySession(json: data))
        }
    }

    private func accumulate(_ totals: [SessionTable.SessionID: UInt64]) {
        kernelPackets.add(packetTally.moved(totals), ordering: .relaxed)
    }

    /// Sessions whose kernel counters moved since the last call.
    func activeSessions() -> [SessionTable.SessionID] {
        // Terse: the counters are in the per-session chains; the maps' and owned sets' elements are not needed.
        let listed = listingLock.withLock { try? listingNft.json("list table ip \(FastPathScript.table)", terse: true) }
        guard let data = listed else { return [] }
        let totals = FastPathCounters.packetsBySession(json: data)
        return queue.sync {
            defer { lastCounters = totals }
            accumulate(totals)
            return totals.compactMap { id, packets in packets != lastCounters[id] ? id : nil }
        }
    }
}

