import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// Whole reconfigurations across several MigrationCoordinator instances (Harness.swift).

/// client → fw1 → server, fw2 is the new box; fw1 controls ("replace" at the old box) with leftAnchor = client.
private func replacementHarness(_ config: Harness.Config = .init()) -> Harness {
    Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
}

@discardableResult
private func replaceFW1(_ h: Harness, at controller: IPAddress = Host.fw1, stateful: Bool,
                        deadlineMilliseconds: UInt32 = 2000, after: UInt64 = 0) -> UInt32 {
    h.replace(at: controller, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
              stateful: stateful, deadlineMilliseconds: deadlineMilliseconds, after: after)
}

/// What is wrong with the end state of a run that replaced fw1 by fw2 (empty: nothing). Checks that the run
/// ended, that nothing is locked or under way anywhere, that the controller's report is what the left anchor
/// decided, and that the session is wholly on the new path (moved) or wholly back on the old one (otherwise).
private func endStateProblems(_ h: Harness, _ run: Harness.RunResult, _ id: UInt32) -> [String] {
    var problems: [String] = []
    if run.exhausted { problems.append("the run did not end (event limit)") }
    problems += h.barrierViolations  // §3.2/§3.5: no lock message before its hold is in the kernel
    if !h.allUnlocked || !h.allIdle { problems.append("left busy: \(h.busy)") }
    guard let report = run.reports[id]?.result else { return problems + ["no report for request \(id)"] }
    if let decided = h.leftAnchorResults[id], decided != report {
        problems.append("controller reported \(Describe.result(report)), the left anchor decided \(Describe.result(decided))")
    }
    let client = h[Host.client], server = h[Host.server], fw1 = h[Host.fw1]
    if report.outcome == .moved {
        if client.context?.rightNeighbour != Host.fw2 { problems.append("client's right neighbour is not fw2") }
        if server.context?.leftNeighbour != Host.fw2 { problems.append("server's left neighbour is not fw2") }
        if !client.did("finishAnchor") || client.did("cancelAnchor") { problems.append("client did not finish cleanly") }
        if !server.did("finishAnchor") || server.did("cancelAnchor") { problems.append("server did not finish cleanly") }
    } else {
        if client.context?.rightNeighbour != Host.fw1 { problems.append("client's right neighbour is not fw1 after \(report.outcome)") }
        if server.context?.leftNeighbour != Host.fw1 { problems.append("server's left neighbour is not fw1 after \(report.outcome)") }
        if fw1.context == nil { problems.append("fw1 left the session although it was not replaced") }
        if client.did("finishAnchor") || server.did("finishAnchor") { problems.append("an anchor finished a reconfiguration that did not happen") }
        if server.did("hold"), !server.did("cancelAnchor") { problems.append("server held the session and never cancelled") }
        if report.outcome == .cancelled, !client.did("cancelAnchor") { problems.append("client did not cancelAnchor") }
    }
    if client.anchor != nil || server.anchor != nil { problems.append("an anchor still tracks the session") }
    return problems
}

@Suite("Reconfiguration harness: replacing a middlebox (paper §3.1, §3.5, §3.6)")
struct ReplacementScenarioTests {
    @Test("stateful replacement succeeds: lock, new path, drain, state, probes, teardown; phase times monotonic")
    func statefulSucceeds() throws {
        let h = replacementHarness()
        let id = replaceFW1(h, stateful: true)
        let run = h.run()
        let report = try #require(run.reports[id], "\(run.trace)")
        #expect(report.controller == Host.fw1)
        #expect(report.result.outcome == .moved, "\(run.trace)")
        #expect(report.result.reason.isEmpty && report.result.failedStep == nil)
        // lock, new path, drain, state, release, teardown ends; export, import; the paper's measure.
        let phases = try #require(report.result.phases)
        let ends = MigrationStep.allCases.map { phases.end(of: $0) }
        #expect(zip(ends, ends.dropFirst()).allSatisfy { $0 <= $1 }, "phases \(phases)")
        #expect(phases.lockEnd > 0)
        #expect(phases.exportMicroseconds > 0 && phases.importMicroseconds > 0)  // the boxes' durations came back
        #expect(phases.newPathSynToUse <= phases.releaseEnd)

        let client = h[Host.client], fw1 = h[Host.fw1], fw2 = h[Host.fw2], server = h[Host.server]
        for kind in ["hold", "openPath", "setPhase.buffering", "promote", "setPhase.probing", "sendProbe",
                     "setPhase.released", "releaseBuffer", "finishAnchor"] {
            #expect(client.did(kind), "client: \(kind)")
        }
        for kind in ["hold", "addPath", "setPhase.buffering", "promote", "setPhase.probing", "sendProbe",
                     "setPhase.released", "releaseBuffer", "finishAnchor"] {
            #expect(server.did(kind), "server: \(kind)")
        }
        #expect(!client.did("cancelAnchor") && !server.did("cancelAnchor"))
        #expect(fw1.count("exportState") == 1 && fw1.did("removeSession"))
        #expect(fw2.did("createSession") && fw2.did("markEstablished") && fw2.count("importState") == 1)
        #expect(fw2.imported.count == 1 && !(fw2.imported.first ?? []).isEmpty)
        #expect(!fw1.did("importState") && !fw2.did("exportState"))
        #expect(!fw2.did("removeSession"))
        // Contexts after success, as the agent's session table has them.
        #expect(client.context?.rightNeighbour == Host.fw2)
        #expect(server.context?.leftNeighbour == Host.fw2)
        #expect(fw1.context == nil)
        #expect(fw2.context?.leftNeighbour == Host.client && fw2.context?.rightNeighbour == Host.server)
        #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
        #expect(!run.exhausted && run.dropped == 0)
    }

    @Test("stateless replacement succeeds without any state export or import")
    func statelessSucceeds() throws {
        let h = replacementHarness()
        let id = replaceFW1(h, stateful: false)
        let run = h.run()
        let report = try #require(run.reports[id]?.result, "\(run.trace)")
        #expect(report.outcome == .moved, "\(run.trace)")
        #expect(report.phases != nil)
        for agent in h.agents.values {
            #expect(!agent.did("exportState") && !agent.did("importState"), "\(agent.name)")
            #expect(!agent.did("setPhase.buffering") && !agent.did("setPhase.probing") && !agent.did("sendProbe"),
                    "\(agent.name)")
            #expect(!agent.actions.contains {
                if case .send(let m, _) = $0, case .stateRequest = m.body { return true }
                return false
            })
        }
        for anchor in [h[Host.client], h[Host.server]] {
            #expect(anchor.did("hold") && anchor.did("promote") && anchor.did("setPhase.released") && anchor.did("finishAnchor"))
        }
        #expect(h[Host.fw1].did("removeSession"))
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
    }

    @Test("the new box is down: cancelled at new-path, naming the unanswered hop; back on the old path")
    func newBoxDown() throws {
        var config = Harness.Config()
        config.down = [Host.fw2]
        let h = replacementHarness(config)
        let id = replaceFW1(h, stateful: true, deadlineMilliseconds: 5000)
        let run = h.run()
        let report = try #require(run.reports[id]?.result, "\(run.trace)")
        #expect(report.outcome == .cancelled)
        #expect(report.failedStep == .newPath)
        #expect(report.reason.contains("10.0.0.3") && report.reason.contains("newPathSyn"), "\(report.reason)")
        let client = h[Host.client], server = h[Host.server]
        #expect(client.did("cancelAnchor") && server.did("cancelAnchor"))
        #expect(!h[Host.fw1].did("exportState"))
        #expect(client.actions.contains {
            if case .send(let m, let to) = $0, case .newPathCancel = m.body { return to == Host.fw2 }
            return false
        })
        #expect(h[Host.fw2].actions.isEmpty)  // it never heard of it
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
    }

    @Test("the import is refused at the new box: cancelled at state with the refusal; both anchors cancel; fw2 leaves")
    func importRefused() throws {
        var config = Harness.Config()
        config.importRefusal = [Host.fw2: "conntrack import: table full (42 entries)"]
        let h = replacementHarness(config)
        let id = replaceFW1(h, stateful: true)
        let run = h.run()
        let report = try #require(run.reports[id]?.result, "\(run.trace)")
        #expect(report.outcome == .cancelled)
        #expect(report.failedStep == .state)
        #expect(report.reason.contains("table full (42 entries)"), "\(report.reason)")
        #expect(h[Host.client].did("cancelAnchor") && h[Host.server].did("cancelAnchor"))
        #expect(h[Host.fw2].did("importState") && h[Host.fw2].did("removeSession"))
        #expect(h[Host.fw2].context == nil)
        #expect(h[Host.fw1].did("exportState") && !h[Host.fw1].did("removeSession"))
        #expect(!h[Host.client].did("promote") && !h[Host.server].did("promote"))
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
    }

    @Test("the export fails at the old box: cancelled at state with the failure")
    func exportFails() throws {
        var config = Harness.Config()
        config.exportFailure = [Host.fw1: "no conntrack entry for the session at the old box"]
        let h = replacementHarness(config)
        let id = replaceFW1(h, stateful: true)
        let run = h.run()
        let report = try #require(run.reports[id]?.result, "\(run.trace)")
        #expect(report.outcome == .cancelled && report.failedStep == .state)
        #expect(report.reason.contains("no conntrack entry"), "\(report.reason)")
        #expect(!h[Host.fw2].did("importState") && h[Host.fw2].did("removeSession"))
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
    }

    @Test("the trace of a run is complete, dumpable and reproducible from its seed")
    func traceIsReproducible() {
        func once() -> Harness.RunResult {
            var config = Harness.Config()
            config.seed = 7
            config.loss = 0.2
            config.duplicate = 0.1
            let h = replacementHarness(config)
            replaceFW1(h, stateful: true)
            return h.run()
        }
        let a = once(), b = once()
        #expect(a.trace == b.trace)
        #expect(!a.trace.entries.isEmpty)
        let text = a.trace.description
        #expect(text.contains("fw1: replaceRequested"))
        #expect(text.contains("-> send requestLock(rightDelta: 0)"))
        #expect(text.contains("client: recv oldPathFinAck") || text.contains("teardown"))
        #expect(a.trace.of("fw2").allSatisfy { $0.agent == "fw2" })
        // Every coordinator step of an agent is in the trace, with the actions it returned.
        let handled = a.trace.entries.filter { Host.names.values.contains($0.agent) && !$0.event.hasPrefix("dropped") }
        #expect(handled.reduce(0) { $0 + $1.actions.count } > 0)
    }
}

@Suite("Reconfiguration harness under loss, duplication and reordering (paper §3.6)")
struct LossyScenarioTests {
    /// 30 % loss, 10 % duplicates, delays from 0.1 to 20 ms (beyond the first retransmission timeouts, so
    /// retransmissions overtake originals). At this loss a 4-hop round trip succeeds with p ≈ 0.24, so the
    /// step retry budget is raised from the default 7 sends (P(step fails) ≈ 15 %) to 20, and the controller
    /// waits long enough for a left anchor still retrying its teardown or cancel.
    static func lossy(seed: UInt64) -> Harness.Config {
        var config = Harness.Config()
        config.seed = seed
        config.loss = 0.3
        config.duplicate = 0.1
        config.delay = 100_000...20_000_000
        config.settings.maxTries = 20
        config.settings.controllerGrace = 15_000_000_000
        return config
    }

    @Test("200 seeded runs: each moves, or is cancelled cleanly; nothing is left locked", arguments: [true, false])
    func lossyRuns(stateful: Bool) {
        var moved = 0, cancelled = 0, teardownUnanswered = 0
        var failures: [(UInt64, [String], Trace)] = []
        for seed in UInt64(1)...200 {
            let h = replacementHarness(Self.lossy(seed: seed))
            let id = replaceFW1(h, stateful: stateful, deadlineMilliseconds: 10_000)
            let run = h.run()
            var problems = endStateProblems(h, run, id)
            switch run.reports[id]?.result.outcome {
            case .moved:
                moved += 1
                if !run.reports[id]!.result.reason.isEmpty { teardownUnanswered += 1 }
            case .cancelled: cancelled += 1
            case .refused: problems.append("refused: \(run.reports[id]!.result.reason)")
            case nil: break
            }
            if !problems.isEmpty { failures.append((seed, problems, run.trace)) }
        }
        #expect(failures.isEmpty, "\(failures.count) runs: first seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? [])\n\(failures.first?.2.description ?? "")")
        #expect(moved + cancelled == 200)
        #expect(moved >= 190, "success rate \(moved)/200 (stateful: \(stateful))")
        print("lossy (stateful: \(stateful)): \(moved)/200 moved (\(teardownUnanswered) of them with the teardown unanswered), \(cancelled) cancelled cleanly")
    }

    @Test("a short deadline under loss: every run that does not move is cancelled cleanly (cancelAnchor at both anchors)",
          arguments: [true, false])
    func deadlineCancelsCleanly(stateful: Bool) {
        var outcomes: [TriggerResult.Outcome: Int] = [:]
        var failures: [(UInt64, [String], Trace)] = []
        for seed in UInt64(1)...200 {
            let h = replacementHarness(Self.lossy(seed: 1000 + seed))
            let id = replaceFW1(h, stateful: stateful, deadlineMilliseconds: 60)
            let run = h.run()
            var problems = endStateProblems(h, run, id)
            if let result = run.reports[id]?.result {
                outcomes[result.outcome, default: 0] += 1
                if result.outcome == .cancelled, result.reason.contains("deadline"),
                   !result.reason.contains("no result from the left anchor") {
                    // Cancelled by the deadline: back on the old path at both anchors if the right one took part.
                    if !h[Host.client].did("cancelAnchor") { problems.append("no cancelAnchor at the client") }
                }
                if result.outcome == .refused { problems.append("refused: \(result.reason)") }
            }
            if !problems.isEmpty { failures.append((seed, problems, run.trace)) }
        }
        #expect(failures.isEmpty, "\(failures.count) runs: first seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? [])\n\(failures.first?.2.description ?? "")")
        #expect((outcomes[.cancelled] ?? 0) > 100, "\(outcomes)")  // the deadline path is exercised
    }
}

@Suite("Reconfiguration harness: contention over segments (paper §3.2)")
struct ContentionScenarioTests {
    @Test("two overlapping replace of the same session from two controllers: exactly one moves, the other is refused",
          arguments: [true, false])
    func twoControllers(stateful: Bool) {
        var failures: [(UInt64, String, Trace)] = []
        var firstWon = 0
        for seed in UInt64(1)...200 {
            var config = Harness.Config()
            config.seed = seed
            let h = replacementHarness(config)
            var rng = SeededRNG(seed: seed &* 31)
            let a = replaceFW1(h, at: Host.fw1, stateful: stateful, after: UInt64.random(in: 0...20_000_000, using: &rng))
            let b = replaceFW1(h, at: Host.server, stateful: stateful, after: UInt64.random(in: 0...20_000_000, using: &rng))
            let run = h.run()
            let outcomes = [a, b].map { run.reports[$0]?.result.outcome }
            let movedCount = outcomes.filter { $0 == .moved }.count
            let refusedCount = outcomes.filter { $0 == .refused }.count
            if movedCount != 1 || refusedCount != 1 || run.exhausted || !h.allIdle || !h.allUnlocked {
                failures.append((seed, "\(outcomes) \(h.busy)", run.trace))
                continue
            }
            if outcomes[0] == .moved { firstWon += 1 }
            let winner = outcomes[0] == .moved ? a : b
            let problems = endStateProblems(h, run, winner)
            if !problems.isEmpty { failures.append((seed, "\(problems)", run.trace)) }
        }
        #expect(failures.isEmpty, "\(failures.count) runs: seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? "")\n\(failures.first?.2.description ?? "")")
        #expect(firstWon > 0 && firstWon < 200, "both orders occur: first won \(firstWon)/200")
    }

    @Test("the same controller asked twice: exactly one moves, the other is refused", arguments: [true, false])
    func sameControllerTwice(stateful: Bool) {
        var failures: [(UInt64, String, Trace)] = []
        for seed in UInt64(1)...200 {
            var config = Harness.Config()
            config.seed = seed
            let h = replacementHarness(config)
            var rng = SeededRNG(seed: seed &* 17)
            let a = replaceFW1(h, stateful: stateful, after: UInt64.random(in: 0...5_000_000, using: &rng))
            let b = replaceFW1(h, stateful: stateful, after: UInt64.random(in: 0...5_000_000, using: &rng))
            let run = h.run()
            let results = [a, b].compactMap { run.reports[$0]?.result }
            let moved = results.filter { $0.outcome == .moved }.count
            let refused = results.filter { $0.outcome == .refused }.count
            if results.count != 2 || moved != 1 || refused != 1 || !h.allIdle || !h.allUnlocked {
                failures.append((seed, "\(results.map(Describe.result)) \(h.busy)", run.trace))
            }
        }
        #expect(failures.isEmpty, "\(failures.count) runs: seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? "")\n\(failures.first?.2.description ?? "")")
    }

    /// client → fw1 → fw3 → server. W/X of the paper's figure 5: request A replaces fw1 (left anchor client,
    /// right anchor fw3, controller fw1, new box fw2); request B replaces fw3 (left anchor fw1, right anchor
    /// server, controller fw3, new box fw4). They overlap on the subsession fw1 → fw3.
    @Test("§3.2 figure: overlapping segments, 500 seeds: exactly one succeeds, the other is refused or cancelled cleanly, no deadlock")
    func overlappingSegments() {
        var failures: [(UInt64, String, Trace)] = []
        var tally: [String: Int] = [:]
        for seed in UInt64(1)...500 {
            var config = Harness.Config()
            config.seed = seed
            let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw2, Host.fw4],
                            config: config)
            var rng = SeededRNG(seed: seed &* 7919)
            let stateful = seed % 2 == 0
            let a = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.fw3], oldBox: Host.fw1,
                              stateful: stateful, after: UInt64.random(in: 0...12_000_000, using: &rng))
            let b = h.replace(at: Host.fw3, leftAnchor: Host.fw1, newPath: [Host.fw4, Host.server], oldBox: Host.fw3,
                              stateful: stateful, after: UInt64.random(in: 0...12_000_000, using: &rng))
            let run = h.run()
            let ra = run.reports[a]?.result, rb = run.reports[b]?.result
            guard let ra, let rb, !run.exhausted else {
                failures.append((seed, "no result for both (deadlock?): \(String(describing: ra)) \(String(describing: rb))", run.trace))
                continue
            }
            let moved = [ra, rb].filter { $0.outcome == .moved }
            var problem: String?
            if moved.count != 1 { problem = "\(moved.count) moved: A \(Describe.result(ra)), B \(Describe.result(rb))" }
            if !h.allIdle || !h.allUnlocked { problem = (problem ?? "") + " left busy: \(h.busy)" }
            let loser = ra.outcome == .moved ? rb : ra
            if loser.outcome == .refused, !(loser.reason.contains("contention") || loser.reason.contains("locked by another")
                                            || loser.reason.contains("being reconfigured") || loser.reason.contains("not-on-path")) {
                problem = (problem ?? "") + " refused for an unexpected reason: \(loser.reason)"
            }
            // The winner's path: the replaced box left, its anchors point at the new box.
            if ra.outcome == .moved {
                if h[Host.client].context?.rightNeighbour != Host.fw2 || h[Host.fw3].context?.leftNeighbour != Host.fw2
                    || h[Host.fw1].context != nil { problem = (problem ?? "") + " A moved but the path is not client→fw2→fw3" }
            } else if rb.outcome == .moved {
                if h[Host.fw1].context?.rightNeighbour != Host.fw4 || h[Host.server].context?.leftNeighbour != Host.fw4
                    || h[Host.fw3].context != nil { problem = (problem ?? "") + " B moved but the path is not fw1→fw4→server" }
            }
            if let problem { failures.append((seed, problem, run.trace)) }
            let key = "\(ra.outcome == .moved ? "A" : "B") moved; other \(loser.outcome): \(loser.reason.prefix(40))"
            tally[key, default: 0] += 1
        }
        #expect(failures.isEmpty, "\(failures.count) runs: seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? "")\n\(failures.first?.2.description ?? "")")
        #expect(tally.keys.contains { $0.hasPrefix("A moved") } && tally.keys.contains { $0.hasPrefix("B moved") }, "\(tally)")
        print("§3.2 figure, 500 seeds: \(tally.sorted { $0.value > $1.value })")
    }
}

@Suite("Reconfiguration harness: contention under loss, duplication and reordering (paper §3.2, §3.6)")
struct LossyContentionScenarioTests {
    @Test("§3.2 figure with 30 % loss, duplicates and reordering, 500 seeds: exactly one moves, nothing left locked")
    func overlappingSegmentsUnderLoss() {
        var failures: [(UInt64, String, Trace)] = []
        var tally: [String: Int] = [:]
        for seed in UInt64(1)...500 {
            let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw2, Host.fw4],
                            config: LossyScenarioTests.lossy(seed: 50_000 + seed))
            var rng = SeededRNG(seed: seed &* 104_729)
            let stateful = seed % 2 == 1
            let a = h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.fw3], oldBox: Host.fw1,
                              stateful: stateful, deadlineMilliseconds: 10_000,
                              after: UInt64.random(in: 0...50_000_000, using: &rng))
            let b = h.replace(at: Host.fw3, leftAnchor: Host.fw1, newPath: [Host.fw4, Host.server], oldBox: Host.fw3,
                              stateful: stateful, deadlineMilliseconds: 10_000,
                              after: UInt64.random(in: 0...50_000_000, using: &rng))
            let run = h.run()
            guard let ra = run.reports[a]?.result, let rb = run.reports[b]?.result, !run.exhausted else {
                failures.append((seed, "no result for both", run.trace))
                continue
            }
            let moved = [ra, rb].filter { $0.outcome == .moved }.count
            if moved != 1 || !h.allIdle || !h.allUnlocked {
                failures.append((seed, "A \(Describe.result(ra)); B \(Describe.result(rb)); \(h.busy)", run.trace))
            }
            tally["\(ra.outcome == .moved ? "A" : "B") moved, other \((ra.outcome == .moved ? rb : ra).outcome)", default: 0] += 1
        }
        #expect(failures.isEmpty, "\(failures.count) runs: seed \(failures.first?.0 ?? 0): \(failures.first?.1 ?? "")\n\(failures.first?.2.description ?? "")")
        print("§3.2 figure under loss, 500 seeds: \(tally.sorted { $0.value > $1.value })")
    }

    @Test("every control message delivered twice: the §3.2 figure's B (fw1 is the left anchor) moves and fw1 stays")
    func duplicatesAtMiddleboxLeftAnchor() throws {
        for seed in UInt64(1)...50 {
            var config = Harness.Config()
            config.seed = seed
            config.duplicate = 1.0
            let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw4], config: config)
            let b = h.replace(at: Host.fw3, leftAnchor: Host.fw1, newPath: [Host.fw4, Host.server], oldBox: Host.fw3,
                              stateful: seed % 2 == 0)
            let run = h.run()
            #expect(run.reports[b]?.result.outcome == .moved, "seed \(seed)")
            #expect(!h[Host.fw1].did("removeSession"), "seed \(seed): the left anchor left the session")
            #expect(h[Host.fw1].context?.rightNeighbour == Host.fw4 && h[Host.fw3].context == nil, "seed \(seed)")
            #expect(!h[Host.client].did("removeSession") && h[Host.client].actions.isEmpty, "seed \(seed)")
            #expect(h.allIdle && h.allUnlocked, "seed \(seed): \(h.busy)")
        }
    }
}

@Suite("Sequence-number deltas on the lock messages (paper §3.4)")
struct DeltaTests {
    let right = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.server,
                               leftNeighbour: Host.fw1, rightNeighbour: nil)
    let left = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.client,
                              leftNeighbour: nil, rightNeighbour: Host.fw1)

    func message(_ body: ControlBody, requestID: UInt32 = 9) -> ControlMessage {
        ControlMessage(identity: TestSession.identity, requestID: requestID, session: TestSession.tuple,
                       leftAnchor: Host.client, rightAnchor: Host.server, body: body)
    }

    @Test("a requestLock with rightDelta 7 at the right anchor: setDelta(7), acknowledged with the same delta")
    func rightAnchorDelta() {
        var c = MigrationCoordinator()
        let actions = c.handle(.message(message(.requestLock(rightDelta: 7)), from: Host.fw1, context: right), now: 1)
        #expect(actions.contains(.setDelta(chainID: TestSession.chainID, 7)))
        #expect(actions.contains(.hold(chainID: TestSession.chainID, side: .left, stateful: true)))
        #expect(actions.contains(.send(message(.ackLock(leftDelta: 0, rightDelta: 7)), to: Host.fw1)))
        // A duplicate changes nothing: no second setDelta.
        let again = c.handle(.message(message(.requestLock(rightDelta: 7)), from: Host.fw1, context: right), now: 2)
        #expect(!again.contains { if case .setDelta = $0 { return true }; return false })
        #expect(again.contains(.send(message(.ackLock(leftDelta: 0, rightDelta: 7)), to: Host.fw1)))
        // No delta, no setDelta.
        var d = MigrationCoordinator()
        let zero = d.handle(.message(message(.requestLock(rightDelta: 0), requestID: 10), from: Host.fw1, context: right), now: 1)
        #expect(!zero.contains { if case .setDelta = $0 { return true }; return false })
    }

    @Test("an ackLock with leftDelta -3 at the left anchor: setDelta(-3), then the new path is opened")
    func leftAnchorDelta() {
        var c = MigrationCoordinator()
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: true, deadlineMilliseconds: 1000)
        let start = c.handle(.message(message(.trigger(trigger)), from: Host.fw1, context: left), now: 1)
        #expect(start.contains(.send(message(.requestLock(rightDelta: 0)), to: Host.fw1)))
        let actions = c.handle(.message(message(.ackLock(leftDelta: -3, rightDelta: 7)), from: Host.fw1, context: left), now: 2)
        let delta = actions.firstIndex(of: .setDelta(chainID: TestSession.chainID, -3))
        let open = actions.firstIndex(of: .openPath(chainID: TestSession.chainID, next: Host.fw2))
        #expect(delta != nil && open != nil)
        if let delta, let open { #expect(delta < open) }
        #expect(c.leftAnchorStep(TestSession.chainID) == .newPath)
    }

    @Test("deltas added on the old path by fw1 reach both anchors in a whole run, which still succeeds")
    func deltasInARun() throws {
        var config = Harness.Config()
        // fw1 changes the byte stream (§3.4): it adds its delta to the requestLock it forwards right and to
        // the ackLock it forwards left.
        config.tamper = { m, from, to in
            guard from == Host.fw1 else { return m }
            switch m.body {
            case .requestLock(let d) where to == Host.server: return m.with(body: .requestLock(rightDelta: d + 7))
            case .ackLock(let l, let r) where to == Host.client: return m.with(body: .ackLock(leftDelta: l - 3, rightDelta: r))
            default: return m
            }
        }
        let h = replacementHarness(config)
        let id = replaceFW1(h, stateful: true)
        let run = h.run()
        #expect(run.reports[id]?.result.outcome == .moved, "\(run.trace)")
        #expect(h[Host.server].actions.contains(.setDelta(chainID: TestSession.chainID, 7)))
        #expect(h[Host.client].actions.contains(.setDelta(chainID: TestSession.chainID, -3)))
        #expect(h[Host.server].count("setDelta") == 1 && h[Host.client].count("setDelta") == 1)
        #expect(endStateProblems(h, run, id).isEmpty, "\(endStateProblems(h, run, id))")
    }
}
