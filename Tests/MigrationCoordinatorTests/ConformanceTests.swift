import DyscoCore
import Foundation
@testable import MigrationCoordinator
import MigrationHarness
import Testing

/// The harness's hosts (Foundation, imported here for the model files, has a `Host` class of its own).
private typealias Host = MigrationHarness.Host

// Holds MigrationCoordinator to the Spin model (docs/VERIFICATION.md, "Conformance"): model/transitions.tsv is the
// transition relation; the model's TR(...) transitions must be exactly its rows marked tr; every harness run
// (including lossy ones) must replay against it, step by step, actions included.

enum ModelFiles {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("model")
    static func text(_ name: String) throws -> String { try String(contentsOf: root.appendingPathComponent(name), encoding: .utf8) }
    static func table() throws -> TransitionTable { try TransitionTable.parse(text("transitions.tsv")) }
}

/// Harness steps → abstract steps of the model's roles.
enum Abstraction {
    /// The roles of the single-reconfiguration scenario (replace fw1 by fw2 between client and server).
    static let roles: [IPAddress: String] = [Host.client: "LA", Host.fw1: "OB", Host.fw2: "NB", Host.server: "RA"]

    /// The events of the state transfer, which reach the right anchor's agent only as a donor.
    static let donorEvents: Set<String> = ["stateRequest", "stateExported.ok", "stateExported.failed", "stateInstalled"]

    static func messageType(_ body: ControlBody) -> String { "\(ControlMessage.typeName(body))" }

    /// The model's name of an event at `role`; nil: the controller's (not modelled).
    static func event(_ e: Event, role: String) -> String? {
        switch e {
        case .replaceRequested: return nil
        case .message(let m, _, _, _):
            switch m.body {
            case .triggerResult: return nil
            case .stateInstalled(let ok, _, _) where role == "LA": return ok ? "stateInstalled.ok" : "stateInstalled.refused"
            default: return messageType(m.body)
            }
        case .timer(let key):
            switch (key.role, key.kind) {
            case (.controller, _): return nil
            case (.leftAnchor, .retransmit): return "retransmit"
            case (.leftAnchor, .deadline): return "deadline"
            case (.rightAnchor, _): return "silence"
            case (.newBox, _): return "linger"
            case (.oldBox, _): return "timer"
            case (.oldPathHop, _): return "silence"
            }
        case .drained: return "dataDrained"
        case .proxyOnSegment: return nil  // a spliced proxy's removal (issue 17): not in the model's scenario
        case .newPathPacket: return "newPathPacket"
        case .bufferFull: return "bufferFull"
        case .pathOpened: return "pathOpened"
        case .pathRefused: return "pathRefused"
        case .stateExported(_, _, let r, _):
            if case .success = r { return "stateExported.ok" } else { return "stateExported.failed" }
        case .stateImported(_, _, let r, _):
            if case .success = r { return "stateImported.ok" } else { return "stateImported.refused" }
        }
    }

    /// The actions the table compares (timers, deltas and the controller's report left out).
    static func actions(_ actions: [Action]) -> [String] {
        actions.compactMap { a in
            switch a {
            case .setTimer, .cancelTimer, .setDelta, .report: nil
            case .send(let m, _): "send:" + messageType(m.body)
            case .setPhase(_, let phase): "setPhase:\(phase.rawValue)"
            default: Describe.kind(a)
            }
        }
    }

    static func steps(_ run: [HarnessStep]) -> [AbstractStep] {
        run.compactMap { s in
            guard var role = roles[s.agent], let event = event(s.event, role: role) else { return nil }
            // The donor of a stateful insertion (issue 17): the old-box role at the right anchor's agent.
            if role == "RA", Self.donorEvents.contains(event) { role = "DO" }
            var request: UInt32?
            if case .message(let m, _, _, _) = s.event { request = m.requestID }
            return AbstractStep(agent: Host.name(s.agent), role: role, request: request, event: event, actions: actions(s.actions),
                                reportedStep: role == "LA" ? (s.leftAnchorStep?.rawValue ?? "none") : nil)
        }
    }

    static func lockState(_ lock: SegmentLock?) -> (String, UInt32?) {
        switch lock?.state {
        case nil, .unlocked?: ("UNLOCKED", nil)
        case .lockPending(let r, _)?: ("PENDING", r.requestID)
        case .locked(let r)?: ("LOCKED", r.requestID)
        }
    }

    /// The lock changes of a run (any agent, any scenario): (agent, from, event, to), where the state or its owner changed.
    static func lockChanges(_ run: [HarnessStep]) -> [(agent: String, from: String, event: String, to: String)] {
        run.compactMap { s in
            let (before, ownerBefore) = lockState(s.lockBefore), (after, ownerAfter) = lockState(s.lockAfter)
            guard before != after || ownerBefore != ownerAfter else { return nil }
            let name: String
            if case .replaceRequested = s.event { name = "trigger" } else { name = event(s.event, role: "OP") ?? "controller" }
            return (Host.name(s.agent), before, name == "stateInstalled.ok" || name == "stateInstalled.refused" ? "stateInstalled" : name, after)
        }
    }
}

extension ControlMessage {
    static func typeName(_ body: ControlBody) -> String { body.type.description }
}

/// One run of the single-reconfiguration scenario (client → fw1 → server; fw2 replaces fw1; fw1 controls).
private func replaceRun(_ config: Harness.Config, stateful: Bool, deadlineMilliseconds: UInt32 = 2000) -> (Harness, Harness.RunResult) {
    let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
    h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
              stateful: stateful, deadlineMilliseconds: deadlineMilliseconds)
    return (h, h.run())
}

/// Issue 17, insertion (paper §3: the old path has no middlebox): client → server, fw2 inserted; the server
/// controls. The left anchor's right neighbour is the right anchor: requestLock goes straight to it.
/// A stateful insertion takes the state from a donor at the right anchor (trigger.oldBox = the server).
private func insertRun(_ config: Harness.Config, mode: TransferMode, deadlineMilliseconds: UInt32 = 2000) -> Harness {
    let h = Harness(chain: [Host.client, Host.server], others: [Host.fw2], config: config)
    h.replace(at: Host.server, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.server,
              mode: mode, deadlineMilliseconds: deadlineMilliseconds)
    _ = h.run()
    return h
}

/// Issue 17, deletion (the new path has no middlebox): client → fw1 → server, fw1 removed; fw1 controls.
/// newPathSyn goes from the client straight to the server (remaining list empty); oldPathFin tears fw1 down.
private func deleteRun(_ config: Harness.Config, mode: TransferMode, deadlineMilliseconds: UInt32 = 2000) -> Harness {
    let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [], config: config)
    h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], oldBox: Host.fw1,
              mode: mode, deadlineMilliseconds: deadlineMilliseconds)
    _ = h.run()
    return h
}

/// The insertion and deletion runs (issue 17): clean, lossy, short deadlines, the inserted box down; held and
/// stateless, and a stateful insertion (the right anchor's state to the inserted box: the donor).
func insertDeleteRuns() -> [(String, Harness)] {
    var runs: [(String, Harness)] = []
    let shapes: [(String, (Harness.Config, TransferMode, UInt32) -> Harness, [TransferMode])] = [
        ("insert", { insertRun($0, mode: $1, deadlineMilliseconds: $2) }, [.held, .stateless, .stateful]),
        ("delete", { deleteRun($0, mode: $1, deadlineMilliseconds: $2) }, [.held, .stateless]),
    ]
    for (shape, run, modes) in shapes {
        for (m, mode) in modes.enumerated() {
            let base = 3000 + UInt64(m) * 200
            runs.append(("\(shape) clean \(mode)", run(.init(), mode, 2000)))
            for seed in UInt64(1)...40 {
                runs.append(("\(shape) lossy seed \(seed) \(mode)", run(LossyScenarioTests.lossy(seed: base + seed), mode, 10_000)))
                runs.append(("\(shape) short deadline seed \(seed) \(mode)", run(LossyScenarioTests.lossy(seed: base + 100 + seed), mode, 60)))
            }
        }
    }
    // Uneven drains: the right anchor's drained overtakes the left anchor's own (held: DRAIN_PEER → RELEASE).
    for seed in UInt64(1)...20 {
        var slow = Harness.Config()
        slow.seed = 8000 + seed
        slow.drainDelay = 100_000...40_000_000
        runs.append(("insert uneven drains seed \(seed) held", insertRun(slow, mode: .held)))
        runs.append(("delete uneven drains seed \(seed) held", deleteRun(slow, mode: .held)))
    }
    for mode in [TransferMode.held, .stateful] {
        var down = Harness.Config(); down.down = [Host.fw2]
        runs.append(("insert, inserted box down \(mode)", insertRun(down, mode: mode, deadlineMilliseconds: 5000)))
    }
    var refused = Harness.Config(); refused.importRefusal = [Host.fw2: "strict tracking refuses"]
    runs.append(("insert stateful, import refused", insertRun(refused, mode: .stateful)))
    var exportFails = Harness.Config(); exportFails.exportFailure = [Host.server: "no conntrack entry"]
    runs.append(("insert stateful, the donor's export fails", insertRun(exportFails, mode: .stateful)))
    return runs
}

/// The single-reconfiguration runs the conformance check replays: clean, faulty, lossy, short deadlines; and
/// the insertion and deletion runs.
private func replaceRuns() -> [(String, Harness)] {
    var runs: [(String, Harness)] = insertDeleteRuns()
    for stateful in [true, false] {
        runs.append(("clean stateful=\(stateful)", replaceRun(.init(), stateful: stateful).0))
        var down = Harness.Config(); down.down = [Host.fw2]
        runs.append(("new box down stateful=\(stateful)", replaceRun(down, stateful: stateful, deadlineMilliseconds: 5000).0))
        for seed in UInt64(1)...150 {
            runs.append(("lossy seed \(seed) stateful=\(stateful)",
                         replaceRun(LossyScenarioTests.lossy(seed: seed), stateful: stateful, deadlineMilliseconds: 10_000).0))
            runs.append(("short deadline seed \(seed) stateful=\(stateful)",
                         replaceRun(LossyScenarioTests.lossy(seed: 1000 + seed), stateful: stateful, deadlineMilliseconds: 60).0))
        }
    }
    // Slow and uneven drains: the right anchor's drained can overtake the left anchor's own (DRAIN_PEER).
    for seed in UInt64(1)...60 {
        var slow = Harness.Config()
        slow.seed = 7000 + seed
        slow.drainDelay = 100_000...40_000_000
        runs.append(("uneven drains seed \(seed)", replaceRun(slow, stateful: seed % 2 == 0).0))
    }
    // Contention at the right anchor: another request (999, from fw1) holds the server as its right anchor, whose
    // left anchor then falls silent: the real request is refused on the old path (nackLock through fw1 to the
    // client), and the server gives the other one up after 10 s (silence).
    for stateful in [true, false] {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: .init())
        let other = ControlMessage(identity: TestSession.identity, requestID: 999, session: TestSession.tuple, leftAnchor: Host.fw1,
                                   rightAnchor: Host.server, body: .requestLock(rightDelta: 0))
        h.inject(.message(other, from: Host.fw1, context: nil), at: Host.server)
        h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                  stateful: stateful, after: 1_000_000)
        _ = h.run()
        runs.append(("contention at the right anchor stateful=\(stateful)", h))
    }
    // Issue 19: a request (998) of the client's session locks fw1 and the server, then its left anchor falls silent
    // (the client leads no such request: the ackLock is dropped there). fw1 gives its lock up after hopLockSilence
    // (OB silence), the server after rightAnchorSilence; the real request after them moves.
    do {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: .init())
        let silent = ControlMessage(identity: TestSession.identity, requestID: 998, session: TestSession.tuple, leftAnchor: Host.client,
                                    rightAnchor: Host.server, body: .requestLock(rightDelta: 0))
        h.inject(.message(silent, from: Host.client, context: nil), at: Host.fw1)
        h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                  stateful: true, after: 45_000_000_000)
        _ = h.run()
        runs.append(("silent left anchor after the lock", h))
    }
    var refused = Harness.Config(); refused.importRefusal = [Host.fw2: "strict tracking refuses"]
    runs.append(("import refused", replaceRun(refused, stateful: true).0))
    var exportFails = Harness.Config(); exportFails.exportFailure = [Host.fw1: "no conntrack entry"]
    runs.append(("export fails", replaceRun(exportFails, stateful: true).0))
    return runs
}

@Suite("Conformance: MigrationCoordinator against the Spin model's transition relation (model/transitions.tsv)")
struct ConformanceTests {
    @Test("the model's TR(...) transitions are exactly the table's rows marked tr (both ways)")
    func modelMatchesTable() throws {
        let table = try ModelFiles.table()
        let model = PromelaTransitions.extract(try ModelFiles.text("replace.pml"))
            .union(PromelaTransitions.extract(try ModelFiles.text("lock.pml")))
        #expect(model.count > 60, "extracted \(model.count) transitions")
        let onlyModel = model.subtracting(table.modelEdges).sorted(), onlyTable = table.modelEdges.subtracting(model).sorted()
        #expect(onlyModel.isEmpty, "in the model, not in the table: \(onlyModel)")
        #expect(onlyTable.isEmpty, "in the table (tr), not in the model: \(onlyTable)")
        print("conformance: \(model.count) model transitions = \(table.modelEdges.count) tr edges of the table (\(table.rows.count) rows)")
    }

    @Test("the extraction leaves mutants out and keeps both STATEFUL branches")
    func extractionOfConditionals() {
        let source = """
        #if STATEFUL
          TR(LA_A, e, LA_B)
        #else
          TR(LA_A, e, LA_C)
        #endif
        #ifdef MUT_X
          TR(LA_A, m, LA_D)
        #else
          TR(LA_A, m, LA_E)
        #endif
        #ifndef MUT_Y
          TR(LA_A, n, LA_F)
        #else
          TR(LA_A, n, LA_G)
        #endif
        """
        let edges = PromelaTransitions.extract(source)
        #expect(edges == [Edge(role: "LA", from: "A", event: "e", to: "B"), Edge(role: "LA", from: "A", event: "e", to: "C"),
                          Edge(role: "LA", from: "A", event: "m", to: "E"), Edge(role: "LA", from: "A", event: "n", to: "F")])
    }

    @Test("every single-reconfiguration run (clean, new box down, refused import, failed export, uneven drains, right-anchor contention, 300 lossy, 300 short deadlines) replays against the table")
    func tracesReplay() throws {
        let table = try ModelFiles.table()
        var used: Set<Int> = []
        var failures: [String] = []
        var steps = 0
        for (name, h) in replaceRuns() {
            var checker = TraceChecker(table: table)
            let abstract = Abstraction.steps(h.steps)
            steps += abstract.count
            if let d = checker.check(abstract) {
                failures.append("\(name): \(d)")
            }
            used.formUnion(checker.used)
        }
        // One line per distinct divergence (the run names only the first run that shows it).
        var distinct: [String: String] = [:]
        for f in failures {
            let key = f.split(separator: ":", maxSplits: 1).last.map { String($0.drop { $0 != ":" }) } ?? f
            if distinct[key] == nil { distinct[key] = f }
        }
        #expect(failures.isEmpty, "\(failures.count) runs diverge, \(distinct.count) distinct:\n\(distinct.values.sorted().prefix(12).joined(separator: "\n"))")
        // Coverage: which of the model's transitions the implementation runs exercised.
        let trRows = table.rows.filter { $0.inModel && $0.role != "OP" }
        let exercised = trRows.filter { used.contains($0.line) }
        let missing = trRows.filter { !used.contains($0.line) }
        print("conformance: \(steps) steps replayed; \(exercised.count)/\(trRows.count) model rows exercised; not exercised: \(missing.map(\.description))")
        #expect(exercised.count * 10 >= trRows.count * 9, "only \(exercised.count)/\(trRows.count) rows exercised")
    }

    @Test("every lock change in every scenario (single, two controllers, §3.2 overlapping segments, lossy) is an OP row of the table")
    func lockChangesConform() throws {
        let table = try ModelFiles.table()
        let checker = TraceChecker(table: table)
        var runs: [[HarnessStep]] = replaceRuns().map { $0.1.steps }
        for seed in UInt64(1)...150 {
            var config = Harness.Config()
            config.seed = seed
            if seed > 75 { config = LossyScenarioTests.lossy(seed: 50_000 + seed) }
            let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw2, Host.fw4], config: config)
            var rng = SeededRNG(seed: seed &* 7919)
            h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.fw3], oldBox: Host.fw1,
                      stateful: seed % 2 == 0, deadlineMilliseconds: 10_000, after: UInt64.random(in: 0...12_000_000, using: &rng))
            h.replace(at: Host.fw3, leftAnchor: Host.fw1, newPath: [Host.fw4, Host.server], oldBox: Host.fw3,
                      stateful: seed % 2 == 0, deadlineMilliseconds: 10_000, after: UInt64.random(in: 0...12_000_000, using: &rng))
            _ = h.run()
            runs.append(h.steps)
        }
        var changes = 0, failures: [String] = []
        var seen: Set<String> = []
        for run in runs {
            for c in Abstraction.lockChanges(run) {
                changes += 1
                if let row = checker.lockChangeAllowed(from: c.from, event: c.event, to: c.to) {
                    seen.insert("\(row.line)")
                } else {
                    failures.append("\(c.agent): lock \(c.from) --\(c.event)--> \(c.to)")
                }
            }
        }
        #expect(failures.isEmpty, "\(Set(failures).sorted())")
        #expect(changes > 1000)
        print("conformance: \(changes) lock changes checked, \(seen.count) OP rows exercised")
    }
}

@Suite("Conformance: the trace checker rejects divergent traces")
struct TraceCheckerTests {
    /// The abstract trace of a clean stateful run.
    func cleanTrace() -> [AbstractStep] {
        Abstraction.steps(replaceRun(.init(), stateful: true).0.steps)
    }

    @Test("a clean stateful run replays and ends with the left anchor moved, the old box gone, the right anchor done")
    func cleanRunEnds() throws {
        var checker = TraceChecker(table: try ModelFiles.table())
        let trace = cleanTrace()
        #expect(checker.check(trace) == nil)
        #expect(checker.state(agent: "client", role: "LA") == "MOVED")
        #expect(checker.state(agent: "fw1", role: "OB") == "GONE")
        #expect(checker.state(agent: "server", role: "RA") == "DONE")
        #expect(checker.state(agent: "fw2", role: "NB") == "LINGERED" || checker.state(agent: "fw2", role: "NB") == "INSTALLED")
    }

    @Test("a dropped action (the left anchor never sends stateRequest) is a divergence")
    func droppedAction() throws {
        var trace = cleanTrace()
        let i = try #require(trace.firstIndex { $0.actions == ["send:stateRequest"] })
        trace[i].actions = []
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == i && d.reason.contains("actions differ"), "\(d)")
    }

    @Test("held (issue 17): a release on the first drain, before both directions are drained, is a divergence")
    func heldEarlyRelease() throws {
        var trace = Abstraction.steps(insertRun(.init(), mode: .held).steps)
        // the clean held run replays, and its release follows the join of both drains
        var clean = TraceChecker(table: try ModelFiles.table())
        let cleanDivergence = clean.check(trace)
        #expect(cleanDivergence == nil)
        let release = try #require(trace.firstIndex { $0.role == "LA" && $0.actions == ["promote", "setPhase:probing", "sendProbe"] })
        #expect(trace[release].event == "drained" || trace[release].event == "dataDrained")
        // the first of the two drains now releases (MUT_HELD_EARLY_RELEASE in the model)
        let first = try #require(trace.firstIndex { $0.role == "LA" && ($0.event == "drained" || $0.event == "dataDrained") })
        #expect(first < release)
        trace[first].actions = ["promote", "setPhase:probing", "sendProbe"]
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == first && d.reason.contains("actions differ"), "\(d)")
    }

    @Test("data released before the state is installed (releaseBuffer on newPathSynAck) is a divergence")
    func earlyRelease() throws {
        var trace = cleanTrace()
        let i = try #require(trace.firstIndex { $0.role == "LA" && $0.event == "newPathSynAck" })
        trace[i].actions = ["promote", "setPhase:released", "releaseBuffer", "send:drainStart"]
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == i, "\(d)")
    }

    @Test("an event in a state where the model has no transition (teardown acknowledged before the lock) is a divergence")
    func eventOutOfOrder() throws {
        var trace = cleanTrace()
        let fin = try #require(trace.firstIndex { $0.role == "LA" && $0.event == "oldPathFinAck" })
        let step = trace.remove(at: fin)
        let lock = try #require(trace.firstIndex { $0.role == "LA" && $0.event == "ackLock" })
        trace.insert(step, at: lock)
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == lock && d.state == "LOCK", "\(d)")
    }

    @Test("the right anchor refusing a duplicate requestLock (nackLock instead of ackLock) is a divergence")
    func nackForDuplicate() throws {
        var trace = cleanTrace()
        let i = try #require(trace.firstIndex { $0.role == "RA" && $0.event == "requestLock" })
        trace.insert(AbstractStep(agent: "server", role: "RA", request: trace[i].request, event: "requestLock", actions: ["send:nackLock"]), at: i + 1)
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == i + 1 && d.state == "LOCKED", "\(d)")
    }

    @Test("the coordinator's reported step must match the model's state (a left anchor reporting drain while in the lock)")
    func reportedStepMismatch() throws {
        var trace = cleanTrace()
        let i = try #require(trace.firstIndex { $0.role == "LA" && $0.event == "trigger" })
        trace[i].reportedStep = "drain"
        var checker = TraceChecker(table: try ModelFiles.table())
        let divergence = checker.check(trace)
        let d = try #require(divergence)
        #expect(d.index == i && d.reason.contains("reports step drain"), "\(d)")
    }

    @Test("a lock change the model does not have (locked → pending on a requestLock) is rejected")
    func lockChangeNotInModel() throws {
        let checker = TraceChecker(table: try ModelFiles.table())
        #expect(checker.lockChangeAllowed(from: "LOCKED", event: "requestLock", to: "PENDING") == nil)
        #expect(checker.lockChangeAllowed(from: "UNLOCKED", event: "ackLock", to: "LOCKED") == nil)
        #expect(checker.lockChangeAllowed(from: "PENDING", event: "ackLock", to: "LOCKED") != nil)
    }

    @Test("a table that lost one of the model's transitions, or invented one, no longer matches the model")
    func tableModelMismatch() throws {
        let text = try ModelFiles.text("transitions.tsv")
        let model = PromelaTransitions.extract(try ModelFiles.text("replace.pml"))
            .union(PromelaTransitions.extract(try ModelFiles.text("lock.pml")))
        let lines = text.components(separatedBy: "\n")
        let i = try #require(lines.firstIndex { $0.hasPrefix("OB\tLOCKED\tstateRequest\tEXPORTING") })
        let dropped = try TransitionTable.parse((lines[..<i] + lines[(i + 1)...]).joined(separator: "\n"))
        #expect(model.subtracting(dropped.modelEdges) == [Edge(role: "OB", from: "LOCKED", event: "stateRequest", to: "EXPORTING")])
        let invented = try TransitionTable.parse(text + "RA\tDONE\trequestLock\tLOCKED\thold,commit,send:ackLock\ttr\n")
        #expect(invented.modelEdges.subtracting(model) == [Edge(role: "RA", from: "DONE", event: "requestLock", to: "LOCKED")])
    }

    @Test("a table with a malformed row is refused")
    func malformedTable() {
        #expect(throws: TransitionTable.ParseError.self) { try TransitionTable.parse("LA\tIDLE\ttrigger\tLOCK\n") }
        #expect(throws: TransitionTable.ParseError.self) { try TransitionTable.parse("LA\tIDLE\ttrigger\tLOCK\t-\tmaybe\n") }
    }
}

@Suite("Findings of the Spin model in MigrationCoordinator, fixed (docs/VERIFICATION.md)")
struct ModelFindingTests {
    /// fw1 between client and fw3 (the §3.2 figure's X): request 1 locks fw1 → fw3, request 2 is refused there;
    /// request 1 is cancelled (fw1 unlocks); then a late duplicate of request 2's requestLock arrives.
    @Test("a refused request's late duplicate must not lock the subsession again (model: IMPL_FORGETS_REFUSED)")
    func refusedDuplicateRelocks() {
        var fw1 = MigrationCoordinator()
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.fw1,
                                     leftNeighbour: Host.client, rightNeighbour: Host.fw3)
        func message(_ request: UInt32, _ body: ControlBody) -> ControlMessage {
            ControlMessage(identity: TestSession.identity, requestID: request, session: TestSession.tuple,
                           leftAnchor: Host.client, rightAnchor: Host.server, body: body)
        }
        func from(_ host: IPAddress, _ m: ControlMessage) -> [String] {
            Abstraction.actions(fw1.handle(.message(m, from: host, context: context), now: 0))
        }
        #expect(from(Host.client, message(1, .requestLock(rightDelta: 0))) == ["send:requestLock"])
        #expect(from(Host.fw3, message(1, .ackLock(leftDelta: 0, rightDelta: 0))) == ["send:ackLock"])
        #expect(from(Host.client, message(2, .requestLock(rightDelta: 0))) == ["send:nackLock"])  // refused: locked
        _ = from(Host.client, message(1, .cancelLock(reason: "deadline")))
        #expect(fw1.locks[TestSession.chainID]?.isUnlocked ?? true)
        // The duplicate of the refused request 2. The model (and §3.2) wants it refused again: before the fix the
        // implementation forgot refusals and locked the subsession pending for a request whose left anchor had
        // finished (if that copy or its answer was lost, nobody retransmitted and the segment stayed locked).
        let late = from(Host.client, message(2, .requestLock(rightDelta: 0)))
        #expect(late == ["send:nackLock"])
        #expect(fw1.locks[TestSession.chainID]?.isUnlocked ?? true)
    }
}

@Suite("Issue 17: insertion and deletion in the harness (the shapes of model/replace.pml OLDBOXES=0 / NEWBOXES=0)")
struct InsertDeleteTests {
    /// fw1 changes the byte stream (§3.4): it adds its delta to requestLock's rightDelta on its way to the server
    /// and its reverse delta to ackLock's leftDelta on its way to the client.
    static func deltaBox(_ seed: UInt64?) -> Harness.Config {
        var config = seed.map { LossyScenarioTests.lossy(seed: $0) } ?? Harness.Config()
        config.tamper = { m, from, to in
            switch m.body {
            case .requestLock(let d) where from == Host.fw1 && to == Host.server: m.with(body: .requestLock(rightDelta: d + 5))
            case .ackLock(let l, let r) where from == Host.fw1 && to == Host.client: m.with(body: .ackLock(leftDelta: l - 3, rightDelta: r))
            default: m
            }
        }
        return config
    }

    static func deltas(_ agent: Harness.Agent) -> [Int32] {
        agent.actions.compactMap { if case .setDelta(_, let d) = $0 { d } else { nil } }
    }

    @Test("insertion and deletion move the session (clean runs): the old box leaves, the inserted box joins")
    func cleanRunsMove() throws {
        for (name, h) in insertDeleteRuns() where name.contains("clean") {
            let reports = h.agents.values.flatMap(\.reports)
            #expect(reports.count == 1 && reports.first?.result.outcome == .moved, "\(name): \(reports.map(\.result))")
            #expect(h.agents.values.allSatisfy { $0.coordinator.isIdle }, "\(name): \(h.agents.values.map { "\($0.name): \($0.coordinator.role(of: TestSession.chainID))" })")
        }
    }

    @Test("deletion of a box with a nonzero delta: each anchor sets the removed box's delta exactly once (§3.4), clean and lossy",
          arguments: [nil] + (UInt64(1)...30).map { Optional(5000 + $0) })
    func deletionDelta(seed: UInt64?) throws {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [], config: Self.deltaBox(seed))
        h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], oldBox: Host.fw1, mode: .held,
                  deadlineMilliseconds: 10_000)
        let result = h.run()
        let outcome = result.reports.values.first?.result.outcome
        #expect(outcome == .moved || (seed != nil && outcome == .cancelled), "\(String(describing: outcome))")
        guard outcome == .moved, let client = h.agents[Host.client], let server = h.agents[Host.server] else { return }
        #expect(Self.deltas(server) == [5], "right anchor: \(Self.deltas(server))")
        #expect(Self.deltas(client) == [-3], "left anchor: \(Self.deltas(client))")
        // and the run conforms to the table
        var checker = TraceChecker(table: try ModelFiles.table())
        #expect(checker.check(Abstraction.steps(h.steps)) == nil)
    }
}

@Suite("Issue 17: the ackAgain delta (docs/VERIFICATION.md, what the model found, 4)")
struct AckAgainDeltaTests {
    /// The leftDelta sum reaches fw1 on the ackLock from the server (a box to fw1's right that changes the byte stream
    /// adds its delta there); fw1 passes it on. An ackAgain of fw1 (a retransmitted requestLock meeting its lock)
    /// carries the same sum (OldPathHop.requestLock, .ackAgain: the lock keeps the answer it passed on). Before the
    /// fix it answered leftDelta 0, and 77 of these 200 lossy deletions ended with the left anchor's delta lost.
    @Test("an ackAgain carries the leftDelta of the ackLock passed on: the left anchor always ends with the removed box's delta")
    func ackAgainDelta() throws {
        var ackAgains = 0
        for seed in UInt64(1)...200 {
            var config = LossyScenarioTests.lossy(seed: 9000 + seed)
            config.tamper = { m, from, to in
                if case .ackLock(let l, let r) = m.body, from == Host.server, to == Host.fw1 { return m.with(body: .ackLock(leftDelta: l - 3, rightDelta: r)) }
                return m
            }
            let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [], config: config)
            h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], oldBox: Host.fw1, mode: .held,
                      deadlineMilliseconds: 10_000)
            let result = h.run()
            // fw1 answered a retransmitted requestLock itself (more than one ackLock to the client): the case that bit.
            let acksToClient = h.agents[Host.fw1]!.actions.filter {
                if case .send(let m, let to) = $0, to == Host.client, case .ackLock = m.body { true } else { false }
            }
            if acksToClient.count > 1 { ackAgains += 1 }
            for case .send(let m, _) in acksToClient {
                if case .ackLock(let l, _) = m.body { #expect(l == -3, "seed \(9000 + seed): fw1 answered leftDelta \(l)") }
            }
            guard result.reports.values.first?.result.outcome == .moved, let client = h.agents[Host.client] else { continue }
            #expect(InsertDeleteTests.deltas(client) == [-3], "seed \(9000 + seed): the left anchor set \(InsertDeleteTests.deltas(client))")
        }
        #expect(ackAgains > 0, "no run answered a repeated requestLock: the test would not bite")
    }
}
