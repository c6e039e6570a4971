import DyscoCore
import CLinux
import Foundation
import Logging
import Synchronization

/// Applies ``FastPathAction``s to the kernel on its own serial queue, so the packet thread never waits for
/// netlink: actions queue up while one transaction runs and go together in the next (batched). Also polls the
/// per-session counters so that idle expiry sees kernel-carried traffic.
final class FastPathWorker: @unchecked Sendable {
    struct Outcome: Sendable {
        var installed: [SessionTable.SessionID] = []
        var failed: [SessionTable.SessionID] = []
    }

    private let queue = DispatchQueue(label: "dysco-fastpath")
    // Used only on `queue`.
    private let nft: NftablesContext
    private let logger: Logger
    private let pending = Mutex<[FastPathAction]>([])
    private var lastCounters: [SessionTable.SessionID: UInt64] = [:]
    /// Packets the kernel rewrote, summed from the per-session counters at each poll (``activeSessions()``, and
    /// ``sampleKernelPackets()`` at each metrics scrape): what a session carried between the last poll and its
    /// removal from the kernel is not counted.
    let kernelPackets = Atomic<UInt64>(0)
    /// The per-session counters ``kernelPackets`` was last summed from (used only on `queue`).
    private var packetBaseline: [SessionTable.SessionID: UInt64] = [:]
    private let report: @Sendable (Outcome) -> Void

    /// Replaces whatever table a predecessor left and creates an empty one.
    init(reroute: Bool, logger: Logger, report: @escaping @Sendable (Outcome) -> Void) throws {
        self.logger = logger
        self.report = report
        nft = try NftablesContext()
        try nft.run(FastPathScript.reset(reroute: reroute), operation: "create table ip \(FastPathScript.table)")
    }

    /// How long the first queued action waits for others to join its transaction.
    static let batchDelay: DispatchTimeInterval = .milliseconds(2)

    /// Queues actions; they are applied within ``batchDelay``, in order, in one transaction with whatever
    /// else is waiting.
    func submit(_ actions: [FastPathAction]) {
        guard !actions.isEmpty else { return }
        let first = pending.withLock { queued in
            defer { queued.append(contentsOf: actions) }
            return queued.isEmpty
        }
        if first { queue.asyncAfter(deadline: .now() + Self.batchDelay) { self.drain() } }
    }


    /// Applies everything queued so far and returns once the kernel has it (hold/release wait on this).
    func flush() {
        queue.sync { drain() }
    }

    /// Deletes the table (agent exit).
    func shutdown() {
        queue.sync {
            drain()
            do { try nft.run(FastPathScript.destroy, operation: "delete table") } catch {
                logger.error("could not delete the fast-path table", metadata: ["error": "\(error)"])
            }
        }
    }

    private func drain() {
        let actions = FastPathAction.coalesce(pending.withLock { queued in
            defer { queued.removeAll() }
            return queued
        })
        guard !actions.isEmpty else { return }
        var outcome = Outcome()
        let script = actions.map(Self.script).joined()
        do {
            try nft.run(script, operation: "apply \(actions.count) change(s)")
            outcome.installed = actions.compactMap { if case .install(let id, _) = $0 { id } else { nil } }
        } catch {
            // One bad session must not keep the others out: apply them one by one.
            for action in actions {
                do {
                    try nft.run(Self.script(action), operation: "apply one change")
                    if case .install(let id, _) = action { outcome.installed.append(id) }
                } catch {
                    if case .install(let id, _) = action { outcome.failed.append(id) }
                    logger.warning("fast path refused a change", metadata: ["session.id": "\(Self.id(action))",
                                                                         "error": "\(error)"])
                }
            }
        }
        report(outcome)
    }

    private static func script(_ action: FastPathAction) -> String {
        switch action {
        case .install(let id, let translations): FastPathScript.install(session: id, translations)
        case .remove(let id, let translations): FastPathScript.remove(session: id, translations)
        }
    }

    private static func id(_ action: FastPathAction) -> SessionTable.SessionID {
        switch action {
        case .install(let id, _), .remove(let id, _): id
        }
    }

    /// Reads the kernel's counters now and adds what they moved to ``kernelPackets`` (a metrics scrape).
    func sampleKernelPackets() {
        queue.sync {
            guard let data = try? nft.json("list table ip \(FastPathScript.table)") else { return }
            accumulate(FastPathCounters.packetsBySession(json: data))
        }
    }

    private func accumulate(_ totals: [SessionTable.SessionID: UInt64]) {
        var moved: UInt64 = 0
        for (id, packets) in totals {
            // A session's chain made anew (released after a hold) starts again from zero.
            let last = packetBaseline[id] ?? 0
            moved &+= packets >= last ? packets - last : packets
        }
        packetBaseline = totals
        kernelPackets.add(moved, ordering: .relaxed)
    }

    /// Sessions whose kernel counters moved since the last call.
    func activeSessions() -> [SessionTable.SessionID] {
        queue.sync {
            guard let data = try? nft.json("list table ip \(FastPathScript.table)") else { return [] }
            let totals = FastPathCounters.packetsBySession(json: data)
            defer { lastCounters = totals }
            accumulate(totals)
            return totals.compactMap { id, packets in packets != lastCounters[id] ? id : nil }
        }
    }
}

