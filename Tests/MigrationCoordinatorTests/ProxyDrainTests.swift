import DyscoCore
@testable import MigrationCoordinator
import MigrationHarness
import Testing

// A session-terminating proxy's removal (paper §2.2, §3.4; issue 17): the proxy (fw1 here) acknowledged bytes
// the anchors count as drained (§3.5's oldSentAcked) while it may still hold them in a pipe or its own buffer.
// A held removal's release therefore waits for the proxy's own `drained`, asked for once both anchors hold.

private let chainID = TestSession.chainID

private func sent(_ actions: [Action]) -> [(ControlMessageType, IPAddress)] {
    actions.compactMap { if case .send(let m, let to) = $0 { return (m.body.type, to) }; return nil }
}

/// The client's left anchor removing fw1 (held): the new path goes straight to the server.
private func removal(_ env: inout LeftAnchor.Environment) -> LeftAnchor {
    let context = SessionContext(identity: TestSession.identity, session: TestSession.tuple, me: Host.client,
                                 leftNeighbour: nil, rightNeighbour: Host.fw1)
    let trigger = Trigger(newPath: [Host.server], oldBox: Host.fw1, mode: .held, deadlineMilliseconds: 3000)
    let request = LeftAnchor.Request(requestID: 9, context: context, trigger: trigger, controller: Host.fw1,
                                     oldRight: Host.fw1, rightAnchor: Host.server, startedAt: 1_000_000)
    var start: [Action] = []
    var l = LeftAnchor(request: request, now: 1_000_000, &env, &start)
    _ = l.locked(leftDelta: 0, now: 2_000_000, &env)
    _ = l.pathOpened(FiveTuple(srcAddr: Host.client, srcPort: 10001, dstAddr: Host.server, dstPort: 80), now: 2_100_000, &env)
    _ = l.newPathAnswered(now: 3_000_000, &env)
    return l
}

@Suite("Proxy removal: the release waits for the proxy to empty (§3.5 with a spliced proxy; issue 17)")
struct ProxyDrainTests {
    @Test("held, proxy on the segment: after both drains, drainStart goes to the proxy; its drained releases")
    func releaseWaitsForProxy() {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var l = removal(&env)
        l.proxyOnSegment(Host.fw1)
        #expect(l.peerDrained(now: 3_500_000, &env).actions.isEmpty)
        let asked = l.selfDrained(now: 4_000_000, &env).actions
        #expect(sent(asked).map(\.0) == [.drainStart] && sent(asked).map(\.1) == [Host.fw1])
        #expect(!asked.contains(.promote(chainID: chainID)), "no release before the proxy is empty")
        #expect(l.step == .state && l.awaitsProxy(Host.fw1) && !l.awaitsProxy(Host.server))
        // The proxy's drainStart is retransmitted like any outstanding message until it answers.
        #expect(sent(l.retransmitTimerFired(now: 5_000_000, &env).actions).map(\.1) == [Host.fw1])
        let release = l.proxyEmptied(now: 6_000_000, &env).actions
        #expect(release.contains(.promote(chainID: chainID)) && release.contains(.setPhase(chainID: chainID, .probing)))
        #expect(l.step == .release)
        #expect(l.timeline.times.stateEnd == 5000, "the proxy's emptying is the held removal's state step")
        #expect(l.proxyEmptied(now: 6_100_000, &env).actions.isEmpty, "a duplicate answer changes nothing")
    }

    @Test("held, no proxy: the release follows the drain at once (unchanged)")
    func noProxy() {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var l = removal(&env)
        _ = l.peerDrained(now: 3_500_000, &env)
        let release = l.selfDrained(now: 4_000_000, &env).actions
        #expect(release.contains(.promote(chainID: chainID)) && sent(release).isEmpty)
        #expect(!l.awaitsProxy(Host.fw1))
    }

    @Test("a proxy announced after the drain ended is not waited for; an unanswered proxy meets the deadline (cancel)")
    func lateAnnouncementAndDeadline() {
        var env = LeftAnchor.Environment(settings: .init(), clock: RetransmitClock(), active: 1)
        var late = removal(&env)
        _ = late.peerDrained(now: 3_500_000, &env)
        _ = late.selfDrained(now: 4_000_000, &env)
        late.proxyOnSegment(Host.fw1)
        #expect(late.proxy == nil && late.step == .release)

        var silent = removal(&env)
        silent.proxyOnSegment(Host.fw1)
        _ = silent.peerDrained(now: 3_500_000, &env)
        _ = silent.selfDrained(now: 4_000_000, &env)
        let cancel = silent.deadlinePassed(now: 4_000_000_000, &env).actions
        #expect(silent.isCancelling)
        #expect(cancel.contains(.cancelAnchor(chainID: chainID)))
    }

    @Test("the router: a drained from the proxy is the proxy's answer, never the right anchor's")
    func routerTellsTheAnswersApart() {
        let h = Harness(chain: [Host.client, Host.fw1, Host.server], others: [])
        let client = h[Host.client]
        let trigger = Trigger(newPath: [Host.server], oldBox: Host.fw1, mode: .held, deadlineMilliseconds: 3000)
        var c = client.coordinator
        let context = client.context!
        var pending = c.handle(.replaceRequested(context, trigger: trigger, leftAnchor: Host.client, requestID: 9), now: 1_000_000)
        // The controller's trigger to the left anchor (this agent too) is delivered here.
        while let i = pending.firstIndex(where: { if case .send(_, Host.client) = $0 { true } else { false } }) {
            guard case .send(let m, _) = pending.remove(at: i) else { break }
            pending += c.handle(.message(m, from: Host.client, context: context), now: 1_000_000)
        }
        #expect(c.leftAnchorStep(chainID) == .lock)
        _ = c.handle(.proxyOnSegment(chainID: chainID, requestID: 9, proxy: Host.fw1), now: 1_100_000)
        func from(_ host: IPAddress, _ body: ControlBody, at now: UInt64) -> [Action] {
            let m = ControlMessage(identity: TestSession.identity, requestID: 9, session: TestSession.tuple,
                                   leftAnchor: Host.client, rightAnchor: Host.server, body: body)
            return c.handle(.message(m, from: host, context: context), now: now)
        }
        // Still locking: a drained from the proxy's address changes nothing.
        #expect(sent(from(Host.fw1, .drained, at: 1_200_000)).isEmpty && c.leftAnchorStep(chainID) == .lock)
        _ = from(Host.fw1, .ackLock(leftDelta: 0, rightDelta: 0), at: 1_300_000)
        let sub = FiveTuple(srcAddr: Host.client, srcPort: 10001, dstAddr: Host.server, dstPort: 80)
        _ = c.handle(.pathOpened(chainID: chainID, subsession: sub), now: 1_400_000)
        _ = from(Host.server, .newPathSynAck(subsession: sub), at: 1_500_000)
        #expect(c.leftAnchorStep(chainID) == .drain)
        // Draining: the proxy's drained is not the right anchor's (both directions still needed).
        _ = from(Host.fw1, .drained, at: 1_600_000)
        _ = c.handle(.drained(chainID: chainID), now: 1_700_000)
        #expect(c.leftAnchorStep(chainID) == .drain, "only our side and a drained from the proxy: not drained")
        let ask = from(Host.server, .drained, at: 1_800_000)
        #expect(sent(ask).map(\.0) == [.drainStart] && sent(ask).map(\.1) == [Host.fw1])
        #expect(c.leftAnchorStep(chainID) == .state)
        // The right anchor's duplicate does not release; the proxy's answer does.
        #expect(!from(Host.server, .drained, at: 1_900_000).contains(.promote(chainID: chainID)))
        #expect(from(Host.fw1, .drained, at: 2_000_000).contains(.promote(chainID: chainID)))
        #expect(c.leftAnchorStep(chainID) == .release)
    }
}
