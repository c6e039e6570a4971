import DyscoCore

/// What the agent shell knows about one session at this host, handed to the coordinator with every event
/// (the coordinator keeps no copy of the session table).
public struct SessionContext: Sendable, Equatable {
    public var identity: SessionIdentity
    public var session: FiveTuple
    /// This host's address on the session's subsessions.
    public var me: IPAddress
    /// Left neighbour on the active path (nil at the left end).
    public var leftNeighbour: IPAddress?
    /// Right neighbour on the active path (nil at the right end).
    public var rightNeighbour: IPAddress?
    /// This host's record of the session has carried more than the anchors' made-up probes (option-less pure
    /// ACKs): data, or an endpoint's own packets, which cross a new path only once it is in use.
    public var carried: Bool
    /// What this host adds to the session's two byte streams between its subsessions (§3.4,
    /// ``SessionTable/Record/hopDelta``): an old-path hop adds it to the lock messages' sums.
    public var hopDelta: SessionTable.BoxDelta
    /// This host's record of the session saw a FIN (either way) or an RST: the session is closing, or half-closed.
    public var ending: Bool
    /// This host's box translates the session's tuple (``SessionTable/Record/translated``): the session leaves it in
    /// another tuple than it came in. It cannot anchor a reconfiguration yet (docs/ARCHITECTURE.md, "Boxes that
    /// translate").
    public var translates = false
    /// This host's box translates the session's *destination* (DNAT: ``SessionTable/Record/translated`` names
    /// another destination address or port than the session).
    public var translatesDestination = false
    /// A box before this host translated the session's tuple (``SessionTable/Record/renamedUpstream``): the
    /// reconfiguration's messages name the session as the chain's left end knows it, not as this host does; they
    /// are accepted on the chain's identity (chain id and nonce).
    public var renamedUpstream = false
    /// Why a box that translates refuses to be the left anchor of a reconfiguration (for now).
    public static let translatingBoxRefusal = "the box on this host translates the session's tuple (NAT): it cannot "
        + "anchor a reconfiguration of the session yet (its new path would carry the untranslated tuple); it stays"
    /// Why the right anchor refuses a new path when its box translates the session's destination (DNAT): the NAT
    /// undoes the translation on the replies in nat POSTROUTING, after the egress queue rule, so the right anchor's
    /// hold would not see the segment's replies as the session (docs/ARCHITECTURE.md, "Moving a box that
    /// translates"). Sent in newPathRefused (§3.3), so the left anchor cancels at once; the old path is untouched.
    public static let translatingRightAnchorRefusal = "the box on this host translates the session's destination "
        + "(DNAT): it cannot anchor a reconfiguration of the session yet (its hold would not see the replies before "
        + "the NAT undoes the translation); it stays"
    /// Why the controller refuses a stateless or held move of a box that translates.
    public static let translatingBoxStatelessRefusal = "the box translates the session's tuple (NAT): only a stateful "
        + "move (replace without --stateless) takes its NAT binding to the new box; it stays"

    var hop: OldPathHop.Hop { OldPathHop.Hop(me: me, delta: hopDelta) }

    public init(identity: SessionIdentity, session: FiveTuple, me: IPAddress, leftNeighbour: IPAddress?,
                rightNeighbour: IPAddress?, carried: Bool = false, hopDelta: SessionTable.BoxDelta = .zero,
                ending: Bool = false) {
        self.hopDelta = hopDelta
        self.ending = ending
        self.identity = identity
        self.session = session
        self.me = me
        self.leftNeighbour = leftNeighbour
        self.rightNeighbour = rightNeighbour
        self.carried = carried
    }
}

/// The roles an agent plays in one reconfiguration (each has its own timers).
public enum Role: String, Sendable, Hashable, Codable {
    case controller, leftAnchor, rightAnchor, oldBox, newBox
    /// An agent of the old path between the anchors, for the silence timer of its lock (never in `role(of:)`).
    case oldPathHop
}

/// A timer of one role of one session's reconfiguration.
public struct TimerKey: Hashable, Sendable {
    public enum Kind: Sendable, Hashable { case retransmit, deadline }
    public var chainID: UInt64
    public var role: Role
    public var kind: Kind
    public init(chainID: UInt64, role: Role, kind: Kind) {
        self.chainID = chainID
        self.role = role
        self.kind = kind
    }
}

/// Inputs to ``MigrationCoordinator/handle(_:now:)``.
public enum Event: Sendable {
    /// A local request (`replace`, through the control socket of this agent): ask `leftAnchor` to move the
    /// session to `trigger.newPath`. This agent becomes the controller of that reconfiguration.
    case replaceRequested(SessionContext, trigger: Trigger, leftAnchor: IPAddress, requestID: UInt32)
    /// A control message that passed every wire check (ControlMessage.decode), from `from`. `context` is the
    /// session it names at this host, if this host knows it; `to`, the address it was sent to (this host's), when
    /// the shell knows it: what lets an agent whose session has ended still answer as the request's anchor (a
    /// teardown that arrives after the session closed on the new path, §3.5).
    case message(ControlMessage, from: IPAddress, context: SessionContext?, to: IPAddress? = nil)
    case timer(TimerKey)
    /// The data plane: everything this anchor sent on the old path is acknowledged (or nothing moved in the
    /// quiet interval), see AnchorState.
    case drained(chainID: UInt64)
    /// The shell: a session-terminating proxy on the segment of the left anchor's request sent its `splice` notice
    /// (with the ackLock); a held release waits for its `drained` (docs/ARCHITECTURE.md, "Session-terminating proxies").
    case proxyOnSegment(chainID: UInt64, requestID: UInt32, proxy: IPAddress)
    /// The data plane: a packet of the session arrived on the new path before this anchor released.
    /// `context`: the session as this host knows it then (a left anchor whose session began to close cancels
    /// instead of releasing, ``LeftAnchor/sessionEnding(now:_:)``).
    case newPathPacket(chainID: UInt64, context: SessionContext? = nil)
    /// The data plane: a session's anchor buffer is full (documented bound): the reconfiguration is cancelled.
    case bufferFull(chainID: UInt64)
    /// Result of ``Action/openPath``, ``Action/addPath`` or ``Action/createSession``: the new-path subsession
    /// (from this host to the right, or from the left to this host), or why it could not be made.
    case pathOpened(chainID: UInt64, subsession: FiveTuple)
    case pathRefused(chainID: UInt64, reason: String)
    /// Result of ``Action/exportState`` (the conntrack document, JSON) / ``Action/importState``; an import's success
    /// carries the session's tuple as the imported NAT binding makes it (nil: the entry translates nothing).
    case stateExported(chainID: UInt64, requestID: UInt32, Result<[UInt8], StepFailure>, micros: UInt32)
    case stateImported(chainID: UInt64, requestID: UInt32, Result<FiveTuple?, StepFailure>, micros: UInt32)
}

/// Why a step failed, in words an operator reads.
public struct StepFailure: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What the shell must do, in order. The order is a rule where ``commitKernel`` says so: the shell may delay a
/// `send` (e.g. to bundle a turn's messages) but never past a `commitKernel` that comes before it.
public enum Action: Sendable, Equatable {
    case send(ControlMessage, to: IPAddress)
    case setTimer(TimerKey, afterNanoseconds: UInt64)
    case cancelTimer(TimerKey)
    /// Take the session off the kernel fast path (its packets reach this agent) and start anchor tracking for
    /// a segment on `side` (AnchorState). Always followed by ``commitKernel`` before the next `send`.
    case hold(chainID: UInt64, side: SessionTable.Side, stateful: Bool)
    /// A barrier: the kernel changes of the actions before it (``hold``: the session off the fast path) must be in
    /// force before any message after it leaves. An anchor's lock message (requestLock from the left anchor,
    /// ackLock from the right anchor, paper §3.2) promises that from then on it sees every packet of the session
    /// on the segment (the two-path rules of §3.5 count them: oldSent, oldRcvd, …); a packet the kernel still
    /// carried after the peer acted on that message would be missed. The shell commits before its next send
    /// (MigrationEngine: one nftables commit per turn, before the turn's messages).
    case commitKernel
    /// A new box whose imported conntrack entry translates the session (a NAT binding, paper §2.1): its right side
    /// carries the translated tuple from now on (``SessionTable/Record/translated``: the right subsession stays, its
    /// translations re-key). Followed by ``commitKernel`` before the import's answer leaves: the release that
    /// follows the answer (§3.5) finds the translations in force.
    case translate(chainID: UInt64, FiveTuple)
    /// Set the anchor's data-plane phase (AnchorState.Phase).
    case setPhase(chainID: UInt64, AnchorState.Phase)
    case setDelta(chainID: UInt64, Int32)
    /// Left anchor: open a new-path subsession from this host to `next` (answer: pathOpened / pathRefused).
    case openPath(chainID: UInt64, next: IPAddress)
    /// Right anchor: accept `subsession` from the left as the new path (answer: pathOpened / pathRefused).
    case addPath(chainID: UInt64, subsession: FiveTuple)
    /// New middlebox: create the session with `left` from the new path, and its right subsession to `next`
    /// (answer: pathOpened with the right subsession / pathRefused).
    case createSession(SessionIdentity, session: FiveTuple, left: FiveTuple, next: IPAddress)
    /// The right subsession of a session this host created from a new-path SYN saw its SYN-ACK.
    case markEstablished(chainID: UInt64)
    /// Egress of `side` switches to the new path.
    case promote(chainID: UInt64)
    /// Send a window-opening probe on the new path (a pure ACK with the local side's current numbers).
    case sendProbe(chainID: UInt64)
    /// Issue the buffered packets, in order, with the translations now in force.
    case releaseBuffer(chainID: UInt64)
    /// Success: the old path's subsession on the anchor's side goes (its port freed), tracking ends, the
    /// session returns to the fast path on the new path.
    case finishAnchor(chainID: UInt64)
    /// Cancel: the new path's subsession goes, egress back on the old path, the buffer is released there,
    /// tracking ends, the session returns to the fast path.
    case cancelAnchor(chainID: UInt64)
    /// This host leaves the session (old box after teardown, new box after a cancel): record, kernel entries,
    /// and, with `deleteConntrack`, the firewall's conntrack entry of the session.
    case removeSession(chainID: UInt64, deleteConntrack: Bool)
    case exportState(chainID: UInt64, requestID: UInt32, session: FiveTuple)
    case importState(chainID: UInt64, requestID: UInt32, document: [UInt8])
    /// A reconfiguration this agent controls has ended (the `replace` caller is waiting for it).
    case report(chainID: UInt64, requestID: UInt32, TriggerResult)
}
