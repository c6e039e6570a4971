import AnchorBuffer
import CLinux
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import NIOPosix
import Synchronization

/// One host's agent (one per network namespace), the composition root: it binds the queue, restores the sessions,
/// installs the rules and wires the parts, one concern per file:
/// - ``AgentDataplane`` (AgentDataplane.swift): the ``PacketProcessor`` behind the packet lock, the kernel path
///   (``BPFKernelPath``), the one place a processor call's effects are handled; the migration engine's
///   ``MigrationDataplane`` (MigrationDataplane.swift)
/// - ``PacketLoop`` (PacketLoop.swift): the packet thread, its verdicts, the anchor buffer
/// - ``ExpiryTimer``, ``QuietTimer`` (AgentTimers.swift): expiry, memory back to the OS, the drain's quiet rule
/// - ``AgentJournal`` (AgentJournal.swift): restore at start, the state file, the kernel's owned keys
/// - control requests and the policy at run time (AgentControl.swift); the snapshot and the metrics' readings
///   (AgentReadings.swift); `agent --purge` (AgentPurge.swift)
/// - ``MigrationEngine``, the control socket and the metrics endpoint, on one shared event-loop group.
public final class DataplaneAgent: @unchecked Sendable {
    public struct Options: Sendable {
        public var queue: UInt16 = 7
        public var portRange: ClosedRange<UInt16> = 10000...29999
        public var settings = PacketProcessor.Settings()
        public var queueMaxLength: UInt32 = 8192
        public var controlSocketPath: String
        public var netns: String?
        /// Hand sessions to the kernel datapath (``BPFKernelPath``: tc programs, BPF maps); false: NFQUEUE only.
        public var fastPath = true
        /// Queue IPv6 TCP as well (``QueueRules/ipv6``): IPv6 sessions of the policies' IPv6 chains, on the slow path.
        public var ipv6 = false
        /// The compiled tc programs (`make bpf`), the bpffs under which the agent pins them (mounted if it
        /// is not one), and the capacity of the session map in translations (nil: the object's default).
        public var bpfObject = ""
        public var bpffs = "/sys/fs/bpf"
        public var bpfMaxEntries: UInt32?
        /// Size of the BPF event ring in bytes (nil: 1 MiB).
        public var bpfRingBytes: UInt32?
        /// How often kernel counters are read for idle expiry of kernel-carried sessions.
        public var counterPollSeconds = 5
        /// The UDP port of the agents' control protocol (docs/CONTROL-PROTOCOL.md).
        public var controlPort: UInt16 = ControlMessage.port
        /// Control-protocol versions this agent takes; it sends each message as the oldest of them that carries it
        /// (issue 19, rolling upgrade; docs/CONTROL-PROTOCOL.md "Versions").
        public var wireVersions: ClosedRange<UInt8> = ControlMessage.versions
        /// Bounds of the anchor buffer (docs/ARCHITECTURE.md, "Anchor buffering").
        public var bufferLimits = AnchorBuffer<HeldPacket>.Limits()
        /// Accept migrated firewall state (a new box of a stateful replacement); false refuses every import.
        public var acceptState = true
        /// A proxy's reported splice takes the proxy out of the session at once (false: it only joins the two
        /// sessions; `remove` takes the proxy out later).
        public var spliceRemoves = true
        /// The firewall's per-session state for stateful migrations (the CLI gives ConntrackStateStore).
        public var stateStore: (any FirewallStateStore)?
        /// Serve Prometheus metrics at http://ENDPOINT/metrics in this namespace (nil: no metrics, no listener).
        public var metrics: MetricsEndpoint?
        /// The deployment's trust keys (paper §2.3): Dysco SYN trailers are signed with the current key and
        /// accepted under the current or previous one. Required: there is no unauthenticated mode.
        public var trust: TrustGroup
        /// The policy file the config came from (`policy reload` and SIGHUP read it again); nil: none.
        public var configPath: String?
        /// The session table's journal (docs/ARCHITECTURE.md, "Agent crash and restart"); nil: nothing persists
        /// and a stop always removes everything.
        public var stateFile: String?
        /// Discard the state file and the kernel table at start (a restart then loses every session).
        public var fresh = false
        /// Remove the rules, the kernel table and the state file at exit even with live sessions.
        public var cleanupOnExit = false

        public init(netns: String?, controlSocketPath: String? = nil, trust: TrustGroup) {
            self.netns = netns
            self.trust = trust
            self.controlSocketPath = controlSocketPath ?? AgentControlPaths.socketPath(netns: netns)
            stateFile = AgentControlPaths.statePath(socketPath: self.controlSocketPath)
        }
    }

    public let options: Options
    let logger: Logger
    let dataplane: AgentDataplane
    let packetLoop: PacketLoop
    private let rules: QueueRules
    let startedAt = dysco_monotonic_ns()
    private let stopping = Atomic<Bool>(false)
    private let migrationSettings: MigrationEngine.Settings
    /// The event loops of the control socket, the agents' UDP control plane and the metrics endpoint (one thread).
    private var eventLoops: MultiThreadedEventLoopGroup?
    private var expiryTimer: ExpiryTimer?
    private var control: ControlServer?
    private(set) var migration: MigrationEngine?
    /// The Prometheus metrics and their HTTP endpoint (nil without `--metrics`).
    let metrics: AgentMetrics?
    private var metricsServer: MetricsServer?
    /// What the start restored (its durations are in the "sessions restored" log line only).
    public private(set) var restoreReport = RestoreReport()
    let configLoads = Atomic<Int>(1)

    /// Binds the queue and installs the rules. Throws a clear error when the queue cannot be bound (another
    /// agent holds it, or no CAP_NET_ADMIN) — and then installs nothing.
    public init(config: AgentConfig, options: Options, logger: Logger) throws {
        self.options = options
        self.logger = logger
        // Memory freed after a flood must go back to the OS (docs/ARCHITECTURE.md, "Floods and table bounds").
        dysco_malloc_fixed_thresholds()
        var settings = options.settings
        settings.fastPath = options.fastPath
        let queueSocket: NetfilterQueueSocket
        do {
            queueSocket = try NetfilterQueueSocket(queue: options.queue, maxLength: options.queueMaxLength)
        } catch let error as SystemCallError {
            let hint = switch error.errno {
            case EBUSY: " (another process, perhaps another agent, is bound to queue \(options.queue); use --queue)"
            case EPERM: " (needs root / CAP_NET_ADMIN in this namespace)"
            default: ""
            }
            throw ControlError(message: "cannot bind NFQUEUE \(options.queue): \(error)\(hint)")
        }
        metrics = options.metrics.map { _ in AgentMetrics(logger: logger) }
        migrationSettings = MigrationEngine.Settings(controlPort: options.controlPort, acceptState: options.acceptState,
                                                     stateStore: options.stateStore, wireVersions: options.wireVersions,
                                                     ipv6: options.ipv6)
        // The BPF datapath takes a session with its SYN (a map write costs microseconds): docs/BPF.md
        // "Connection setup in the kernel".
        settings.installAtSyn = options.fastPath
        if options.fastPath { logger.info("kernel fast path on", metadata: ["fastpath.datapath": "bpf"]) }
        let bpf = BPFKernelPath.Settings(
            objectPath: options.bpfObject, bpffs: options.bpffs,
            pinDirectory: options.bpffs + "/dysco-\(options.netns ?? "host")-q\(options.queue)",
            maxEntries: options.bpfMaxEntries, ringBytes: options.bpfRingBytes, fresh: options.fresh,
            carries: options.fastPath, queue: options.queue)
        dataplane = try AgentDataplane(
            processor: PacketProcessor(config: config, portRange: options.portRange, trust: options.trust, settings: settings),
            quietNanoseconds: migrationSettings.quietNanoseconds, logger: logger) { nudge, report, carriers in
            // --no-fastpath: the BPF path carrying nothing, for its owned keys only (docs/BPF.md "Owned keys");
            // without the BPF programs there, no kernel state at all (warned once).
            do {
                return try BPFKernelPath(settings: bpf, logger: logger, nudge: nudge, report: report, carriers: carriers)
            } catch where !options.fastPath {
                logger.warning("--no-fastpath without the BPF programs: no owned keys (the sessions of a stopped agent pass untranslated instead of failing closed)",
                               metadata: ["error": "\(error)"])
                return NoKernelPath()
            }
        }
        let bpfPath = dataplane.fastPath as? BPFKernelPath
        rules = QueueRules(queue: options.queue, egressFilter: bpfPath?.egressFilterPath,
                           ownedFilter: bpfPath?.ownedFilterPath, failClosed: !(dataplane.fastPath is NoKernelPath),
                           ipv6: options.ipv6)
        packetLoop = PacketLoop(dataplane: dataplane, queueSocket: queueSocket, bufferLimits: options.bufferLimits,
                                logger: logger)
        restoreReport = try dataplane.restoreOrReset(stateFile: options.stateFile, fresh: options.fresh, logger: logger)
        let rulesStart = dysco_monotonic_ns()
        try rules.install(logger: logger)
        if restoreReport.restored > 0 {
            let rulesSeconds = Double(dysco_monotonic_ns() - rulesStart) / 1e9
            logger.notice("queue rules in place", metadata: ["state.rules_seconds": "\(rulesSeconds)"])
        }
    }

    /// Starts the packet thread, the expiry timer, the migration engine, the metrics endpoint (before the control
    /// socket, whose appearance tells that the agent is ready: a metrics port in use fails the start) and the
    /// control socket.
    public func start() throws {
        let eventLoops = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.eventLoops = eventLoops
        // The engine exists before the first packet (the data plane reports anchor observations to it); its
        // control port opens below.
        let engine = try MigrationEngine(dataplane: dataplane, trust: options.trust, settings: migrationSettings,
                                         metrics: metrics, eventLoopGroup: eventLoops, logger: logger)
        migration = engine
        dataplane.migration = engine
        packetLoop.start()
        expiryTimer = ExpiryTimer(dataplane: dataplane, pollKernelCounters: options.fastPath,
                                  counterPollSeconds: options.counterPollSeconds, logger: logger)
        try engine.start()
        if let endpoint = options.metrics, let metrics {
            metricsServer = try MetricsServer(endpoint: endpoint, group: eventLoops, logger: logger) { [weak self] in
                guard let self else { return [] }
                return metrics.render(self.metricsReadings())
            }
        }
        control = try makeControlServer(engine: engine, group: eventLoops)
        logger.info("agent ready", metadata: [
            "queue.number": "\(options.queue)", "agent.netns": "\(options.netns ?? "host")",
            "agent.control": "\(options.controlSocketPath)",
        ])
    }

    /// A planned stop (SIGTERM, SIGINT). With live sessions and a state file (and no ``Options/cleanupOnExit``),
    /// the rules, the kernel table and the state file stay, so that the next agent started with the same command
    /// line takes over every session (an upgrade). Otherwise the rules go first (packets pass untouched from then
    /// on), then the threads stop and the table and the state file go.
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        packetLoop.requestStop()
        let live = dataplane.processor.withLock { state in
            state.table.records.values.contains { $0.closeDeadline == nil }
        }
        let keep = live && dataplane.journal.file != nil && !options.cleanupOnExit
        if !keep {
            do { try QueueRules.remove(logger: logger) } catch {
                logger.error("could not remove NFQUEUE rules", metadata: ["error": "\(error)"])
            }
        }
        expiryTimer?.cancel()
        dataplane.quietTimer.cancel()
        control?.close()
        metricsServer?.close()
        migration?.stop()
        try? eventLoops?.syncShutdownGracefully()
        packetLoop.join()
        dataplane.persistTurn()
        dataplane.fastPath?.shutdown(keep: keep)
        if keep {
            logger.notice("agent stopped; its sessions stay in the kernel and the state file for the next agent",
                          metadata: ["state.file": "\(dataplane.journal.file?.path ?? "-")"])
        } else {
            dataplane.processor.withLock { _ in dataplane.journal.remove() }
            logger.info("agent stopped")
        }
    }
}
