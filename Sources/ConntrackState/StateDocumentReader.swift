import DyscoCore
import Foundation

/// A document that passed every check of ``StateDocumentReader``: only the reader makes one, so an import of a
/// `ValidatedStateDocument` cannot skip validation (``ConntrackTable/importDocument(_:options:deletingFrom:)``).
public struct ValidatedStateDocument: Sendable {
    public let host: String
    public let exportedAt: Date
    /// The entries, in document order (empty when the reader was asked only to validate).
    public let entries: [ConntrackEntry]
    /// How many entries the document has.
    public let entryCount: Int
    /// The document's size in bytes.
    public let byteCount: Int

    /// As a ``StateDocument`` (what the exporter writes).
    public var document: StateDocument { StateDocument(host: host, exportedAt: exportedAt, entries: entries) }
}

/// Reads a state document as a stream and validates it completely before anything may be imported: the limits
/// (``StateDocumentLimits``), strict JSON, the header, every entry (decoded one at a time by `JSONDecoder`, then
/// ``ConntrackEntry/validationFindings()``), the endpoint rule (``EndpointPolicy``) and duplicates. Every
/// problem is reported with its JSON path (``StateValidationError``), several at once up to a cap.
///
/// Memory: one entry's bytes, the path, ~20 bytes a slot (≈ 60 per entry at a resize) for the duplicate check and, when the entries are
/// kept for an import, the decoded entries (not the JSON tree).
public struct StateDocumentReader: Sendable {
    public var limits: StateDocumentLimits
    public var endpoints: EndpointPolicy

    public init(limits: StateDocumentLimits = StateDocumentLimits(), endpoints: EndpointPolicy = .off) {
        self.limits = limits
        self.endpoints = endpoints
    }

    /// Where the document comes from.
    public enum Source {
        case bytes([UInt8])
        /// A file, read in chunks; its size is checked against the limit before the first byte is read.
        case file(String)
        /// A stream (stdin); the limit is enforced while reading.
        case handle(FileHandle)
    }

    /// Validates and returns the entries (for an import).
    public func read(_ source: Source) throws(StateValidationError) -> ValidatedStateDocument {
        try scan(source, keep: true)
    }

    /// Validates only: the entries are checked and dropped (memory independent of the document's size).
    public func validate(_ source: Source) throws(StateValidationError) -> ValidatedStateDocument {
        try scan(source, keep: false)
    }

    private static let chunkSize = 256 * 1024

    private func scan(_ source: Source, keep: Bool) throws(StateValidationError) -> ValidatedStateDocument {
        var collector = IssueCollector(cap: limits.maxIssues)
        let pull: () throws -> [UInt8]
        switch source {
        case let .bytes(bytes):
            if bytes.count > limits.maxBytes { collector.tooLarge(bytes.count, limits); throw collector.error() }
            var done = false
            pull = {
                defer { done = true }
                return done ? [] : bytes
            }
        case let .file(path):
            let handle: FileHandle
            do {
                let size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.intValue ?? 0
                if size > limits.maxBytes { collector.tooLarge(size, limits); throw collector.error() }
                handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
            } catch let error as StateValidationError {
                throw error
            } catch {
                collector.add(path: "$", reason: "cannot read \(path): \(error.localizedDescription)")
                throw collector.error()
            }
            pull = { [UInt8](try handle.read(upToCount: Self.chunkSize) ?? Data()) }
        case let .handle(handle):
            pull = { [UInt8](try handle.read(upToCount: Self.chunkSize) ?? Data()) }
        }
        var pass = DocumentPass(reader: self, keep: keep, collector: collector)
        var scanner = JSONStreamScanner(
            stream: JSONByteStream(maxBytes: limits.maxBytes, maxCaptureBytes: limits.maxEntryBytes,
                                   maxBytesOption: limits.maxBytesOption, pull: pull),
            limits: limits, integerRule: Self.integerRule)
        do {
            try pass.run(&scanner)
        } catch let error as JSONScanError {
            let path = switch error.scope {
            case .value: error.path.components.isEmpty ? JSONPath(scanner.path) : error.path
            case .document: JSONPath()
            case .entry: JSONPath(Array(scanner.path.prefix(2)))
            }
            pass.collector.add(path: path.description, reason: error.message)
            pass.fatal = true
        } catch {
            pass.collector.add(path: JSONPath(scanner.path).description, reason: "cannot read the document: \(error)")
            pass.fatal = true
        }
        return try pass.finish(bytes: scanner.stream.offset)
    }

    // MARK: Integer fields of the format

    private static let integerFields: [String: IntegerRange] = {
        var rules: [String: IntegerRange] = [
            "proto": .u8, "timeout": .u32, "mark": .u32, "zone": .u16, "id": .u32, "labels[]": .int,
            "tcp.orig.wscale": .u8, "tcp.reply.wscale": .u8, "nat.snat.port": .u16, "nat.dnat.port": .u16,
        ]
        for tuple in ["orig", "reply"] {
            for field in ["sport", "dport", "id"] { rules["\(tuple).\(field)"] = .u16 }
            for field in ["type", "code"] { rules["\(tuple).\(field)"] = .u8 }
            for field in ["correction_pos", "offset_before", "offset_after"] { rules["seq_adj.\(tuple).\(field)"] = .u32 }
            for field in ["packets", "bytes"] { rules["counters.\(tuple).\(field)"] = .u64 }
        }
        return rules
    }()

    /// The range of the integer at `path` when it is a known field (`$.version`, `$.entries[i].orig.sport`, …).
    static func integerRule(_ path: [JSONPathComponent]) -> IntegerRange? {
        if path.count == 1 { return path[0] == .key("version") ? .int : nil }
        guard path.count >= 3, path[0] == .key("entries"), case .index = path[1] else { return nil }
        var pattern = ""
        for component in path.dropFirst(2) {
            switch component {
            case let .key(key): pattern += pattern.isEmpty ? key : ".\(key)"
            case .index: pattern += "[]"
            }
        }
        return integerFields[pattern]
    }
}

/// Issues of one read, up to a cap (the rest are counted).
struct IssueCollector {
    let cap: Int
    var issues: [ValidationIssue] = []
    var more = 0

    mutating func add(_ issue: ValidationIssue) {
        if issues.count < cap { issues.append(issue) } else { more += 1 }
    }

    mutating func add(path: String, reason: String, index: Int? = nil, entry: String = "") {
        add(ValidationIssue(index: index, entry: entry, path: path, reason: reason))
    }

    mutating func tooLarge(_ size: Int, _ limits: StateDocumentLimits) {
        add(path: "$", reason: "document of \(size) bytes is larger than the limit of \(limits.maxBytes) bytes (\(limits.maxBytesOption)); "
            + "nothing was parsed")
    }

    var isEmpty: Bool { issues.isEmpty }

    func error() -> StateValidationError { StateValidationError(issues: issues, moreIssues: more) }
}

/// One pass over a document: the header fields, the entries, the issues.
private struct DocumentPass {
    let reader: StateDocumentReader
    let keep: Bool
    var collector: IssueCollector
    var fatal = false

    var schema: String?
    var version: Int64?
    var versionSeen = false
    var host: String?
    var exportedAtText: String?
    var entriesSeen = false
    var entries: [ConntrackEntry] = []
    var entryCount = 0
    var seen = SeenKeys()
    /// Issues of entries, kept apart: a wrong schema or version replaces them (the entries were never meant
    /// to be read as version 1).
    var entryIssues: IssueCollector
    let decoder = JSONDecoder()

    init(reader: StateDocumentReader, keep: Bool, collector: IssueCollector) {
        self.reader = reader
        self.keep = keep
        self.collector = collector
        entryIssues = IssueCollector(cap: collector.cap)
    }

    mutating func run(_ scanner: inout JSONStreamScanner) throws {
        try scanner.begin()
        let first = try scanner.peekToken()
        guard first == UInt8(ascii: "{") else {
            if first == nil { throw scanner.unexpected(nil, expecting: "a JSON object") }
            let kind = try scanner.skipValue()
            collector.add(path: "$", reason: "expected an object, found \(kind.rawValue)")
            try scanner.end()
            fatal = true
            return
        }
        try scanner.object { scanner, key in
            switch key {
            case "schema": schema = try topString(&scanner, key)
            case "host": host = try topString(&scanner, key)
            case "exported_at": exportedAtText = try topString(&scanner, key)
            case "version":
                versionSeen = true
                guard try scanner.peekToken().map({ $0 == UInt8(ascii: "-") || (0x30...0x39).contains($0) }) == true else {
                    let kind = try scanner.skipValue()
                    collector.add(path: "$.version", reason: "expected an integer, found \(kind.rawValue)")
                    return
                }
                version = try scanner.number()
            case "entries":
                entriesSeen = true
                guard try scanner.peekToken() == UInt8(ascii: "[") else {
                    let kind = try scanner.skipValue()
                    collector.add(path: "$.entries", reason: "expected an array, found \(kind.rawValue)")
                    return
                }
                try scanner.array { scanner, index in try entry(&scanner, index) }
            default:
                try scanner.skipValue()  // unknown keys are ignored (but must be valid JSON within the limits)
            }
        }
        try scanner.end()
        drainValueProblems(&scanner, into: &collector)
    }

    /// A top-level string field; a value of another type is an issue (and skipped).
    mutating func topString(_ scanner: inout JSONStreamScanner, _ key: String) throws -> String? {
        guard try scanner.peekToken() == UInt8(ascii: "\"") else {
            let kind = try scanner.skipValue()
            collector.add(path: "$.\(key)", reason: "expected a string, found \(kind.rawValue)")
            return nil
        }
        return try scanner.string(keep: true)
    }

    func drainValueProblems(_ scanner: inout JSONStreamScanner, into collector: inout IssueCollector,
                            index: Int? = nil) {
        for problem in scanner.valueProblems {
            collector.add(path: JSONPath(problem.path).description, reason: problem.message, index: index)
        }
        scanner.valueProblems.removeAll()
    }

    mutating func entry(_ scanner: inout JSONStreamScanner, _ index: Int) throws {
        entryCount += 1
        let path = JSONPath([.key("entries"), .index(index)])
        guard try scanner.peekToken() == UInt8(ascii: "{") else {
            let kind = try scanner.skipValue()
            entryIssues.add(path: path.description, reason: "expected an object, found \(kind.rawValue)", index: index)
            return
        }
        scanner.stream.captured.removeAll(keepingCapacity: true)
        scanner.stream.capturing = true
        try scanner.skipValue()
        scanner.stream.capturing = false
        if !scanner.valueProblems.isEmpty {
            // Out-of-range numbers: JSONDecoder would only say "not valid JSON"; the scanner knows the path.
            drainValueProblems(&scanner, into: &entryIssues, index: index)
            return
        }
        let entry: ConntrackEntry
        do {
            entry = try decoder.decode(ConntrackEntry.self, from: Data(scanner.stream.captured))
        } catch {
            let (relative, reason) = Self.describe(error)
            entryIssues.add(path: path.appending(relative).description, reason: reason, index: index)
            return
        }
        let label = entry.description
        for finding in entry.validationFindings() {
            entryIssues.add(path: path.description + (finding.field.isEmpty ? "" : ".\(finding.field)"),
                            reason: finding.message, index: index, entry: label)
        }
        for finding in reader.endpoints.findings(entry) {
            entryIssues.add(path: path.description + ".\(finding.field)", reason: finding.message, index: index, entry: label)
        }
        if let first = seen.insert(entry.key, at: index) {
            entryIssues.add(path: path.description, reason: "duplicate of entry #\(first)", index: index, entry: label)
        }
        if keep && entryIssues.isEmpty && collector.isEmpty { entries.append(entry) }
    }

    /// A DecodingError of one entry as (path inside the entry, reason).
    static func describe(_ error: any Error) -> ([JSONPathComponent], String) {
        func components(_ keys: [any CodingKey]) -> [JSONPathComponent] {
            keys.map { key in key.intValue.map(JSONPathComponent.index) ?? .key(key.stringValue) }
        }
        switch error {
        case let DecodingError.dataCorrupted(context):
            return (components(context.codingPath), context.debugDescription)
        case let DecodingError.keyNotFound(key, context):
            return (components(context.codingPath + [key]), "missing")
        case let DecodingError.typeMismatch(type, context):
            return (components(context.codingPath), "wrong type, expected \(type): \(context.debugDescription)")
        case let DecodingError.valueNotFound(type, context):
            return (components(context.codingPath), "null where \(type) is required")
        default:
            return ([], "\(error)")
        }
    }

    mutating func finish(bytes: Int) throws(StateValidationError) -> ValidatedStateDocument {
        var header = IssueCollector(cap: collector.cap)
        if !fatal {
            if let schema, schema != StateDocument.schemaName {
                header.add(path: "$.schema", reason: "\"\(schema)\" is not \"\(StateDocument.schemaName)\": not a conntrack state document")
            } else if schema == nil, !collector.issues.contains(where: { $0.path == "$.schema" }) {
                header.add(path: "$.schema", reason: "missing (expected \"\(StateDocument.schemaName)\")")
            }
            if let version, !StateDocument.supportedVersions.contains(Int(version)) {
                let supported = StateDocument.supportedVersions
                header.add(path: "$.version", reason: "unsupported state document version \(version) (this build reads \(supported.lowerBound)...\(supported.upperBound))")
            } else if !versionSeen {
                header.add(path: "$.version", reason: "missing")
            }
        }
        // A wrong schema or version: the entries are not version-1 entries, their problems do not matter.
        let headerRefused = !header.isEmpty
        var result = IssueCollector(cap: collector.cap)
        for issue in header.issues + collector.issues { result.add(issue) }
        if !headerRefused {
            for issue in entryIssues.issues { result.add(issue) }
            result.more += entryIssues.more
        }
        result.more += collector.more
        var exportedAt: Date?
        if !fatal && !headerRefused {
            if host == nil && !collector.issues.contains(where: { $0.path == "$.host" }) { result.add(path: "$.host", reason: "missing") }
            if !entriesSeen { result.add(path: "$.entries", reason: "missing") }
            if let exportedAtText {
                exportedAt = StateDocument.parseDate(exportedAtText)
                if exportedAt == nil { result.add(path: "$.exported_at", reason: "not an ISO 8601 time: \"\(exportedAtText)\"") }
            } else if !collector.issues.contains(where: { $0.path == "$.exported_at" }) {
                result.add(path: "$.exported_at", reason: "missing")
            }
        }
        guard result.isEmpty, let host, let exportedAt else {
            if result.isEmpty { result.add(path: "$", reason: "incomplete document") }
            throw result.error()
        }
        return ValidatedStateDocument(host: host, exportedAt: exportedAt, entries: keep ? entries : [],
                                      entryCount: entryCount, byteCount: bytes)
    }
}

/// An IPv4 flow key in 16 bytes, exact, for the duplicate check of large documents (20 bytes a table slot with
/// its index, instead of ~70 for a ``FlowKey``); nil for IPv6, which keeps its ``FlowKey``.
struct PackedFlowKey: Hashable {
    var high: UInt64
    var low: UInt64

    init?(_ key: FlowKey) {
        let tuple = key.tuple
        guard tuple.src.isIPv4, tuple.dst.isIPv4 else { return nil }
        let ports = UInt64(tuple.sport ?? 0) << 16 | UInt64(tuple.dport ?? 0)
        let icmp = UInt64(tuple.type ?? 0) << 24 | UInt64(tuple.code ?? 0) << 16 | UInt64(tuple.id ?? 0)
        let presence = UInt64(tuple.sport == nil ? 0 : 1) | UInt64(tuple.dport == nil ? 0 : 2)
            | UInt64(tuple.type == nil ? 0 : 4) | UInt64(tuple.code == nil ? 0 : 8) | UInt64(tuple.id == nil ? 0 : 16)
        high = UInt64(key.proto.number) << 56 | UInt64(key.zone) << 40 | presence << 32 | (key.proto.hasPorts ? ports : icmp)
        low = UInt64(tuple.src.value) << 32 | UInt64(tuple.dst.value)
    }
}

/// First index of every flow key seen (the duplicate check).
struct SeenKeys {
    private var v4: [PackedFlowKey: Int32] = [:]
    private var other: [FlowKey: Int] = [:]

    /// Records `key` at `index`; returns the earlier index when the key was seen before.
    mutating func insert(_ key: FlowKey, at index: Int) -> Int? {
        if let packed = PackedFlowKey(key), index < Int(Int32.max) {
            if let first = v4[packed] { return Int(first) }
            v4[packed] = Int32(index)
            return nil
        }
        if let first = other[key] { return first }
        other[key] = index
        return nil
    }
}
