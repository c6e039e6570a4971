/// A session-terminating proxy's two sessions joined into one middlebox record (paper §2.2, §3.4, §4): the proxy
/// (HAProxy in TCP mode, unmodified) splices the socket of its client's session to the socket of its own
/// session with the server; the `LD_PRELOAD` interposer (Sources/DyscoSplice) or a modified proxy's
/// `dysco_splice(fd_in, fd_out, delta)` tells the agent which two (docs/ARCHITECTURE.md, "Session-terminating
/// proxies").
extension PacketProcessor {
    /// What the agent learnt from a splice report.
    public struct SpliceOutcome: Sendable, Equatable {
        /// The joined record (the id of the client's session).
        public var id: SessionTable.SessionID
        /// The proxy's deltas between its two sessions (§3.4): the client's stream continues on the server's
        /// session `forward` higher, the server's stream on the client's session `reverse` higher.
        public var boxDelta: SessionTable.BoxDelta
        /// The report named a pair joined before (a second splice of the same sockets, the other direction's).
        public var alreadyJoined: Bool
    }

    /// Joins the proxy's two sessions, given as its two sockets see them (local → peer, `from` the socket the data
    /// is read from, `to` the one it goes to, in either order of roles): one must be a session delivered to this
    /// host (its client's), the other one started here (to its server). `delta`: bytes the proxy added to the
    /// stream from `from` before it went to `to` (negative: removed; the paper's `dysco_splice` argument).
    ///
    /// The deltas are the differences of the initial sequence numbers (§3.4: "a session-terminating proxy also has a
    /// delta because it begins sending in its TCP session with the server with a different sequence number than the
    /// client chose"), plus `delta` in its direction. Both sessions leave the kernel fast path for the join (the
    /// joined record goes back to it like any session). Refused, changing nothing: a socket that is no session here,
    /// two sockets of the same role, a session whose initial numbers the agent did not see (a session from before a
    /// restart), a reconfiguration under way.
    public mutating func splice(from: FiveTuple, to: FiveTuple, delta: Int32) -> Result<SpliceOutcome, SessionTable.JoinError> {
        func joined(_ t: FiveTuple) -> SessionTable.SessionID? {
            guard let id = table.bySession[t] ?? table.bySession[t.reversed], table.records[id]?.spliced != nil else { return nil }
            return id
        }
        if let a = joined(from), let b = joined(to), a == b, let record = table.records[a] {
            // The other direction's report (a modified proxy calls dysco_splice per direction): its bytes count too.
            if delta != 0 {
                let fromClient = table.bySession[from.reversed] == a && record.session == from.reversed
                table.addSpliceBytes(a, forward: fromClient ? delta : 0, reverse: fromClient ? 0 : delta)
            }
            return .success(SpliceOutcome(id: a, boxDelta: table.records[a]?.boxDelta ?? record.boxDelta, alreadyJoined: true))
        }
        // The client's socket: local = this host's listening address, peer = the client (the session reversed).
        func clientSession(_ socket: FiveTuple) -> SessionTable.Record? {
            table.bySession[socket.reversed].flatMap { table.records[$0] }.flatMap { $0.role == .rightEnd ? $0 : nil }
        }
        func serverSession(_ socket: FiveTuple) -> SessionTable.Record? {
            table.bySession[socket].flatMap { table.records[$0] }.flatMap { $0.role == .leftEnd ? $0 : nil }
        }
        let fromClient: Bool
        let client: SessionTable.Record
        let server: SessionTable.Record
        if let c = clientSession(from), let s = serverSession(to) {
            (fromClient, client, server) = (true, c, s)
        } else if let c = clientSession(to), let s = serverSession(from) {
            (fromClient, client, server) = (false, c, s)
        } else {
            return .failure(.notProxySessions(
                "\(from) and \(to) are not a session delivered to this host and a session started here (the proxy's two sessions)"))
        }
        guard let c1 = client.sequence.forward.isn, let p1 = client.sequence.reverse.isn,
              let p2 = server.sequence.forward.isn, let s2 = server.sequence.reverse.isn else {
            return .failure(.handshakeUnseen)
        }
        var box = SessionTable.BoxDelta(forward: Int32(bitPattern: p2 &- c1), reverse: Int32(bitPattern: p1 &- s2))
        if fromClient { box.forward = box.forward &+ delta } else { box.reverse = box.reverse &+ delta }
        // Off the kernel for the join: its entries are per record, and one record goes.
        for record in [client, server] where record.carrier == .pending || record.carrier == .kernel {
            pending.fastPath.append(.remove(record.id, record.fastPathTranslations))
            table.update(record.id) { $0.carrier = .slow }
        }
        do throws(SessionTable.JoinError) {
            try table.join(client.id, server.id, boxDelta: box,
                           bytesDelta: .init(forward: fromClient ? delta : 0, reverse: fromClient ? 0 : delta))
        } catch {
            return .failure(error)
        }
        counters.sessionsRemoved &+= 1
        pending.events.append(.sessionRemoved(server, reason: "spliced"))
        return .success(SpliceOutcome(id: client.id, boxDelta: box, alreadyJoined: false))
    }
}

extension PacketProcessor {
    /// A spliced-out proxy's notice to an anchor of its removal (``SpliceNotice``): the client chain's identity for
    /// the session (right anchor) and the timestamp delta of the anchor's new path, into the anchor's state and onto a
    /// new-path subsession that exists already. False (nothing changes) if the chain is unknown here or no
    /// reconfiguration of it is under way.
    public mutating func spliceNotice(chainID: UInt64, alias: SessionTable.ChainAlias?, tsDelta: Int32) -> Bool {
        guard let id = table.byChain[chainID], var m = table.records[id]?.migration else { return false }
        if let alias, !table.setAlias(id, alias) { return false }
        m.tsDelta = tsDelta
        m.proxyOnSegment = true
        table.update(id) { $0.migration = m }
        table.updateNewPathDelta(id, m.side)
        // The old path (the proxy's own clock) moves by the margin the new path's delta carries: both stay together.
        if tsDelta != 0 { table.setOldPathTimestampDelta(id, m.side, SessionTable.TimestampClocks.margin) }
        return true
    }
}

/// One of a spliced-out proxy's sockets (paper §4): the proxy still holds it, but its session now runs between the
/// anchors. Whatever it sends is dropped here (it would reach an endpoint whose socket has the same tuple); the
/// agent closes it: a FIN as from its peer at the socket's next expected number, and an ACK of the FIN the socket
/// then sends (MigrationEngine+Splice.swift), so the proxy sees an ordinary end of both connections.
public struct SplicedOutSocket: Sendable, Equatable {
    /// Packets as from the peer carry this tuple (peer → the proxy's socket).
    public var fromPeer: FiveTuple
    /// The peer's and the socket's own initial sequence numbers.
    public var peerISN: UInt32
    public var ownISN: UInt32
    /// Sequence number after the FIN the agent sent as the peer (nil: not sent yet).
    public var peerNext: UInt32?
    /// The socket's FIN: its sequence number + 1 (what acknowledges it), once seen.
    public var finEnd: UInt32?
    /// Dropped packets from the socket.
    public var dropped: UInt64 = 0
    public var until: UInt64
}

extension PacketProcessor {
    /// The proxy's sockets of a joined record that leaves the session (``leave(chainID:reason:now:)``).
    mutating func spliceOut(_ record: SessionTable.Record, until: UInt64) {
        guard let splice = record.spliced, let isns = splice.initialNumbers, isns.count == 4 else { return }
        // The client's socket: the proxy's end of the client's session (proxy → client); the server's: proxy → server.
        splicedOut[record.session.reversed] = SplicedOutSocket(fromPeer: record.session, peerISN: isns[0], ownISN: isns[1],
                                                               until: until)
        splicedOut[splice.session] = SplicedOutSocket(fromPeer: splice.session.reversed, peerISN: isns[3], ownISN: isns[2],
                                                      until: until)
    }

    /// A packet a spliced-out socket sent: dropped; a FIN is remembered (the agent acknowledges it).
    mutating func absorbSplicedOut(_ packet: some TCPPacketView, key: FiveTuple) {
        guard var socket = splicedOut[key] else { return }
        socket.dropped &+= 1
        let tcp = packet.tcp
        if tcp.flags.contains(.fin) {
            socket.finEnd = tcp.sequenceNumber &+ UInt32(packet.payloadLength) &+ 1
        }
        splicedOut[key] = socket
        counters.droppedAfterLeaving &+= 1
    }

    /// The agent sent the FIN as the peer of `socket` (its egress tuple).
    public mutating func splicedOutFinSent(_ socket: FiveTuple, next: UInt32) {
        splicedOut[socket]?.peerNext = next
    }

    /// Forgets the spliced-out sockets (closed).
    public mutating func forgetSplicedOut(_ sockets: [FiveTuple]) {
        for socket in sockets { splicedOut.removeValue(forKey: socket) }
    }
}
