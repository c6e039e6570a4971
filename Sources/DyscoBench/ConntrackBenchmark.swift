import DyscoCore
import ConntrackState
import DyscoLab
import Glibc
import Foundation
import Logging

/// Figures for `dysco-bench conntrack`. Everything runs in private network namespaces (`unshare`), so the
/// host's conntrack table is never touched; the namespaces disappear with their handles.
public enum ConntrackBenchmark {
    public struct Figure: Sendable, CustomStringConvertible {
        public var name: String
        public var value: Double
        public var unit: String
        public var note: String

        public var description: String {
            let number = value >= 100 ? String(format: "%.0f", value) : String(format: "%.3g", value)
            return "\(name.padding(toLength: 52, withPad: " ", startingAt: 0)) \(number) \(unit)"
                + (note.isEmpty ? "" : "  (\(note))")
        }
    }

    /// A synthetic established TCP session, distinct for every `index` (up to ~16 million).
    public static func syntheticEntry(_ index: Int, base: UInt8 = 200) -> ConntrackEntry {
        let client = IPAddress.v4(10, base, UInt8((index / 60_000) & 0xff), UInt8(1 + (index / 60_000) >> 8))
        let server = IPAddress.v4(10, base &+ 1, 0, 1)
        let sport = UInt16(1024 + index % 60_000)
        let orig = ConntrackTuple(src: client, dst: server, sport: sport, dport: 80)
        return ConntrackEntry(
            family: .ipv4, proto: .tcp, orig: orig, reply: orig.inverted,
            tcp: TCPInfo(state: .established,
                         orig: TCPDirection(flags: [.windowScale, .sackPerm], wscale: 7),
                         reply: TCPDirection(flags: [.windowScale, .sackPerm], wscale: 7)),
            status: [.seenReply, .assured, .confirmed], timeout: 3600, mark: UInt32(index % 4))
    }

    /// Runs the three measurements of the issue and returns their figures (asserts nothing).
    public static func run(logger: Logger, importCount: Int = 10_000, tableSize: Int = 100_000,
                           sessionCount: Int = 100, lookups: Int = 1_000) throws -> [Figure] {
        let clock = ContinuousClock()
        var figures: [Figure] = []
        func ms(_ duration: Duration) -> Double {
            Double(duration.components.seconds) * 1e3 + Double(duration.components.attoseconds) / 1e15
        }
        func us(_ duration: Duration) -> Double { ms(duration) * 1e3 }

        // 1. Import 10,000 entries on one handle.
        do {
            let table = try ConntrackTable(namespace: .fresh, logger: logger)
            let document = StateDocument(host: "bench", entries: (0..<importCount).map { syntheticEntry($0) })
            let json = try document.encoded(pretty: false)
            let decodeStart = clock.now
            let decoded = try StateDocument.decode(json)
            let decodeTime = clock.now - decodeStart
            let start = clock.now
            let report = try table.importDocument(decoded)
            let elapsed = clock.now - start
            guard report.succeeded else { throw BenchmarkError(message: "bench import failed: \(report.summary)") }
            figures.append(Figure(name: "import \(importCount) entries (validate + create)", value: ms(elapsed),
                                  unit: "ms", note: String(format: "%.2f µs/entry; target < 100 ms",
                                                           us(elapsed) / Double(importCount))))
            figures.append(Figure(name: "  JSON decode of those \(importCount) entries", value: ms(decodeTime),
                                  unit: "ms", note: "\(json.count / 1024) KiB"))
        }

        // 2. Export one session from a table of 100,000 entries.
        do {
            let table = try ConntrackTable(namespace: .fresh, logger: logger)
            let fill = StateDocument(host: "bench", entries: (0..<tableSize).map { syntheticEntry($0) })
            let fillStart = clock.now
            let report = try table.importDocument(fill)
            let fillTime = clock.now - fillStart
            guard report.succeeded else { throw BenchmarkError(message: "bench fill failed: \(report.summary)") }
            figures.append(Figure(name: "fill a table with \(tableSize) entries", value: ms(fillTime), unit: "ms",
                                  note: String(format: "%.2f µs/entry", us(fillTime) / Double(tableSize))))
            var samples: [Duration] = []
            samples.reserveCapacity(lookups)
            for round in 0..<lookups {
                let wanted = syntheticEntry((round * 7919) % tableSize)
                // Alternate directions: the reply tuple finds the session too.
                let key = FlowKey(proto: .tcp, tuple: round % 2 == 0 ? wanted.orig : wanted.reply)
                let start = clock.now
                let result = try table.export(.flows([key]), host: "bench")
                let json = try result.document.encoded(pretty: false)
                samples.append(clock.now - start)
                guard result.document.entries.count == 1, !json.isEmpty else {
                    throw BenchmarkError(message: "bench export found \(result.document.entries.count) entries for \(key)")
                }
            }
            samples.sort()
            figures.append(Figure(name: "export 1 session of \(tableSize) (GET + JSON), median", value: us(samples[samples.count / 2]),
                                  unit: "µs", note: "target < 1 ms"))
            figures.append(Figure(name: "export 1 session of \(tableSize) (GET + JSON), p99",
                                  value: us(samples[samples.count * 99 / 100]), unit: "µs", note: "\(lookups) lookups"))
            let dumpStart = clock.now
            let all = try table.dump()
            figures.append(Figure(name: "  for comparison: dump all \(all.count) entries", value: ms(clock.now - dumpStart),
                                  unit: "ms", note: ""))
        }

        // 3. Export -> JSON -> import of 100 sessions, between two namespaces.
        do {
            let source = try ConntrackTable(namespace: .fresh, logger: logger)
            let destination = try ConntrackTable(namespace: .fresh, logger: logger)
            let sessions = (0..<sessionCount).map { syntheticEntry($0, base: 210) }
            guard try source.importDocument(StateDocument(host: "bench", entries: sessions)).succeeded else {
                throw BenchmarkError(message: "bench: could not create the source sessions")
            }
            let start = clock.now
            let exported = try source.export(.flows(sessions.map { FlowKey(proto: .tcp, tuple: $0.orig) }), host: "bench")
            let exportDone = clock.now
            let json = try exported.document.encoded()
            let encodeDone = clock.now
            let decoded = try StateDocument.decode(json)
            let decodeDone = clock.now
            let report = try destination.importDocument(decoded)
            let end = clock.now
            guard report.succeeded, report.created == sessionCount else {
                throw BenchmarkError(message: "bench: session import failed: \(report.summary)")
            }
            figures.append(Figure(name: "export → JSON → import of \(sessionCount) sessions", value: ms(end - start), unit: "ms",
                                  note: String(format: "export %.2f, encode %.2f, decode %.2f, import %.2f ms; %d bytes",
                                               ms(exportDone - start), ms(encodeDone - exportDone),
                                               ms(decodeDone - encodeDone), ms(end - decodeDone), json.count)))
        }
        return figures
    }
}

public struct BenchmarkError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// `dysco-bench state-validate`: peak memory and time to validate large documents, streaming
/// (``StateDocumentReader``) against the whole-document decode (``StateDocument/decode(_:)`` + `validate()`).
/// Each measurement runs in its own child process so that each peak RSS is its own.
public enum StateValidateBenchmark {
    public enum Mode: String, Sendable, CaseIterable {
        /// Data(contentsOf:) + JSONDecoder over the whole document + validate(): the old path.
        case whole
        /// The streaming reader, validating only (what `state validate` does).
        case stream
        /// The streaming reader keeping the decoded entries (what `state import` holds before its first write).
        case streamKeep = "stream-keep"
    }

    public struct Measurement: Codable, Sendable {
        public var mode: String
        public var entries: Int
        public var bytes: Int
        public var seconds: Double
        /// getrusage(RUSAGE_SELF).ru_maxrss of the process that validated, in KiB.
        public var maxRSSKiB: Int
        public var valid: Bool
    }

    /// Writes a document of `count` synthetic entries to `path` (compact, as the agents send them), streamed:
    /// 1,000 entries at a time. Returns the size in bytes.
    @discardableResult
    public static func generate(path: String, count: Int) throws -> Int {
        guard FileManager.default.createFile(atPath: path, contents: nil) else {
            throw BenchmarkError(message: "cannot create \(path)")
        }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var size = 0
        func write(_ data: Data) throws {
            try handle.write(contentsOf: data)
            size += data.count
        }
        try write(Data(#"{"entries":["#.utf8))
        var batch = Data()
        for index in 0..<count {
            if index > 0 { batch.append(0x2c) }
            batch.append(try encoder.encode(ConntrackBenchmark.syntheticEntry(index)))
            if batch.count > 1 << 20 {
                try write(batch)
                batch.removeAll(keepingCapacity: true)
            }
        }
        try write(batch)
        try write(Data(#"],"exported_at":"2026-01-01T00:00:00.000Z","host":"bench","schema":"dysco-conntrack-state","version":1}"#.utf8))
        return size
    }

    /// One measurement in this process (the child's side).
    public static func measure(_ mode: Mode, path: String) -> Measurement {
        let clock = ContinuousClock()
        let start = clock.now
        var entries = 0
        var valid = true
        switch mode {
        case .whole:
            do {
                let document = try StateDocument.decode(try Data(contentsOf: URL(fileURLWithPath: path)))
                try document.validate()
                entries = document.entries.count
            } catch {
                valid = false
            }
        case .stream, .streamKeep:
            let reader = StateDocumentReader(limits: StateDocumentLimits(maxBytes: Int.max))
            do {
                let document = mode == .stream ? try reader.validate(.file(path)) : try reader.read(.file(path))
                entries = document.entryCount
            } catch {
                valid = false
            }
        }
        let elapsed = clock.now - start
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        let bytes = ((try? FileManager.default.attributesOfItem(atPath: path)[.size]) as? NSNumber)?.intValue ?? 0
        return Measurement(mode: mode.rawValue, entries: entries, bytes: bytes,
                           seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
                           maxRSSKiB: usage.ru_maxrss, valid: valid)
    }
}
