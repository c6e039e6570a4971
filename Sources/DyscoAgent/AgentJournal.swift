import CLinux
import DyscoCore
import Foundation
import Logging

/// The state file and the keys the kernel fails closed for (docs/ARCHITECTURE.md, "Agent crash and restart"):
/// the session table's changes accumulate in the table (``SessionTable/changed``, ``SessionTable/ownershipChanged``)
/// and go out together — once per packet-thread turn, after its verdicts, and after each operation of the other
/// threads. Used under the processor's lock only.
final class AgentJournal: @unchecked Sendable {
    /// The state file (nil without one, or before the start opened it).
    private(set) var file: StateJournal?
    /// The keys the kernel fails closed for.
    private var ownership = KernelOwnership()

    /// Writes the records changed since the last call to the state file and returns the owned-key changes for the
    /// fast-path worker (nil when nothing changed).
    func persist(_ state: inout PacketProcessor) -> AgentDataplane.OwnershipChange? {
        if let changed = state.table.changed, !changed.isEmpty {
            state.table.changed = []
            file?.record(changed, table: state.table)
        }
        guard let owned = state.table.ownershipChanged, !owned.isEmpty else { return nil }
        state.table.ownershipChanged = []
        return ownership.update(owned, table: state.table)
    }

    /// The restored sessions' owned keys (their first update).
    fileprivate func own(_ ids: [SessionTable.SessionID], table: SessionTable) -> KernelOwnership.Keys {
        ownership.update(ids, table: table).add
    }

    /// Starts the journal anew with a snapshot of `state`'s table; from now on the table tracks its changes.
    fileprivate func open(path: String, _ state: inout PacketProcessor) throws {
        file = try StateJournal(path: path, table: state.table)
        state.table.changed = []
        state.table.ownershipChanged = []
    }

    /// A stop that leaves nothing for a successor.
    func remove() { file?.remove() }
}

extension DataplaneAgent {
    /// How a start went: from the state file and the kernel table, or empty.
    public struct RestoreReport: Sendable, Codable {
        public var restored = 0
        public var kernel = 0
        public var refused = 0
        public var badLines = 0
        /// The kernel table was kept as it was (only the owned keys set again); false: rebuilt.
        public var tableKept = false
        /// Why the start was fresh although a state file existed (nil: restored, or nothing to restore).
        public var freshReason: String?
    }
}

extension AgentDataplane {
    /// Reads the state file and, if the kernel table is there too, puts the sessions back and rebuilds the table
    /// with the ones it carried (one transaction); otherwise starts with an empty table. Then the journal starts
    /// anew with a snapshot (docs/ARCHITECTURE.md, "Agent crash and restart").
    func restoreOrReset(stateFile: String?, fresh: Bool, logger: Logger) throws -> DataplaneAgent.RestoreReport {
        var report = DataplaneAgent.RestoreReport()
        guard let worker = fastPath else { return report }
        guard let path = stateFile else {
            try worker.reset()
            return report
        }
        if fresh { unlink(path) }
        let readStart = dysco_monotonic_ns()
        let contents = try StateJournal.read(path: path)
        let listStart = dysco_monotonic_ns()
        let listing = contents == nil ? nil : worker.listing()
        let listSeconds = Double(dysco_monotonic_ns() - listStart) / 1e9
        let now = dysco_monotonic_coarse_ns()
        if let contents, let listing {
            let inKernel = listing.sessions
            let (result, carried, owned) = processor.withLock { state in
                let result = SessionStateFile.restore(contents, into: &state.table, now: now)
                state.counters.sessionsRestored = UInt64(result.restored.count)
                let carried = SessionStateFile.reconcile(result.restored, table: &state.table, inKernel: inKernel,
                                                         fastPath: state.settings.fastPath,
                                                         keepClosing: state.settings.installAtSyn)
                return (result, carried, journal.own(result.restored, table: state.table))
            }
            report.restored = result.restored.count
            report.refused = result.refused.count
            report.badLines = contents.badLines
            report.kernel = carried.count
            let readSeconds = Double(dysco_monotonic_ns() - readStart) / 1e9
            let kernelStart = dysco_monotonic_ns()
            // The common case (a crash or an upgrade of the same format): the kernel has exactly these sessions and
            // keeps them untouched. Anything else (stray chains, closed sessions, an older format) is rebuilt.
            report.tableKept = listing.matches(carried)
            if report.tableKept {
                try worker.keep(owned: owned)
            } else {
                try worker.rebuild(sessions: carried, owned: owned)
            }
            let kernelSeconds = Double(dysco_monotonic_ns() - kernelStart) / 1e9
            logger.notice("sessions restored", metadata: [
                "state.file": "\(path)", "state.sessions": "\(result.restored.count)",
                "state.kernel": "\(carried.count)", "state.refused": "\(result.refused.count)",
                "state.bad_lines": "\(contents.badLines)", "state.first_error": "\(contents.firstError ?? "-")",
                "state.read_seconds": "\(readSeconds)", "state.list_seconds": "\(listSeconds)",
                "state.kernel_seconds": "\(kernelSeconds)", "state.table_kept": "\(report.tableKept)",
            ])
        } else {
            if contents != nil {
                report.freshReason = "no kernel table (rebooted, or removed): the state file is stale"
                logger.warning("state file without a kernel table: starting empty", metadata: ["state.file": "\(path)"])
            }
            try worker.reset()
        }
        try processor.withLock { state in try journal.open(path: path, &state) }
        return report
    }
}
