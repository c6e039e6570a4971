/// Where a middlebox's per-session firewall state comes from and goes to during a stateful reconfiguration
/// (paper §3.5, §5.3). The agent's shell calls it from one serial queue. The product's implementation is
/// ConntrackState's `ConntrackStateStore` (libnetfilter_conntrack); keeping the protocol here keeps the agent
/// free of the conntrack C module.
public protocol FirewallStateStore: AnyObject, Sendable {
    /// The session's state as a JSON state document (docs/STATE-FORMAT.md).
    func exportState(session: FiveTuple) throws(FirewallStateError) -> [UInt8]
    /// Validates the whole document, then imports it (strict tracking); throws if anything was refused. Returns what
    /// the imported bindings do to the sessions (paper §2.1, a box that translates): for each IPv4 TCP entry, its
    /// original tuple → the tuple the flow leaves with (the reply tuple reversed; the same tuple when the entry
    /// translates nothing).
    @discardableResult
    func importState(_ document: [UInt8]) throws(FirewallStateError) -> [FiveTuple: FiveTuple]
    /// Deletes the session's state (the old box after the teardown).
    func deleteState(session: FiveTuple)
}

public struct FirewallStateError: Error, CustomStringConvertible, Sendable, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
