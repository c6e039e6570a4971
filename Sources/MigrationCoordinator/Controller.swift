import DyscoCore

/// The controller of one reconfiguration: asked locally (`replace`) to move a session, it sends `trigger` to
/// the left anchor (paper §3.1: "the triggering component must always communicate with the left anchor") and
/// waits for its result, sending the trigger again while it waits, until the deadline and a grace period pass.
struct Controller: Sendable {
    struct Waiting: Sendable {
        var tries = 1
        var delay: UInt64
    }

    enum State: Sendable {
        /// The trigger is out; no result yet.
        case waiting(Waiting)
        /// The result came back, or the controller gave up: the router forgets it.
        case finished
    }

    /// What one event makes the controller do; `finished` when its part is over.
    struct Output: Sendable {
        var actions: [Action] = []
        var finished = false
    }

    let requestID: UInt32
    let message: ControlMessage
    let leftAnchor: IPAddress
    let giveUpAt: UInt64
    let deadline: UInt64
    private(set) var state: State

    private var chainID: UInt64 { message.identity.chainID }
    private var retransmitKey: TimerKey { TimerKey(chainID: chainID, role: .controller, kind: .retransmit) }

    /// Sends the trigger. `firstTimeout` comes from the shared ``RetransmitClock`` (the router's).
    init(context: SessionContext, trigger: Trigger, leftAnchor: IPAddress, requestID: UInt32, now: UInt64,
         firstTimeout: UInt64, settings: MigrationCoordinator.Settings, _ out: inout [Action]) {
        self.requestID = requestID
        self.leftAnchor = leftAnchor
        message = ControlMessage(identity: context.identity, requestID: requestID, session: context.session,
                                 leftAnchor: leftAnchor, rightAnchor: trigger.newPath.last ?? leftAnchor,
                                 body: .trigger(trigger))
        giveUpAt = now &+ UInt64(trigger.deadlineMilliseconds) * 1_000_000 &+ settings.controllerGrace
        deadline = UInt64(trigger.deadlineMilliseconds) * 1_000_000
        state = .waiting(Waiting(delay: firstTimeout * 2))
        out.append(.send(message, to: leftAnchor))
        out.append(.setTimer(TimerKey(chainID: context.identity.chainID, role: .controller, kind: .retransmit),
                             afterNanoseconds: firstTimeout))
    }

    /// The left anchor's triggerResult.
    mutating func resultArrived(_ result: TriggerResult, requestID: UInt32) -> Output {
        var out = Output()
        guard case .waiting = state, requestID == self.requestID else { return out }
        state = .finished
        out.actions.append(.cancelTimer(retransmitKey))
        out.actions.append(.report(chainID: chainID, requestID: requestID, result))
        out.finished = true
        return out
    }

    /// The retransmission timer: send the trigger again, or give up after the deadline and the grace.
    mutating func timerFired(now: UInt64, settings: MigrationCoordinator.Settings) -> Output {
        var out = Output()
        guard case .waiting(var waiting) = state else { return out }
        if now >= giveUpAt {
            state = .finished
            out.actions.append(.report(chainID: chainID, requestID: requestID, TriggerResult(
                outcome: .cancelled, reason: "no result from the left anchor \(leftAnchor) within the deadline",
                failedStep: .lock)))
            out.finished = true
            return out
        }
        waiting.tries += 1
        out.actions.append(.send(message, to: leftAnchor))
        out.actions.append(.setTimer(retransmitKey, afterNanoseconds: waiting.delay))
        // The left anchor answers only with the result (its own triggerResult goes once; a repeated trigger gets
        // it again): while it works, the trigger goes again about four times per deadline, but at least every
        // `controllerRetransmitCap`, so that a result lost after the left anchor finished is asked for again often
        // enough before the controller gives up (ReconfigureTests (g), ControlHostilityTests (d): 30 % loss).
        waiting.delay = min(waiting.delay * 2, max(settings.retransmitMax, min(deadline / 4, settings.controllerRetransmitCap)))
        state = .waiting(waiting)
        return out
    }
}
