import DyscoCore
import Foundation
import NIOCore

/// The agent's control socket (docs/ARCHITECTURE.md, "Control socket and `sessions`"): each request to the part
/// that answers it, and the operations it offers (policy at run time, `path hold|release`).
extension DataplaneAgent {
    func makeControlServer(engine: MigrationEngine, group: any EventLoopGroup) throws -> ControlServer {
        try ControlServer(path: options.controlSocketPath, group: group) { [self] request in
            switch request.command {
            case .sessions:
                return (try? JSONEncoder().encode(snapshot(after: request.after, limit: request.limit))) ?? Data()
            case .hold: return (try? JSONEncoder().encode(ControlPathReply(sessions: hold(request.sessions ?? [])))) ?? Data()
            case .release:
                return (try? JSONEncoder().encode(ControlPathReply(sessions: release(request.sessions ?? [])))) ?? Data()
            case .policy:
                guard let policy = request.policy else { return Data(#"{"error":"policy without its parameters"}"#.utf8) }
                return (try? JSONEncoder().encode(self.policy(policy))) ?? Data()
            case .delta:
                guard let delta = request.delta else { return Data(#"{"error":"delta without its parameters"}"#.utf8) }
                return (try? JSONEncoder().encode(self.boxDelta(delta))) ?? Data()
            case .splice:
                guard let splice = request.splice else { return Data(#"{"error":"splice without its parameters"}"#.utf8) }
                var reply = self.splice(splice, engine: engine)
                // The kernel reports a handshake it carried through its event ring: a splice right after the
                // connection may come first. Asked again for up to a second.
                for _ in 0..<Self.spliceRetries where reply.handshakeUnseen {
                    try? await Task.sleep(for: .milliseconds(10))
                    reply = self.splice(splice, engine: engine)
                }
                return (try? JSONEncoder().encode(reply)) ?? Data()
            case .replace:
                guard let replace = request.replace else { return Data(#"{"error":"replace without its parameters"}"#.utf8) }
                if let problem = replace.problem {
                    return (try? JSONEncoder().encode(["error": problem])) ?? Data()
                }
                let report = await engine.replace(replace)
                return (try? JSONEncoder().encode(report)) ?? Data()
            }
        }
    }

    // MARK: - A box's sequence deltas (§3.4)

    /// Records what the box on this host does to a session's byte streams.
    public func boxDelta(_ request: DeltaRequest) -> DeltaReply {
        let id = dataplane.processor.withLock { state -> UInt64? in
            let delta = SessionTable.BoxDelta(forward: request.forward, reverse: request.reverse)
            guard state.setBoxDelta(session: request.session, delta) else { return nil }
            return state.table.bySession[request.session] ?? state.table.bySession[request.session.reversed]
        }
        guard let id else { return DeltaReply(error: "no session \(request.session) crosses this host") }
        logger.info("box delta", metadata: ["session.id": "\(id)", "delta.forward": "\(request.forward)",
                                            "delta.reverse": "\(request.reverse)"])
        return DeltaReply(session: id)
    }

    // MARK: - A session-terminating proxy's splice (§2.2, §4)

    /// Joins the proxy's two sessions into one middlebox record with the proxy's deltas
    /// (``PacketProcessor/splice(from:to:delta:)``) and, as the paper's agent does on a splice, takes the proxy out
    /// of the session: a removal of this box from the joined session, the trigger going to its left neighbour
    /// (MigrationEngine+Splice.swift has the proxy's part). Answered at once; the removal's outcome is logged.
    func splice(_ request: SpliceRequest, engine: MigrationEngine? = nil) -> SpliceReply {
        var result: Result<PacketProcessor.SpliceOutcome, SessionTable.JoinError> = .failure(.notProxySessions("not run"))
        var sessions: (client: FiveTuple, server: FiveTuple, chain: UInt64)?
        dataplane.change { state in
            result = state.splice(from: request.from, to: request.to, delta: request.delta ?? 0)
            if case .success(let outcome) = result, let record = state.table.records[outcome.id], let splice = record.spliced {
                sessions = (record.session, splice.session, record.identity.chainID)
            }
            return state.takeEffects()
        }
        switch result {
        case .success(let outcome):
            var reply = SpliceReply(session: outcome.id, boxDelta: outcome.boxDelta, alreadyJoined: outcome.alreadyJoined)
            guard !outcome.alreadyJoined, let sessions else { return reply }
            logger.info("proxy sessions joined", metadata: [
                "session.id": "\(outcome.id)", "splice.from": "\(request.from)", "splice.to": "\(request.to)",
                "delta.forward": "\(outcome.boxDelta.forward)", "delta.reverse": "\(outcome.boxDelta.reverse)"])
            if let problem = ProxySockets.mismatch(client: sessions.client, server: sessions.server) {
                reply.removal = "not removed: \(problem)"
                logger.notice("proxy stays in the session", metadata: ["session.id": "\(outcome.id)", "reason": "\(problem)"])
            } else if !options.spliceRemoves {
                reply.removal = "joined (the agent runs with --splice join: `remove --box` takes the proxy out)"
            } else if let engine {
                reply.removal = "started"
                let removal = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [], mode: .held,
                                             deadlineMilliseconds: Self.spliceRemovalDeadline, chains: [sessions.chain])
                let logger = logger
                let dataplane = dataplane
                Task {
                    // The anchors need the proxy's timestamp clocks, learnt from the packets after the join; once the
                    // lock clamps the endpoints' windows few packets come, so the removal starts when they are known.
                    var known = false
                    for _ in 0..<Self.spliceClockPolls {
                        known = dataplane.processor.withLock { $0.table.records[outcome.id]?.clocks.complete ?? true }
                        if known { break }
                        try? await Task.sleep(for: .milliseconds(10))
                    }
                    guard known else {
                        logger.notice("proxy stays in the session: no traffic to learn its timestamp clocks from",
                                      metadata: ["session.id": "\(outcome.id)"])
                        return
                    }
                    let report = await engine.replace(removal)
                    for s in report.sessions {
                        logger.info("proxy removal", metadata: [
                            "session.tuple": "\(s.session)", "result": "\(s.result)", "reason": "\(s.reason)",
                            "step": "\(s.failedStep)", "latency.total.us": "\(s.phases?.total ?? 0)"])
                    }
                }
            }
            return reply
        case .failure(.handshakeUnseen):
            return SpliceReply(error: SessionTable.JoinError.handshakeUnseen.description)
        case .failure(let error):
            logger.notice("splice not joined", metadata: ["splice.from": "\(request.from)", "splice.to": "\(request.to)",
                                                          "error": "\(error)"])
            return SpliceReply(error: error.description)
        }
    }

    /// The deadline of a proxy's removal after its splice (ms): longer than `remove`'s default, as the proxy first
    /// empties its sockets (MigrationEngine+Splice.swift).
    static let spliceRemovalDeadline: UInt32 = 10_000
    static let spliceRetries = 100
    /// Polls (10 ms apart) for the joined proxy's timestamp clocks before its removal starts.
    static let spliceClockPolls = 500

    // MARK: - Policy at run time

    /// Shows, reloads or changes the cordons of the policy; an error leaves everything as it was.
    public func policy(_ request: PolicyRequest) -> PolicyReply {
        var failure: String?
        switch request.action {
        case .show: break
        case .reload:
            failure = reloadConfig()
        case .cordon:
            if let address = request.address {
                failure = dataplane.processor.withLock { state -> String? in
                    do throws(Cordons.CordonError) {
                        try state.cordons.cordon(address, replacements: request.replacements ?? [])
                        return nil
                    } catch { return "\(error)" }
                }
                if failure == nil {
                    logger.notice("cordoned", metadata: ["cordon.address": "\(address)",
                                                         "cordon.replacements": "\(request.replacements ?? [])"])
                }
            } else {
                failure = "cordon: which box? (address missing)"
            }
        case .uncordon:
            if let address = request.address {
                if !dataplane.processor.withLock({ $0.cordons.uncordon(address) }) { failure = "\(address) is not cordoned" }
            } else {
                failure = "uncordon: which box? (address missing)"
            }
        }
        let (config, cordons) = dataplane.processor.withLock { ($0.config, $0.cordons.cordons) }
        return PolicyReply(configPath: options.configPath, config: config, cordons: cordons,
                           loads: configLoads.load(ordering: .relaxed), error: failure)
    }

    /// Reads the config file again (SIGHUP, `policy reload`): new sessions follow it, existing ones keep their
    /// chains, cordons stay. Returns the error (the old config stays in force) or nil.
    @discardableResult
    public func reloadConfig() -> String? {
        guard let path = options.configPath else { return "this agent was started without --config: nothing to reload" }
        do {
            let config = try AgentConfig.load(path: path)
            dataplane.processor.withLock { $0.config = config }
            configLoads.add(1, ordering: .relaxed)
            logger.notice("config reloaded", metadata: ["config.path": "\(path)", "config.policies": "\(config.policies.count)"])
            return nil
        } catch {
            logger.error("config reload failed; the previous config stays", metadata: ["config.path": "\(path)", "error": "\(error)"])
            return "cannot reload \(path): \(error) (the previous config stays in force)"
        }
    }

    /// Takes sessions back to the slow path; returns once the kernel no longer rewrites them, so every later
    /// packet of theirs reaches this agent (atomic per session: one nftables transaction).
    public func hold(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] { dataplane.hold(ids) }

    /// Returns held sessions to the fast path (`path release`: installed before this returns, whatever the
    /// queue holds at that moment).
    public func release(_ ids: [SessionTable.SessionID]) -> [SessionTable.SessionID] { dataplane.release(ids) }
}
