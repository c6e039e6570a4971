import CLinux
import DyscoCore
import Foundation

/// What the agent shows: the `sessions` snapshot (paged) and what a metrics scrape reads.
extension DataplaneAgent {
    /// One page of the agent's snapshot (``AgentSnapshot/pageLimit`` sessions at most, ids after `after`).
    public func snapshot(after: UInt64? = nil, limit: Int? = nil) -> AgentSnapshot {
        let now = dysco_monotonic_coarse_ns()
        let limit = min(limit ?? AgentSnapshot.pageLimit, AgentSnapshot.pageLimit)
        var snapshot = dataplane.processor.withLock { state in
            let page = state.snapshotSessions(now: now, after: after, limit: limit)
            var snapshot = AgentSnapshot(netns: options.netns, pid: getpid(), queue: options.queue, fastPath: options.fastPath,
                                         uptimeSeconds: Double(dysco_monotonic_ns() - startedAt) / 1e9,
                                         counters: state.counters, sessions: page.sessions)
            snapshot.total = state.table.records.count
            snapshot.next = page.more ? page.sessions.last?.id : nil
            return snapshot
        }
        snapshot.control = migration?.counters.withLock { $0 } ?? [:]
        snapshot.wireVersions = Array(options.wireVersions)
        return snapshot
    }

    /// What a scrape reads: the processor's counters and counts (a short hold of the packet lock, no session
    /// walk), the control counters, the kernel's packet total and the buffer's occupancy.
    func metricsReadings() -> AgentMetricCatalog.Readings {
        if options.fastPath { dataplane.fastPath?.sampleKernelPackets() }
        let (counters, sessions, anchoring) = dataplane.processor.withLock { ($0.counters, $0.table.records.count, $0.anchoring) }
        var readings = AgentMetricCatalog.Readings(
            counters: counters, sessions: sessions, anchoring: anchoring,
            control: migration?.counters.withLock { $0 } ?? [:],
            fastPathPackets: dataplane.fastPath?.kernelPacketCount ?? 0,
            bufferPackets: packetLoop.bufferOccupancy.packets.load(ordering: .relaxed),
            bufferBytes: packetLoop.bufferOccupancy.bytes.load(ordering: .relaxed),
            bufferRefused: packetLoop.bufferOccupancy.refused.load(ordering: .relaxed),
            uptimeSeconds: Double(dysco_monotonic_ns() - startedAt) / 1e9)
        readings.kernelOpeningRefused = dataplane.fastPath?.openingRefused ?? 0
        return readings
    }
}
