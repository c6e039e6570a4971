import DyscoCore
import DyscoSystem
import Foundation
import Logging

// MARK: Export

/// Which entries to export.
public enum ExportSelector: Sendable, Hashable {
    /// Sessions by tuple, each in either direction (one NFCT_Q_GET per tuple).
    case flows([FlowKey])
    /// Entries whose mark matches under mask (filtered in the kernel).
    case mark(UInt32, mask: UInt32)
    /// The whole table.
    case all
}

public struct ExportResult: Sendable {
    public var document: StateDocument
    /// Requested tuples that have no entry.
    public var missing: [FlowKey]
}

extension ConntrackTable {
    /// Exports the selected entries as a document stamped with `host` and the current time.
    public func export(_ selector: ExportSelector, host: String) throws(ConntrackError) -> ExportResult {
        var entries: [ConntrackEntry] = []
        var missing: [FlowKey] = []
        switch selector {
        case let .flows(keys):
            var seen = Set<FlowKey>()
            for key in keys {
                if let entry = try get(key) {
                    if seen.insert(entry.key).inserted { entries.append(entry) }
                } else {
                    missing.append(key)
                    logger.notice("no conntrack entry", metadata: ["conntrack.entry": "\(key)"])
                }
            }
        case let .mark(mark, mask):
            entries = try dump(mark: mark, mask: mask)
        case .all:
            entries = try dump()
        }
        logger.debug("exported", metadata: ["conntrack.count": "\(entries.count)", "conntrack.missing": "\(missing.count)"])
        return ExportResult(document: StateDocument(host: host, entries: entries), missing: missing)
    }

    /// The name an export records as its host: the hostname, plus the namespace when there is one.
    public static func hostLabel(namespace: NamespaceSelection) -> String {
        let hostname = ProcessInfo.processInfo.hostName
        switch namespace {
        case let .named(name): return "\(hostname)/\(name)"
        case .fresh: return "\(hostname)/private"
        case .current: return NetworkNamespace.currentName().map { "\(hostname)/\($0)" } ?? hostname
        }
    }
}

// MARK: Import

public struct ImportOptions: Sendable, Hashable {
    /// What to do when an entry with the same tuple already exists (EEXIST).
    public enum Existing: String, Sendable, Hashable {
        /// Destroy the existing entry and create the imported one.
        case replace
        /// Leave the existing entry alone and report the imported one as skipped.
        case skip
    }

    public var existing: Existing
    /// Set BE_LIBERAL in both directions (weakens TCP window tracking; only when asked for).
    public var liberal: Bool

    public init(existing: Existing = .skip, liberal: Bool = false) {
        self.existing = existing
        self.liberal = liberal
    }
}

public enum ImportOutcome: Sendable, Hashable {
    case created
    case replaced
    case skipped
    case failed(ConntrackError)

    public var isSuccess: Bool {
        if case .failed = self { return false }
        return true
    }
}

public struct ImportResult: Sendable, Hashable, CustomStringConvertible {
    public var index: Int
    public var key: FlowKey
    public var outcome: ImportOutcome
    /// When deleting from a source table was asked for: nil if not attempted, else the outcome.
    public var sourceDeletion: Result<Void, ConntrackError>?

    public static func == (lhs: Self, rhs: Self) -> Bool {
        lhs.index == rhs.index && lhs.key == rhs.key && lhs.outcome == rhs.outcome
    }
    public func hash(into hasher: inout Hasher) {
        hasher.combine(index)
        hasher.combine(key)
    }

    public var description: String {
        var text = "entry #\(index) (\(key)): "
        switch outcome {
        case .created: text += "created"
        case .replaced: text += "replaced the existing entry"
        case .skipped: text += "skipped, an entry already exists"
        case let .failed(error): text += "FAILED: \(error)"
        }
        switch sourceDeletion {
        case .none: break
        case .success: text += "; deleted on the source"
        case let .failure(error): text += "; NOT deleted on the source: \(error)"
        }
        return text
    }
}

public struct ImportReport: Sendable {
    public var results: [ImportResult]
    public var elapsed: Duration

    public var created: Int { results.count { $0.outcome == .created } }
    public var replaced: Int { results.count { $0.outcome == .replaced } }
    public var skipped: Int { results.count { $0.outcome == .skipped } }
    public var failures: [ImportResult] { results.filter { !$0.outcome.isSuccess } }
    public var sourceDeletionFailures: [ImportResult] {
        results.filter { if case .failure = $0.sourceDeletion { true } else { false } }
    }
    /// Every entry created, replaced or skipped, and every asked-for source deletion done.
    public var succeeded: Bool { failures.isEmpty && sourceDeletionFailures.isEmpty }

    public var summary: String {
        var text = "imported \(results.count) entr\(results.count == 1 ? "y" : "ies"): \(created) created, "
            + "\(replaced) replaced, \(skipped) skipped, \(failures.count) failed"
        let deleted = results.count { if case .success = $0.sourceDeletion { true } else { false } }
        if deleted > 0 || !sourceDeletionFailures.isEmpty {
            text += "; \(deleted) deleted on the source, \(sourceDeletionFailures.count) not"
        }
        for result in results where !result.outcome.isSuccess || (result.sourceDeletion.map { (try? $0.get()) == nil } ?? false) {
            text += "\n  \(result)"
        }
        return text
    }
}

extension ConntrackTable {
    /// Imports every entry of `document` on this handle.
    ///
    /// The whole document is validated first (``StateValidationError``: nothing written). Then every entry is
    /// created; an existing one is replaced (destroy + create) or skipped as `options` says; a kernel refusal is
    /// recorded in that entry's result and the import goes on with the next one. With `source`, every entry
    /// imported (created or replaced) is then deleted from that table.
    public func importDocument(_ document: StateDocument, options: ImportOptions = ImportOptions(),
                               deletingFrom source: ConntrackTable? = nil) throws(StateValidationError) -> ImportReport {
        try document.validate()
        return importEntries(document.entries, options: options, deletingFrom: source)
    }

    /// Imports a document that ``StateDocumentReader`` validated as a whole (the entries it kept): the reader,
    /// not this call, refused anything wrong, so nothing here reaches the kernel unless all of it validated.
    public func importDocument(_ document: ValidatedStateDocument, options: ImportOptions = ImportOptions(),
                               deletingFrom source: ConntrackTable? = nil) -> ImportReport {
        importEntries(document.entries, options: options, deletingFrom: source)
    }

    private func importEntries(_ entries: [ConntrackEntry], options: ImportOptions,
                               deletingFrom source: ConntrackTable?) -> ImportReport {
        let clock = ContinuousClock()
        let start = clock.now
        var results: [ImportResult] = []
        results.reserveCapacity(entries.count)
        for (index, entry) in entries.enumerated() {
            let outcome = importEntry(entry, options: options)
            if case let .failed(error) = outcome {
                logger.error("import failed", metadata: ["conntrack.entry": "\(entry)", "conntrack.index": "\(index)",
                                                         "conntrack.errno": "\(error.errno)", "conntrack.error": "\(error)"])
            }
            results.append(ImportResult(index: index, key: entry.key, outcome: outcome))
        }
        if let source {
            for position in results.indices where results[position].outcome == .created
                || results[position].outcome == .replaced
            {
                do {
                    try source.destroy(results[position].key)
                    results[position].sourceDeletion = .success(())
                } catch {
                    results[position].sourceDeletion = .failure(error)
                }
            }
        }
        let report = ImportReport(results: results, elapsed: clock.now - start)
        logger.info("import done", metadata: ["conntrack.created": "\(report.created)", "conntrack.replaced": "\(report.replaced)",
                                              "conntrack.skipped": "\(report.skipped)", "conntrack.failed": "\(report.failures.count)"])
        return report
    }

    private func importEntry(_ entry: ConntrackEntry, options: ImportOptions) -> ImportOutcome {
        do {
            try create(entry, liberal: options.liberal)
            return .created
        } catch where error.errno == EEXIST {
            guard options.existing == .replace else { return .skipped }
        } catch {
            return .failed(error)
        }
        do {
            do {
                try destroy(entry.key)
            } catch where error.errno == ENOENT {
                // Gone in the meantime (expired): creating is all that is left to do.
            }
            try create(entry, liberal: options.liberal)
            return .replaced
        } catch {
            var failure = error
            failure.operation = "replace (destroy + create): \(error.operation)"
            return .failed(failure)
        }
    }

    /// Deletes the given entries (by their original tuple and zone); returns one result per key.
    public func delete(_ keys: [FlowKey]) -> [Result<Void, ConntrackError>] {
        keys.map { key in Result { () throws(ConntrackError) in try destroy(key) } }
    }
}
