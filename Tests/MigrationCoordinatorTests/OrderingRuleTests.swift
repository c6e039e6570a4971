import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// The ordering rule the coordinator's output carries itself (Action.commitKernel): an anchor takes the session
// off the kernel fast path (hold) and that change is committed before its lock message leaves. Paper §3.2: the
// lock (requestLock from the left anchor, ackLock from the right anchor) starts the reconfiguration, after which
// §3.5's two-path rules count every byte the anchor sends and receives on the old path (oldSent, oldRcvd, ...):
// a packet the kernel still carried past the anchor once the peer acted on the lock would never be counted.

private let chainID = TestSession.chainID

private func message(_ body: ControlBody, requestID: UInt32 = 7) -> ControlMessage {
    ControlMessage(identity: TestSession.identity, requestID: requestID, session: TestSession.tuple,
                   leftAnchor: Host.client, rightAnchor: Host.server, body: body)
}

/// The position of the first action matching `kind`.
private func first(_ actions: [Action], _ kind: String) -> Int? {
    actions.firstIndex { Describe.kind($0) == kind }
}

@Suite("Ordering rule: kernel changes committed before the messages that depend on them (§3.2, §3.5)")
struct OrderingRuleTests {
    @Test("§3.2: the left anchor's hold is committed before its requestLock leaves")
    func leftAnchorCommitsBeforeRequestLock() throws {
        var c = MigrationCoordinator()
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.client,
                                     leftNeighbour: nil, rightNeighbour: Host.fw1)
        let trigger = Trigger(newPath: [Host.fw2, Host.server], oldBox: Host.fw1, stateful: true, deadlineMilliseconds: 3000)
        let actions = c.handle(.message(message(.trigger(trigger)), from: Host.fw1, context: context), now: 1)
        let hold = try #require(first(actions, "hold")), commit = try #require(first(actions, "commit"))
        let send = try #require(first(actions, "send"))
        #expect(hold < commit && commit < send, "\(actions.map(Describe.action))")
        #expect(Harness.Barrier.violations(actions).isEmpty)
    }

    @Test("§3.2: the right anchor's hold is committed before its ackLock leaves; a repeated ackLock needs none")
    func rightAnchorCommitsBeforeAckLock() throws {
        var c = MigrationCoordinator()
        let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.server,
                                     leftNeighbour: Host.fw1, rightNeighbour: nil)
        let actions = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: context), now: 1)
        let hold = try #require(first(actions, "hold")), commit = try #require(first(actions, "commit"))
        let send = try #require(first(actions, "send"))
        #expect(hold < commit && commit < send, "\(actions.map(Describe.action))")
        // A retransmitted requestLock: the same answer, no second hold, nothing to commit.
        let again = c.handle(.message(message(.requestLock(rightDelta: 0)), from: Host.fw1, context: context), now: 2)
        #expect(first(again, "hold") == nil && first(again, "commit") == nil && first(again, "send") != nil)
    }

    @Test("the checker sees a message sent before its hold was committed")
    func checkerCatchesViolation() {
        let send = Action.send(message(.ackLock(leftDelta: 0, rightDelta: 0)), to: Host.fw1)
        let hold = Action.hold(chainID: chainID, side: .left, stateful: true)
        #expect(Harness.Barrier.violations([hold, send]).count == 1)
        #expect(Harness.Barrier.violations([hold, .commitKernel, send]).isEmpty)
        #expect(Harness.Barrier.violations([send, hold, .commitKernel]).isEmpty)
    }

    @Test("whole reconfigurations, clean and lossy, stateful and stateless: no message ever leaves before its hold is committed",
          arguments: [true, false])
    func harnessRuns(stateful: Bool) {
        for seed in UInt64(1)...60 {
            var config = Harness.Config()
            config.seed = seed
            config.loss = seed == 1 ? 0 : 0.15
            config.duplicate = seed == 1 ? 0 : 0.05
            let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: config)
            h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                      stateful: stateful, deadlineMilliseconds: 2000)
            let run = h.run()
            #expect(h.barrierViolations.isEmpty, "seed \(seed): \(h.barrierViolations)\n\(run.trace)")
            if seed == 1 {
                #expect(h[Host.client].did("commit") && h[Host.server].did("commit"))
            }
        }
    }
}

/// Records what a ``MigrationTurn`` asks of its shell, in order.
private final class RecordingPerformer: ActionPerformer {
    var log: [String] = []
    var answer: (Action) -> Event? = { _ in nil }
    func perform(_ action: Action) -> Event? {
        log.append(Describe.kind(action))
        return answer(action)
    }
    func commitKernel() { log.append("commit") }
    func transmit(_ messages: [(to: IPAddress, message: ControlMessage)]) {
        log.append("transmit " + messages.map { "\($0.message.body.type)" }.joined(separator: ","))
    }
}

@Suite("MigrationTurn: the one order of a shell's turn (§3.2, §3.5)")
struct MigrationTurnTests {
    private let lock = Action.send(message(.requestLock(rightDelta: 0)), to: Host.fw1)
    private let ack = Action.send(message(.ackLock(leftDelta: 0, rightDelta: 0)), to: Host.fw1)
    private let hold = Action.hold(chainID: chainID, side: .left, stateful: true)

    @Test("a send the coordinator put before its barrier still leaves after the commit; sends keep their order")
    func sendsWaitForTheCommit() {
        let performer = RecordingPerformer()
        let summary = MigrationTurn.run([Event.drained(chainID: chainID)], performer: performer) { _ in
            [lock, hold, .commitKernel, ack]
        }
        #expect(performer.log == ["hold", "commit", "transmit requestLock,ackLock"])
        #expect(summary == MigrationTurn.Summary(events: 1, committed: true, messages: 2))
    }

    @Test("no barrier, no commit: a turn that only sends commits nothing")
    func noBarrierNoCommit() {
        let performer = RecordingPerformer()
        MigrationTurn.run([Event.drained(chainID: chainID)], performer: performer) { _ in [lock] }
        #expect(performer.log == ["transmit requestLock"])
    }

    @Test("an action's answer (a path opened) is handled in the same turn, before the turn's messages leave")
    func followUpsBeforeMessages() {
        let performer = RecordingPerformer()
        let opened = FiveTuple(srcAddr: Host.client, srcPort: 30001, dstAddr: Host.fw2, dstPort: 80)
        performer.answer = { action in
            if case .openPath = action { return .pathOpened(chainID: chainID, subsession: opened) }
            return nil
        }
        var seen: [String] = []
        let summary = MigrationTurn.run([Event.drained(chainID: chainID)], performer: performer) { event in
            seen.append(Describe.event(event))
            if case .drained = event { return [hold, .openPath(chainID: chainID, next: Host.fw2), lock] }
            return [.commitKernel, ack]
        }
        #expect(seen == ["drained", "pathOpened(\(opened))"])
        #expect(performer.log.first == "hold" && performer.log.dropFirst().first == "openPath")
        #expect(performer.log.suffix(2) == ["commit", "transmit requestLock,ackLock"])
        #expect(summary.events == 2 && summary.messages == 2)
    }

    @Test("the harness runs its agents' turns through MigrationTurn: its fake kernel sees each commit before the sends")
    func harnessUsesTheTurn() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [Host.fw2], config: Harness.Config())
        h.replace(at: Host.fw1, leftAnchor: Host.client, newPath: [Host.fw2, Host.server], oldBox: Host.fw1,
                  stateful: true, deadlineMilliseconds: 2000)
        _ = h.run()
        #expect(h.barrierViolations.isEmpty)
        #expect(h[Host.client].kernel.uncommitted == false)
    }
}
