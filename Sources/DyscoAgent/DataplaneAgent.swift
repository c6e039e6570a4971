import AnchorBuffer
import DyscoCore
import CLinux
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// The NFQUEUE slow path of one host: binds the queue, installs the rules, runs the packet thread and the
/// expiry timer around a ``PacketProcessor`` (the state machine; this class is its thin shell), and answers
/// control requests. One agent per network namespace.
public final class DataplaneAgent: @unchecked Sendable {
    public struct Options: Sendable {
        public var queue: UInt16 = 7
        public var portRange: ClosedRange<UInt16> = 10000...29999
        public var settings = PacketProcessor.Settings()
        public var queueMaxLength: UInt32 = 8192
        public var controlSocketPath: String
        public var netns: String?
        /// Mirror established sessions into nftables (``FastPathWorker``); false: NFQUEUE only.
        public var fastPath = true
        /// Re-route locally sent packets the fast path rewrote: nil = only if this namespace has gateway routes.
        public var fastPathReroute: Bool?
        /// How often kernel counters are read for idle expiry of kernel-carried sessions.
        public var counterPollSeconds = 5
        /// The UDP port of the agents' control protocol (docs/CONTROL-PROTOCOL.md).
        public var controlPort: UInt16 = ControlMessage.port
        /// Bounds of the anchor buffer (docs/ARCHITECTURE.md, "Anchor buffering").
        public var bufferLimits = AnchorBuffer<HeldPacket>.Limits()
        /// Accept migrated firewall state (a new box of a stateful replacement); false refuses every import.
        public var acceptState = true
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

    /// Packets up to this size are copied to a scratch buffer with room for the Dysco trailer; larger ones
    /// (never a SYN) are rewritten in place in the receive buffer.
    static let smallPacketLimit = 1024
    static let scratchCapacity = 2048

    public let options: Options
    private let logger: Logger
    private let logLimiter = Mutex(LogRateLimiter())
    let processor: Mutex<PacketProcessor>
    // Confined to the packet thread once `start()` returns (init and deinit run before/after it).
    private let queueSocket: NetfilterQueueSocket
    private let rules: QueueRules
    private let startedAt = dysco_monotonic_ns()
    private let stopping = Atomic<Bool>(false)
    private let packetThreadDone = DispatchSemaphore(value: 0)
    private var timer: DispatchSourceTimer?
    private var control: ControlServer?
    private var fastPath: FastPathWorker?
    private var migration: MigrationEngine?
    private let wakeup: Wakeup
    /// Work for the packet thread (buffer releases), posted by other threads; see ``Wakeup``.
    private let packetWork = Mutex<[UInt64]>([])
    private let workPosted = Atomic<Bool>(false)
    // Confined to the packet thread.
    private var buffer: AnchorBuffer<HeldPacket>
    private var quietTimer: DispatchSourceTimer?
    private let quietQueue = DispatchQueue(label: "dysco-quiet")
    /// The quiet timer ticks (every 5 ms) only while some session is anchored here: an idle agent has no timer
    /// waking it 200 times a second (issue 21). Set under the processor's lock.
    private let quietTicking = Atomic<Bool>(false)
    /// Copies of the buffer's totals, written by the packet thread when it appends or releases, read by scrapes.
    private let bufferOccupancy = BufferOccupancy()
    /// The expiry compacted the table; the timer gives freed memory back to the OS.
    private let compactedPending = Atomic<Bool>(false)
    /// The Prometheus metrics and their HTTP endpoint (nil without `--metrics`).
    private let metrics: AgentMetrics?
    private var metricsServer: MetricsServer?
    /// The state file (nil without ``Options/stateFile``); used under the processor's lock.
    private var journal: StateJournal?
    /// The keys the kernel fails closed for; used under the processor's lock.
    private var ownership = KernelOwnership()
    /// What the start restored (its durations are in the "sessions restored" log line only).
    public private(set) var restoreReport = RestoreReport()

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

    /// Binds the queue and installs the rules. Throws a clear error when the queue cannot be bound (another
    /// agent holds it, or no CAP_NET_ADMIN) — and then installs nothing.
    public init(config: AgentConfig, options: Options, logger: Logger) throws {
        self.options = options
        self.logger = logger
        // Memory freed after a flood must go back to the OS (docs/ARCHITECTURE.md, "Floods and table bounds").
        dysco_malloc_fixed_thresholds()
        var settings = options.settings
        settings.fastPath = options.fastPath
        processor = Mutex(PacketProcessor(config: config, portRange: options.portRange, trust: options.trust,
                                          settings: settings))
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
        rules = QueueRules(queue: options.queue)
        wakeup = try Wakeup()
        buffer = AnchorBuffer(limits: options.bufferLimits)
        metrics = options.metrics.map { _ in AgentMetrics(logger: logger) }
        // The nftables table exists with the fast path off too: its owned sets make known sessions fail closed
        // while no agent runs.
        let reroute = options.fastPathReroute ?? RouteTable.hasGatewayRoutes(
            procNetRoute: (try? String(contentsOfFile: "/proc/net/route", encoding: .utf8)) ?? "")
        if options.fastPath { logger.info("kernel fast path on", metadata: ["fastpath.reroute": "\(reroute)"]) }
        let wakeup = wakeup
        let worker = try FastPathWorker(reroute: reroute, logger: logger, nudge: { wakeup.signal() }) { [weak self] outcome in
            self?.processor.withLock { state in
                state.fastPathInstalled(outcome.installed)
                state.fastPathFailed(outcome.failed)
            }
        }
        fastPath = worker
        try restoreOrReset(worker)
        let rulesStart = dysco_monotonic_ns()
        try rules.install(logger: logger)
        if restoreReport.restored > 0 {
            let rulesSeconds = Double(dysco_monotonic_ns() - rulesStart) / 1e9
            logger.notice("queue rules in place", metadata: ["state.rules_seconds": "\(rulesSeconds)"])
        }
    }

    /// Reads the state file and, if the kernel table is there too, puts the sessions back and rebuilds the table
    /// with the ones it carried (one transaction); otherwise starts with an empty table. Then the journal starts
    /// anew with a snapshot (docs/ARCHITECTURE.md, "Agent crash and restart").
    private func restoreOrReset(_ worker: FastPathWorker) throws {
        guard let path = options.stateFile else {
            try worker.reset()
            return
        }
        if options.fresh { unlink(path) }
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
                                                         fastPath: state.settings.fastPath)
                return (result, carried, ownership.update(result.restored, table: state.table).add)
            }
            restoreReport.restored = result.restored.count
            restoreReport.refused = result.refused.count
            restoreReport.badLines = contents.badLines
            restoreReport.kernel = carried.count
            let readSeconds = Double(dysco_monotonic_ns() - readStart) / 1e9
            let kernelStart = dysco_monotonic_ns()
            // The common case (a crash or an upgrade of the same format): the kernel has exactly these sessions and
            // keeps them untouched. Anything else (stray chains, closed sessions, an older format) is rebuilt.
            restoreReport.tableKept = listing.matches(carried)
            if restoreReport.tableKept {
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
                "state.kernel_seconds": "\(kernelSeconds)", "state.table_kept": "\(restoreReport.tableKept)",
            ])
        } else {
            if contents != nil {
                restoreReport.freshReason = "no kernel table (rebooted, or removed): the state file is stale"
                logger.warning("state file without a kernel table: starting empty", metadata: ["state.file": "\(path)"])
            }
            try worker.reset()
        }
        try processor.withLock { state in
            journal = try StateJournal(path: path, table: state.table)
            state.table.changed = []
            state.table.ownershipChanged = []
        }
    }

    /// Under the processor's lock: writes the records changed since the last call to the state file and returns
    /// the owned-key changes for the fast-path worker (nil when nothing changed).
    private func persist(_ state: inout PacketProcessor) -> (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)? {
        if let changed = state.table.changed, !changed.isEmpty {
            state.table.changed = []
            journal?.record(changed, table: state.table)
        }
        guard let owned = state.table.ownershipChanged, !owned.isEmpty else { return nil }
        state.table.ownershipChanged = []
        return ownership.update(owned, table: state.table)
    }

    /// Starts the packet thread, the expiry timer, the migration engine, the metrics endpoint (before the control
    /// socket, whose appearance tells that the agent is ready: a metrics port in use fails the start) and the
    /// control socket.
    public func start() throws {
        let thread = Thread { [self] in
            packetLoop()
            packetThreadDone.signal()
        }
        thread.name = "dysco-nfqueue"
        thread.stackSize = 1 << 20
        thread.start()

        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "dysco-expiry"))
        timer.schedule(deadline: .now() + 1, repeating: 1)
        var ticks = 0
        var lastTrimTick = -10
        var trimPending = false
        timer.setEventHandler { [self] in
            ticks += 1
            let now = dysco_monotonic_coarse_ns()
            if let fastPath, options.fastPath, ticks % max(options.counterPollSeconds, 1) == 0 {
                let active = fastPath.activeSessions()
                processor.withLock { $0.kernelActivity(active, now: now) }
            }
            let (effects, owned) = processor.withLock { state in (state.expire(now: now).effects, persist(&state)) }
            apply(effects, ownership: owned)
            reportSuppressedLogs()
            let compacted = compactedPending.exchange(false, ordering: .relaxed)
            // The table shrank after a flood: give the freed heap back to the OS (glibc keeps it otherwise), at
            // most every 10 s (malloc_trim walks every arena), outside the packet lock.
            if compacted || (ticks - lastTrimTick >= 10 && trimPending) {
                if ticks - lastTrimTick >= 10 {
                    let released = dysco_malloc_trim()
                    logger.info("session table compacted, freed memory returned to the OS",
                                metadata: ["memory.released": "\(released != 0)"])
                    lastTrimTick = ticks
                    trimPending = false
                } else {
                    trimPending = true
                }
            }
        }
        timer.resume()
        self.timer = timer
        let engine = try MigrationEngine(agent: self, trust: options.trust,
                                         settings: .init(controlPort: options.controlPort, acceptState: options.acceptState,
                                                        stateStore: options.stateStore),
                                         metrics: metrics, logger: logger)
        try engine.start()
        migration = engine
        // The drain's quiet rule needs a finer clock than the expiry timer. It ticks only while a session is
        // anchored (``applyFastPath(_:)`` starts it; it stops itself on the first tick with none).
        let quietTimer = DispatchSource.makeTimerSource(queue: quietQueue)
        quietTimer.schedule(deadline: .distantFuture)
        quietTimer.setEventHandler { [self] in
            let now = dysco_monotonic_coarse_ns()
            let effects = processor.withLock { state -> DataplaneEffects? in
                guard state.anchoring > 0 else {
                    quietTicking.store(false, ordering: .relaxed)
                    return nil
                }
                return state.checkQuietAnchors(now: now, quiet: engine.quietNanoseconds)
            }
            guard let effects else {
                // Unless an anchor started since (its start, queued behind this tick, schedules the timer again).
                if !quietTicking.load(ordering: .relaxed) { self.quietTimer?.schedule(deadline: .distantFuture) }
                return
            }
            apply(effects)
        }
        quietTimer.resume()
        self.quietTimer = quietTimer
        if let endpoint = options.metrics, let metrics {
            metricsServer = try MetricsServer(endpoint: endpoint, logger: logger) { [weak self] in
                guard let self else { return [] }
                return metrics.render(self.metricsReadings())
            }
        }
        control = try ControlServer(path: options.controlSocketPath) { [self] request in
            switch request.command {
            case .sessions:
                return (try? JSONEncoder().encode(snapshot(after: request.after, limit: request.limit))) ?? Data()
            case .hold: return (try? JSONEncoder().encode(ControlPathReply(sessions: hold(request.sessions ?? [])))) ?? Data()
            case .release:
                return (try? JSONEncoder().encode(ControlPathReply(sessions: release(request.sessions ?? [])))) ?? Data()
            case .policy:
                guard let policy = request.policy else { return Data(#"{"error":"policy without its parameters"}"#.utf8) }
                return (try? JSONEncoder().encode(self.policy(policy))) ?? Data()
            case .replace:
                guard let replace = request.replace else { return Data(#"{"error":"replace without its parameters"}"#.utf8) }
                if let problem = replace.problem {
                    return (try? JSONEncoder().encode(["error": problem])) ?? Data()
                }
                let report = await engine.replace(replace)
                return (try? JSONEncoder().encode(report)) ?? Data()
            }
        }
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
        let live = processor.withLock { state in
            state.table.records.values.contains { $0.closeDeadline == nil }
        }
        let keep = live && journal != nil && !options.cleanupOnExit
        if !keep {
            do { try QueueRules.remove(logger: logger) } catch {
                logger.error("could not remove NFQUEUE rules", metadata: ["error": "\(error)"])
            }
        }
        timer?.cancel()
        quietTimer?.cancel()
        control?.close()
        metricsServer?.close()
        migration?.stop()
        wakeup.signal()
        _ = packetThreadDone.wait(timeout: .now() + 2)
        let owned = processor.withLock { persist(&$0) }
        if let owned { fastPath?.submit([], ownership: owned) }
        fastPath?.shutdown(keep: keep)
        if keep {
            logger.notice("agent stopped; its sessions stay in the kernel and the state file for the next agent",
                          metadata: ["state.file": "\(journal?.path ?? "-")"])
        } else {
            processor.withLock { _ in journal?.remove() }
            logger.info("agent stopped")
        }
    }

    // MARK: - Policy at run time

    private let configLoads = Atomic<Int>(1)

    /// Shows, reloads or changes the cordons of the policy; an error leaves everything as it was.
    public func policy(_ request: PolicyRequest) -> PolicyReply {
        var failure: String?
        switch request.action {
        case .show: break
        case .reload:
            failure = reloadConfig()
        case .cordon:
            if let address = request.address {
                failure = processor.withLock { state -> String? in
                    do throws(Cordons.CordonError) {
                        try state.cordons.cordon(address, replacements: request.replacements ?? [])
                        return nil
                    } catch { return "\(error)" }
                }
                if failure == nil {
                    logger.notice("cordoned", metadata: ["cordon.address": "\(address)",
                                                         "cordon.replacements": "\(request.replacements ?? [])"])
                }
            } else {
                failure = "cordon: which box? (address missing)"
            }
        case .uncordon:
            if let address = request.address {
                if !processor.withLock({ $0.cordons.uncordon(address) }) { failure = "\(address) is not cordoned" }
            } else {
                failure = "uncordon: which box? (address missing)"
            }
        }
        let (config, cordons) = processor.withLock { ($0.config, $0.cordons.cordons) }
        return PolicyReply(configPath: options.configPath, config: config, cordons: cordons,
                           loads: configLoads.load(ordering: .relaxed), error: failure)
    }

    /// Reads the config file again (SIGHUP, `policy reload`): new sessions follow it, existing ones keep their
    /// chains, cordons stay. Returns the error (the old config stays in force) or nil.
    @discardableResult
    public func reloadConfig() -> String? {
        guard let path = options.configPath else { return "this agent was started without --config: nothing to reload" }
        do {
            let config = try AgentConfig.load(path: path)
            processor.withLock { $0.config = config }
            configLoads.add(1, ordering: .relaxed)
            logger.notice("config reloaded", metadata: ["config.path": "\(path)", "config.policies": "\(config.policies.count)"])
            return nil
        } catch {
            logger.error("config reload failed; the previous config stays", metadata: ["config.path": "\(path)", "error": "\(error)"])
            return "cannot reload \(path): \(error) (the previous config stays in force)"
        }
    }

    /// Takes sessions back to the slow path; returns once the kernel no longer rewrites them, so every later
    /// packet of theirs reaches this agent (atomic per session: one nftables transaction).
    public func hold(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        let (held, owned) = processor.withLock { state in (state.hold(ids), persist(&state)) }
        apply(held.effects, ownership: owned)
        fastPath?.flush()
        return held.held
    }

    /// Returns held sessions to the fast path (`path release`: installed before this returns, whatever the
    /// queue holds at that moment).
    public func release(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] {
        let (released, owned) = processor.withLock { state in (state.release(ids), persist(&state)) }
        apply(released.effects, ownership: owned)
        fastPath?.commitAll()
        return released.released
    }

    /// Runs a data-plane operation and queues its fast-path work: installs go at the packet thread's quiet
    /// point; ``flushFastPath()`` commits the removals (a hold) at once. The migration engine flushes once per
    /// batch.
    func applyFastPath(_ body: (inout PacketProcessor) -> DataplaneEffects) {
        let (effects, owned, startQuiet) = processor.withLock { state in
            let effects = body(&state)
            let startQuiet = state.anchoring > 0 && !quietTicking.exchange(true, ordering: .relaxed)
            return (effects, persist(&state), startQuiet)
        }
        apply(effects, ownership: owned)
        if startQuiet {
            quietQueue.async { [self] in quietTimer?.schedule(deadline: .now() + .milliseconds(5), repeating: .milliseconds(5)) }
        }
    }

    /// Commits every queued removal from the kernel (and what else queued for those sessions) and returns once
    /// the kernel has them (``FastPathWorker/flush()``).
    func flushFastPath() { fastPath?.flush() }

    /// Issues a session's held packets, in order, with the translations now in force (packet thread).
    func releaseBuffer(_ chainID: UInt64) {
        packetWork.withLock { $0.append(chainID) }
        workPosted.store(true, ordering: .releasing)
        wakeup.signal()
    }

    /// One page of the agent's snapshot (``AgentSnapshot/pageLimit`` sessions at most, ids after `after`).
    public func snapshot(after: UInt64? = nil, limit: Int? = nil) -> AgentSnapshot {
        let now = dysco_monotonic_coarse_ns()
        let limit = min(limit ?? AgentSnapshot.pageLimit, AgentSnapshot.pageLimit)
        var snapshot = processor.withLock { state in
            let page = state.snapshotSessions(now: now, after: after, limit: limit)
            var snapshot = AgentSnapshot(netns: options.netns, pid: getpid(), queue: options.queue, fastPath: options.fastPath,
                                         uptimeSeconds: Double(dysco_monotonic_ns() - startedAt) / 1e9,
                                         counters: state.counters, sessions: page.sessions)
            snapshot.total = state.table.records.count
            snapshot.next = page.more ? page.sessions.last?.id : nil
            return snapshot
        }
        snapshot.control = migration?.counters.withLock { $0 } ?? [:]
        return snapshot
    }

    /// What a scrape reads: the processor's counters and counts (a short hold of the packet lock, no session
    /// walk), the control counters, the kernel's packet total and the buffer's occupancy.
    func metricsReadings() -> AgentMetricCatalog.Readings {
        if options.fastPath { fastPath?.sampleKernelPackets() }
        let (counters, sessions, anchoring) = processor.withLock { ($0.counters, $0.table.records.count, $0.anchoring) }
        return AgentMetricCatalog.Readings(
            counters: counters, sessions: sessions, anchoring: anchoring,
            control: migration?.counters.withLock { $0 } ?? [:],
            fastPathPackets: fastPath?.kernelPackets.load(ordering: .relaxed) ?? 0,
            bufferPackets: bufferOccupancy.packets.load(ordering: .relaxed),
            bufferBytes: bufferOccupancy.bytes.load(ordering: .relaxed),
            bufferRefused: bufferOccupancy.refused.load(ordering: .relaxed),
            uptimeSeconds: Double(dysco_monotonic_ns() - startedAt) / 1e9)
    }

    // MARK: - Packet thread

    private func packetLoop() {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.scratchCapacity, alignment: 16)
        defer { scratch.deallocate() }
        var fds = [pollfd(fd: queueSocket.fileDescriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeup.fd, events: Int16(POLLIN), revents: 0)]
        while !stopping.load(ordering: .relaxed) {
            // Block until a packet or posted work (eventfd) arrives, or a fast-path commit is due.
            let ready = poll(&fds, 2, fastPath?.pollTimeout(now: dysco_monotonic_ns()) ?? -1)
            if ready < 0 { continue }
            if fds[1].revents != 0 {
                wakeup.drain()
                runPacketWork(scratch: scratch)
            }
            // Read what is waiting (bounded, so posted work is not starved under load).
            var queueEmpty = fds[0].revents == 0
            if !queueEmpty {
                for _ in 0..<64 {
                    do {
                        if try !queueSocket.receive({ packet in
                            // Posted releases first: a released session's held packets go before its later ones.
                            if workPosted.load(ordering: .relaxed) { runPacketWork(scratch: scratch) }
                            try handle(&packet, scratch: scratch)
                        }) {
                            queueEmpty = true
                            break
                        }
                    } catch {
                        if stopping.load(ordering: .relaxed) { break }
                        logger.error("nfqueue error", metadata: ["error": "\(error)"])
                        break
                    }
                }
            }
            if !packetWork.withLock({ $0.isEmpty }) { runPacketWork(scratch: scratch) }
            // The turn's table changes go to the state file once, after its verdicts (a record changed by several
            // packets of the turn is one line), and its owned-key changes to the worker.
            persistTurn()
            // Fast-path changes go to the kernel here, with no packet of ours left in the queue (FastPathWorker).
            fastPath?.commitIfDue(queueEmpty: queueEmpty, now: dysco_monotonic_ns())
        }
    }

    /// Writes what the packet thread's turn changed to the state file (docs/ARCHITECTURE.md, "Agent crash and
    /// restart": after the turn's verdicts, so a crash loses at most the changes of the packets of its last turn).
    private func persistTurn() {
        guard let owned = processor.withLock({ persist(&$0) }) else { return }
        fastPath?.submit([], ownership: owned)
    }

    /// Releases the buffers other threads asked for: each held packet goes through the processor again (now
    /// translated for the path in force) and gets its verdict, in the order it came.
    private func runPacketWork(scratch: UnsafeMutableRawPointer) {
        workPosted.store(false, ordering: .relaxed)
        let chains = packetWork.withLock { work in
            defer { work.removeAll() }
            return work
        }
        for chainID in chains {
            // On the packet thread, so no packet of the queue is handled between these two steps.
            processor.withLock { $0.endRelease(chainID: chainID) }
            let released = buffer.take(session: chainID)
            publishBufferOccupancy()
            for held in released {
                var bytes = held.bytes
                do {
                    // Not held twice: a session released is no longer buffering.
                    try bytes.withUnsafeMutableBytes { raw in
                        try handle(QueuedPacket(id: held.id, base: raw.baseAddress!, count: raw.count, capacity: raw.count,
                                                hook: held.hook, checksum: held.checksum, mayHold: false),
                                   now: dysco_monotonic_coarse_ns())
                    }
                } catch {
                    logger.error("verdict for a released packet failed", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    @inline(__always)
    private func handle(_ packet: inout NetfilterQueueSocket.Packet, scratch: UnsafeMutableRawPointer) throws {
        guard let payload = packet.payload, packet.length > 0 else {
            try queueSocket.verdict(id: packet.id, accept: true)
            return
        }
        let small = packet.length <= Self.smallPacketLimit
        let base = small ? scratch : payload
        if small { scratch.copyMemory(from: payload, byteCount: packet.length) }
        let queued = QueuedPacket(id: packet.id, base: base, count: packet.length,
                                  capacity: small ? Self.scratchCapacity : packet.length,
                                  hook: packet.hook == .preRouting ? .ingress : .egress,
                                  checksum: packet.checksumNotReady ? .partial : .complete, mayHold: true)
        let now = dysco_monotonic_coarse_ns()
        if packet.mark & (FastPathScript.observeIngressMark | FastPathScript.observeEgressMark) != 0 {
            // A FIN/RST the kernel rewrote: bookkeeping only, accepted as it is (already translated).
            let outcome = processor.withLock { state in
                let outcome = PacketOutcome(verdict: .accept,
                                            effects: state.observe(base, count: queued.count, hook: queued.hook, now: now).effects)
                state.counters.count(outcome.verdict)
                return outcome
            }
            try finish(queued, outcome)
            return
        }
        try handle(queued, now: now)
    }

    /// A packet through the processor, then its verdict and effects. The state file gets its changes (a new
    /// session, a FIN) at the end of the turn (``persistTurn()``).
    @inline(__always)
    private func handle(_ packet: QueuedPacket, now: UInt64) throws {
        let outcome = processor.withLock { state in
            let outcome = state.process(packet.base, count: packet.count, capacity: packet.capacity, hook: packet.hook,
                                        checksum: packet.checksum, now: now)
            state.counters.count(outcome.verdict)
            return outcome
        }
        try finish(packet, outcome)
    }

    /// The one place a verdict goes to the kernel, and then the effects to the rest of the agent.
    @inline(__always)
    private func finish(_ packet: QueuedPacket, _ outcome: PacketOutcome) throws {
        defer { apply(outcome.effects) }
        switch outcome.verdict {
        case .accept:
            try queueSocket.verdict(id: packet.id, accept: true)
        case .acceptModified(let length):
            try queueSocket.verdict(id: packet.id, accept: true, packet: UnsafeRawBufferPointer(start: packet.base, count: length))
        case .drop:
            try queueSocket.verdict(id: packet.id, accept: false)
        case .hold(let chainID):
            // A released packet is not held twice (its session no longer buffers); a full buffer's packet neither.
            guard packet.mayHold else {
                try queueSocket.verdict(id: packet.id, accept: true)
                return
            }
            // A migrating session's new data: keep the kernel's packet (no verdict) and a copy of its bytes.
            let held = HeldPacket(id: packet.id, bytes: [UInt8](UnsafeRawBufferPointer(start: packet.base, count: packet.count)),
                                  hook: packet.hook, checksum: packet.checksum)
            let appended = buffer.append(held, size: packet.count, session: chainID)
            publishBufferOccupancy()
            guard !appended else { return }
            // Full (documented bound): this packet and the rest go on the old path; the reconfiguration is
            // cancelled, which releases the buffer there too.
            var again = packet
            again.mayHold = false
            processor.withLock { $0.anchorStopHolding(chainID: chainID) }
            try handle(again, now: dysco_monotonic_coarse_ns())
            migration?.bufferFull(chainID)
        }
    }

    /// Everything a processor call produced besides its verdict, handled in one place: anchor observations to the
    /// migration engine, kernel work (and owned-key changes) to the fast-path worker, events to the log, a
    /// compacted table to the expiry timer (which gives the memory back).
    private func apply(_ effects: DataplaneEffects,
                       ownership: (add: KernelOwnership.Keys, remove: KernelOwnership.Keys)? = nil) {
        if effects.isEmpty, ownership == nil { return }
        if !effects.anchor.isEmpty { migration?.anchorEvents(effects.anchor) }
        fastPath?.submit(effects.fastPath, ownership: ownership)
        if !effects.events.isEmpty { log(effects.events) }
        if effects.compacted { compactedPending.store(true, ordering: .relaxed) }
    }

    /// The anchor buffer's occupancy for the metrics (the buffer is the packet thread's; readers get these copies).
    private func publishBufferOccupancy() {
        bufferOccupancy.packets.store(buffer.totalPackets, ordering: .relaxed)
        bufferOccupancy.bytes.store(buffer.totalBytes, ordering: .relaxed)
        bufferOccupancy.refused.store(buffer.refused, ordering: .relaxed)
    }

    private func log(_ events: [DataplaneEvent]) {
        for event in events {
            switch event {
            case .sessionCreated(let record):
                // Per-session events are debug: at info, formatting and writing them would sit between a
                // SYN's verdict and the SYN-ACK on a busy agent (connect latency).
                logger.debug("session created", metadata: [
                    "session.id": "\(record.id)", "session.role": "\(record.role.rawValue)",
                    "session.tuple": "\(record.session)", "subsession.left": "\(record.left.map { "\($0)" } ?? "-")",
                    "subsession.right": "\(record.right.map { "\($0)" } ?? "-")",
                ])
            case .sessionRemoved(let record, let reason):
                logger.debug("session removed", metadata: [
                    "session.id": "\(record.id)", "session.tuple": "\(record.session)", "session.reason": "\(reason)",
                    "session.packets": "\(record.packets)",
                ])
            case .malformedDyscoSyn(let tuple, let error):
                warnLimited("dropped malformed Dysco SYN", ["packet.tuple": "\(tuple)", "error": "\(error)"])
            case .untrustedDyscoSyn(let tuple, let error):
                warnLimited("dropped untrusted Dysco SYN", ["packet.tuple": "\(tuple)", "error": "\(error)"])
            case .rejected(let tuple, let reason):
                warnLimited("dropped SYN", ["packet.tuple": "\(tuple)", "reason": "\(reason)"])
            }
        }
    }

    /// A warning anyone on the segment can trigger: rate-limited per message (``LogRateLimiter``), the lines
    /// left out counted in `log.suppressed` of the next one (or in a line of their own once the window ends).
    private func warnLimited(_ message: Logger.Message, _ metadata: Logger.Metadata) {
        let decision = logLimiter.withLock { $0.admit(message.description, now: dysco_monotonic_coarse_ns()) }
        guard case .log(let suppressed) = decision else { return }
        var metadata = metadata
        if suppressed > 0 { metadata["log.suppressed"] = "\(suppressed)" }
        logger.warning(message, metadata: metadata)
    }

    /// Lines suppressed in windows that ended without another line of their kind (the expiry timer calls it).
    private func reportSuppressedLogs() {
        for report in logLimiter.withLock({ $0.takeReports(now: dysco_monotonic_coarse_ns()) }) {
            logger.warning("log lines suppressed", metadata: ["log.message": "\(report.kind)", "log.suppressed": "\(report.suppressed)"])
        }
    }
}


/// The anchor buffer's totals as the packet thread last published them.
final class BufferOccupancy: Sendable {
    let packets = Atomic<Int>(0)
    let bytes = Atomic<Int>(0)
    let refused = Atomic<UInt64>(0)
}

/// A packet on its way through the processor: where its bytes are (the scratch buffer, the receive buffer, a
/// released copy) and what the processor needs to know.
struct QueuedPacket {
    var id: UInt32
    var base: UnsafeMutableRawPointer
    var count: Int
    var capacity: Int
    var hook: HookPoint
    var checksum: ChecksumState
    /// False for a packet released from the anchor buffer, or refused by a full one: it is not held (again).
    var mayHold: Bool
}

/// A packet an anchor holds: its NFQUEUE id (no verdict yet) and its bytes as they came (untranslated).
public struct HeldPacket: Sendable {
    var id: UInt32
    var bytes: [UInt8]
    var hook: HookPoint
    var checksum: ChecksumState
}

extension DataplaneAgent {
    /// What ``purge(queue:logger:stateFile:)`` removed.
    public struct PurgeReport: Sendable, Codable {
        public var rules = false
        public var table = false
        public var stateFile = false
    }

    /// Removes what a stopped agent left for its successor (`agent --purge`): the NFQUEUE rules, the kernel table
    /// and the state file; the sessions they carried are then lost. Refused while an agent holds `queue`.
    public static func purge(queue: UInt16, logger: Logger, stateFile: String) throws -> PurgeReport {
        // Root gets EPERM (not EBUSY) for a queue another socket has bound.
        do { _ = try NetfilterQueueSocket(queue: queue) } catch let error as SystemCallError
            where error.errno == EBUSY || error.errno == EPERM {
            throw ControlError(message: "an agent is running on queue \(queue) in this namespace (binding it: \(error)); "
                               + "stop it first (SIGTERM)")
        }
        var report = PurgeReport()
        report.rules = QueueRules.present()
        try QueueRules.remove(logger: logger)
        let nft = try NftablesContext()
        report.table = (try? nft.json("list table ip \(FastPathScript.table)")) != nil
        try nft.run(FastPathScript.destroy, operation: "delete table")
        report.stateFile = unlink(stateFile) == 0
        unlink(stateFile + ".tmp")
        return report
    }
}
