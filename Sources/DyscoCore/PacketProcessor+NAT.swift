/// Boxes that translate tuples (paper §2.1, "Middleboxes that modify the five-tuple"; docs/ARCHITECTURE.md "Boxes
/// that translate"). A NAT'ing firewall changes the session's tuple between the agent's ingress (before conntrack)
/// and the host's last netfilter hook, where source NAT happens after the agent's egress queue rule. So the agent
/// of such a box (``PacketProcessor/Settings/natBox``) tags each Dysco SYN it takes in (``FastPath/natSynMark``,
/// the paper's local tag), lets it through the box untranslated, and the tc egress program, which runs after every
/// NAT, drops the tagged SYN and reports its tuple; the agent then records that tuple as the session's right-hand
/// tuple (``SessionTable/Record/translated``), opens the right subsession for it and sends the SYN on itself.
/// The right side's translations carry the translated tuple; the kernel carries the rest of the session.
extension PacketProcessor {
    /// A SYN a box that translates tagged at ingress: its session, and its bytes as they left the box's egress
    /// queue rule (before the NAT), which the agent sends on once the kernel reports the NAT's tuple.
    public struct NATSyn: Sendable {
        public var id: SessionTable.SessionID
        public var bytes: [UInt8]?
    }

    /// Tags the Dysco SYN in progress (its verdict sets ``FastPath/natSynMark``) and remembers it by sequence
    /// number, unless its session is past the handshake on the right.
    mutating func tagNATSyn(_ record: SessionTable.Record, sequence: UInt32) {
        guard record.role == .middlebox, !record.rightEstablished else { return }
        if natSyns[sequence]?.id != record.id { natSyns[sequence] = NATSyn(id: record.id, bytes: nil) }
        verdictMark |= FastPath.natSynMark
    }

    /// A tagged SYN at the egress queue rule, before the box's NAT: its bytes are kept, and it goes on untouched
    /// (the tc egress program drops it after the NAT and reports its tuple, ``natSynLeft(_:sequence:now:)``).
    mutating func natSynLeaving(_ packet: some TCPPacketView, _ waiting: NATSyn) -> Verdict {
        let sequence = packet.tcp.sequenceNumber
        guard let record = table.records[waiting.id], record.role == .middlebox, !record.rightEstablished else {
            natSyns.removeValue(forKey: sequence)
            return pass()
        }
        natSyns[sequence]?.bytes = [UInt8](UnsafeRawBufferPointer(start: packet.base, count: packet.length))
        return .accept
    }

    /// The kernel dropped a tagged SYN after the box's NAT and reports its tuple there (`key`): the session's right
    /// side is opened for that tuple (the first time), and the SYN goes on in it with the trailer (trailer v2 names
    /// the translated session, so the next hop and the right end see what the box made of it). Returns the packet
    /// for the agent to send itself (nil: no waiting SYN took the report; counted).
    public mutating func natSynLeft(_ key: FiveTuple, sequence: UInt32, now: UInt64)
        -> (packet: [UInt8]?, effects: DataplaneEffects) {
        guard let waiting = natSyns[sequence], let bytes = waiting.bytes, var record = table.records[waiting.id],
              record.role == .middlebox, !record.rightEstablished else {
            counters.natSynsStale &+= 1
            return (nil, takeEffects())
        }
        let id = waiting.id
        if record.right == nil {
            do {
                try table.setTranslated(id, key)
                if key.dstAddr != record.session.dstAddr, record.remaining.last == record.session.dstAddr {
                    // Destination NAT: the session's right end is now the address the box sent it to.
                    table.update(id) { $0.remaining[$0.remaining.count - 1] = key.dstAddr }
                }
                guard let updated = table.records[id], let next = updated.remaining.first,
                      let local = updated.left?.dstAddr else {
                    natSyns.removeValue(forKey: sequence)
                    counters.natSynsStale &+= 1
                    return (nil, takeEffects())
                }
                try table.openRight(id, local: local, next: next)
                table.update(id) { $0.remaining.removeFirst() }
            } catch {
                countInsertError(error, key: key)
                natSyns.removeValue(forKey: sequence)
                return (nil, takeEffects())
            }
            counters.translatedEgress &+= 1
            openInKernel(id, syn: .init(tuple: key, sequence: sequence))
            guard let updated = table.records[id] else { return (nil, takeEffects()) }
            record = updated
        } else if record.rightSession != key {
            // A retransmission that the NAT gave another tuple (its binding expired meanwhile): not this session's.
            counters.natSynsStale &+= 1
            return (nil, takeEffects())
        }
        let capacity = bytes.count + DyscoSynPayload.maxLength
        var buffer = [UInt8](repeating: 0, count: capacity)
        buffer.replaceSubrange(0..<bytes.count, with: bytes)
        let length = buffer.withUnsafeMutableBytes { raw -> Int? in
            func send(_ packet: inout some TCPPacketView) -> Int? {
                guard case .acceptModified(let length) = sendSyn(&packet, record: record, capacity: capacity) else { return nil }
                return length
            }
            if record.session.srcAddr.isIPv4 {
                guard case .success(var packet) = IPv4TCPPacket.parse(raw.baseAddress!, count: bytes.count) else { return nil }
                return send(&packet)
            }
            guard case .success(var packet) = IPv6TCPPacket.parse(raw.baseAddress!, count: bytes.count) else { return nil }
            return send(&packet)
        }
        guard let length else { return (nil, takeEffects()) }
        counters.natSyns &+= 1
        return (Array(buffer.prefix(length)), takeEffects())
    }

    /// A new box of a reconfiguration whose imported conntrack entry translates the session (the old box's NAT
    /// binding, §3.5 state transfer): its right side now carries `tuple` (``SessionTable/Record/translated``), as it
    /// would had the box's own NAT translated the SYN. The right subsession stays (the right anchor knows the
    /// session by that tuple already); the translations re-key, and the kernel carries the session from here (the
    /// egress queue rules run before the NAT: the slow path cannot rewrite a translated session, docs/ARCHITECTURE.md
    /// "Boxes that translate"). Committed before the import's answer leaves (``Action/translate``).
    public mutating func adoptTranslation(chainID: UInt64, _ tuple: FiveTuple) -> DataplaneEffects {
        guard let id = table.byChain[chainID], let old = table.records[id], old.role == .middlebox, old.rightSession != tuple else {
            return takeEffects()
        }
        do throws(SessionTable.InsertError) { try table.setTranslated(id, tuple) } catch {
            countInsertError(error, key: tuple)
            return takeEffects()
        }
        guard let record = table.records[id] else { return takeEffects() }
        counters.translationsAdopted &+= 1
        // The removal (of nothing, from the slow path) makes the flush before the answer commit the install at once
        // (``FastPathAction/splitForFlush(_:)``) rather than at the packet thread's quiet point.
        switch old.carrier {
        case .held:
            break  // released later with the translations then in force
        case .pending, .kernel:
            pending.fastPath += [.remove(id, old.fastPathTranslations), .install(id, record.fastPathTranslations)]
        case .slow:
            guard settings.fastPath, !record.fastPathFailed, !record.needsSlowPath else { break }
            table.update(id) {
                $0.carrier = .pending
                $0.sequence.invalidate()
            }
            pending.fastPath += [.remove(id, []), .install(id, record.fastPathTranslations)]
        }
        return takeEffects()
    }

    /// Forgets the tagged SYNs whose session is gone or established on the right (the expiry timer's turn).
    mutating func expireNATSyns() {
        natSyns = natSyns.filter { table.records[$0.value.id].map { !$0.rightEstablished } ?? false }
    }
}
