import DyscoCore

/// What performs a coordinator's actions for a ``MigrationTurn``: the agent's MigrationEngine over the real data
/// plane, UDP and conntrack; the test harness over an in-memory network. A performer decides no order: the turn
/// tells it what to do and when.
public protocol ActionPerformer: AnyObject {
    /// Does `action` now. Never called with ``Action/send(_:to:)`` or ``Action/commitKernel`` (the turn keeps
    /// those). Returns the event the action produces at once, if any (``Event/pathOpened(chainID:subsession:)``
    /// or ``Event/pathRefused(chainID:reason:)`` for the path actions); later results (timers, state jobs) come
    /// back as events of a later turn.
    func perform(_ action: Action) -> Event?
    /// Puts the kernel changes made so far in force (the engine: one nftables commit for the whole turn).
    func commitKernel()
    /// Sends the turn's messages, in the coordinator's order (the engine bundles those to the same agent).
    func transmit(_ messages: [(to: IPAddress, message: ControlMessage)])
}

/// One turn of an agent's shell: the one place that orders what a shell does with the coordinator's output.
///
/// The events are handled in order; the actions of each are performed at once in the coordinator's order,
/// except that messages wait for the end of the turn; the events the actions produce (a path opened or refused)
/// are handled next, before any later event. At the end, the kernel changes are committed once if a
/// ``Action/commitKernel`` barrier came, and only then do the turn's messages leave. Delaying a send is always
/// allowed; a send never leaves before a barrier that preceded it, so an ackLock never leaves before its hold is in
/// the kernel (paper §3.2, §3.5; OrderingRuleTests, model/transitions.tsv's `hold,commit,send`).
public enum MigrationTurn {
    /// What a turn did.
    public struct Summary: Sendable, Equatable {
        /// Events handled (the given ones and those the actions produced).
        public var events = 0
        /// A barrier came, and the kernel changes were committed before the messages.
        public var committed = false
        public var messages = 0
    }

    /// Runs one turn: `handle` is the coordinator's ``MigrationCoordinator/handle(_:now:)`` as the shell calls
    /// it (with its clock, lock and logging).
    @discardableResult
    public static func run(_ events: some Sequence<Event>, performer: some ActionPerformer,
                           handle: (Event) -> [Action]) -> Summary {
        var summary = Summary()
        var queue = Array(events)[...]
        var outbox: [(to: IPAddress, message: ControlMessage)] = []
        while let event = queue.popFirst() {
            summary.events += 1
            for action in handle(event) {
                switch action {
                case .send(let message, let to):
                    outbox.append((to, message))
                case .commitKernel:
                    summary.committed = true
                default:
                    if let followUp = performer.perform(action) { queue.append(followUp) }
                }
            }
        }
        if summary.committed { performer.commitKernel() }
        summary.messages = outbox.count
        if !outbox.isEmpty { performer.transmit(outbox) }
        return summary
    }
}

extension Event {
    /// The answer to a path action (``Action/openPath(chainID:next:)``, ``Action/addPath(chainID:subsession:)``,
    /// ``Action/createSession(_:session:left:next:)``).
    public static func path(_ chainID: UInt64, _ result: Result<FiveTuple, some Error>) -> Event {
        switch result {
        case .success(let tuple): .pathOpened(chainID: chainID, subsession: tuple)
        case .failure(let error): .pathRefused(chainID: chainID, reason: "\(error)")
        }
    }
}

extension MigrationCoordinator {
    /// Whether a message naming a session this host does not know is handed to the coordinator at all: only
    /// those that can start or end something here without it (a new box's newPathSyn and cancel, the results a
    /// controller waits for, state for a new box). Every other one is dropped by the shell and counted.
    public static func acceptsWithoutSession(_ body: ControlBody) -> Bool {
        switch body {
        case .newPathSyn, .newPathCancel, .triggerResult, .statePut, .stateInstalled, .newPathCancelAck, .newPathRefused:
            true
        default:
            false
        }
    }
}
