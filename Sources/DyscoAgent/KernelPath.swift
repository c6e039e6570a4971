import DyscoBPF
import DyscoCore

/// What the agent's kernel datapath does for it: carry the packets of the sessions the ``PacketProcessor`` hands
/// over (``FastPathAction``s), take them back (holds, teardown), report which sessions it carried traffic for
/// (idle expiry) and how many packets, and leave or remove its state at exit. Implemented by ``BPFKernelPath`` (tc
/// programs, one map entry per translation; docs/BPF.md); the agent's packet thread, dataplane and journal talk to
/// this protocol only, which keeps the datapath's surface in one place.
///
/// Ordering rule: installs are committed by the packet thread at a quiet point (``commitIfDue(queueEmpty:now:)``:
/// no packet of a session going to the kernel still waits in NFQUEUE); a hold's removals at once (``flush()``).
/// The hand-over rule for held translations: the program takes one back only when every packet
/// it queued while held has been verdicted (``handOverKey(_:count:hook:)``, ``verdicted(_:)``).
protocol KernelPath: AnyObject, Sendable {
    /// Queues actions for the next commit, and owned-key changes (written at once).
    func submit(_ actions: [FastPathAction], ownership: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)?)
    /// The packet thread, between reads: commits what is queued if it is due (`queueEmpty`: the quiet point).
    func commitIfDue(queueEmpty: Bool, now: UInt64)
    /// Milliseconds the packet thread may sleep before a commit is due (-1: none pending).
    func pollTimeout(now: UInt64) -> Int32
    /// Takes held sessions off the kernel now (the queued changes of every session with a removal).
    func flush()
    /// Commits everything queued now (`path release`).
    func commitAll()
    /// Agent exit: commits what is queued; removes the kernel state unless `keep`.
    func shutdown(keep: Bool)
    /// Packets the kernel rewrote so far (as of the last ``sampleKernelPackets()`` or ``activeSessions()``).
    var kernelPacketCount: UInt64 { get }
    /// Reads the kernel's counters now (a metrics scrape).
    func sampleKernelPackets()
    /// SYN-ACKs and RSTs the kernel refused on sessions it opened with their SYN (as of the last
    /// ``sampleKernelPackets()``; the BPF datapath's `OPENING_REFUSED`).
    var openingRefused: UInt64 { get }
    /// Sessions whose kernel counters moved since the last call (idle expiry).
    func activeSessions() -> [SessionTable.SessionID]

    // Events (the BPF datapath's ring buffer; docs/BPF.md "The agent's BPF datapath", "Events").
    /// A descriptor the packet thread adds to its poll set: readable when the kernel reported packets it carried
    /// (nil: no ring, e.g. after a failed open).
    var eventsFD: Int32? { get }
    /// The packet thread, when ``eventsFD`` is readable: the reported packets, in the order the kernel reported
    /// them, and how many reports the kernel had to drop since the last call (a full ring).
    func takeEvents() -> (events: [KernelEvent], lost: UInt64)

    // Hand-over without reordering (the BPF datapath; docs/BPF.md). The packet thread reports each verdict of a
    // packet whose translation is being handed over between the queue and the kernel.
    /// The key a queued packet (its bytes as queued, before the processor) counts under; nil when no translation
    /// is being handed over (the common case: no parsing).
    func handOverKey(_ base: UnsafeMutableRawPointer, count: Int, hook: HookPoint) -> BPFSessionKey?
    /// The verdict of a packet of `key` went out (sent to the kernel: a reinjected packet has traversed the stack).
    /// `counted`: the program counted it (ingress: it carries ``BPFHandOver/countedMark``; egress: always true).
    func verdicted(_ key: BPFSessionKey, counted: Bool)
    /// The last barrier after which packets that missed a new key's entry are all in the queue (BPF: RCU grace
    /// periods; 0: none). The packet thread reads it before each read of the queue.
    var queueBarrier: UInt64 { get }
    /// The packet thread found the queue empty with a read that began after barrier `barrier` had returned.
    func queueDrained(through barrier: UInt64, now: UInt64)
    /// The packet thread verdicted the queued packet with this NFQUEUE id (only needed while new keys wait).
    func queueRead(packetID: UInt32)

    // Restart (docs/ARCHITECTURE.md, "Agent crash and restart").
    /// What the kernel holds of a predecessor's fast path; nil: nothing (the state file is then stale).
    func listing() -> (any KernelListing)?
    /// The kernel state is as the predecessor left it: only the owned keys are set again.
    func keep(owned: KernelOwnership.Keys) throws
    /// Starts empty (whatever a predecessor left goes).
    func reset() throws
    /// Replaces the kernel state with `sessions` and the owned keys.
    func rebuild(sessions: [(SessionTable.SessionID, [FastPath.Translation])], owned: KernelOwnership.Keys) throws
}

/// What a restarted agent reads of its predecessor's kernel state: the sessions it carries and whether it carries
/// exactly a given set (then it is kept untouched): the pinned session map's entries (``BPFSessionListing``).
protocol KernelListing: Sendable {
    /// Sessions the kernel carries (a restored session among them goes back to the kernel).
    var sessions: Set<SessionTable.SessionID> { get }
    /// The kernel holds exactly `carried`'s translations in the current format.
    func matches(_ carried: [(SessionTable.SessionID, [FastPath.Translation])]) -> Bool
}

/// `--no-fastpath` without the BPF programs (no object, or no kernel support): no kernel state at all, so no owned
/// keys either (the agent warns once); a restart restores the state file's sessions onto the slow path.
final class NoKernelPath: KernelPath {
    func submit(_ actions: [FastPathAction], ownership: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)?) {}
    func commitIfDue(queueEmpty: Bool, now: UInt64) {}
    func pollTimeout(now: UInt64) -> Int32 { -1 }
    func flush() {}
    func commitAll() {}
    func shutdown(keep: Bool) {}
    var kernelPacketCount: UInt64 { 0 }
    func sampleKernelPackets() {}
    func activeSessions() -> [SessionTable.SessionID] { [] }
    var openingRefused: UInt64 { 0 }
    var eventsFD: Int32? { nil }
    func takeEvents() -> (events: [KernelEvent], lost: UInt64) { ([], 0) }
    func handOverKey(_ base: UnsafeMutableRawPointer, count: Int, hook: HookPoint) -> BPFSessionKey? { nil }
    func verdicted(_ key: BPFSessionKey, counted: Bool) {}
    var queueBarrier: UInt64 { 0 }
    func queueDrained(through barrier: UInt64, now: UInt64) {}
    func queueRead(packetID: UInt32) {}
    func listing() -> (any KernelListing)? { BPFSessionListing([]) }
    func keep(owned: KernelOwnership.Keys) throws {}
    func reset() throws {}
    func rebuild(sessions: [(SessionTable.SessionID, [FastPath.Translation])], owned: KernelOwnership.Keys) throws {}
}

extension BPFSessionListing: KernelListing {}

/// What a commit did with the installs: the sessions the kernel now carries and those it refused.
struct KernelPathOutcome: Sendable {
    var installed: [SessionTable.SessionID] = []
    var failed: [SessionTable.SessionID] = []
}

/// The kernel's per-session packet counters summed into one running total (`kernelPacketCount`, the
/// `dysco_kernel_packets` metric): each reading adds what every session moved since the last one.
struct KernelPacketTally {
    private var baseline: [SessionTable.SessionID: UInt64] = [:]

    /// Takes a reading of every session's counter; returns the packets moved since the last reading. A session
    /// whose counter went back (its translations made anew, e.g. released after a hold) counts from zero.
    mutating func moved(_ totals: [SessionTable.SessionID: UInt64]) -> UInt64 {
        var moved: UInt64 = 0
        for (id, packets) in totals {
            let last = baseline[id] ?? 0
            moved &+= packets >= last ? packets - last : packets
        }
        baseline = totals
        return moved
    }

    /// Starts from `totals` without counting them (a restart takes over counters already in the kernel).
    mutating func reset(to totals: [SessionTable.SessionID: UInt64]) { baseline = totals }
}
