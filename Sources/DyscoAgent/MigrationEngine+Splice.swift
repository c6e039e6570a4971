import CLinux
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import MigrationCoordinator

/// An ackLock a spliced-out proxy holds back (``MigrationEngine/spliceOutgoing(_:releasing:)``).
struct SpliceGate {
    var pending: [(to: IPAddress, message: ControlMessage)] = []
    /// When the first ackLock was held (monotonic ns).
    var since: UInt64
    /// The last check found the proxy empty: one more, a couple of milliseconds later, opens the gate (a splice
    /// between its sockets' queues, a pipe HAProxy has not emptied yet, is over by then).
    var emptyOnce = false
}

/// A session-terminating proxy taken out of a session (paper §2.2, §3.4, §4; docs/ARCHITECTURE.md,
/// "Session-terminating proxies"). The proxy's agent joined its two sessions into one record
/// (``PacketProcessor/splice(from:to:delta:)``) and is an ordinary old-path hop of the removal, with three
/// additions, all here in the engine (the protocol's state machines do not change):
///
/// 1. **Two names.** The client's chain and the proxy's chain to the server have their own identities. The proxy
///    speaks to its right neighbour in the server chain's name and answers to both. After the removal the left
///    anchor (the client's side) and the right anchor (the server's side) talk directly: the right anchor learns
///    the client chain's name from the proxy (``SessionTable/ChainAlias``) and uses it with the left anchor.
/// 2. **The proxy empties before the lock completes and before the release.** Its sockets hold bytes the endpoints
///    consider delivered (the proxy acknowledged them). The proxy's agent passes the ackLock on to the left only
///    once it is empty (``ProxySockets/empty(client:server:bytesDelta:logger:)``, twice in a row). An endpoint that
///    has not yet seen the anchors' clamped window still sends up to its old one, so the proxy may fill again: the
///    left anchor asks it for `drained` (drainStart) once both anchors hold and have drained, and releases only
///    after its answer (``receiveProxyDrain(_:from:)``).
/// 3. **Timestamps.** With that ackLock go `splice` notices with each anchor's timestamp delta
///    (``SessionTable/TimestampClocks``) and, to the right anchor, the client chain's name.
extension MigrationEngine {
    /// How long a proxy holds an ackLock at most: the removal's deadline (its left anchor cancels then; a proxy whose
    /// client stopped reading never empties).
    static let spliceGateLimit = UInt64(DataplaneAgent.spliceRemovalDeadline) * 1_000_000
    static let spliceGatePoll: Int = 1  // ms

    /// A message in a session's other name (``SessionTable/Record/spliced``, ``SessionTable/Record/alias``),
    /// checked against that name's nonce and session, in the session's own; others unchanged. Nil: drop it.
    func ownName(_ message: ControlMessage) -> ControlMessage? {
        let chain = message.identity.chainID
        guard let (record, _) = dataplane.session(chainID: chain), record.identity.chainID != chain else { return message }
        let other: (identity: SessionIdentity, session: FiveTuple)
        if let s = record.spliced, s.identity.chainID == chain {
            other = (s.identity, s.session)
        } else if let a = record.alias, a.identity.chainID == chain {
            other = (a.identity, a.session)
        } else {
            return message
        }
        guard other.identity.nonce == message.identity.nonce else { count("dropped.wrong-nonce"); return nil }
        guard other.session == message.session else { count("dropped.wrong-session"); return nil }
        var renamed = message
        renamed.identity = record.identity
        renamed.session = record.session
        count("received.renamed")
        return renamed
    }

    /// Outgoing: a joined proxy's messages to its right neighbour, and a right anchor's to the peer of its alias, in
    /// the other name; a joined proxy's ackLocks to its left wait for the proxy to empty (unless `releasing`).
    func spliceOutgoing(_ messages: [(to: IPAddress, message: ControlMessage)], releasing: Bool = false)
        -> [(to: IPAddress, message: ControlMessage)] {
        var out: [(to: IPAddress, message: ControlMessage)] = []
        for (to, message) in messages {
            guard let (record, _) = dataplane.session(chainID: message.identity.chainID),
                  record.spliced != nil || record.alias != nil else {
                out.append((to, message))
                continue
            }
            var renamed = message
            if let splice = record.spliced {
                if !releasing, case .ackLock = message.body, to == record.leftNeighbour {
                    holdAckLock(record, to: to, message)
                    continue
                }
                if to == record.rightNeighbour {
                    renamed.identity = splice.identity
                    renamed.session = splice.session
                }
            } else if let alias = record.alias, to == alias.peer {
                renamed.identity = alias.identity
                renamed.session = alias.session
            }
            out.append((to, renamed))
        }
        return out
    }

    private func holdAckLock(_ record: SessionTable.Record, to: IPAddress, _ message: ControlMessage) {
        let chain = record.identity.chainID
        let first = spliceGates[chain] == nil
        var gate = spliceGates[chain] ?? SpliceGate(since: dysco_monotonic_ns())
        gate.pending.removeAll { $0.message.requestID == message.requestID }
        gate.pending.append((to, message))
        spliceGates[chain] = gate
        count("splice.acklock-held")
        if first { pollGate(chain) }
    }

    /// Opens the gate once the proxy is empty (both sockets, twice) and its clocks are known: the `splice` notices
    /// to both neighbours go out with the held ackLock. Runs on `loop`.
    func pollGate(_ chain: UInt64) {
        guard var gate = spliceGates[chain] else { return }
        // The request must still hold this hop's lock (a cancel or the end of the request drops the gate).
        guard let (record, _) = dataplane.session(chainID: chain), let splice = record.spliced,
              let requestID = gate.pending.last?.message.requestID,
              coordinator.withLock({ $0.hopLockOwner(of: chain) }) == requestID else {
            spliceGates[chain] = nil
            return
        }
        let now = dysco_monotonic_ns()
        if now &- gate.since > Self.spliceGateLimit {
            spliceGates[chain] = nil
            count("splice.gave-up")
            logger.warning("proxy did not empty: lock not passed on", metadata: ["session.chain": "\(chainKey(chain))"])
            return
        }
        var empty = false
        if let clocks = record.clocks.deltas {
            empty = ProxySockets.empty(client: record.session, server: splice.session, bytesDelta: splice.bytesDelta,
                                       logger: logger)
            if empty, gate.emptyOnce, let (to, ackLock) = gate.pending.last {
                spliceGates[chain] = nil
                let right = record.rightNeighbour ?? ackLock.rightAnchor
                var notices: [(to: IPAddress, message: ControlMessage)] = []
                notices.append((right, ackLock.with(body: .splice(SpliceNotice(
                    tsDelta: clocks.forward, alias: (record.identity, record.session))))))
                notices.append((to, ackLock.with(body: .splice(SpliceNotice(tsDelta: clocks.reverse)))))
                count("splice.acklock-passed")
                logger.info("proxy empty: lock passed on", metadata: [
                    "session.chain": "\(chainKey(chain))", "splice.waited.ms": "\((now &- gate.since) / 1_000_000)",
                    "splice.ts.forward": "\(clocks.forward)", "splice.ts.reverse": "\(clocks.reverse)"])
                transmit(spliceOutgoing(notices + gate.pending, releasing: true), renamed: true)
                return
            }
        }
        gate.emptyOnce = empty
        spliceGates[chain] = gate
        loop.asyncAfter(deadline: .now() + .milliseconds(Self.spliceGatePoll)) { [self] in pollGate(chain) }
    }

    /// drainStart from the left anchor of this proxy's removal (held, after both anchors drained): the anchors hold
    /// their endpoints' new data, so nothing enters the proxy any more; what it acknowledged but still holds (in a
    /// pipe, in its own buffer) goes out on the old path. Answered `drained` once both sockets are empty
    /// (``ProxySockets/empty(client:server:bytesDelta:logger:)``: with both anchors holding, the proxy only empties,
    /// and the byte counts see what sits in a pipe, so one look is enough); a retransmission while polling changes
    /// nothing. Given up with the request's lock, or after the removal's deadline (the left anchor cancels).
    func receiveProxyDrain(_ message: ControlMessage, from: IPAddress) {
        let chain = message.identity.chainID
        guard from == message.leftAnchor else {
            count("dropped.splice-not-neighbour")
            return
        }
        guard proxyDrains[chain] != message.requestID else { return }
        proxyDrains[chain] = message.requestID
        count("splice.drain-started")
        pollProxyDrain(message, from: from, since: dysco_monotonic_ns())
    }

    private func pollProxyDrain(_ message: ControlMessage, from: IPAddress, since: UInt64) {
        let chain = message.identity.chainID
        guard proxyDrains[chain] == message.requestID, let (record, _) = dataplane.session(chainID: chain),
              let splice = record.spliced,
              coordinator.withLock({ $0.hopLockOwner(of: chain) }) == message.requestID else {
            if proxyDrains[chain] == message.requestID { proxyDrains[chain] = nil }
            return
        }
        let now = dysco_monotonic_ns()
        if now &- since > Self.spliceGateLimit {
            proxyDrains[chain] = nil
            count("splice.drain-gave-up")
            logger.warning("proxy did not empty: drain not answered", metadata: ["session.chain": "\(chainKey(chain))"])
            return
        }
        if ProxySockets.empty(client: record.session, server: splice.session, bytesDelta: splice.bytesDelta, logger: logger) {
            proxyDrains[chain] = nil
            count("splice.drained")
            logger.info("proxy empty: drained", metadata: [
                "session.chain": "\(chainKey(chain))", "splice.waited.ms": "\((now &- since) / 1_000_000)"])
            transmit([(from, message.answer(.drained))])
            return
        }
        loop.asyncAfter(deadline: .now() + .milliseconds(Self.spliceGatePoll)) { [self] in
            pollProxyDrain(message, from: from, since: since)
        }
    }

    /// How long the agent tends a spliced-out proxy's sockets at most (its FIN, their FINs' acknowledgments).
    static let spliceCloseLimit = 5_000  // ms
    /// How long after the proxy leaves the session its sockets are closed (ms).
    static let spliceCloseDelay = 500

    /// Closes a spliced-out proxy's two sockets (``SplicedOutSocket``; `sockets` as they send: proxy → peer): a FIN
    /// as from each peer at the socket's next expected number (its peer's initial number + 1 + the bytes it
    /// received, sock_diag), acknowledging what the socket sent; the proxy then closes both connections and each
    /// socket's own FIN is acknowledged in turn, until both are gone or in TIME-WAIT.
    func closeProxySockets(_ sockets: [FiveTuple], elapsed: Int = 0) {
        let tended = dataplane.splicedOut(sockets)
        var open: [FiveTuple] = []
        for socket in sockets {
            guard let s = tended[socket] else { continue }
            let info: TCPSocketInfo?
            do { info = try TCPSocketDiag.query(local: socket) } catch {
                logger.warning("sock_diag failed", metadata: ["socket.local": "\(socket)", "error": "\(error)"])
                continue
            }
            guard let info, info.hasTCPInfo, info.state != .timeWait, info.state != .close else { continue }
            open.append(socket)
            // Everything the socket has sent is acknowledged (its FIN once seen), with an open window: bytes the proxy
            // still forwards after it left (a late copy of what the endpoints now exchange directly) drain, and its
            // FIN goes out.
            let unacknowledged = ProxySockets.acknowledged(info, initialNumber: s.ownISN, connected: socket == sockets.last)
            let ack = s.finEnd ?? (unacknowledged &+ (info.sendQueue &- min(info.sendQueue, info.notSentBytes)))
            if s.peerNext == nil {
                let seq = s.peerISN &+ 1 &+ UInt32(truncatingIfNeeded: info.bytesReceived)
                injectToProxy(s.fromPeer, seq: seq, ack: ack, flags: [.fin, .ack])
                dataplane.splicedOutFinSent(socket, next: seq &+ 1)
            } else if let next = s.peerNext, s.finEnd != nil || info.sendQueue > 0 {
                injectToProxy(s.fromPeer, seq: next, ack: ack, flags: .ack)
            }
        }
        guard !open.isEmpty, elapsed < Self.spliceCloseLimit else {
            if !open.isEmpty { count("splice.close-unfinished") } else { count("splice.closed") }
            return
        }
        loop.asyncAfter(deadline: .now() + .milliseconds(10)) { [self] in closeProxySockets(sockets, elapsed: elapsed + 10) }
    }

    private func injectToProxy(_ tuple: FiveTuple, seq: UInt32, ack: UInt32, flags: TCPFlags) {
        withUnsafeTemporaryAllocation(byteCount: PureAck.maxLength, alignment: 16) { buffer in
            let packet = IPv4TCPPacket.buildPureAck(into: buffer.baseAddress!, tuple: tuple, seq: seq, ack: ack,
                                                    window: 0xffff, flags: flags)
            do {
                try probes.send(UnsafeRawBufferPointer(start: buffer.baseAddress!, count: packet.length), to: tuple.dstAddr)
                count("splice.close-sent")
            } catch {
                count("splice.close-failed")
            }
        }
    }

    /// A `splice` notice from the proxy that is leaving this session: taken from a neighbour only (the proxy is the
    /// left neighbour of the right anchor and the right neighbour of the left anchor until the old path goes).
    func receiveSpliceNotice(_ message: ControlMessage, _ notice: SpliceNotice, from: IPAddress) {
        guard let (record, _) = dataplane.session(chainID: message.identity.chainID) else {
            count("dropped.unknown-session")
            return
        }
        // Only during a reconfiguration this agent anchors, from its neighbour on the segment's side (the proxy), and
        // an alias only at the right anchor, once.
        guard let m = record.migration, from == (m.side == .right ? record.rightNeighbour : record.leftNeighbour) else {
            count("dropped.splice-not-neighbour")
            return
        }
        guard notice.alias == nil || (m.side == .left && record.alias == nil) else {
            count("dropped.splice-refused")
            return
        }
        let alias = notice.alias.map {
            SessionTable.ChainAlias(identity: $0.identity, session: $0.session, peer: message.leftAnchor)
        }
        if dataplane.spliceNotice(chainID: message.identity.chainID, alias: alias, tsDelta: notice.tsDelta) {
            count("received.splice")
            if m.side == .right {
                // The left anchor: its held release waits for this proxy to empty.
                dispatch([.proxyOnSegment(chainID: message.identity.chainID, requestID: message.requestID, proxy: from)])
            }
        } else {
            count("dropped.splice-refused")
        }
    }
}

/// The proxy's two sockets as the kernel sees them (sock_diag, ``TCPSocketDiag``), in the agent's namespace.
enum ProxySockets {
    /// Nothing queued in either socket either way: every byte the proxy took in was read and every byte it wrote
    /// was acknowledged. A socket that is gone counts as empty (the proxy closed it). `client`: the client's session
    /// (client → proxy); `server`: the proxy's session to the server.
    /// Also: every byte one socket received went out of the other and was acknowledged (`tcpi_bytes_received` of one
    /// against `tcpi_bytes_acked` of the other, which counts the SYN of the socket that connected, the server's),
    /// `bytesDelta` being what the proxy reported adding to each stream: a proxy holding bytes in its pipe or its own
    /// buffer is not empty, whatever its queues say.
    static func empty(client: FiveTuple, server: FiveTuple, bytesDelta: SessionTable.BoxDelta, logger: Logger) -> Bool {
        let c: TCPSocketInfo?, s: TCPSocketInfo?
        do {
            c = try TCPSocketDiag.query(local: client.reversed)
            s = try TCPSocketDiag.query(local: server)
        } catch {
            logger.warning("sock_diag failed", metadata: ["socket.client": "\(client)", "socket.server": "\(server)",
                                                         "error": "\(error)"])
            return false
        }
        guard let c, let s else { return c == nil && s == nil }  // one gone: the proxy is closing, wait for the other
        guard c.receiveQueue == 0, c.sendQueue == 0, s.receiveQueue == 0, s.sendQueue == 0 else { return false }
        guard c.hasTCPInfo, s.hasTCPInfo else { return true }
        let forward = Int64(c.bytesReceived) + Int64(bytesDelta.forward) == Int64(s.bytesAcked) - 1
        let reverse = Int64(s.bytesReceived) + Int64(bytesDelta.reverse) == Int64(c.bytesAcked)
        return forward && reverse
    }

    /// The number a socket's peer acknowledges next of what it sent: its initial number + 1 + the payload acknowledged
    /// (`tcpi_bytes_acked` counts the SYN of a socket that connected).
    static func acknowledged(_ info: TCPSocketInfo, initialNumber: UInt32, connected: Bool) -> UInt32 {
        initialNumber &+ 1 &+ UInt32(truncatingIfNeeded: info.bytesAcked &- (connected ? 1 : 0))
    }

    /// Why the two sessions cannot become one by translating sequence numbers and timestamps (nil: they can): after
    /// the removal each endpoint reads the other's window fields with the scale the proxy announced to it, and
    /// relies on the options it negotiated with the proxy (window scaling, SACK, timestamps). Rescaling windows is
    /// not implemented: the scales must agree.
    static func mismatch(client: FiveTuple, server: FiveTuple) -> String? {
        let s1: TCPSocketInfo?
        let s2: TCPSocketInfo?
        do {
            s1 = try TCPSocketDiag.query(local: client.reversed)
            s2 = try TCPSocketDiag.query(local: server)
        } catch {
            return "sock_diag: \(error)"
        }
        guard let s1, let s2, s1.hasTCPInfo, s2.hasTCPInfo else { return "the proxy's sockets are gone" }
        if s1.options & 7 != s2.options & 7 {
            return "the two sessions negotiated different options (timestamps, SACK, window scaling: \(s1.options & 7) and \(s2.options & 7))"
        }
        if s1.sendWindowScale != s2.receiveWindowScale || s2.sendWindowScale != s1.receiveWindowScale {
            return "window scales differ (client \(s1.sendWindowScale), proxy to it \(s1.receiveWindowScale); proxy to the server \(s2.receiveWindowScale), server \(s2.sendWindowScale)); rescaling is not implemented"
        }
        return nil
    }
}
