import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// Whole reconfigurations of other shapes than one box by one (issue 17; paper §3, first paragraphs): "If the old
// path consists of a single subsession (with no middleboxes) and the new path has at least one middlebox,
// middleboxes have been inserted. Reverse old and new, and middleboxes have been deleted." And k → m.

/// Asks `controller` for a reconfiguration as `MigrationEngine.replace` does (its context, a fresh request id).
@discardableResult
private func reconfigure(_ h: Harness, at controller: IPAddress, leftAnchor: IPAddress, newPath: [IPAddress],
                         stateFrom: IPAddress, mode: TransferMode, requestID: UInt32 = 41) -> UInt32 {
    let trigger = Trigger(newPath: newPath, oldBox: stateFrom, mode: mode, deadlineMilliseconds: 2000)
    h.inject(.replaceRequested(h[controller].context!, trigger: trigger, leftAnchor: leftAnchor, requestID: requestID),
             at: controller)
    return requestID
}

/// Common end checks: the run ended, nothing is locked or under way, the report is `moved`, no kernel barrier was
/// crossed, no anchor still tracks the session.
private func expectMovedCleanly(_ h: Harness, _ run: Harness.RunResult, _ id: UInt32, anchors: [IPAddress]) {
    #expect(!run.exhausted)
    #expect(run.reports[id]?.result.outcome == .moved, "\(run.trace)")
    #expect(h.barrierViolations.isEmpty, "\(h.barrierViolations)")
    #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
    for a in anchors {
        #expect(h[a].did("finishAnchor") && !h[a].did("cancelAnchor"), "\(Host.name(a)) did not finish cleanly")
        #expect(h[a].anchor == nil, "\(Host.name(a)) still anchors the session")
    }
}

@Suite("Reconfiguration harness: insertion, deletion, k → m (paper §3; issue 17)")
struct InsertRemoveScenarioTests {
    @Test("deletion (§3: a new path without middleboxes), held: client and server talk directly; no state moves, the release follows the drain")
    func deletionHeld() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [])
        let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], stateFrom: Host.fw1, mode: .held)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.client, Host.server])
        #expect(h[Host.client].context?.rightNeighbour == Host.server)
        #expect(h[Host.server].context?.leftNeighbour == Host.client)
        #expect(h[Host.fw1].context == nil && h[Host.fw1].did("removeSession"))
        // Held: both anchors hold, drain, then probe and release; nobody exports or imports.
        for a in [Host.client, Host.server] {
            for kind in ["hold", "setPhase.buffering", "promote", "setPhase.probing", "releaseBuffer"] {
                #expect(h[a].did(kind), "\(Host.name(a)): \(kind)")
            }
        }
        #expect(!h[Host.fw1].did("exportState") && !h[Host.server].did("importState"))
        #expect(!run.trace.description.contains("stateRequest"), "no state step when held")
        let phases = run.reports[id]?.result.phases
        #expect(phases.map { $0.stateEnd == $0.drainEnd || $0.stateEnd >= $0.drainEnd } == true)
    }

    @Test("deletion of a box that changed the byte stream (§3.4): its deltas reach both anchors once")
    func deletionWithDelta() {
        var config = Harness.Config()
        // fw1 inserted 7 bytes client → server and removed 3 server → client: it adds its deltas to the lock
        // messages it forwards (§3.4).
        config.tamper = { m, from, to in
            guard from == Host.fw1 else { return m }
            switch m.body {
            case .requestLock(let d) where to == Host.server: return m.with(body: .requestLock(rightDelta: d + 7))
            case .ackLock(let l, let r) where to == Host.client: return m.with(body: .ackLock(leftDelta: l - 3, rightDelta: r))
            default: return m
            }
        }
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [], config: config)
        let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], stateFrom: Host.fw1, mode: .held)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.client, Host.server])
        #expect(h[Host.server].actions.contains(.setDelta(chainID: TestSession.chainID, 7)))
        #expect(h[Host.client].actions.contains(.setDelta(chainID: TestSession.chainID, -3)))
        #expect(h[Host.server].count("setDelta") == 1 && h[Host.client].count("setDelta") == 1)
    }

    @Test("insertion (§3: an old path of one subsession), held: fw2 goes between fw1 and the server; the lock goes straight to the right anchor")
    func insertionHeld() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2])
        let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.fw1, newPath: [Host.fw2, Host.server], stateFrom: Host.fw1, mode: .held)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.fw1, Host.server])
        #expect(h[Host.fw1].context?.rightNeighbour == Host.fw2 && h[Host.fw1].context?.leftNeighbour == Host.client)
        #expect(h[Host.fw2].context?.leftNeighbour == Host.fw1 && h[Host.fw2].context?.rightNeighbour == Host.server)
        #expect(h[Host.server].context?.leftNeighbour == Host.fw2)
        #expect(h[Host.client].context?.rightNeighbour == Host.fw1, "the client is not on the segment")
        #expect(!h[Host.client].did("hold"))
        #expect(!h[Host.fw1].did("exportState") && !h[Host.fw2].did("importState"))
        #expect(!h[Host.fw1].did("removeSession"), "the left anchor stays on the path")
    }

    @Test("stateful insertion with the right anchor as donor: fw1 exports (and keeps) the state, the inserted fw2 imports it")
    func insertionDonorRightAnchor() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2])
        let id = reconfigure(h, at: Host.client, leftAnchor: Host.client, newPath: [Host.fw2, Host.fw1], stateFrom: Host.fw1, mode: .stateful)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.client, Host.fw1])
        #expect(h[Host.fw1].count("exportState") == 1 && h[Host.fw2].count("importState") == 1)
        #expect(h[Host.fw1].context?.leftNeighbour == Host.fw2, "the donor stays, behind the inserted box")
        #expect(!h[Host.fw1].did("removeSession"))
        #expect(h[Host.client].context?.rightNeighbour == Host.fw2)
        let phases = run.reports[id]?.result.phases
        #expect((phases?.exportMicroseconds ?? 0) > 0 && (phases?.importMicroseconds ?? 0) > 0)
    }

    @Test("stateful insertion with the left anchor as donor: it asks itself for the state")
    func insertionDonorLeftAnchor() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2])
        let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.fw1, newPath: [Host.fw2, Host.server], stateFrom: Host.fw1, mode: .stateful)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.fw1, Host.server])
        #expect(h[Host.fw1].count("exportState") == 1 && h[Host.fw2].count("importState") == 1)
        #expect(h[Host.fw1].context?.rightNeighbour == Host.fw2)
    }

    @Test("a donor that is neither locked for the request nor its right anchor is refused: cancelled at the state step")
    func donorOffTheSegment() {
        // client → fw1 → fw3 → server: insert fw2 after fw3 with the state of fw1 (not on the segment fw3 → server).
        let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw2])
        let id = reconfigure(h, at: Host.fw3, leftAnchor: Host.fw3, newPath: [Host.fw2, Host.server], stateFrom: Host.fw1, mode: .stateful)
        let run = h.run()
        let result = run.reports[id]?.result
        #expect(result?.outcome == .cancelled && result?.failedStep == .state, "\(run.trace)")
        #expect(result?.reason.contains("not locked for request") == true, "\(result?.reason ?? "")")
        #expect(!h[Host.fw1].did("exportState"))
        #expect(h.allUnlocked && h.allIdle, "\(h.busy)")
        #expect(h[Host.fw3].context?.rightNeighbour == Host.server, "back on the old path")
    }

    @Test("k → m: fw1 and fw3 replaced by fw2 (stateful, fw1's state); both old boxes leave at the teardown")
    func twoByOne() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.fw3, Host.server], others: [Host.fw2])
        let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], stateFrom: Host.fw1, mode: .stateful)
        let run = h.run()
        expectMovedCleanly(h, run, id, anchors: [Host.client, Host.server])
        #expect(h[Host.fw1].context == nil && h[Host.fw3].context == nil)
        #expect(h[Host.fw1].did("removeSession") && h[Host.fw3].did("removeSession"))
        #expect(h[Host.fw1].count("exportState") == 1 && !h[Host.fw3].did("exportState"))
        #expect(h[Host.fw2].context?.leftNeighbour == Host.client && h[Host.fw2].context?.rightNeighbour == Host.server)
    }

    @Test("under 30 % control loss a deletion still moves (the left anchor's retransmissions), seeds 1…20")
    func deletionUnderLoss() {
        for seed in UInt64(1)...20 {
            var config = Harness.Config()
            config.seed = seed
            config.loss = 0.3
            config.settings.maxTries = 12
            let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [], config: config)
            let id = reconfigure(h, at: Host.fw1, leftAnchor: Host.client, newPath: [Host.server], stateFrom: Host.fw1, mode: .held)
            let run = h.run()
            let outcome = run.reports[id]?.result.outcome
            // Whatever the losses decide, the end state is clean: moved, or wholly back on the old path.
            #expect(!run.exhausted && h.allUnlocked && h.allIdle, "seed \(seed): \(h.busy)")
            if outcome == .moved {
                #expect(h[Host.client].context?.rightNeighbour == Host.server, "seed \(seed)")
            } else {
                #expect(h[Host.client].context?.rightNeighbour == Host.fw1, "seed \(seed): \(outcome.map { "\($0)" } ?? "no report")")
            }
        }
    }
}
