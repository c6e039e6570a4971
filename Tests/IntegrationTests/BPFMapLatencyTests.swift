import DyscoBPF
import DyscoCore
import DyscoSystem
import Foundation
import Testing

/// What one session change costs in the BPF datapath's map, from Swift through libbpf (needs root to create maps;
/// no namespace, no device, nothing pinned): insert, hold (a flag: lookup + update), delete of one translation at
/// an empty map and at a map of 100,000, plus the batch fill and the kernel's memory accounting per entry.
/// Figures are printed; only a generous ratio is asserted (issue 16, test (b)).
@Suite(.serialized) struct BPFMapLatencyTests {
    static let background = 100_000
    static let probes = 2_000

    /// A distinct translation per index (addresses in 10.217.0.0/16 of no namespace: the map is never attached).
    static func key(_ i: Int) -> BPFSessionKey {
        BPFSessionKey(FiveTuple(srcAddr: IPAddress(10, 217, UInt8((i >> 8) & 0xFF), UInt8(i & 0xFF)),
                                srcPort: UInt16(1024 + (i >> 16)), dstAddr: IPAddress(10, 218, 0, 1), dstPort: 80),
                      hook: i & 1 == 0 ? .egress : .ingress)
    }

    static func entry(_ i: Int) -> BPFSessionEntry {
        BPFSessionEntry(target: FiveTuple(srcAddr: IPAddress(10, 219, 0, 1), srcPort: UInt16(truncatingIfNeeded: i),
                                          dstAddr: IPAddress(10, 219, 0, 2), dstPort: 8080),
                        sessionID: UInt64(i))
    }

    struct Figures: CustomStringConvertible {
        var insert: [Double] = [], hold: [Double] = [], delete: [Double] = []
        static func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
        static func p99(_ values: [Double]) -> Double { values.sorted()[values.count * 99 / 100] }
        var description: String {
            String(format: "insert p50 %.2f µs p99 %.2f, hold p50 %.2f µs p99 %.2f, delete p50 %.2f µs p99 %.2f",
                   Self.median(insert), Self.p99(insert), Self.median(hold), Self.p99(hold),
                   Self.median(delete), Self.p99(delete))
        }
    }

    /// Inserts, holds and deletes `probes` translations numbered from `base`, one call each, timed one by one.
    static func probe(_ datapath: BPFDatapath, base: Int) throws -> Figures {
        let clock = ContinuousClock()
        var figures = Figures()
        func micros(_ d: Duration) -> Double {
            Double(d.components.seconds) * 1e6 + Double(d.components.attoseconds) / 1e12
        }
        for i in base..<(base + probes) {
            let (k, e) = (key(i), entry(i))
            figures.insert.append(micros(try clock.measure { try datapath.insert(k, e) }))
        }
        for i in base..<(base + probes) {
            let k = key(i)
            figures.hold.append(micros(try clock.measure { try datapath.setFlags(k, set: .held) }))
        }
        for i in base..<(base + probes) {
            let k = key(i)
            figures.delete.append(micros(try clock.measure { try datapath.delete(k) }))
        }
        return figures
    }

    @Test("insert/hold/delete of one translation costs about the same at 100,000 entries as at none; memory per entry")
    func latencyFlatInTableSize() throws {
        let object = try BPFDatapathTests.objectPath()
        let datapath = try BPFDatapath(objectPath: object, pinDirectory: nil)
        let emptyMemory = datapath.sessionMapMemoryBytes
        // Warm-up (allocator caches, page faults), then the empty-map figures.
        _ = try Self.probe(datapath, base: 1_000_000)
        let empty = try Self.probe(datapath, base: 1_000_000)
        #expect(try datapath.entries().isEmpty)

        let clock = ContinuousClock()
        let chunk = 10_000
        let chunks = stride(from: 0, to: Self.background, by: chunk).map { start in
            (start..<(start + chunk)).map { (Self.key($0), Self.entry($0)) }
        }
        let fill = try clock.measure {
            for entries in chunks { try datapath.writeBatch(entries) }
        }
        let fullMemory = datapath.sessionMapMemoryBytes
        let full = try Self.probe(datapath, base: 1_000_000)
        #expect(try datapath.lookup(Self.key(Self.background - 1))?.sessionID == UInt64(Self.background - 1))
        let keyChunks = chunks.map { $0.map(\.0) }
        let drain = try clock.measure {
            for keys in keyChunks { try datapath.deleteBatch(keys) }
        }
        #expect(try datapath.entries().isEmpty)

        func micros(_ d: Duration) -> Double {
            Double(d.components.seconds) * 1e6 + Double(d.components.attoseconds) / 1e12
        }
        let fillPerEntry = micros(fill) / Double(Self.background)
        let drainPerEntry = micros(drain) / Double(Self.background)
        var perEntry = "?"
        if let emptyMemory, let fullMemory {
            let bytes = (Double(fullMemory) - Double(emptyMemory)) / Double(Self.background)
            perEntry = String(format: "%.0f", bytes)
        }
        let batch = String(format: "batch insert %.2f µs/entry, batch delete %.2f µs/entry (chunks of %d)",
                           fillPerEntry, drainPerEntry, chunk)
        print("BPF map latency (\(Self.probes) probes each, per call through libbpf)")
        print("  empty map:       \(empty)")
        print("  100,000 entries: \(full)")
        print("  \(batch)")
        print("  memlock: empty \(emptyMemory.map(String.init) ?? "?") B, 100,000 entries \(fullMemory.map(String.init) ?? "?") B (\(perEntry) B/entry)")
        // Generous: O(1) means the same order of magnitude, not equal figures on a loaded 2-core machine.
        for (name, a, b) in [("insert", empty.insert, full.insert), ("hold", empty.hold, full.hold),
                             ("delete", empty.delete, full.delete)] {
            #expect(Figures.median(b) < 5 * Figures.median(a) + 5, "\(name): \(Figures.median(a)) → \(Figures.median(b)) µs")
        }
    }
}
