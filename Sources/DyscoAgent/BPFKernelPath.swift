import CLinux
import DyscoBPF
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// The agent's ``KernelPath`` (docs/BPF.md): the tc programs of `dysco.bpf.o` on every device of
/// the namespace but `lo`, one `dysco_sessions` entry per translation. An install writes a session's entries (one
/// batch); a removal deletes them, unless it is a migration's hold (the session's carrier is `held` when the removal
/// is committed): then the entries get the `HELD` flag (the programs pass the packets untouched, to the NFQUEUE
/// rules) and keep their counters and TCP facts; the release's install hands them back by the hand-over rule
/// (``BPFHandOver``: `HELD|RELEASING` with the agent's count of verdicted packets; the program takes over when its
/// count of queued packets meets it) and deletes the keys a migration changed. Entries of held sessions that are gone are deleted by the counter poll. Installs of sessions the agent carried wait for the packet thread's quiet point; map writes
/// take microseconds, so the commit is cheap. A key new at an install (but an opening's) is written `HELD` and
/// released by the same rule once the queue was seen empty after an RCU barrier (docs/BPF.md, "New keys"), so its
/// first kernel-carried packet overtakes none still queued.
///
/// Marks: the ingress program ORs ``FastPath/ingressMark`` into what it rewrote (the raw-PREROUTING queue rule
/// skips it); no observe mark. At egress the queue rules run before tc, so
/// they ask the pinned socket filter `dysco_egress_carried` (``QueueRules``). A kernel-carried session's FIN and RST
/// stay in the kernel at both hooks: the programs report them through the `dysco_events` ring buffer, which the
/// packet thread polls (``eventsFD``, ``takeEvents()``) and hands to the processor's bookkeeping.
///
/// Restart (docs/BPF.md, "Restart via pinning"): programs, maps and pins outlive the agent; a restarted agent
/// re-opens the pinned maps (their entries stay), re-attaches the programs with replace and rebuilds its table from
/// the state file and the map's entries (``listing()``: each entry is a translation).
///
/// Owned keys (docs/BPF.md, "Owned keys"): the keys of the sessions the agent alone translates
/// (``KernelOwnership``) are entries of `dysco_owned`, written as the changes come (``submit(_:ownership:)``: a map
/// write takes microseconds, so no batching delay); the ingress program marks an owned packet it does not rewrite
/// with ``FastPath/ownedIngressMark``, and the egress queue rules ask the pinned socket filter
/// `dysco_egress_owned`; both feed a queue rule without `--queue-bypass` (``QueueRules``): while no agent runs those
/// packets are dropped, not leaked untranslated. With ``Settings/carries`` false (`--no-fastpath`) the path
/// carries nothing (installs are ignored, every packet goes through NFQUEUE) and serves the owned keys only.
final class BPFKernelPath: KernelPath, @unchecked Sendable {
    /// How long the first queued install waits for others to join its batch.
    static let batchDelayNanoseconds: UInt64 = 2_000_000
    /// Under load the queue may never be empty: installs are committed after this long anyway (the hand-over rule
    /// keeps held translations in order; see docs/BPF.md for what a forced commit may still reorder).
    static let maxDelayNanoseconds: UInt64 = 20_000_000

    struct Settings: Sendable {
        /// The compiled programs (`make bpf`: .build/bpf/dysco.bpf.o).
        var objectPath: String
        /// A bpffs mount point; mounted by the agent if it is not one (and unmounted at exit).
        var bpffs: String
        /// The agent's own directory on it (maps and the egress socket filter are pinned there).
        var pinDirectory: String
        /// Capacity of `dysco_sessions` in translations (nil: the object's default).
        var maxEntries: UInt32?
        /// Size of the `dysco_events` ring in bytes (nil: the object's 1 MiB).
        var ringBytes: UInt32? = nil
        /// `--fresh`: a pinned map of another capacity is replaced (its sessions are lost) instead of refused.
        var fresh = false
        /// Carry sessions (false: `--no-fastpath`, the owned keys only; installs are ignored).
        var carries = true
        /// The agent's NFQUEUE number: after a barrier its last packet id is read from
        /// /proc/net/netfilter/nfnetlink_queue (docs/BPF.md "New keys"; nil: only an empty queue releases new keys).
        var queue: UInt16? = nil
    }

    private let settings: Settings
    private let logger: Logger
    private let report: @Sendable (KernelPathOutcome) -> Void
    /// The processor's carrier of each session (takes the packet lock; never called under it).
    private let carriers: @Sendable ([SessionTable.SessionID]) -> [SessionTable.SessionID: SessionTable.Carrier]
    /// The keys each session has in the map, and the sessions whose entries are `HELD` (under `lock`).
    private var installedKeys: [SessionTable.SessionID: [BPFSessionKey]] = [:]
    private var heldSessions = Set<SessionTable.SessionID>()
    /// The hand-over rule's agent side (under `lock`): counts of verdicted packets of held translations, releases
    /// waiting for the program to take over (docs/BPF.md, "Hand-over without reordering").
    private var handOver = BPFHandOver()
    /// `!handOver.isEmpty` and `handOver.releasing.count`, for the packet thread's checks without the lock.
    private let handingOver = Atomic<Bool>(false)
    private let releasingCount = Atomic<Int>(0)
    /// New keys waiting for the queue to be seen empty after their barrier (``BPFHandOver/awaitingDrain``).
    private let awaitingDrain = Atomic<Int>(0)
    /// RCU barriers (docs/BPF.md "New keys"): the last one requested (under `lock`) and the last one that returned.
    private var barrierRequested: UInt64 = 0
    private let barrierDone = Atomic<UInt64>(0)
    /// The last returned barrier with the queue's last packet id at its return: (number << 32) | id; 0: none.
    private let barrierMark = Atomic<UInt64>(0)
    private let barrierQueue = DispatchQueue(label: "dysco-bpf-barrier", qos: .userInitiated)
    /// When the packet thread last read the releasing entries' flags (under `lock`).
    private var lastReleaseCheck: UInt64 = 0
    private let nudge: (@Sendable () -> Void)?
    /// Guards `datapath` (libbpf objects have one user at a time) and the counter baselines.
    private let lock = NSLock()
    private let datapath: BPFDatapath
    private let interfaces: [String]
    /// The agent mounted the bpffs (so it unmounts it at exit).
    private let mountedFS: Bool
    private var lastCounters: [SessionTable.SessionID: UInt64] = [:]
    private var packetTally = KernelPacketTally()
    private let kernelPackets = Atomic<UInt64>(0)
    /// A predecessor's pinned session map was there at start (re-opened, entries kept): ``listing()`` reads it.
    private let inherited: Bool
    /// The entries ``listing()`` read (the restart's ``keep(owned:)`` takes its sessions' keys from it).
    private var listed: BPFSessionListing?
    var kernelPacketCount: UInt64 { kernelPackets.load(ordering: .relaxed) }
    private let openingRefusedCount = Atomic<UInt64>(0)
    var openingRefused: UInt64 { openingRefusedCount.load(ordering: .relaxed) }
    /// The ring buffer's epoll descriptor (the packet thread's poll set).
    let eventsFD: Int32?
    /// `dysco_stats[EVENT_LOST]` as of the last ``takeEvents()`` (under `lock`).
    private var eventsLostSeen: UInt64 = 0
    /// The owned keys `dysco_owned` holds (under `lock`): changes are written against them.
    private var ownedIngress = Set<FiveTuple>()
    private var ownedEgress = Set<FiveTuple>()

    private struct Pending {
        var actions: [FastPathAction] = []
        var since: UInt64 = 0
    }
    private let pending = Mutex(Pending())

    /// Where the egress queue rules find the socket filter (`iptables -m bpf --object-pinned`).
    var egressFilterPath: String { settings.pinDirectory + "/" + BPFDatapath.egressCarriedProgram }
    /// Where the fail-closed egress queue rule finds the owned-key filter.
    var ownedFilterPath: String { settings.pinDirectory + "/" + BPFDatapath.egressOwnedProgram }

    /// Mounts the bpffs if needed, loads the object (the verifier's error names a missing kernel feature), pins the
    /// maps and the egress socket filter, sets the marks and attaches both programs to every device but `lo`.
    init(settings: Settings, logger: Logger, nudge: (@Sendable () -> Void)?,
         report: @escaping @Sendable (KernelPathOutcome) -> Void,
         carriers: @escaping @Sendable ([SessionTable.SessionID]) -> [SessionTable.SessionID: SessionTable.Carrier]) throws {
        self.settings = settings
        self.logger = logger
        self.nudge = nudge
        self.report = report
        self.carriers = carriers
        guard FileManager.default.isReadableFile(atPath: settings.objectPath) else {
            throw ControlError(message: "no BPF object at \(settings.objectPath) (build it with `make bpf`, or give --bpf-object)")
        }
        mountedFS = try Self.ensureBPFFS(settings.bpffs, logger: logger)
        do {
            try FileManager.default.createDirectory(atPath: settings.pinDirectory, withIntermediateDirectories: true)
            // Carrying nothing, the path may replace pinned maps of another size (the owned keys are set again from
            // the state file).
            var checked = settings
            checked.fresh = settings.fresh || !settings.carries
            inherited = try Self.checkPinnedMap(checked, logger: logger)
            let datapath: BPFDatapath
            do {
                datapath = try BPFDatapath(objectPath: settings.objectPath, pinDirectory: settings.pinDirectory,
                                           maxEntries: settings.maxEntries, ringBytes: settings.ringBytes)
            } catch {
                throw ControlError(message: """
                    cannot load the BPF datapath \(settings.objectPath): \(error) (needs BPF syscall, clsact, ring \
                    buffers, bpf_redirect_neigh, atomic fetch ops: Linux ≥ 5.12; docs/BPF.md "Kernel requirements"; \
                    --no-fastpath works without)
                    """)
            }
            self.datapath = datapath
            // No observe mark: FIN/RST are reported through the ring buffer (``takeEvents()``).
            try datapath.setMarks(ingress: FastPath.ingressMark, observe: 0, owned: FastPath.ownedIngressMark)
            eventsFD = datapath.eventsPollFD
            try datapath.pinProgram(BPFDatapath.egressCarriedProgram,
                                    path: settings.pinDirectory + "/" + BPFDatapath.egressCarriedProgram)
            try datapath.pinProgram(BPFDatapath.egressOwnedProgram,
                                    path: settings.pinDirectory + "/" + BPFDatapath.egressOwnedProgram)
            interfaces = Self.devices()
            for interface in interfaces { try datapath.attach(interface: interface) }
        } catch {
            if mountedFS { Self.unmount(settings.bpffs, logger: logger) }
            throw error
        }
        logger.info("BPF datapath attached", metadata: [
            "bpf.object": "\(settings.objectPath)", "bpf.pin_dir": "\(settings.pinDirectory)",
            "bpf.interfaces": "\(interfaces.joined(separator: ","))", "bpf.mounted": "\(mountedFS)",
            "bpf.inherited": "\(inherited)", "bpf.carries": "\(settings.carries)",
        ])
    }

    /// Whether a predecessor's `dysco_sessions` is pinned in the pin directory (the load re-opens it: its entries
    /// stay). libbpf refuses to reuse a pinned map of another capacity (`--max-sessions` changed across the restart)
    /// or another layout (a build whose key or value differs): refused here with a message naming the ways out, or,
    /// with `--fresh`, the pin directory's pins removed (its sessions are lost; the programs still using the old maps
    /// are replaced by the attach) so that the load creates the maps anew.
    static func checkPinnedMap(_ settings: Settings, logger: Logger) throws -> Bool {
        let path = settings.pinDirectory + "/dysco_sessions"
        guard FileManager.default.fileExists(atPath: path) else { return false }
        let pinned = try BPFDatapath.pinnedLayout(mapPath: path)
        let wanted = BPFDatapath.MapLayout(keySize: UInt32(BPFLayout.keySize), valueSize: UInt32(BPFLayout.valueSize),
                                           maxEntries: settings.maxEntries ?? UInt32(BPFLayout.defaultMaxEntries))
        guard pinned != wanted else { return true }
        let sameLayout = pinned.keySize == wanted.keySize && pinned.valueSize == wanted.valueSize
        guard settings.fresh else {
            let problem = sameLayout
                ? "holds \(pinned.maxEntries) translations, this agent would size it \(wanted.maxEntries) (4 × " +
                  "--max-sessions): start it with --max-sessions \(pinned.maxEntries / 4) to take over the kernel's sessions, or"
                : "has another layout (key \(pinned.keySize) B, value \(pinned.valueSize) B; this build's: " +
                  "\(wanted.keySize) B, \(wanted.valueSize) B), left by another build: start"
            throw ControlError(message: """
                the pinned session map \(path) \(problem) with --fresh to replace the maps (their \
                sessions are lost), or run `agent --purge` first
                """)
        }
        logger.notice("--fresh: replacing pinned maps of another size or layout", metadata: [
            "bpf.map": "\(path)", "bpf.pinned_entries": "\(pinned.maxEntries)", "bpf.max_entries": "\(wanted.maxEntries)",
            "bpf.pinned_value_size": "\(pinned.valueSize)",
        ])
        for pin in try FileManager.default.contentsOfDirectory(atPath: settings.pinDirectory) {
            let pinPath = settings.pinDirectory + "/" + pin
            _ = try sysCall("unlink(\(pinPath))") { unlink(pinPath) }
        }
        return false
    }

    // MARK: - bpffs and devices

    /// Mounts a bpffs at `path` unless one is there; true if this call mounted it.
    static func ensureBPFFS(_ path: String, logger: Logger) throws -> Bool {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        if try sysCall("statfs(\(path))", { dysco_is_bpffs(path) }) == 1 { return false }
        _ = try sysCall("mount(bpf, \(path))") { dysco_mount_bpffs(path) }
        logger.debug("mounted a bpffs", metadata: ["bpf.fs": "\(path)"])
        return true
    }

    static func unmount(_ path: String, logger: Logger) {
        do { _ = try sysCall("umount2(\(path))") { dysco_umount_lazy(path) } } catch {
            logger.warning("could not unmount the bpffs", metadata: ["bpf.fs": "\(path)", "error": "\(error)"])
        }
    }

    /// The namespace's devices but `lo`.
    static func devices() -> [String] {
        guard let list = if_nameindex() else { return [] }
        defer { if_freenameindex(list) }
        var names: [String] = []
        var entry = list
        while entry.pointee.if_index != 0 {
            if let name = entry.pointee.if_name.map({ String(cString: $0) }), name != "lo" { names.append(name) }
            entry += 1
        }
        return names.sorted()
    }

    // MARK: - Commits

    /// Owned-key changes go to `dysco_owned` at once (one batch each way, microseconds: no delay to fold them in);
    /// actions queue for the next commit (none when the path carries nothing).
    func submit(_ actions: [FastPathAction], ownership: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)?) {
        if let ownership, !ownership.add.isEmpty || !ownership.remove.isEmpty { own(ownership) }
        guard settings.carries, !actions.isEmpty else { return }
        let first = pending.withLock { p in
            let first = p.actions.isEmpty
            if first { p.since = dysco_monotonic_ns() }
            p.actions.append(contentsOf: actions)
            return first
        }
        guard first else { return }
        if let nudge { nudge() } else { commitAll() }
    }

    func commitIfDue(queueEmpty: Bool, now: UInt64) {
        if releasingCount.load(ordering: .relaxed) > 0 { checkReleases(now: now) }
        let due = pending.withLock { p in
            let wait = queueEmpty ? Self.batchDelayNanoseconds : Self.maxDelayNanoseconds
            return !p.actions.isEmpty && now &- p.since >= wait
        }
        if due { commit { ($0, []) } }
    }

    func pollTimeout(now: UInt64) -> Int32 {
        let commit = pending.withLock { p -> Int32 in
            guard !p.actions.isEmpty else { return -1 }
            let due = p.since &+ Self.batchDelayNanoseconds
            return due <= now ? 0 : Int32((due - now + 999_999) / 1_000_000)
        }
        // A release waiting for the program, or new keys for an empty queue: the packet thread looks again within
        // `releaseCheckMilliseconds`.
        guard releasingCount.load(ordering: .relaxed) > 0 || awaitingDrain.load(ordering: .relaxed) > 0 else { return commit }
        return commit < 0 ? Self.releaseCheckMilliseconds : min(commit, Self.releaseCheckMilliseconds)
    }

    func flush() { commit { FastPathAction.splitForFlush($0) } }

    func commitAll() { commit { ($0, []) } }

    /// Takes `split(queued).now` from the queue (leaving `.later`) and applies it. Taking and applying happen under
    /// `lock`, so commits from different threads (the packet thread's, a hold's flush) reach the map in the order
    /// their actions were queued. The outcome is reported after the lock is released (the report takes the
    /// packet lock).
    private func commit(_ split: ([FastPathAction]) -> (now: [FastPathAction], later: [FastPathAction])) {
        let outcome = lock.withLock { () -> KernelPathOutcome? in
            let taken = pending.withLock { p in
                let (now, later) = split(p.actions)
                p.actions = later
                return now
            }
            let actions = FastPathAction.coalesce(taken)
            guard !actions.isEmpty else { return nil }
            // A removal of a session the processor holds is a hold (its carrier is read now: a hold and its release
            // committed together read `pending` and delete, then install).
            var removed: [SessionTable.SessionID] = []
            for case .remove(let id, _) in actions { removed.append(id) }
            let holding = removed.isEmpty ? [:] : carriers(removed).filter { $0.value == .held }
            return apply(actions, holding: Set(holding.keys))
        }
        if let outcome { report(outcome) }
    }

    /// Writes the actions to the map (under `lock`). `holding`: the removals that are holds.
    private func apply(_ actions: [FastPathAction], holding: Set<SessionTable.SessionID>) -> KernelPathOutcome {
        var outcome = KernelPathOutcome()
        for action in actions {
            switch action {
            case .install(let id, let translations), .open(let id, let translations, _):
                let entries = Self.entries(action, id, translations)
                var opening = false
                if case .open = action { opening = true }
                // Entries whose packets no queue rule sees are never held (a box's NAT'd tuples at tc egress).
                let unheld = Set(translations.filter(\.afterQueueRules).map { BPFSessionKey.entry($0, sessionID: id).key })
                do {
                    try install(id, entries, newKeysHeld: !opening, except: unheld)
                    outcome.installed.append(id)
                } catch {
                    for entry in entries {
                        _ = try? datapath.delete(entry.key)
                        perform(handOver.drop(entry.key))
                    }
                    publishHandOver()
                    installedKeys[id] = nil
                    heldSessions.remove(id)
                    outcome.failed.append(id)
                    logger.warning("BPF map refused a session", metadata: ["session.id": "\(id)", "error": "\(error)"])
                }
            case .remove(let id, let translations):
                let keys = translations.map { BPFSessionKey.entry($0, sessionID: id).key }
                if holding.contains(id) {
                    // As at an install: an entry whose packets no queue rule sees (a box's NAT'd tuples at tc egress)
                    // is never held. Held, the program would pass its packets on untranslated, after the last rule
                    // that could queue them: a DNAT'ing right anchor's replies left for the client with the
                    // published tuple, past the old path (NATTests, the refused right anchor).
                    hold(id, zip(translations, keys).filter { !$0.0.afterQueueRules }.map(\.1))
                } else {
                    delete(id, keys)
                }
            }
        }
        return outcome
    }

    /// The map entries of an install. An opening (a session installed with its SYN, issue 16 item 2) is marked
    /// `OPENING` (without `REWRITE_SYN`: a retransmitted SYN still reaches the agent), and the egress translation its
    /// SYN left by gets the SYN's facts, which the ingress program judges a SYN-ACK or an RST against (the SYN
    /// itself left rewritten by the agent: tc egress never saw it with the session's tuple).
    static func entries(_ action: FastPathAction, _ id: SessionTable.SessionID,
                        _ translations: [FastPath.Translation]) -> [(key: BPFSessionKey, entry: BPFSessionEntry)] {
        guard case .open(_, _, let syn) = action else {
            return translations.map { BPFSessionKey.entry($0, sessionID: id) }
        }
        return translations.map { translation in
            var entry = BPFSessionKey.entry(translation, sessionID: id, flags: .opening)
            if let syn, translation.hook == .egress, translation.key == syn.tuple {
                entry.entry.tcp = BPFTCPFacts(sequenceEnd: syn.sequence &+ 1, tcpFlags: UInt8(TCPFlags.syn.rawValue))
            }
            return entry
        }
    }

    /// A release's (or a first) install: keys the session had and no longer has go; a held key is released by the
    /// hand-over rule: the agent's count of its verdicted packets goes to `dysco_seen`, then the entry (the present
    /// one with its counters and facts when the target is unchanged, else the new one) is written `HELD|RELEASING`,
    /// and the program takes it over once its own count of packets it queued meets the agent's. Anything else is
    /// written anew. With `newKeysHeld` (any install but an opening's) a key the session did not have (a
    /// migration's new subsession, the new box's keys) is written `HELD` with its counts zeroed, and an RCU
    /// barrier is requested; the packet thread releases it by the hand-over rule once it has seen the queue empty
    /// after the barrier (``queueDrained(through:now:)``; docs/BPF.md, "New keys"). An opening's keys are written
    /// unheld: its SYN is still in the agent's hands, no packet of the session waits in the queue. So are the keys in
    /// `unheld` (``FastPath/Translation/afterQueueRules``: no queue rule sees their packets).
    private func install(_ id: SessionTable.SessionID, _ entries: [(key: BPFSessionKey, entry: BPFSessionEntry)],
                         newKeysHeld: Bool, except unheld: Set<BPFSessionKey> = []) throws {
        let keys = entries.map(\.key)
        let had = installedKeys[id] ?? []
        for key in had where !keys.contains(key) {
            _ = try datapath.delete(key)
            perform(handOver.drop(key))
        }
        var newKeys = 0
        var fresh: [(BPFSessionKey, BPFSessionEntry)] = []
        let now = dysco_monotonic_ns()
        for (key, entry) in entries {
            if heldSessions.contains(id), let seen = handOver.release(key, now: now) {
                perform(seen)
                if var present = try datapath.lookup(key), present.target == entry.target,
                   present.seqDelta == entry.seqDelta {
                    present.flags.formUnion([.held, .releasing])
                    try datapath.write(key, present, mode: .replace)
                } else {
                    var releasing = entry
                    releasing.flags.formUnion([.held, .releasing])
                    try datapath.write(key, releasing)
                }
            } else if newKeysHeld, !had.contains(key), !unheld.contains(key),
                      let clear = handOver.fresh(key, barrier: barrierRequested + 1) {
                perform(clear)
                var held = entry
                held.flags.insert(.held)
                fresh.append((key, held))
                newKeys += 1
            } else {
                fresh.append((key, entry))
            }
        }
        try datapath.writeBatch(fresh)
        installedKeys[id] = keys
        heldSessions.remove(id)
        publishHandOver()
        if newKeys > 0 { requestBarrier() }
    }

    /// Asks for an RCU barrier after the entries just written (under `lock`): on `barrierQueue` (a grace period
    /// takes 10–20 ms here; the packet thread must not wait for it). One barrier covers every request made before
    /// it began. When it returns, the packet thread is woken to look for an empty queue.
    private func requestBarrier() {
        barrierRequested += 1
        barrierQueue.async { [self] in
            let target = lock.withLock { barrierRequested }
            guard barrierDone.load(ordering: .acquiring) < target else { return }
            if dysco_rcu_barrier() != 0 {
                // No RCU barrier (membarrier refused, e.g. nohz_full): a grace period is a few ms; wait well past
                // one. Not exact; logged.
                logger.warning("membarrier(MEMBARRIER_CMD_GLOBAL) failed; new keys wait 50 ms instead",
                               metadata: ["errno": "\(dysco_errno())"])
                Thread.sleep(forTimeInterval: 0.05)
            }
            // Every packet that missed a new entry is now in the queue, with an id at most the queue's last one.
            if let queue = settings.queue, let last = Self.lastPacketID(queue: queue) {
                barrierMark.store((target << 32) | UInt64(last), ordering: .releasing)
            }
            barrierDone.store(target, ordering: .releasing)
            nudge?()
        }
    }

    /// A migration's hold: `HELD` on each of the session's entries (one lookup and one update each; counter adds
    /// between the two are lost, docs/BPF.md), after the hand-over counts of each are zeroed.
    private func hold(_ id: SessionTable.SessionID, _ keys: [BPFSessionKey]) {
        for key in keys {
            perform(handOver.hold(key))
            publishHandOver()
            do { try datapath.setFlags(key, set: .held) } catch where error.errno == ENOENT {
                perform(handOver.drop(key))
            } catch {
                perform(handOver.drop(key))
                logger.warning("BPF map refused a hold", metadata: ["session.id": "\(id)", "error": "\(error)"])
            }
        }
        heldSessions.insert(id)
        publishHandOver()
    }

    /// Deletes the session's entries, but not a key another session holds now: a removal from another thread (the
    /// expiry's) can reach the map after a new session that reuses the freed subsession port wrote the same key
    /// with its SYN (an install at SYN commits at once), and must not take that session's entry.
    private func delete(_ id: SessionTable.SessionID, _ keys: [BPFSessionKey]) {
        for key in Set(keys).union(installedKeys[id] ?? []) {
            if let present = try? datapath.lookup(key), present.sessionID != id { continue }
            do { try datapath.delete(key) } catch {
                logger.warning("BPF map refused a removal", metadata: ["session.id": "\(id)", "error": "\(error)"])
            }
            perform(handOver.drop(key))
        }
        installedKeys[id] = nil
        heldSessions.remove(id)
        publishHandOver()
    }

    // MARK: - Owned keys (docs/BPF.md, "Owned keys")

    /// Writes one owned-key change (its removals, then its additions; only keys whose membership changes).
    private func own(_ change: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)) {
        var delta = OwnershipDelta()
        delta.apply(change)
        lock.withLock {
            let (add, remove) = BPFOwnedKeys.changes(delta, ingress: &ownedIngress, egress: &ownedEgress)
            do {
                try datapath.removeOwned(remove)
                try datapath.addOwned(add)
            } catch {
                logger.warning("BPF map refused owned keys", metadata: [
                    "bpf.owned_add": "\(add.count)", "bpf.owned_remove": "\(remove.count)", "error": "\(error)",
                ])
            }
        }
    }

    /// `dysco_owned` holds exactly `owned` afterwards (under `lock`): a restart's keys, written by difference.
    private func setOwned(_ owned: KernelOwnership.Keys) throws {
        let plan = BPFOwnedKeys.plan(present: try datapath.ownedKeys(), wanted: owned)
        try datapath.removeOwned(plan.remove)
        try datapath.addOwned(plan.add)
        ownedIngress = Set(owned.ingress)
        ownedEgress = Set(owned.egress)
    }

    // MARK: - Hand-over (docs/BPF.md, "Hand-over without reordering")

    /// How often (at most) the packet thread reads the flags of releasing entries, and the longest it sleeps while
    /// one is releasing.
    static let releaseCheckMilliseconds: Int32 = 2

    /// Performs the hand-over's map writes (under `lock`).
    private func perform(_ actions: [BPFHandOver.Action]) {
        for action in actions { perform(action) }
    }

    private func perform(_ action: BPFHandOver.Action?) {
        guard let action else { return }
        switch action {
        case .clearCounts(let key):
            datapath.clearHandOverCounts(key)
        case .writeSeen(let key, let count):
            do { try datapath.writeSeen(key, count) } catch {
                logger.warning("BPF map refused a hand-over count", metadata: ["bpf.key": "\(key)", "error": "\(error)"])
            }
        case .takeOver(let key):
            _ = try? datapath.setFlags(key, clear: [.held, .releasing])
        case .setReleasing(let key):
            do { _ = try datapath.setFlags(key, set: .releasing) } catch {
                perform(handOver.drop(key))
            }
        case .forceRelease(let key, let seen):
            _ = try? datapath.setFlags(key, clear: [.held, .releasing])
            logger.warning("hand-over forced: the program's and the agent's counts did not meet", metadata: [
                "bpf.key": "\(key)", "bpf.passed": "\(datapath.passed(key))", "bpf.seen": "\(seen)",
                "bpf.handover_forced": "\(handOver.forcedReleases)",
            ])
        }
    }

    /// Copies the hand-over's state to the atomics the packet thread reads without the lock (under `lock`).
    private func publishHandOver() {
        handingOver.store(!handOver.isEmpty, ordering: .releasing)
        releasingCount.store(handOver.releasing.count, ordering: .relaxed)
        awaitingDrain.store(handOver.awaitingDrain, ordering: .relaxed)
    }

    /// The last packet id NFQUEUE `queue` gave (`id_sequence`, the 8th column of /proc/net/netfilter/nfnetlink_queue
    /// in this network namespace); ids are given in the order packets enter the agent's socket.
    static func lastPacketID(queue: UInt16) -> UInt32? {
        guard let text = try? String(contentsOfFile: "/proc/net/netfilter/nfnetlink_queue", encoding: .utf8) else { return nil }
        return lastPacketID(queue: queue, in: text)
    }

    static func lastPacketID(queue: UInt16, in text: String) -> UInt32? {
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if fields.count >= 8, UInt16(fields[0]) == queue { return UInt32(fields[7]) }
        }
        return nil
    }

    /// The packet thread verdicted the packet with NFQUEUE id `id`: if it is at or past the last id at a barrier's
    /// return, every packet before it (FIFO), among them all that missed new entries written before that barrier,
    /// has been verdicted: as good as an empty queue, and under load sooner.
    func queueRead(packetID id: UInt32) {
        guard awaitingDrain.load(ordering: .relaxed) > 0 else { return }
        let mark = barrierMark.load(ordering: .acquiring)
        guard mark != 0, Int32(bitPattern: id &- UInt32(truncatingIfNeeded: mark)) >= 0 else { return }
        drained(through: mark >> 32, queueEmpty: false, now: dysco_monotonic_ns())
    }

    /// The last RCU barrier that returned: the packet thread reads it before each read of the queue.
    var queueBarrier: UInt64 { barrierDone.load(ordering: .acquiring) }

    /// The packet thread found the queue empty with a read that began after barrier `barrier` returned: new keys
    /// written before that barrier are released by the hand-over rule (``BPFHandOver/drained(through:now:passed:)``).
    func queueDrained(through barrier: UInt64, now: UInt64) {
        guard awaitingDrain.load(ordering: .relaxed) > 0, barrier > 0 else { return }
        drained(through: barrier, queueEmpty: true, now: now)
    }

    private func drained(through barrier: UInt64, queueEmpty: Bool, now: UInt64) {
        lock.withLock {
            perform(handOver.drained(through: barrier, queueEmpty: queueEmpty, now: now, passed: { datapath.passed($0) }))
            publishHandOver()
        }
    }

    /// The key a queued packet counts under, if any translation is being handed over (one atomic load otherwise).
    /// From the packet's bytes as queued (before the processor translates them): the tuple the program looked up.
    func handOverKey(_ base: UnsafeMutableRawPointer, count: Int, hook: HookPoint) -> BPFSessionKey? {
        guard handingOver.load(ordering: .acquiring), let tuple = TCPPacketTuple.parse(base, count: count) else { return nil }
        return BPFSessionKey(tuple, hook: hook == .ingress ? .ingress : .egress)
    }

    /// The packet thread, after the verdict of a packet of `key` went out: counted; while the translation is
    /// releasing, the count goes to the map at once (the program may take over now).
    func verdicted(_ key: BPFSessionKey, counted: Bool) {
        lock.withLock { perform(handOver.verdicted(key, counted: counted)) }
    }

    /// The packet thread (at most every `releaseCheckMilliseconds`): which releasing entries the program took over,
    /// and which waited past ``BPFHandOver/releaseBoundNanoseconds`` (forced).
    private func checkReleases(now: UInt64) {
        lock.withLock {
            guard now &- lastReleaseCheck >= UInt64(Self.releaseCheckMilliseconds) * 1_000_000 else { return }
            lastReleaseCheck = now
            for key in handOver.releasing {
                let held = ((try? datapath.lookup(key)) ?? nil)?.flags.contains(.held) ?? false
                perform(handOver.observed(key, held: held, passed: held ? datapath.passed(key) : 0, now: now))
            }
            publishHandOver()
        }
    }

    /// Deletes the entries of held sessions the processor no longer holds without having released them (gone:
    /// removed while held, e.g. an old box's sessions after a migration; or back on the slow path).
    private func sweepHeld() {
        let ids = lock.withLock { Array(heldSessions) }
        guard !ids.isEmpty else { return }
        let now = carriers(ids)  // outside `lock`: the query takes the packet lock
        for id in ids where now[id] != .held {
            // Re-checked under `lock`: a release committed meanwhile took the session out of `heldSessions`.
            lock.withLock {
                guard heldSessions.contains(id) else { return }
                delete(id, [])
            }
        }
    }

    // MARK: - Events

    /// Drains the ring buffer (the packet thread, when ``eventsFD`` is readable) and reads the lost-event count.
    /// After a loss (a full ring) the map is scanned for entries whose flags say the program reported a FIN or an
    /// RST, and those are handed over again (``KernelEvent/reported(by:_:)``): the bookkeeping is idempotent for
    /// sessions that already had it (a FIN sets what it set; an RST of a session the kernel still carries had
    /// not been handled). What the scan cannot restore (an `ESTABLISHED`) is left to idle expiry.
    func takeEvents() -> (events: [KernelEvent], lost: UInt64) {
        lock.withLock {
            var events: [KernelEvent] = []
            do {
                for event in try datapath.pollEvents(timeoutMilliseconds: 0) {
                    if let event = event.kernelEvent { events.append(event) }
                }
            } catch {
                logger.warning("BPF ring buffer poll failed", metadata: ["error": "\(error)"])
            }
            let lostTotal = (try? datapath.statistics().eventsLost) ?? eventsLostSeen
            let lost = lostTotal >= eventsLostSeen ? lostTotal - eventsLostSeen : lostTotal
            eventsLostSeen = lostTotal
            if lost > 0 {
                logger.warning("BPF ring buffer dropped events; rescanning the map", metadata: ["bpf.events_lost": "\(lost)"])
                for (key, entry) in (try? datapath.entries()) ?? [] where !entry.flags.contains(.held) {
                    events.append(contentsOf: KernelEvent.reported(by: key, entry))
                }
            }
            return (events, lost)
        }
    }

    // MARK: - Counters

    func sampleKernelPackets() {
        lock.withLock {
            accumulate(totals())
            if let statistics = try? datapath.statistics() {
                openingRefusedCount.store(statistics.openingRefused, ordering: .relaxed)
            }
        }
    }

    func activeSessions() -> [SessionTable.SessionID] {
        sweepHeld()
        return lock.withLock {
            let totals = totals()
            defer { lastCounters = totals }
            accumulate(totals)
            return totals.compactMap { id, packets in packets != lastCounters[id] ? id : nil }
        }
    }

    /// Packets per session summed over its entries (under `lock`).
    private func totals() -> [SessionTable.SessionID: UInt64] {
        var totals: [SessionTable.SessionID: UInt64] = [:]
        guard let entries = try? datapath.entries() else { return totals }
        for (_, entry) in entries { totals[entry.sessionID, default: 0] &+= entry.packets }
        return totals
    }

    private func accumulate(_ totals: [SessionTable.SessionID: UInt64]) {
        kernelPackets.add(packetTally.moved(totals), ordering: .relaxed)
    }

    // MARK: - Start and exit

    /// A predecessor's session map (pinned, re-opened at start): each entry is one translation of one session.
    /// nil when the map was created by this start (no predecessor, or its bpffs died with it): the state file is
    /// then stale.
    /// Carrying nothing (`--no-fastpath`), the kernel holds no session: an empty listing, whether or not the maps
    /// were inherited (a bpffs private to the predecessor died with it; its programs, still attached, kept failing
    /// closed).
    func listing() -> (any KernelListing)? {
        guard settings.carries else { return BPFSessionListing([]) }
        guard inherited else { return nil }
        return lock.withLock { () -> BPFSessionListing? in
            guard let entries = try? datapath.entries() else { return nil }
            let listing = BPFSessionListing(entries)
            listed = listing
            return listing
        }
    }

    /// The map is as the predecessor left it (``BPFSessionListing/matches(_:)``): nothing is written; the agent
    /// learns which keys each session has, and the counters become the baselines. `dysco_owned` is set to exactly
    /// `owned`.
    func keep(owned: KernelOwnership.Keys) throws {
        try lock.withLock {
            try setOwned(owned)
            guard let listed else { return }
            installedKeys = listed.keysBySession
            heldSessions = []
            handOver.reset()
            publishHandOver()
            adoptCounters(listed)
        }
    }

    func reset() throws {
        try lock.withLock {
            let keys = try datapath.entries().map(\.0)
            try datapath.deleteBatch(keys)
            try setOwned(KernelOwnership.Keys())
            installedKeys = [:]
            heldSessions = []
            handOver.reset()
            publishHandOver()
        }
    }

    /// Brings the map to `sessions`' translations with the fewest writes (``BPFSessionListing/rebuildPlan(_:)``):
    /// stray entries go, entries that already serve a translation stay with their counters, the rest are
    /// written. Each write is atomic for the programs: a kernel-carried session never stops.
    func rebuild(sessions: [(SessionTable.SessionID, [FastPath.Translation])], owned: KernelOwnership.Keys) throws {
        try lock.withLock {
            let plan = BPFSessionListing(try datapath.entries()).rebuildPlan(sessions)
            for key in plan.delete { try datapath.delete(key) }
            try datapath.writeBatch(plan.write)
            try setOwned(owned)
            installedKeys = [:]
            for (id, translations) in sessions {
                installedKeys[id] = translations.map { BPFSessionKey.entry($0, sessionID: id).key }
            }
            heldSessions = []
            handOver.reset()
            publishHandOver()
            adoptCounters(BPFSessionListing(try datapath.entries()))
            logger.debug("BPF session map rebuilt", metadata: [
                "bpf.sessions": "\(sessions.count)", "bpf.deleted": "\(plan.delete.count)",
                "bpf.written": "\(plan.write.count)",
            ])
        }
    }

    /// The predecessor's counters are the baselines (under `lock`): its packets are not counted again.
    private func adoptCounters(_ listing: BPFSessionListing) {
        packetTally.reset(to: listing.packetsBySession)
        lastCounters = listing.packetsBySession
    }

    /// `keep`: programs, maps and pins stay (kernel-carried sessions flow on). Otherwise the programs are detached,
    /// the pins removed, and the bpffs unmounted if the agent mounted it.
    func shutdown(keep: Bool) {
        commitAll()
        guard !keep else { return }
        lock.withLock {
            for interface in interfaces {
                do { try BPFDatapath.detach(interface: interface) } catch {
                    logger.warning("could not detach the BPF programs", metadata: ["bpf.interface": "\(interface)", "error": "\(error)"])
                }
            }
            do { try datapath.unpinMaps() } catch {
                logger.warning("could not unpin the BPF maps", metadata: ["error": "\(error)"])
            }
            unlink(egressFilterPath)
            unlink(ownedFilterPath)
            rmdir(settings.pinDirectory)
        }
        if mountedFS { Self.unmount(settings.bpffs, logger: logger) }
    }
}
