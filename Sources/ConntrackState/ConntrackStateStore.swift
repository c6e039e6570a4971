import DyscoCore
import Foundation
import Logging

/// The agent's firewall state for migrations: conntrack entries of this namespace, by session tuple
/// (``FirewallStateStore``). Not thread-safe: the agent uses it from one serial queue.
public final class ConntrackStateStore: FirewallStateStore, @unchecked Sendable {
    private let logger: Logger
    private var handle: ConntrackTable?
    /// The documents' "host" (hostname/netns), found once: Foundation's hostName resolves the name (DNS), and
    /// the namespace's name is looked up in /run/netns — milliseconds per export otherwise.
    private lazy var hostLabel = ConntrackTable.hostLabel(namespace: .current)

    private let namespace: NamespaceSelection
    /// How received documents are read: limits and the endpoint rule (agent `--state-max-bytes`,
    /// `--state-only-local`).
    private var reader: StateDocumentReader
    /// This host's addresses and routes for `.routes`, re-read at most once a second.
    private var local: (addresses: LocalAddresses, readAt: ContinuousClock.Instant)?

    /// Per-migration import/export lines ("import done") are below the agent's default level: a drain of
    /// 10,000 sessions would log 10,000 of them.
    public init(logger: Logger, limits: StateDocumentLimits = StateDocumentLimits(maxBytes: ControlBody.maxDocumentBytes),
                endpoints: EndpointPolicy.Rule = .basic, namespace: NamespaceSelection = .current) {
        var quiet = logger
        quiet.logLevel = max(logger.logLevel, .notice)
        self.logger = quiet
        self.namespace = namespace
        var limits = limits
        limits.maxBytesOption = "--state-max-bytes"
        reader = StateDocumentReader(limits: limits, endpoints: EndpointPolicy(rule: endpoints, option: "--state-only-local"))
    }

    /// The largest document a statePut carries (docs/CONTROL-PROTOCOL.md): the agent's default limit.
    public static let defaultMaxBytes = ControlBody.maxDocumentBytes

    private func table() throws(FirewallStateError) -> ConntrackTable {
        if let handle { return handle }
        do {
            let opened = try ConntrackTable(namespace: namespace, logger: logger)
            handle = opened
            return opened
        } catch {
            throw FirewallStateError("cannot open conntrack: \(error)")
        }
    }

    static func flowKey(_ session: FiveTuple) -> FlowKey {
        FlowKey(src: session.srcAddr, sport: session.srcPort, dst: session.dstAddr, dport: session.dstPort)
    }

    public func exportState(session: FiveTuple) throws(FirewallStateError) -> [UInt8] {
        let table = try table()
        do {
            let export = try table.export(.flows([Self.flowKey(session)]), host: hostLabel)
            guard !export.document.entries.isEmpty else {
                throw FirewallStateError("no conntrack entry for \(session) at the old box")
            }
            return [UInt8](try export.document.encoded(pretty: false))
        } catch let error as FirewallStateError {
            throw error
        } catch {
            throw FirewallStateError("conntrack export: \(error)")
        }
    }

    @discardableResult
    public func importState(_ bytes: [UInt8]) throws(FirewallStateError) -> [FiveTuple: FiveTuple] {
        if reader.endpoints.rule == .routes {
            let clock = ContinuousClock()
            if local == nil || clock.now - local!.readAt > .seconds(1) {
                do { local = (try LocalAddresses.read(in: namespace), clock.now) } catch {
                    throw FirewallStateError("cannot read this host's addresses and routes: \(error)")
                }
            }
            reader.endpoints.local = local?.addresses
        }
        // Validated as a whole before the handle is even opened: a refused document writes nothing.
        let document: ValidatedStateDocument
        do { document = try reader.read(.bytes(bytes)) } catch {
            logger.warning("state document refused", metadata: ["conntrack.problems": "\(error.count)",
                                                                 "conntrack.first": "\(error.issues.first.map(String.init(describing:)) ?? "")"])
            // Short: the reason travels back in stateInstalled (at most 200 bytes; the phase times are fields of their own).
            throw FirewallStateError("state document refused, nothing imported: "
                + (error.issues.first.map(String.init(describing:)) ?? "?") + (error.count > 1 ? " (+\(error.count - 1) more)" : ""))
        }
        let table = try table()
        let report = table.importDocument(document, options: ImportOptions(existing: .replace))
        guard report.succeeded, report.created + report.replaced == document.entryCount else {
            throw FirewallStateError(report.summary)
        }
        return Self.translations(document.entries)
    }

    /// Each TCP entry's original tuple → the tuple the flow leaves the box with (``FirewallStateStore``), in either
    /// family (a tuple's two addresses are of one family).
    static func translations(_ entries: [ConntrackEntry]) -> [FiveTuple: FiveTuple] {
        func tuple(_ t: ConntrackTuple) -> FiveTuple? {
            guard t.src.isIPv4 == t.dst.isIPv4, let sport = t.sport, let dport = t.dport else { return nil }
            return FiveTuple(srcAddr: t.src, srcPort: sport, dstAddr: t.dst, dstPort: dport)
        }
        var result: [FiveTuple: FiveTuple] = [:]
        for entry in entries where entry.proto.number == 6 {
            guard let original = tuple(entry.orig), let leaves = tuple(entry.reply.inverted) else { continue }
            result[original] = leaves
        }
        return result
    }

    public func deleteState(session: FiveTuple) {
        _ = try? table().delete([Self.flowKey(session)])
    }
}
