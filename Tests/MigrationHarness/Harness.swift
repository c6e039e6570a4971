import DyscoCore
import MigrationCoordinator

// An in-memory harness for whole reconfigurations (paper §3): one MigrationCoordinator per agent, a simulated
// network (loss, duplication, reordering by random delays) and a virtual clock, and a fake data plane per agent
// that answers the data-plane actions the way DyscoAgent.MigrationEngine and PacketProcessor+Anchor do.
// A test-support target (Tests/MigrationHarness, not a test target): its API is `package`, for any test target of
// this package (MigrationCoordinatorTests today; the engine's tests may drive it too).

// MARK: - Hosts and sessions

package enum Host {
    package static let client = IPAddress(10, 0, 0, 1)
    package static let fw1 = IPAddress(10, 0, 0, 2)
    package static let fw2 = IPAddress(10, 0, 0, 3)
    package static let fw3 = IPAddress(10, 0, 0, 4)
    package static let fw4 = IPAddress(10, 0, 0, 5)
    package static let server = IPAddress(10, 0, 0, 9)

    package static let names: [IPAddress: String] = [
        client: "client", fw1: "fw1", fw2: "fw2", fw3: "fw3", fw4: "fw4", server: "server",
    ]

    package static func name(_ address: IPAddress) -> String { names[address] ?? "\(address)" }
}

/// The session of every scenario: client:40000 → server:80, with a fixed identity.
package enum TestSession {
    package static let identity = SessionIdentity(chainID: 0x5EED_D15C_0000_0001, nonce: 0xA11C_E5B0_B000_0042)
    package static let tuple = FiveTuple(srcAddr: Host.client, srcPort: 40000, dstAddr: Host.server, dstPort: 80)
    package static var chainID: UInt64 { identity.chainID }

    /// The contexts of the agents of a chain (first: left end, last: right end).
    package static func contexts(_ chain: [IPAddress]) -> [IPAddress: SessionContext] {
        var contexts: [IPAddress: SessionContext] = [:]
        for (i, host) in chain.enumerated() {
            contexts[host] = SessionContext(identity: identity, session: tuple, me: host,
                                            leftNeighbour: i > 0 ? chain[i - 1] : nil,
                                            rightNeighbour: i + 1 < chain.count ? chain[i + 1] : nil)
        }
        return contexts
    }
}

/// SplitMix64: small, seedable, good enough for schedules.
package struct SeededRNG: RandomNumberGenerator {
    package var state: UInt64
    package init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 &+ 0x1234_5678 }
    package mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    package mutating func chance(_ p: Double) -> Bool { p > 0 && Double.random(in: 0..<1, using: &self) < p }
}

// MARK: - Trace

/// One step of a run: an event handled by one agent's coordinator and the actions it returned, or something
/// the network or the fake data plane did (agent "net" / "dataplane"). Kept for checking against a Spin model.
public struct TraceEntry: Sendable, Equatable, CustomStringConvertible {
    /// Virtual nanoseconds since the start of the run.
    public var time: UInt64
    public var agent: String
    public var event: String
    public var actions: [String]

    public var description: String {
        let head = "\(Self.format(time)) \(agent): \(event)"
        return actions.isEmpty ? head : head + "\n" + actions.map { "        -> \($0)" }.joined(separator: "\n")
    }

    package static func format(_ ns: UInt64) -> String {
        let micros = ns / 1000
        let ms = micros / 1000, frac = micros % 1000
        return "[\(ms).\(String(repeating: "0", count: 3 - String(frac).count))\(frac)ms]"
    }
}

/// The event trace of one harness run.
public struct Trace: Sendable, Equatable, CustomStringConvertible {
    public var entries: [TraceEntry] = []
    public init(entries: [TraceEntry] = []) { self.entries = entries }
    public var description: String { entries.map(\.description).joined(separator: "\n") }
    /// Only the coordinator steps of one agent.
    public func of(_ agent: String) -> [TraceEntry] { entries.filter { $0.agent == agent } }
}

package enum Describe {
    package static func addresses(_ list: [IPAddress]) -> String { "[" + list.map(Host.name).joined(separator: ",") + "]" }

    package static func message(_ m: ControlMessage) -> String {
        let body: String
        switch m.body {
        case .trigger(let t):
            body = "trigger(newPath: \(addresses(t.newPath)), oldBox: \(Host.name(t.oldBox)), stateful: \(t.stateful), deadline: \(t.deadlineMilliseconds)ms)"
        case .triggerResult(let r): body = "triggerResult(\(result(r)))"
        case .requestLock(let d): body = "requestLock(rightDelta: \(d))"
        case .ackLock(let l, let r): body = "ackLock(leftDelta: \(l), rightDelta: \(r))"
        case .nackLock(let reason): body = "nackLock(\(reason))"
        case .cancelLock(let reason): body = "cancelLock(\"\(reason)\")"
        case .ackCancel: body = "ackCancel"
        case .newPathSyn(let s, let remaining): body = "newPathSyn(\(s), remaining: \(addresses(remaining)))"
        case .newPathSynAck(let s): body = "newPathSynAck(\(s))"
        case .newPathCancel: body = "newPathCancel"
        case .newPathCancelAck: body = "newPathCancelAck"
        case .newPathRefused(let reason): body = "newPathRefused(\"\(reason)\")"
        case .drainStart(let stateful): body = "drainStart(stateful: \(stateful))"
        case .drained: body = "drained"
        case .stateRequest(let newBox): body = "stateRequest(newBox: \(Host.name(newBox)))"
        case .statePut(let document): body = "statePut(\(document.count) bytes)"
        case .stateInstalled(let ok, let times, let reason):
            body = "stateInstalled(ok: \(ok), export: \(times.exportMicroseconds), import: \(times.importMicroseconds), \"\(reason)\")"
        case .oldPathFin: body = "oldPathFin"
        case .oldPathFinAck: body = "oldPathFinAck"
        case .splice(let n): body = "splice(tsDelta: \(n.tsDelta), alias: \(n.alias.map { "\($0.session)" } ?? "none"))"
        }
        return "\(body) req=\(m.requestID) L=\(Host.name(m.leftAnchor)) R=\(Host.name(m.rightAnchor))"
    }

    package static func result(_ r: TriggerResult) -> String {
        r.outcome == .moved && r.reason.isEmpty
            ? "moved, phases: \(r.phases.map { "\($0)" } ?? "none")"
            : "\(r.outcome), step: \(r.failedStep.map(\.rawValue) ?? ""), reason: \"\(r.reason)\""
    }

    package static func key(_ k: TimerKey) -> String { "\(k.role).\(k.kind)" }

    package static func event(_ e: Event) -> String {
        switch e {
        case .replaceRequested(_, let t, let leftAnchor, let requestID):
            "replaceRequested(req=\(requestID), leftAnchor: \(Host.name(leftAnchor)), newPath: \(addresses(t.newPath)), oldBox: \(Host.name(t.oldBox)), stateful: \(t.stateful))"
        case .message(let m, let from, let context, _):
            "recv \(message(m)) from \(Host.name(from))\(context == nil ? " (no session here)" : "")"
        case .timer(let k): "timer \(key(k))"
        case .drained: "drained"
        case .proxyOnSegment(_, let requestID, let proxy): "proxyOnSegment(req=\(requestID), proxy: \(Host.name(proxy)))"
        case .newPathPacket: "newPathPacket"
        case .bufferFull: "bufferFull"
        case .pathOpened(_, let s): "pathOpened(\(s))"
        case .pathRefused(_, let reason): "pathRefused(\(reason))"
        case .stateExported(_, let requestID, let r, _):
            switch r {
            case .success(let d): "stateExported(req=\(requestID), \(d.count) bytes)"
            case .failure(let f): "stateExported(req=\(requestID), failed: \(f))"
            }
        case .stateImported(_, let requestID, let r, _):
            switch r {
            case .success: "stateImported(req=\(requestID), ok)"
            case .failure(let f): "stateImported(req=\(requestID), refused: \(f))"
            }
        }
    }

    package static func action(_ a: Action) -> String {
        switch a {
        case .send(let m, let to): "send \(message(m)) to \(Host.name(to))"
        case .setTimer(let k, let after): "setTimer \(key(k)) +\(TraceEntry.format(after))"
        case .cancelTimer(let k): "cancelTimer \(key(k))"
        case .hold(_, let side, let stateful): "hold(side: \(side), stateful: \(stateful))"
        case .commitKernel: "commitKernel"
        case .translate(_, let t): "translate(\(t))"
        case .setPhase(_, let phase): "setPhase(\(phase))"
        case .setDelta(_, let d): "setDelta(\(d))"
        case .openPath(_, let next): "openPath(next: \(Host.name(next)))"
        case .addPath(_, let s): "addPath(\(s))"
        case .createSession(_, _, let left, let next): "createSession(left: \(left), next: \(Host.name(next)))"
        case .markEstablished: "markEstablished"
        case .promote: "promote"
        case .sendProbe: "sendProbe"
        case .releaseBuffer: "releaseBuffer"
        case .finishAnchor: "finishAnchor"
        case .cancelAnchor: "cancelAnchor"
        case .removeSession(_, let deleteConntrack): "removeSession(deleteConntrack: \(deleteConntrack))"
        case .exportState(_, let requestID, let s): "exportState(req=\(requestID), \(s))"
        case .importState(_, let requestID, let d): "importState(req=\(requestID), \(d.count) bytes)"
        case .report(_, let requestID, let r): "report(req=\(requestID), \(result(r)))"
        }
    }

    /// The name of an action's case (for "which agent did what" checks).
    package static func kind(_ a: Action) -> String {
        switch a {
        case .send: "send"
        case .setTimer: "setTimer"
        case .cancelTimer: "cancelTimer"
        case .hold: "hold"
        case .commitKernel: "commit"
        case .translate: "translate"
        case .setPhase(_, let phase): "setPhase.\(phase)"
        case .setDelta: "setDelta"
        case .openPath: "openPath"
        case .addPath: "addPath"
        case .createSession: "createSession"
        case .markEstablished: "markEstablished"
        case .promote: "promote"
        case .sendProbe: "sendProbe"
        case .releaseBuffer: "releaseBuffer"
        case .finishAnchor: "finishAnchor"
        case .cancelAnchor: "cancelAnchor"
        case .removeSession: "removeSession"
        case .exportState: "exportState"
        case .importState: "importState"
        case .report: "report"
        }
    }
}

/// One coordinator step as the harness saw it: the event, the actions, and the agent's lock of the session
/// before and after (SegmentLock is public state) and its left-anchor step after (nil if it leads none).
package struct HarnessStep {
    package var time: UInt64
    package var agent: IPAddress
    package var event: Event
    package var actions: [Action]
    package var lockBefore: SegmentLock?
    package var lockAfter: SegmentLock?
    package var leftAnchorStep: MigrationStep?
}

// MARK: - Harness

package final class Harness {
    package struct Config {
        package var seed: UInt64 = 1
        /// Probability that a control message is lost / delivered twice.
        package var loss = 0.0
        package var duplicate = 0.0
        /// One-way delay of a control message or probe hop, uniform in this range (reordering comes from it).
        package var delay: ClosedRange<UInt64> = 100_000...1_000_000
        /// From setPhase(buffering) (or stateless released) to the data plane's drained.
        package var drainDelay: ClosedRange<UInt64> = 500_000...3_000_000
        /// Duration of a conntrack export or import.
        package var stateDelay: ClosedRange<UInt64> = 200_000...800_000
        /// Hosts that drop everything addressed to them (control messages and probes).
        package var down: Set<IPAddress> = []
        package var exportFailure: [IPAddress: String] = [:]
        package var importRefusal: [IPAddress: String] = [:]
        package var settings = MigrationCoordinator.Settings()
        /// A run handling more events than this is reported as exhausted (a livelock).
        package var eventLimit = 100_000
        /// Rewrites a control message on its way (from, to): e.g. an old-path middlebox that changes the byte
        /// stream and so adds its delta to requestLock / ackLock (§3.4).
        package var tamper: ((ControlMessage, IPAddress, IPAddress) -> ControlMessage)?

        package init() {}
    }

    /// What the fake data plane keeps for a session this agent anchors (PacketProcessor+Anchor's AnchorState).
    package struct FakeAnchor {
        package var side: SessionTable.Side
        package var stateful: Bool
        package var phase: AnchorState.Phase = .locked
        package var promoted = false
        package var drainedReported = false
        package var delta: Int32 = 0
        /// The neighbour on the anchor's side on the old path and, once opened, on the new one.
        package var oldNeighbour: IPAddress?
        package var newNeighbour: IPAddress?
    }

    package final class Agent {
        package let address: IPAddress
        package var name: String { Host.name(address) }
        package var coordinator: MigrationCoordinator
        package var context: SessionContext?
        package var anchor: FakeAnchor?
        package var timers: [TimerKey: UInt64] = [:]
        package var nextPort: UInt16 = 30000
        /// Every action the coordinator returned here, in order.
        package var actions: [Action] = []
        package var reports: [(requestID: UInt32, result: TriggerResult)] = []
        package var imported: [[UInt8]] = []
        /// The fake kernel: a hold not yet committed (``Action/commitKernel``), and sends that went before it.
        package var kernel = Barrier()
        package init(address: IPAddress, settings: MigrationCoordinator.Settings, context: SessionContext?) {
            self.address = address
            coordinator = MigrationCoordinator(settings: settings)
            self.context = context
        }
        package func did(_ kind: String) -> Bool { actions.contains { Describe.kind($0) == kind } }
        package func count(_ kind: String) -> Int { actions.filter { Describe.kind($0) == kind }.count }
    }

    /// The ordering rule of ``Action/commitKernel`` (paper §3.2, §3.5): a message never leaves while a kernel
    /// change before it (a hold) is not committed. The harness runs each agent's actions in order through one
    /// of these, like the shell does.
    package struct Barrier: Sendable {
        /// A hold came and no commitKernel since.
        package private(set) var uncommitted = false
        /// Sends that left before the hold before them was committed.
        package private(set) var violations: [String] = []
        package init() {}

        package mutating func perform(_ action: Action) {
            switch action {
            case .hold: uncommitted = true
            case .commitKernel: commit()
            case .send(let m, let to): transmit(m, to: to)
            default: break
            }
        }

        package mutating func commit() { uncommitted = false }

        package mutating func transmit(_ m: ControlMessage, to: IPAddress) {
            if uncommitted { violations.append("\(Describe.message(m)) to \(Host.name(to)) before the hold was committed") }
        }

        /// The violations of `actions` run in order from a committed kernel.
        package static func violations(_ actions: [Action]) -> [String] {
            var barrier = Barrier()
            for action in actions { barrier.perform(action) }
            return barrier.violations
        }
    }

    package enum Pending {
        case deliver(ControlMessage, to: IPAddress, from: IPAddress)
        case timer(IPAddress, TimerKey, generation: UInt64)
        case drainCheck(IPAddress, chainID: UInt64)
        case probe(to: IPAddress, chainID: UInt64)
        case result(IPAddress, Event)
        case replace(IPAddress, Trigger, leftAnchor: IPAddress, requestID: UInt32)
        /// An event handed to an agent's coordinator as it is (messages get the agent's current context).
        case inject(IPAddress, Event)
    }

    package struct Scheduled { var time: UInt64; var seq: UInt64; var item: Pending }

    /// What a run leaves behind.
    package struct RunResult {
        package var trace: Trace
        /// Reports of the controllers, by request id.
        package var reports: [UInt32: (controller: IPAddress, result: TriggerResult)]
        package var events: Int
        package var exhausted: Bool
        package var endTime: UInt64
        package var dropped: Int
        package var duplicated: Int
    }

    package var config: Config
    package var rng: SeededRNG
    package var agents: [IPAddress: Agent] = [:]
    private var heap: [Scheduled] = []
    private var seq: UInt64 = 0
    package private(set) var now: UInt64 = 0
    package private(set) var trace = Trace()
    /// Every coordinator step of the run, structured (ConformanceTests replays them against model/transitions.tsv).
    package private(set) var steps: [HarnessStep] = []
    private var events = 0
    private var dropped = 0
    private var duplicated = 0
    private var nextRequestID: UInt32 = 100

    /// `chain`: the session's path (left end first); `others`: hosts not on it (new boxes).
    package init(chain: [IPAddress], others: [IPAddress], config: Config = Config()) {
        self.config = config
        rng = SeededRNG(seed: config.seed)
        let contexts = TestSession.contexts(chain)
        for host in chain + others {
            agents[host] = Agent(address: host, settings: config.settings, context: contexts[host])
        }
    }

    package subscript(_ host: IPAddress) -> Agent { agents[host]! }

    // MARK: Scheduling

    private func schedule(_ item: Pending, after: UInt64) {
        seq += 1
        heap.append(Scheduled(time: now &+ after, seq: seq, item: item))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(heap[i], heap[parent]) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    private func less(_ a: Scheduled, _ b: Scheduled) -> Bool { (a.time, a.seq) < (b.time, b.seq) }

    private func pop() -> Scheduled? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count, less(heap[l], heap[m]) { m = l }
            if r < heap.count, less(heap[r], heap[m]) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return top
    }

    private func randomDelay(_ range: ClosedRange<UInt64>) -> UInt64 { UInt64.random(in: range, using: &rng) }

    private func note(_ agent: String, _ event: String) {
        trace.entries.append(TraceEntry(time: now, agent: agent, event: event, actions: []))
    }

    // MARK: Driving

    /// `replace` at `controller` after `after` ns: move the session to `newPath` (new boxes, then the right anchor).
    @discardableResult
    package func replace(at controller: IPAddress, leftAnchor: IPAddress, newPath: [IPAddress], oldBox: IPAddress,
                 stateful: Bool, deadlineMilliseconds: UInt32 = 2000, after: UInt64 = 0) -> UInt32 {
        replace(at: controller, leftAnchor: leftAnchor, newPath: newPath, oldBox: oldBox, mode: stateful ? .stateful : .stateless,
                deadlineMilliseconds: deadlineMilliseconds, after: after)
    }

    /// `replace` with a transfer mode (issue 17: stateless, stateful, held).
    @discardableResult
    package func replace(at controller: IPAddress, leftAnchor: IPAddress, newPath: [IPAddress], oldBox: IPAddress,
                 mode: TransferMode, deadlineMilliseconds: UInt32 = 2000, after: UInt64 = 0) -> UInt32 {
        nextRequestID += 1
        let trigger = Trigger(newPath: newPath, oldBox: oldBox, mode: mode, deadlineMilliseconds: deadlineMilliseconds)
        schedule(.replace(controller, trigger, leftAnchor: leftAnchor, requestID: nextRequestID), after: after)
        return nextRequestID
    }

    /// Hands `event` to `host`'s coordinator after `after` ns (a `.message` gets the host's context then).
    package func inject(_ event: Event, at host: IPAddress, after: UInt64 = 0) {
        schedule(.inject(host, event), after: after)
    }

    /// Runs until no event is left (or the event limit is hit).
    package func run() -> RunResult {
        var exhausted = false
        while let next = pop() {
            now = next.time
            events += 1
            if events > config.eventLimit { exhausted = true; break }
            process(next.item)
        }
        var reports: [UInt32: (IPAddress, TriggerResult)] = [:]
        for agent in agents.values { for r in agent.reports { reports[r.requestID] = (agent.address, r.result) } }
        return RunResult(trace: trace, reports: reports, events: events, exhausted: exhausted, endTime: now,
                         dropped: dropped, duplicated: duplicated)
    }

    private func contextFor(_ host: IPAddress, _ chainID: UInt64) -> SessionContext? {
        guard let c = agents[host]?.context, c.identity.chainID == chainID else { return nil }
        return c
    }

    private func process(_ item: Pending) {
        switch item {
        case .deliver(let m, let to, let from):
            guard !config.down.contains(to), agents[to] != nil else {
                note("net", "lost at \(Host.name(to)) (down): \(Describe.message(m)) from \(Host.name(from))")
                return
            }
            let context = contextFor(to, m.identity.chainID)
            if let context {
                guard context.identity == m.identity, context.session == m.session else {
                    note(Host.name(to), "dropped (wrong nonce or session): \(Describe.message(m))")
                    return
                }
            } else {
                // MigrationEngine.receive: the same rule for a session this host does not know.
                guard agents[to]?.coordinator.acceptsWithoutSession(m, to: to) == true else {
                    note(Host.name(to), "dropped (unknown session): \(Describe.message(m)) from \(Host.name(from))")
                    return
                }
            }
            dispatch(to, .message(m, from: from, context: context, to: to))
        case .timer(let host, let key, let generation):
            guard let agent = agents[host], agent.timers[key] == generation else { return }  // cancelled or re-armed
            agent.timers[key] = nil
            dispatch(host, .timer(key))
        case .drainCheck(let host, let chainID):
            guard let agent = agents[host], var anchor = agent.anchor, !anchor.drainedReported,
                  anchor.phase == .buffering || (anchor.phase == .released && !anchor.stateful) else { return }
            anchor.drainedReported = true
            agent.anchor = anchor
            dispatch(host, .drained(chainID: chainID))
        case .probe(let to, let chainID):
            guard let agent = agents[to], let anchor = agent.anchor, anchor.newNeighbour != nil,
                  anchor.phase != .released else {
                note("dataplane", "probe at \(Host.name(to)) not reported (not anchoring, or released)")
                return
            }
            dispatch(to, .newPathPacket(chainID: chainID, context: contextFor(to, chainID)))
        case .result(let host, let event):
            dispatch(host, event)
        case .replace(let host, let trigger, let leftAnchor, let requestID):
            guard let context = agents[host]?.context else {
                // MigrationEngine.replace: the session is not at this agent (any more): nothing is asked.
                let result = TriggerResult(outcome: .refused, reason: "the session is not at this agent",
                                           failedStep: .lock)
                agents[host]?.reports.append((requestID, result))
                note(Host.name(host), "replace req=\(requestID): no session here (refused by the shell)")
                return
            }
            dispatch(host, .replaceRequested(context, trigger: trigger, leftAnchor: leftAnchor, requestID: requestID))
        case .inject(let host, let event):
            if case .message(let m, let from, _, _) = event {
                dispatch(host, .message(m, from: from, context: contextFor(host, m.identity.chainID), to: host))
            } else {
                dispatch(host, event)
            }
        }
    }

    /// One turn of the agent at `host`, run by the shell's own ``MigrationTurn`` (the order of actions, the commit
    /// and the sends is the engine's, not re-implemented here); the harness only records and performs.
    private func dispatch(_ host: IPAddress, _ first: Event) {
        let agent = agents[host]!
        MigrationTurn.run([first], performer: TurnPerformer(harness: self, agent: agent)) { event in
            let lockBefore = agent.coordinator.locks[TestSession.chainID]
            let actions = agent.coordinator.handle(event, now: now)
            steps.append(HarnessStep(time: now, agent: agent.address, event: event, actions: actions, lockBefore: lockBefore,
                                     lockAfter: agent.coordinator.locks[TestSession.chainID],
                                     leftAnchorStep: agent.coordinator.leftAnchorStep(TestSession.chainID)))
            trace.entries.append(TraceEntry(time: now, agent: agent.name, event: Describe.event(event),
                                            actions: actions.map(Describe.action)))
            agent.actions.append(contentsOf: actions)
            return actions
        }
    }

    /// The harness's side of a turn: the fake data plane and network of one agent.
    private final class TurnPerformer: ActionPerformer {
        unowned let harness: Harness
        let agent: Agent
        init(harness: Harness, agent: Agent) {
            self.harness = harness
            self.agent = agent
        }
        func perform(_ action: Action) -> Event? { harness.perform(agent, action) }
        func commitKernel() { agent.kernel.commit() }
        func transmit(_ messages: [(to: IPAddress, message: ControlMessage)]) {
            for (to, message) in messages {
                agent.kernel.transmit(message, to: to)
                harness.send(message, from: agent.address, to: to)
            }
        }
    }

    // MARK: The fake data plane (MigrationEngine.perform)

    private func freshPort(_ agent: Agent) -> UInt16 {
        agent.nextPort &+= 1
        return agent.nextPort
    }

    /// Every send that left an agent before its hold was committed (empty: the ordering rule held).
    package var barrierViolations: [String] {
        agents.values.flatMap { agent in agent.kernel.violations.map { "\(agent.name): \($0)" } }
    }

    fileprivate func perform(_ agent: Agent, _ action: Action) -> Event? {
        agent.kernel.perform(action)
        switch action {
        case .commitKernel, .send:
            preconditionFailure("MigrationTurn keeps sends and barriers")
        case .setTimer(let key, let after):
            seq += 1
            agent.timers[key] = seq
            schedule(.timer(agent.address, key, generation: seq), after: after)
        case .cancelTimer(let key):
            agent.timers[key] = nil
        case .hold(_, let side, let stateful):
            let old = side == .right ? agent.context?.rightNeighbour : agent.context?.leftNeighbour
            agent.anchor = FakeAnchor(side: side, stateful: stateful, oldNeighbour: old)
        case .setPhase(let chainID, let phase):
            guard var anchor = agent.anchor else { break }
            if phase == .released, anchor.phase == .locked { anchor.stateful = false }
            if phase == .buffering { anchor.stateful = true }
            anchor.phase = phase
            agent.anchor = anchor
            if !anchor.drainedReported, phase == .buffering || (phase == .released && !anchor.stateful) {
                schedule(.drainCheck(agent.address, chainID: chainID), after: randomDelay(config.drainDelay))
            }
        case .setDelta(_, let delta):
            agent.anchor?.delta = delta
        case .openPath(let chainID, let next):
            guard let context = agent.context, agent.anchor != nil else {
                return .pathRefused(chainID: chainID, reason: "collision")
            }
            agent.anchor!.newNeighbour = next
            let tuple = FiveTuple(srcAddr: context.me, srcPort: freshPort(agent), dstAddr: next,
                                  dstPort: context.session.dstPort)
            return .pathOpened(chainID: chainID, subsession: tuple)
        case .addPath(let chainID, let subsession):
            guard agent.context != nil, agent.anchor != nil else {
                return .pathRefused(chainID: chainID, reason: "collision(\(subsession))")
            }
            agent.anchor!.newNeighbour = subsession.srcAddr
            return .pathOpened(chainID: chainID, subsession: subsession)
        case .createSession(let identity, let session, let left, let next):
            guard agent.context == nil else { return .pathRefused(chainID: identity.chainID, reason: "collision(\(session))") }
            agent.context = SessionContext(identity: identity, session: session, me: left.dstAddr,
                                           leftNeighbour: left.srcAddr, rightNeighbour: next)
            let right = FiveTuple(srcAddr: left.dstAddr, srcPort: freshPort(agent), dstAddr: next, dstPort: session.dstPort)
            return .pathOpened(chainID: identity.chainID, subsession: right)
        case .markEstablished:
            break
        case .promote:
            // SessionTable.promote: the new path becomes the active one; the neighbour on that side changes.
            guard var anchor = agent.anchor, !anchor.promoted, let new = anchor.newNeighbour else { break }
            anchor.promoted = true
            agent.anchor = anchor
            if anchor.side == .right { agent.context?.rightNeighbour = new } else { agent.context?.leftNeighbour = new }
        case .sendProbe(let chainID):
            sendProbe(agent, chainID: chainID)
        case .releaseBuffer:
            break
        case .finishAnchor:
            // The old path's subsession goes; tracking ends (the context already names the new neighbour).
            agent.anchor = nil
        case .cancelAnchor:
            // Back on the old path; the new path's subsession goes; tracking ends.
            if let anchor = agent.anchor, anchor.promoted {
                if anchor.side == .right { agent.context?.rightNeighbour = anchor.oldNeighbour }
                else { agent.context?.leftNeighbour = anchor.oldNeighbour }
            }
            agent.anchor = nil
        case .translate:
            break  // the data plane's re-key; the protocol model has no NAT
        case .removeSession:
            agent.context = nil
            agent.anchor = nil
        case .exportState(let chainID, let requestID, _):
            let result: Result<[UInt8], StepFailure> = config.exportFailure[agent.address].map { .failure(StepFailure($0)) }
                ?? .success(Array(#"{"version":1,"entries":[{"proto":"tcp","state":"ESTABLISHED"}]}"#.utf8))
            let duration = randomDelay(config.stateDelay)
            schedule(.result(agent.address, .stateExported(chainID: chainID, requestID: requestID, result,
                                                           micros: UInt32(duration / 1000))), after: duration)
        case .importState(let chainID, let requestID, let document):
            agent.imported.append(document)
            let result: Result<FiveTuple?, StepFailure> = config.importRefusal[agent.address].map { .failure(StepFailure($0)) }
                ?? .success(nil)
            let duration = randomDelay(config.stateDelay)
            schedule(.result(agent.address, .stateImported(chainID: chainID, requestID: requestID, result,
                                                           micros: UInt32(duration / 1000))), after: duration)
        case .report(_, let requestID, let result):
            agent.reports.append((requestID, result))
        }
        return nil
    }

    fileprivate func send(_ m: ControlMessage, from: IPAddress, to: IPAddress) {
        var m = m
        if let tamper = config.tamper {
            let changed = tamper(m, from, to)
            if changed != m { note("net", "rewritten on \(Host.name(from))→\(Host.name(to)): \(Describe.message(changed))") }
            m = changed
        }
        if rng.chance(config.loss) {
            dropped += 1
            note("net", "lost: \(Describe.message(m)) \(Host.name(from))→\(Host.name(to))")
            return
        }
        schedule(.deliver(m, to: to, from: from), after: randomDelay(config.delay))
        if rng.chance(config.duplicate) {
            duplicated += 1
            schedule(.deliver(m, to: to, from: from), after: randomDelay(config.delay))
        }
    }

    /// The probe is a packet on the new path: it crosses the new boxes' data planes (each must have the
    /// session, and be up) to the anchor at the other end, which reports it as a newPathPacket.
    private func sendProbe(_ agent: Agent, chainID: UInt64) {
        guard let anchor = agent.anchor, var hop = anchor.newNeighbour else {
            note("dataplane", "\(agent.name): probe not sent (no new path)")
            return
        }
        var previous = agent.address
        var delay: UInt64 = 0
        for _ in 0..<16 {
            delay += randomDelay(config.delay)
            guard !config.down.contains(hop), let next = agents[hop], let context = contextFor(hop, chainID) else {
                note("dataplane", "probe from \(agent.name) lost at \(Host.name(hop))")
                return
            }
            if let far = next.anchor, far.newNeighbour == previous {
                schedule(.probe(to: hop, chainID: chainID), after: delay)
                return
            }
            guard let onward = anchor.side == .right ? context.rightNeighbour : context.leftNeighbour else { break }
            previous = hop
            hop = onward
        }
        note("dataplane", "probe from \(agent.name) found no anchor at the end of the new path")
    }

    // MARK: Inspection

    /// Every agent's coordinator has nothing left: no role, no lock.
    package var allIdle: Bool { agents.values.allSatisfy { $0.coordinator.isIdle } }
    package var allUnlocked: Bool { agents.values.allSatisfy { $0.coordinator.locks.isEmpty } }
    /// The results the left anchors sent to their controllers, by request id (the last one of each).
    package var leftAnchorResults: [UInt32: TriggerResult] {
        var results: [UInt32: TriggerResult] = [:]
        for agent in agents.values {
            for case .send(let m, _) in agent.actions {
                if case .triggerResult(let r) = m.body { results[m.requestID] = r }
            }
        }
        return results
    }

    package var busy: [String] {
        agents.values.filter { !$0.coordinator.isIdle || !$0.coordinator.locks.isEmpty }.map {
            "\($0.name): roles \($0.coordinator.role(of: TestSession.chainID)), locks \($0.coordinator.locks)"
        }.sorted()
    }
}
