import CLinux
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import MigrationCoordinator
import NIOCore
import Synchronization

/// The thin shell around ``MigrationCoordinator``: decodes and checks control messages, feeds events in, and
/// performs the actions that come out (UDP sends, timers, operations of its ``MigrationDataplane``, conntrack
/// export/import). Results of actions go back in as events,
/// in order, before the next outside event.
final class MigrationEngine: @unchecked Sendable {
    struct Settings: Sendable {
        var controlPort: UInt16 = ControlMessage.port
        /// The quiet rule of the drain (AnchorState): no packet for this long means nothing is in flight.
        var quietNanoseconds: UInt64 = 20_000_000
        /// This box accepts migrated firewall state (`--accept-state`); false refuses every import.
        var acceptState = true
        /// The firewall's per-session state (nil: this agent cannot take part in stateful migrations as a box).
        var stateStore: (any FirewallStateStore)?
        /// Freshness windows of received control messages (issue 20).
        var freshness = FreshnessChecker.Settings()
        /// Control-protocol versions taken (issue 19, rolling upgrade); a message goes out as the oldest of them that
        /// carries it (``ControlMessage/minimumVersion``).
        var wireVersions: ClosedRange<UInt8> = ControlMessage.versions
        /// IPv6 sessions' control messages too (`agent --ipv6`): an IPv6 control socket beside the IPv4 one.
        var ipv6 = false
    }

    private let trust: TrustGroup
    let logger: Logger
    private let settings: Settings
    /// The data plane whose sessions this engine reconfigures (it does not own the engine).
    let dataplane: any MigrationDataplane
    /// The event loops of the UDP control plane (the agent's shared group; nil: one of its own).
    private let eventLoopGroup: (any EventLoopGroup)?
    let coordinator: Mutex<MigrationCoordinator>
    /// Serializes event handling (one event and the events its actions produce at a time).
    let loop = DispatchQueue(label: "dysco-migration")
    private let conntrackQueue = DispatchQueue(label: "dysco-conntrack")
    private var control: ControlPlane?
    let probes: RawPacketSender
    private let timers = Mutex<[TimerKey: UInt64]>([:])
    private let timerGeneration = Atomic<UInt64>(0)
    /// The `replace` callers waiting, by (chain id, request id).
    private struct ReportKey: Hashable { var chainID: UInt64; var requestID: UInt32 }
    private let reports = Mutex<[ReportKey: AsyncStream<TriggerResult>.Continuation]>([:])
    let counters = Mutex<[String: UInt64]>([:])
    /// Migration results and phase latencies for `--metrics` (nil without).
    private let metrics: AgentMetrics?
    /// Freshness of control messages (issue 20, docs/CONTROL-PROTOCOL.md "Freshness"): the stamp of every message
    /// this agent sends (a random sender id per run, a counter per receiver, the wall-clock time), and the
    /// check of every message it receives. Touched only on `loop`.
    private var stamper = ControlStamper()
    private var freshness: FreshnessChecker
    private var freshnessSweptAt: UInt64 = 0
    /// ackLocks a spliced-out proxy holds back until its sockets are empty (MigrationEngine+Splice.swift), by chain.
    /// Touched only on `loop`.
    var spliceGates: [UInt64: SpliceGate] = [:]
    /// A joined proxy's drains under way (``receiveProxyDrain(_:from:)``): the request each one answers.
    var proxyDrains: [UInt64: UInt32] = [:]

    init(dataplane: any MigrationDataplane, trust: TrustGroup, settings: Settings, metrics: AgentMetrics? = nil,
         eventLoopGroup: (any EventLoopGroup)? = nil, logger: Logger) throws {
        self.dataplane = dataplane
        self.eventLoopGroup = eventLoopGroup
        self.metrics = metrics
        self.trust = trust
        self.settings = settings
        self.logger = logger
        coordinator = Mutex(MigrationCoordinator())
        freshness = FreshnessChecker(startedAt: dysco_realtime_us(), settings: settings.freshness)
        probes = try RawPacketSender()
    }

    func start() throws {
        let loop = loop
        control = try ControlPlane(port: settings.controlPort, group: eventLoopGroup, ipv6: settings.ipv6) { [weak self] bytes, from, destination in
            guard let engine = self else { return }
            loop.async { engine.receive(bytes, from: from, destination: destination) }
        }
    }

    func stop() {
        control?.close()
        loop.sync {}
    }

    func count(_ name: String) {
        counters.withLock { $0[name, default: 0] += 1 }
    }

    private func add(_ name: String, _ value: UInt64) {
        counters.withLock { $0[name, default: 0] += value }
    }

    // MARK: - Inputs

    /// One datagram: every message it carries (ControlMessage.frames) is checked on its own, and those that
    /// pass are handled in one turn (see ``dispatch(_:)``).
    private func receive(_ bytes: [UInt8], from: IPAddress, destination: IPAddress?) {
        guard !from.isForbiddenHop else { count("dropped.forbidden-address"); return }
        var events: [Event] = []
        let now = dysco_realtime_us()
        if now &- freshnessSweptAt > 1_000_000 {
            freshnessSweptAt = now
            freshness.forgetSilent(now: now)
        }
        for decoded in ControlMessage.decodeAll(bytes, trust: trust, accepting: settings.wireVersions) {
            switch decoded {
            case .failure(let error):
                count("dropped.\(error.counterName)")
                logger.debug("dropped control message", metadata: ["control.from": "\(from)", "control.error": "\(error)"])
            case .success(let message):
                // Authenticated; now fresh? (issue 20: a recorded message sent again is dropped, whatever it is.)
                if let refusal = freshness.admit(message.stamp, destination: destination, nowMicros: now) {
                    count("dropped.replayed")
                    logger.debug("dropped control message", metadata: [
                        "control.from": "\(from)", "control.type": "\(message.body.type)",
                        "control.error": "replayed (\(refusal.rawValue))"])
                    continue
                }
                if let event = accept(message, from: from, to: destination) { events.append(event) }
            }
        }
        if events.count > 1 { count("received.bundles") }
        dispatch(events)
    }

    /// The engine's checks of a decoded message against its record of the session (nonce, tuple).
    private func accept(_ message: ControlMessage, from: IPAddress, to destination: IPAddress?) -> Event? {
        // A session known by two chains' names (a joined proxy, a right anchor after the proxy left): in its own.
        guard let message = ownName(message) else { return nil }
        let context = sessionContext(message.identity.chainID)
        if let context {
            guard context.identity.nonce == message.identity.nonce else { count("dropped.wrong-nonce"); return nil }
            // A box before this host renamed the session (NAT): the left end's name for it is unknown here.
            guard context.session == message.session || context.renamedUpstream else {
                count("dropped.wrong-session")
                return nil
            }
            if case .splice(let notice) = message.body {
                receiveSpliceNotice(message, notice, from: from)
                return nil
            }
            if case .drainStart = message.body, message.rightAnchor != context.me,
               dataplane.session(chainID: message.identity.chainID)?.record.spliced != nil {
                receiveProxyDrain(message, from: from)
                return nil
            }
            if case .cancelLock = message.body { spliceGates[message.identity.chainID] = nil }
        } else {
            guard coordinator.withLock({ $0.acceptsWithoutSession(message, to: destination) }) else {
                count("dropped.unknown-session")
                return nil
            }
        }
        count("received.\(message.body.type)")
        return .message(message, from: from, context: context, to: destination)
    }

    /// The data plane's observations (from the packet thread and the timer).
    func anchorEvents(_ events: [AnchorEvent]) {
        guard !events.isEmpty else { return }
        loop.async { [self] in
            dispatch(events.map { event in
                switch event {
                case .drained(let chainID): .drained(chainID: chainID)
                case .newPathPacket(let chainID): .newPathPacket(chainID: chainID, context: sessionContext(chainID))
                }
            })
        }
    }

    func bufferFull(_ chainID: UInt64) {
        loop.async { [self] in dispatch([.bufferFull(chainID: chainID)]) }
    }

    var quietNanoseconds: UInt64 { settings.quietNanoseconds }

    /// `replace`, `remove` and `insert` at this agent (the controller, §3.1): the first old box (replace, remove) or
    /// the box after which new ones go (insert). Asks each session's left anchor to move it, waits for all. The
    /// triggers go out in one turn, so sessions that share a left anchor travel in one datagram and the hops handle
    /// them as a batch (see ``dispatch(_:)``).
    func replace(_ request: ReplaceRequest) async -> ReplaceReport {
        let started = ContinuousClock.now
        let candidates = dataplane.sessions { record in
            // A session this agent anchors for another reconfiguration is a candidate too: its left anchor or a
            // lock on the segment refuses the second request (§3.2), and the report says so.
            (record.role == .middlebox || (request.insertHere && record.role == .leftEnd))
                && record.closeDeadline == nil
                && request.predicate.matches(record.session)
                && (request.chains.map { $0.contains(record.identity.chainID) } ?? true)
        }.sorted { $0.id < $1.id }.prefix(request.limit ?? .max)
        var results: [ReplaceReport.Session] = []
        var triggers: [(SessionTable.Record, Event, ReportKey)] = []
        for record in candidates {
            let chainID = record.identity.chainID
            switch Self.segment(of: record, request) {
            case .failure(let reason):
                metrics?.controllerRefused()
                results.append(.init(record.session, chainID: chainID,
                                     TriggerResult(outcome: .refused, reason: reason.reason, failedStep: .lock)))
            case .success(let (context, trigger, leftAnchor)):
                let requestID = UInt32.random(in: 1 ... .max)
                triggers.append((record, .replaceRequested(context, trigger: trigger, leftAnchor: leftAnchor, requestID: requestID),
                                 ReportKey(chainID: chainID, requestID: requestID)))
            }
        }
        let moved = await withTaskGroup(of: ReplaceReport.Session.self) { group in
            let registered = triggers.map { (record, _, key) in
                let (stream, continuation) = AsyncStream.makeStream(of: TriggerResult.self)
                reports.withLock { $0[key] = continuation }
                return (record, stream)
            }
            let events = triggers.map(\.1)
            loop.async { [self] in dispatch(events) }
            for (record, stream) in registered {
                group.addTask {
                    var iterator = stream.makeAsyncIterator()
                    let result = await iterator.next()
                        ?? TriggerResult(outcome: .cancelled, reason: "the agent stopped", failedStep: .lock)
                    return .init(record.session, chainID: record.identity.chainID, result)
                }
            }
            var collected: [ReplaceReport.Session] = []
            for await result in group { collected.append(result) }
            return collected
        }
        results += moved
        let elapsed = ContinuousClock.now - started
        return ReplaceReport(sessions: results.sorted { $0.session.description < $1.session.description },
                             matched: candidates.count,
                             elapsedMicroseconds: UInt64(elapsed.components.seconds) * 1_000_000
                                + UInt64(elapsed.components.attoseconds / 1_000_000_000_000))
    }

    /// The segment a request reconfigures for one session at this agent (the controller), paper §3: its left
    /// anchor, the trigger (new path ending at the right anchor, the state's source, the mode), and this agent's
    /// context. The right anchor of a k → m replacement (several old boxes) is the last old box's right neighbour,
    /// which the command read from that box's agent (`rightAnchors`); this box's right neighbour must be the
    /// second old box.
    static func segment(of record: SessionTable.Record, _ request: ReplaceRequest)
        -> Result<(SessionContext, Trigger, IPAddress), ReconfigureRefusal> {
        // Each session takes the boxes of its own family (a request may name every box once per family).
        let ipv4 = record.session.srcAddr.isIPv4
        guard let request = request.forFamily(ipv4: ipv4) else {
            return .failure(ReconfigureRefusal(
                "the request names no \(ipv4 ? "IPv4" : "IPv6") address for a box, and the session is \(ipv4 ? "IPv4" : "IPv6") (name each box's \(ipv4 ? "IPv4" : "IPv6") address too)"))
        }
        guard let right = record.rightNeighbour,
              let me = record.right?.srcAddr ?? record.left?.dstAddr else {
            return .failure(ReconfigureRefusal("the session has no complete path here"))
        }
        // A box that translates moves with its NAT binding (the stateful import re-keys the new box's right side).
        if record.translated != nil, request.mode != .stateful {
            return .failure(ReconfigureRefusal(SessionContext.translatingBoxStatelessRefusal))
        }
        let context = SessionContext(identity: record.identity, session: record.session, me: me,
                                     leftNeighbour: record.leftNeighbour, rightNeighbour: right, hopDelta: record.hopDelta)
        let leftAnchor: IPAddress
        let rightAnchor: IPAddress
        if request.insertHere {
            // Insertion (§3: the old path is one subsession): this agent is the left anchor.
            leftAnchor = me
            rightAnchor = right
        } else {
            guard let left = record.leftNeighbour else {
                return .failure(ReconfigureRefusal("the session has no complete path here"))
            }
            leftAnchor = left
            if request.alsoOld.isEmpty {
                rightAnchor = right
            } else if right != request.alsoOld[0] {
                return .failure(ReconfigureRefusal(
                    "the old boxes \(([me] + request.alsoOld).map(\.description).joined(separator: ",")) are not this session's path (after \(me) it goes to \(right))"))
            } else if let known = request.rightAnchors?[chainKey(record.identity.chainID)] {
                rightAnchor = known
            } else {
                return .failure(ReconfigureRefusal(
                    "the right anchor is unknown: the last old box \(request.alsoOld.last!) did not list the session"))
            }
        }
        if record.spliced != nil, request.mode != .held || !request.newBoxes.isEmpty || !request.alsoOld.isEmpty {
            // A joined proxy leaves only held, alone and without a replacement: its release waits for it to empty
            // (docs/ARCHITECTURE.md, "Session-terminating proxies").
            return .failure(ReconfigureRefusal(
                "this box is a session-terminating proxy (its two sessions joined): it is removed alone and held (remove --box without --stateless)"))
        }
        let newPath = request.newBoxes + [rightAnchor]
        if let clash = request.newBoxes.first(where: { $0 == leftAnchor || $0 == rightAnchor || $0 == me || request.alsoOld.contains($0) }) {
            return .failure(ReconfigureRefusal("\(clash) is on the session's path already"))
        }
        var source = me
        if request.mode == .stateful {
            if request.insertHere {
                // An inserted box that needs state gets it from a donor, one of the anchors (which keeps its own).
                guard let donor = request.donor, donor == leftAnchor || donor == rightAnchor else {
                    return .failure(ReconfigureRefusal(request.donor == nil
                        ? "a stateful insertion needs a donor (--state-from): an inserted box has no state of a live session"
                        : "the donor must be an anchor of the segment (\(leftAnchor) or \(rightAnchor))"))
                }
                source = donor
            } else if let donor = request.donor {
                guard donor == me || request.alsoOld.contains(donor) else {
                    return .failure(ReconfigureRefusal("the donor \(donor) is not one of the old boxes"))
                }
                source = donor
            }
        }
        let trigger = Trigger(newPath: newPath, oldBox: source, mode: request.mode,
                              deadlineMilliseconds: request.deadlineMilliseconds)
        return .success((context, trigger, leftAnchor))
    }

    // MARK: - The loop: a turn (MigrationTurn) is a batch of events and the events their actions produce

    /// Anchors that took their session off the fast path in the current turn: they elicit numbers once the
    /// turn's kernel changes are committed (touched only on `loop`).
    private var heldThisTurn: [UInt64] = []

    /// Handles `events` as one ``MigrationTurn`` (which orders everything: actions at once, the commit, then the
    /// messages). Runs on `loop` only.
    func dispatch(_ events: [Event]) {
        guard !events.isEmpty else { return }
        let turnStarted = dysco_monotonic_ns()
        defer { add("turns.micros", (dysco_monotonic_ns() - turnStarted) / 1000); add("turns", 1) }
        MigrationTurn.run(events, performer: self) { event in
            let actions = coordinator.withLock { $0.handle(event, now: dysco_monotonic_ns()) }
            if logger.logLevel <= .debug {
                logger.debug("migration event", metadata: ["migration.event": "\(String(describing: event).prefix(300))",
                                                           "migration.actions": "\(actions.map { String(describing: $0).prefix(160) })"])
            }
            return actions
        }
        elicitHeld()
    }

    private func sessionContext(_ chainID: UInt64) -> SessionContext? {
        guard let (record, me) = dataplane.session(chainID: chainID) else { return nil }
        var context = SessionContext(identity: record.identity, session: record.session, me: me,
                                     leftNeighbour: record.leftNeighbour, rightNeighbour: record.rightNeighbour,
                                     carried: record.bytes > record.packets &* UInt64(IPv4TCPPacket.pureAckLength),
                                     hopDelta: record.hopDelta,
                                     ending: record.finForward || record.finReverse || record.closeDeadline != nil)
        context.translates = record.translated != nil
        context.translatesDestination = record.translated.map {
            $0.dstAddr != record.session.dstAddr || $0.dstPort != record.session.dstPort
        } ?? false
        context.renamedUpstream = record.renamedUpstream
        return context
    }

    private func pathEvent(_ chainID: UInt64, _ result: Result<FiveTuple, SessionTable.InsertError>) -> Event {
        .path(chainID, result)
    }

    /// Elicits numbers for the anchors that held their session this turn (after the commit, if one came).
    private func elicitHeld() {
        let held = heldThisTurn
        heldThisTurn.removeAll()
        for chainID in held {
            elicit(chainID)
            elicitAgain(chainID, remaining: Self.elicitRetries)
        }
    }

    // MARK: - ActionPerformer: the coordinator's actions, as ``MigrationTurn`` orders them (on `loop` only)

    func commitKernel() {
        let flushStarted = dysco_monotonic_ns()
        dataplane.commitHolds()
        add("turns.flush.micros", (dysco_monotonic_ns() - flushStarted) / 1000)
    }

    /// Stamps, encodes and sends the turn's messages, those to the same agent bundled in as few datagrams as fit
    /// (``ControlMessage/bundle(_:limit:)``).
    func transmit(_ messages: [(to: IPAddress, message: ControlMessage)]) { transmit(messages, renamed: false) }

    /// `renamed`: ``spliceOutgoing(_:releasing:)`` has been applied already.
    func transmit(_ messages: [(to: IPAddress, message: ControlMessage)], renamed: Bool) {
        var order: [IPAddress] = []
        var byDestination: [IPAddress: [[UInt8]]] = [:]
        for (to, message) in renamed ? messages : spliceOutgoing(messages) {
            // The emit rule (ControlMessage.minimumVersion): the oldest version this agent speaks that carries it.
            let version = max(message.minimumVersion, settings.wireVersions.lowerBound)
            guard settings.wireVersions.contains(version) else {
                count("unsent.version")
                logger.debug("control message not sent: its version is not spoken here", metadata: [
                    "control.to": "\(to)", "control.type": "\(message.body.type)", "control.version": "\(version)"])
                continue
            }
            count("sent.\(message.body.type)")
            if let metrics, case .triggerResult(let result) = message.body {
                metrics.leftAnchorFinished(chainID: message.identity.chainID, requestID: message.requestID, result)
            }
            var stamped = message
            stamped.stamp = stamper.stamp(to: to, nowMicros: dysco_realtime_us())
            if byDestination[to] == nil { order.append(to) }
            byDestination[to, default: []].append(stamped.encode(trust: trust, version: version))
        }
        for to in order {
            let encoded = byDestination[to] ?? []
            let datagrams = ControlMessage.bundle(encoded)
            if datagrams.count < encoded.count { count("sent.bundles") }
            for datagram in datagrams { control?.send(datagram, to: to) }
        }
    }

    func perform(_ action: Action) -> Event? {
        let now = dysco_monotonic_ns()
        switch action {
        case .send, .commitKernel:
            preconditionFailure("MigrationTurn keeps sends and barriers")
        case .setTimer(let key, let after):
            let generation = timerGeneration.add(1, ordering: .relaxed).newValue
            timers.withLock { $0[key] = generation }
            loop.asyncAfter(deadline: .now() + .nanoseconds(Int(min(after, UInt64(Int.max))))) { [self] in
                guard timers.withLock({ $0[key] == generation ? $0.removeValue(forKey: key) : nil }) != nil else { return }
                dispatch([.timer(key)])
            }
        case .cancelTimer(let key):
            timers.withLock { _ = $0.removeValue(forKey: key) }
        case .hold(let chainID, let side, let stateful):
            dataplane.hold(chainID: chainID, side: side, stateful: stateful, now: now)
            heldThisTurn.append(chainID)
        case .setPhase(let chainID, let phase):
            let needsNumbers = dataplane.setPhase(chainID: chainID, phase)
            if needsNumbers, phase == .buffering || phase == .released { elicit(chainID) }
            if phase == .buffering || phase == .released { poke(chainID, remaining: PokeSchedule.pokes) }
        case .setDelta(let chainID, let delta):
            dataplane.setDelta(chainID: chainID, delta)
        case .openPath(let chainID, let next):
            return pathEvent(chainID, dataplane.openPath(chainID: chainID, next: next))
        case .addPath(let chainID, let subsession):
            return pathEvent(chainID, dataplane.addPath(chainID: chainID, subsession: subsession))
        case .createSession(let identity, let session, let left, let next):
            return pathEvent(identity.chainID, dataplane.createSession(identity: identity, session: session, left: left, next: next))
        case .markEstablished(let chainID):
            dataplane.markEstablished(chainID: chainID)
        case .translate(let chainID, let tuple):
            dataplane.translate(chainID: chainID, tuple)
        case .promote(let chainID):
            dataplane.promote(chainID: chainID)
        case .sendProbe(let chainID):
            sendProbe(chainID)
        case .releaseBuffer(let chainID):
            dataplane.releaseHeld(chainID: chainID)
            unclamp(chainID)
        case .finishAnchor(let chainID):
            unclamp(chainID)
            // Back to the kernel on the new path: committed at the packet thread's quiet point (no wait here).
            dataplane.finish(chainID: chainID)
        case .cancelAnchor(let chainID):
            unclamp(chainID)
            dataplane.cancel(chainID: chainID)
            dataplane.releaseHeld(chainID: chainID)
        case .removeSession(let chainID, let deleteConntrack):
            let record = dataplane.session(chainID: chainID)?.record
            dataplane.leave(chainID: chainID, reason: "left the path (reconfiguration)")
            if deleteConntrack, let session = record?.session { deleteState(session) }
            if let record, let splice = record.spliced {
                // Not before the anchors have dropped the old path and the kernel here has forgotten the session's
                // translations: the proxy's answer to the FINs must not reach an endpoint.
                let sockets = [record.session.reversed, splice.session]
                loop.asyncAfter(deadline: .now() + .milliseconds(Self.spliceCloseDelay)) { [self] in closeProxySockets(sockets) }
            }
        case .exportState(let chainID, let requestID, let session):
            exportState(chainID: chainID, requestID: requestID, session: session)
        case .importState(let chainID, let requestID, let document):
            importState(chainID: chainID, requestID: requestID, document: document)
        case .report(let chainID, let requestID, let result):
            count("migrations.\(result.outcome)")
            metrics?.controllerFinished(result)
            let continuation = reports.withLock { $0.removeValue(forKey: ReportKey(chainID: chainID, requestID: requestID)) }
            continuation?.yield(result)
            continuation?.finish()
        }
        return nil
    }


    /// Builds a packet with the data plane and sends it through the raw socket, counting
    /// `<name>.sent` / `<name>.failed` / `<name>.unknown-numbers`.
    private func sendBuilt(_ name: String, _ chainID: UInt64,
                           _ build: (UnsafeMutableRawPointer) -> (Int, IPAddress)?) {
        withUnsafeTemporaryAllocation(byteCount: PureAck.maxLength, alignment: 16) { buffer in
            let base = buffer.baseAddress!
            guard let (length, destination) = build(base) else {
                count("\(name).unknown-numbers")
                return
            }
            do {
                try probes.send(UnsafeRawBufferPointer(start: base, count: length), to: destination)
                count("\(name).sent")
            } catch {
                count("\(name).failed")
                logger.warning("\(name) not sent", metadata: ["session.chain": "\(String(chainID, radix: 16))", "error": "\(error)"])
            }
        }
    }

    /// Makes the local endpoint announce its numbers (``PacketProcessor/anchorElicit(chainID:into:)``).
    private func elicit(_ chainID: UInt64) {
        sendBuilt("elicits", chainID) { dataplane.buildElicit(chainID: chainID, into: $0) }
    }

    /// Ends the anchor's zero-window clamp: the local endpoint gets a window update with the far side's real
    /// window (``PacketProcessor/anchorUnclamp(chainID:into:)``).
    private func unclamp(_ chainID: UInt64) {
        sendBuilt("window-updates", chainID) { dataplane.buildWindowUpdate(chainID: chainID, into: $0) }
    }

    /// Linux answers the elicit's SYN with a challenge ACK at most once per 500 ms per socket
    /// (net.ipv4.tcp_invalid_ratelimit): a session moved again within 500 ms of its last move (issue 20: back to
    /// back) gets no answer, and an anchor whose endpoint is silent then never learns the numbers its probes
    /// need ("no probe came back on the new path"). So the anchor elicits again every 100 ms while it lacks them,
    /// at most this many times (the deadline ends the migration first).
    static let elicitRetries = 40

    private func elicitAgain(_ chainID: UInt64, remaining: Int) {
        loop.asyncAfter(deadline: .now() + .milliseconds(100)) { [self] in
            guard remaining > 0, dataplane.lacksProbeNumbers(chainID: chainID) else { return }
            count("elicits.again")
            elicit(chainID)
            elicitAgain(chainID, remaining: remaining - 1)
        }
    }

    /// Sessions with a poke chain running.
    private let poking = Atomic<Int>(0)

    /// Keeps the far endpoint acknowledging until this anchor's old path is drained
    /// (``PacketProcessor/anchorPoke(chainID:into:)``); when and how often is ``PokeSchedule``'s.
    private func poke(_ chainID: UInt64, remaining: Int) {
        if remaining == PokeSchedule.pokes { poking.add(1, ordering: .relaxed) }
        let result = withUnsafeTemporaryAllocation(byteCount: PureAck.maxLength, alignment: 16) { buffer in
            let base = buffer.baseAddress!
            let result = dataplane.buildPoke(chainID: chainID, into: base)
            if case .sent(let length, let destination, _) = result {
                try? probes.send(UnsafeRawBufferPointer(start: base, count: length), to: destination)
                count("pokes.sent")
                if PokeSchedule.isSlow(remaining: remaining) {
                    let state = dataplane.session(chainID: chainID)?.record.migration
                    logger.debug("anchor still draining after \(PokeSchedule.slowAfter) pokes",
                                 metadata: ["anchor.state": "\(state.map { "\($0)" } ?? "-")"])
                }
            }
            return result
        }
        guard case .again(let left) = PokeSchedule.next(after: result, remaining: remaining) else {
            poking.subtract(1, ordering: .relaxed)
            return
        }
        let wait = PokeSchedule.interval(activeSessions: poking.load(ordering: .relaxed))
        loop.asyncAfter(deadline: .now() + .microseconds(wait)) { [self] in poke(chainID, remaining: left) }
    }

    /// A window-opening probe on the new path (``PacketProcessor/anchorProbe(chainID:into:)``).
    private func sendProbe(_ chainID: UInt64) {
        sendBuilt("probes", chainID) { base in
            dataplane.buildProbe(chainID: chainID, into: base).map { length in
                (length, PureAck.destination(of: base))
            }
        }
    }

    // MARK: - The firewall's state (FirewallStateStore: conntrack via ConntrackState in the product)

    /// Exports and imports are group-committed: requests that arrive while the conntrack queue is busy wait
    /// and then run as one job, whose results come back to the loop as one turn (one bundle of statePut /
    /// stateInstalled messages per peer).
    private enum StateJob {
        case export(chainID: UInt64, requestID: UInt32, session: FiveTuple)
        case `import`(chainID: UInt64, requestID: UInt32, document: [UInt8])
    }
    private let stateJobs = Mutex<[StateJob]>([])

    private func exportState(chainID: UInt64, requestID: UInt32, session: FiveTuple) {
        enqueue(.export(chainID: chainID, requestID: requestID, session: session))
    }

    private func importState(chainID: UInt64, requestID: UInt32, document bytes: [UInt8]) {
        enqueue(.import(chainID: chainID, requestID: requestID, document: bytes))
    }

    private func enqueue(_ job: StateJob) {
        let first = stateJobs.withLock { jobs in
            defer { jobs.append(job) }
            return jobs.isEmpty
        }
        guard first else { return }
        conntrackQueue.async { [self] in
            let jobs = stateJobs.withLock { jobs in
                defer { jobs.removeAll() }
                return jobs
            }
            let jobStarted = dysco_monotonic_ns()
            let results = jobs.map(run)
            add("state-jobs", 1)
            add("state-jobs.items", UInt64(jobs.count))
            add("state-jobs.micros", (dysco_monotonic_ns() - jobStarted) / 1000)
            loop.async { [self] in dispatch(results) }
        }
    }

    private func run(_ job: StateJob) -> Event {
        let started = dysco_monotonic_ns()
        func micros() -> UInt32 { UInt32(clamping: (dysco_monotonic_ns() - started) / 1000) }
        switch job {
        case .export(let chainID, let requestID, let session):
            let result: Result<[UInt8], StepFailure>
            if let store = settings.stateStore {
                do { result = .success(try store.exportState(session: session)) } catch {
                    result = .failure(StepFailure("\(error)"))
                }
            } else {
                result = .failure(StepFailure("this agent has no firewall state store"))
            }
            return .stateExported(chainID: chainID, requestID: requestID, result, micros: micros())
        case .import(let chainID, let requestID, let bytes):
            let result: Result<FiveTuple?, StepFailure>
            if !settings.acceptState {
                result = .failure(StepFailure("this box does not accept migrated state (agent --accept-state no)"))
            } else if let store = settings.stateStore {
                // The session's tuple as the imported binding makes it (NAT), for the re-key before the answer.
                do {
                    let translations = try store.importState(bytes)
                    let session = dataplane.session(chainID: chainID)?.record.session
                    let leaves = session.flatMap { translations[$0] }
                    result = .success(leaves == session ? nil : leaves)
                } catch {
                    result = .failure(StepFailure("\(error)"))
                }
            } else {
                result = .failure(StepFailure("this agent has no firewall state store"))
            }
            return .stateImported(chainID: chainID, requestID: requestID, result, micros: micros())
        }
    }

    private func deleteState(_ session: FiveTuple) {
        guard let store = settings.stateStore else { return }
        conntrackQueue.async { store.deleteState(session: session) }
    }

    // MARK: - Inspection

    func migrationRoles(_ chainID: UInt64) -> [Role] { coordinator.withLock { $0.role(of: chainID) } }
}

extension MigrationEngine: ActionPerformer {}

/// A chain id as `sessions --json` and ``ReplaceRequest/rightAnchors`` write it (hex).
public func chainKey(_ chainID: UInt64) -> String { String(chainID, radix: 16) }

/// Why the controller refuses to reconfigure one session (it reports it, nothing is sent).
struct ReconfigureRefusal: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

/// A reconfiguration asked of this agent as controller (§3.1): `replace` (this box and `alsoOld` by `newBoxes`),
/// `remove` (this box and `alsoOld` by none) or `insert` (`newBoxes` after this host: `insertHere`).
public struct ReplaceRequest: Codable, Sendable {
    /// Which of this box's sessions: a predicate on the session tuple (empty: all).
    public var predicate: SessionPredicate
    /// The new middleboxes, in order (empty: a deletion). The right anchor is each session's right neighbour (after
    /// `alsoOld`, for k → m).
    public var newBoxes: [IPAddress]
    public var mode: TransferMode
    public var deadlineMilliseconds: UInt32
    /// At most this many sessions (nil: all that match).
    public var limit: Int?
    /// Only these sessions, by chain id (nil: every session the predicate matches). `drain` names its batches so.
    public var chains: Set<UInt64>?
    /// Insertion: this host is the left anchor, the old path is its right subsession (no old box).
    public var insertHere: Bool
    /// The old boxes after this one, in path order (k → m; empty: this box alone).
    public var alsoOld: [IPAddress]
    /// Where the state comes from (stateful): for an insertion, an anchor (required); otherwise one of the old boxes
    /// (nil: this box).
    public var donor: IPAddress?
    /// The donor's address of the other family (a dual-stack donor named in both; ``forFamily(ipv4:)`` keeps the one of
    /// the session's family).
    public var alsoDonor: IPAddress?
    /// With several old boxes: each session's right anchor (the last old box's right neighbour), by chain id in hex
    /// (``chainKey(_:)``), as that box's agent listed them.
    public var rightAnchors: [String: IPAddress]?

    /// Whether both anchors hold new data (stateful or held).
    public var stateful: Bool { mode != .stateless }

    /// The request for a session of one family: the boxes of that family, in order (a request may list each box
    /// once per family, e.g. a dual-stack box's IPv4 and IPv6 addresses). Nil when it names boxes but none of this
    /// family: the session would otherwise lose its old box with no replacement.
    public func forFamily(ipv4: Bool) -> ReplaceRequest? {
        var request = self
        func keep(_ list: [IPAddress]) -> [IPAddress] { list.filter { $0.isIPv4 == ipv4 } }
        request.newBoxes = keep(newBoxes)
        request.alsoOld = keep(alsoOld)
        let donors = [donor, alsoDonor].compactMap { $0 }
        request.donor = donors.first { $0.isIPv4 == ipv4 }
        request.alsoDonor = nil
        if request.newBoxes.isEmpty, !newBoxes.isEmpty { return nil }
        if request.alsoOld.isEmpty, !alsoOld.isEmpty { return nil }
        if !donors.isEmpty, request.donor == nil { return nil }
        return request
    }

    /// Why an agent refuses this request before doing anything (nil: it is fine): nothing to do, or a box that no
    /// packet may be sent through (``IPAddress/isForbiddenHop``).
    public var problem: String? {
        if insertHere && newBoxes.isEmpty { return "insert: name at least one box to insert" }
        if insertHere && !alsoOld.isEmpty { return "insert: an insertion has no old box" }
        if newBoxes.count + 1 > ControlBody.maxPathAddresses {
            return "at most \(ControlBody.maxPathAddresses - 1) new boxes"
        }
        if let bad = (newBoxes + alsoOld + (donor.map { [$0] } ?? [])).first(where: \.isForbiddenHop) {
            return "\(bad) cannot be a box (loopback, multicast, broadcast, unspecified or link-local)"
        }
        if !insertHere && newBoxes.isEmpty && mode == .stateful {
            return "remove: no box is left to take the state (use held or stateless)"
        }
        if Set(newBoxes).count != newBoxes.count { return "a new box is named twice" }
        return nil
    }

    public init(predicate: SessionPredicate, newBoxes: [IPAddress], mode: TransferMode, deadlineMilliseconds: UInt32,
                limit: Int? = nil, chains: Set<UInt64>? = nil, insertHere: Bool = false, alsoOld: [IPAddress] = [],
                donor: IPAddress? = nil, alsoDonor: IPAddress? = nil, rightAnchors: [String: IPAddress]? = nil) {
        self.rightAnchors = rightAnchors
        self.chains = chains
        self.predicate = predicate
        self.newBoxes = newBoxes
        self.mode = mode
        self.deadlineMilliseconds = deadlineMilliseconds
        self.limit = limit
        self.insertHere = insertHere
        self.alsoOld = alsoOld
        self.donor = donor
        self.alsoDonor = alsoDonor
    }

    public init(predicate: SessionPredicate, newBoxes: [IPAddress], stateful: Bool, deadlineMilliseconds: UInt32,
                limit: Int? = nil, chains: Set<UInt64>? = nil) {
        self.init(predicate: predicate, newBoxes: newBoxes, mode: stateful ? .stateful : .stateless,
                  deadlineMilliseconds: deadlineMilliseconds, limit: limit, chains: chains)
    }
}

/// What `replace` reports: per session the outcome and the latency of each phase.
public struct ReplaceReport: Codable, Sendable {
    public struct Phases: Codable, Sendable, Equatable {
        /// Microseconds each phase took (lock, new path, drain, state = export + transfer + import, release,
        /// teardown), the boxes' own export and import times, and the transfer (state − export − import).
        public var lock, newPath, drain, state, release, teardown: UInt32
        public var export, transfer, `import`: UInt32
        /// Trigger at the left anchor → release: the migration's latency.
        public var total: UInt32
        /// The paper's measure (§5.3): new-path SYN sent → new path first used.
        public var paper: UInt32

        init?(_ times: PhaseTimes?) {
            guard let t = times else { return nil }
            func delta(_ end: UInt32, after previous: UInt32) -> UInt32 { end &- min(end, previous) }
            lock = t.lockEnd
            newPath = delta(t.newPathEnd, after: t.lockEnd)
            drain = delta(t.drainEnd, after: t.newPathEnd)
            state = delta(t.stateEnd, after: t.drainEnd)
            release = t.releaseEnd >= t.stateEnd ? t.releaseEnd - t.stateEnd : 0
            teardown = t.teardownEnd &- min(t.teardownEnd, max(t.releaseEnd, t.stateEnd))
            export = t.exportMicroseconds; `import` = t.importMicroseconds
            transfer = state &- min(state, export &+ `import`)
            total = t.releaseEnd
            paper = t.newPathSynToUse
        }
    }

    public struct Session: Codable, Sendable {
        public var session: FiveTuple
        public var chainID: String
        /// moved, cancelled or refused.
        public var result: String
        public var reason: String
        public var failedStep: String
        public var phases: Phases?

        init(_ session: FiveTuple, chainID: UInt64, _ result: TriggerResult) {
            self.session = session
            self.chainID = String(chainID, radix: 16)
            self.result = "\(result.outcome)"
            reason = result.reason
            failedStep = result.failedStep?.rawValue ?? ""
            phases = Phases(result.phases)
        }
    }

    public var sessions: [Session]
    public var matched: Int
    public var elapsedMicroseconds: UInt64

    public var allMoved: Bool { sessions.allSatisfy { $0.result == "moved" } }
}
