import CoreMetrics
import DyscoCore
import Logging
import Prometheus
import Synchronization

/// The agent's Prometheus metrics (``AgentMetricCatalog`` names them). Two kinds of source:
/// - counters the agent keeps anyway (``DataplaneCounters``, the control counters, the buffer's totals) are read
///   at scrape time (``render(_:)``) and copied into the registry: the packet path does no metrics work;
/// - migration events (results, phase latencies) are recorded when they happen, through swift-metrics
///   (`CoreMetrics.Counter`, `CoreMetrics.Timer`) backed by swift-prometheus.
final class AgentMetrics: Sendable {
    private let registry = PrometheusCollectorRegistry()
    private let logger: Logger
    /// Scrapes one at a time: a scrape sets every copied counter and then emits.
    private let scrapeLock = Mutex<Void>(())
    private let migrations: [String: CoreMetrics.Counter]
    private let phaseTimers: [String: CoreMetrics.Timer]
    /// Left-anchor results already counted (a retransmitted trigger is answered again with the same result).
    private let countedResults = Mutex<Set<ResultKey>>([])
    private struct ResultKey: Hashable { var chainID: UInt64; var requestID: UInt32 }

    init(logger: Logger) {
        self.logger = logger
        var factory = PrometheusMetricsFactory(registry: registry)
        let buckets = AgentMetricCatalog.phaseBuckets.map { Duration.nanoseconds(Int64(($0 * 1e9).rounded())) }
        factory.durationHistogramBuckets[AgentMetricCatalog.phaseDuration] = buckets
        var migrations: [String: CoreMetrics.Counter] = [:]
        let migrationFamily = Self.descriptor(AgentMetricCatalog.migrations)
        for role in AgentMetricCatalog.MigrationRole.allCases {
            for result in AgentMetricCatalog.migrationResults {
                let labels = [("role", role.rawValue), ("result", result)]
                let handler = registry.makeCounter(descriptor: migrationFamily, labels: labels)
                migrations["\(role.rawValue)/\(result)"] = CoreMetrics.Counter(
                    label: AgentMetricCatalog.migrations, dimensions: labels, handler: handler, factory: factory)
            }
        }
        self.migrations = migrations
        var timers: [String: CoreMetrics.Timer] = [:]
        let phaseFamily = Self.descriptor(AgentMetricCatalog.phaseDuration)
        for phase in AgentMetricCatalog.phases {
            let labels = [("phase", phase)]
            let handler = registry.makeDurationHistogram(descriptor: phaseFamily, labels: labels, buckets: buckets)
            timers[phase] = CoreMetrics.Timer(label: AgentMetricCatalog.phaseDuration, dimensions: labels, handler: handler,
                                              factory: factory)
        }
        phaseTimers = timers
    }

    /// The registry's name and help text of a catalog family (the whole name is the metric name: no unit suffix
    /// is added).
    private static func descriptor(_ family: AgentMetricCatalog.Family) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: family.name, unitName: "", helpText: family.help)
    }

    private static func descriptor(_ name: String) -> MetricNameDescriptor {
        descriptor(AgentMetricCatalog.family(name)!)
    }

    // MARK: - Events

    /// A migration this agent controlled (the `replace` report came back): its result and, when it moved, the
    /// latency of each phase.
    func controllerFinished(_ result: TriggerResult) {
        count(.controller, result.outcome)
        guard result.outcome == .moved, let phases = ReplaceReport.Phases(result.phases) else { return }
        let values: [String: UInt32] = [
            "lock": phases.lock, "new_path": phases.newPath, "drain": phases.drain, "state": phases.state,
            "release": phases.release, "teardown": phases.teardown, "export": phases.export, "transfer": phases.transfer,
            "import": phases.import, "total": phases.total, "paper": phases.paper,
        ]
        for (phase, micros) in values { phaseTimers[phase]?.recordMicroseconds(micros) }
    }

    /// A controller refused before anything was sent (the session has no complete path here).
    func controllerRefused() { count(.controller, .refused) }

    /// This agent, the left anchor, answered a trigger with `result` (counted once per request).
    func leftAnchorFinished(chainID: UInt64, requestID: UInt32, _ result: TriggerResult) {
        let first = countedResults.withLock { counted in
            if counted.count > 4096 { counted.removeAll(keepingCapacity: true) }
            return counted.insert(ResultKey(chainID: chainID, requestID: requestID)).inserted
        }
        if first { count(.leftAnchor, result.outcome) }
    }

    private func count(_ role: AgentMetricCatalog.MigrationRole, _ outcome: TriggerResult.Outcome) {
        migrations["\(role.rawValue)/\(AgentMetricCatalog.migrationResult(outcome))"]?.increment()
    }

    // MARK: - Scrape

    /// The text exposition (`text/plain; version=0.0.4`) of everything, with the scrape-time counters set from
    /// `readings`.
    func render(_ readings: AgentMetricCatalog.Readings) -> [UInt8] {
        scrapeLock.withLock { _ in
            for sample in AgentMetricCatalog.samples(readings) {
                guard let family = AgentMetricCatalog.family(sample.name) else { continue }
                let descriptor = Self.descriptor(family)
                let labels = sample.labels.map { ($0.name, $0.value) }
                switch family.kind {
                case .counter:
                    let counter = labels.isEmpty
                        ? registry.makeCounter(descriptor: descriptor)
                        : registry.makeCounter(descriptor: descriptor, labels: labels)
                    // The agent's counters only grow; the registry's copy is set to them (scrapes are serialized).
                    counter.reset()
                    counter.increment(by: Int64(clamping: UInt64(sample.value)))
                case .gauge:
                    let gauge = labels.isEmpty
                        ? registry.makeGauge(descriptor: descriptor)
                        : registry.makeGauge(descriptor: descriptor, labels: labels)
                    gauge.set(sample.value)
                case .histogram:
                    logger.debug("metrics: a histogram among the scrape samples", metadata: ["metrics.name": "\(sample.name)"])
                }
            }
            return registry.emitToBuffer()
        }
    }
}
