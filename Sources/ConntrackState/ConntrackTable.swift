import DyscoCore
import CConntrack
import DyscoSystem
import Logging

/// One ctnetlink handle (libnetfilter_conntrack `nfct_handle`) on one namespace's conntrack table.
///
/// Not thread-safe: use it from one thread at a time. Many queries go over the same handle (no per-entry socket).
public final class ConntrackTable {
    public let namespace: NamespaceSelection
    let handle: OpaquePointer
    let sink: DumpSink
    var logger: Logger

    /// Opens a ctnetlink socket in `namespace` (the socket stays there; the calling thread does not move).
    public init(namespace: NamespaceSelection = .current, logger: Logger) throws(ConntrackError) {
        self.namespace = namespace
        self.logger = logger
        self.logger[metadataKey: "conntrack.netns"] = "\(namespace)"
        let opened: Result<HandleBox, any Error> = Result {
            try NamespaceThread.run(in: namespace) {
                HandleBox(pointer: try ctCall("nfct_open(CONNTRACK) in \(namespace)") { dysco_nfct_open_conntrack() })
            }
        }
        switch opened {
        case let .success(box):
            handle = box.pointer
        case let .failure(error as ConntrackError):
            throw error
        case let .failure(error as SystemCallError):
            throw ConntrackError(error)
        case let .failure(error):
            throw ConntrackError(operation: "open conntrack handle in \(namespace): \(error)", errno: EIO)
        }
        sink = DumpSink()
        let registered = nfct_callback_register(handle, NFCT_T_ALL, conntrackCallback,
                                                Unmanaged.passUnretained(sink).toOpaque())
        if registered < 0 {
            let code = dysco_ct_errno()
            nfct_close(handle)
            throw ConntrackError(operation: "nfct_callback_register", errno: code == 0 ? ENOMEM : code)
        }
    }

    deinit {
        nfct_callback_unregister(handle)
        nfct_close(handle)
    }

    // MARK: Reading

    /// The entry a tuple belongs to, in either direction (original or reply tuple); nil when there is none.
    public func get(_ key: FlowKey) throws(ConntrackError) -> ConntrackEntry? {
        if let entry = try getExact(key) { return entry }
        // A reply tuple that went through NAT is found directly; the inverse of an original tuple is not when the
        // entry is NAT'd, so try the inverted tuple as the original one too.
        var inverted = key
        inverted.tuple = key.tuple.inverted
        return try getExact(inverted)
    }

    private func getExact(_ key: FlowKey) throws(ConntrackError) -> ConntrackEntry? {
        let family = key.tuple.src.family
        let ct = try newObject(entry: key.description)
        defer { nfct_destroy(ct) }
        setTuple(ct, family: family, proto: key.proto, orig: key.tuple, reply: nil)
        nfct_set_attr_u16(ct, ATTR_ZONE, key.zone)
        sink.reset()
        do {
            try ctCall("get (NFCT_Q_GET)", entry: key.description) {
                nfct_query(handle, NFCT_Q_GET, UnsafeRawPointer(ct))
            }
        } catch where error.errno == ENOENT {
            return nil
        }
        if let failure = sink.failure { throw ConntrackError(operation: failure, errno: EPROTO, entry: key.description) }
        return sink.entries.first
    }

    /// Every entry of the table (optionally one family only), or those whose mark matches `mark` under `mask`
    /// (filtered in the kernel).
    public func dump(family: AddressFamily? = nil, mark: UInt32? = nil, mask: UInt32 = 0xffff_ffff)
        throws(ConntrackError) -> [ConntrackEntry]
    {
        sink.reset()
        if let mark {
            let filter = try ctCall("nfct_filter_dump_create") { nfct_filter_dump_create() }
            defer { nfct_filter_dump_destroy(filter) }
            var markFilter = nfct_filter_dump_mark(val: mark, mask: mask)
            nfct_filter_dump_set_attr(filter, NFCT_FILTER_DUMP_MARK, &markFilter)
            if let family { nfct_filter_dump_set_attr_u8(filter, NFCT_FILTER_DUMP_L3NUM, family.afValue) }
            try ctCall("dump (NFCT_Q_DUMP_FILTER mark=\(mark)/\(mask))") {
                nfct_query(handle, NFCT_Q_DUMP_FILTER, UnsafeRawPointer(filter))
            }
        } else {
            var af = UInt32(family?.afValue ?? UInt8(AF_UNSPEC))
            try ctCall("dump (NFCT_Q_DUMP)") { nfct_query(handle, NFCT_Q_DUMP, &af) }
        }
        if let failure = sink.failure { throw ConntrackError(operation: failure, errno: EPROTO) }
        let entries = sink.entries
        sink.reset()
        return entries
    }

    // MARK: Writing

    /// Creates `entry` (NFCT_Q_CREATE). Throws EEXIST when the tuple is taken; see ``ConntrackImporter``.
    public func create(_ entry: ConntrackEntry, liberal: Bool = false) throws(ConntrackError) {
        let ct = try newObject(entry: entry.description)
        defer { nfct_destroy(ct) }
        try fill(ct, from: entry, liberal: liberal)
        try ctCall("create (NFCT_Q_CREATE)", entry: entry.description) {
            nfct_query(handle, NFCT_Q_CREATE, UnsafeRawPointer(ct))
        }
    }

    /// Deletes the entry a tuple belongs to (NFCT_Q_DESTROY). Throws ENOENT when there is none.
    public func destroy(_ key: FlowKey) throws(ConntrackError) {
        let ct = try newObject(entry: key.description)
        defer { nfct_destroy(ct) }
        setTuple(ct, family: key.tuple.src.family, proto: key.proto, orig: key.tuple, reply: nil)
        nfct_set_attr_u16(ct, ATTR_ZONE, key.zone)
        try ctCall("destroy (NFCT_Q_DESTROY)", entry: key.description) {
            nfct_query(handle, NFCT_Q_DESTROY, UnsafeRawPointer(ct))
        }
    }

    // MARK: Building nf_conntrack objects

    private func newObject(entry: String) throws(ConntrackError) -> OpaquePointer {
        try ctCall("nfct_new", entry: entry) { nfct_new() }
    }

    private func setTuple(_ ct: OpaquePointer, family: AddressFamily, proto: L4Protocol,
                          orig: ConntrackTuple, reply: ConntrackTuple?) {
        nfct_set_attr_u8(ct, ATTR_L3PROTO, family.afValue)
        nfct_set_attr_u8(ct, ATTR_L4PROTO, proto.number)
        setAddress(ct, orig.src, family: family, v4: ATTR_ORIG_IPV4_SRC, v6: ATTR_ORIG_IPV6_SRC)
        setAddress(ct, orig.dst, family: family, v4: ATTR_ORIG_IPV4_DST, v6: ATTR_ORIG_IPV6_DST)
        if let sport = orig.sport { nfct_set_attr_u16(ct, ATTR_ORIG_PORT_SRC, sport.bigEndian) }
        if let dport = orig.dport { nfct_set_attr_u16(ct, ATTR_ORIG_PORT_DST, dport.bigEndian) }
        if let type = orig.type { nfct_set_attr_u8(ct, ATTR_ICMP_TYPE, type) }
        if let code = orig.code { nfct_set_attr_u8(ct, ATTR_ICMP_CODE, code) }
        if let id = orig.id { nfct_set_attr_u16(ct, ATTR_ICMP_ID, id.bigEndian) }
        guard let reply else { return }
        nfct_set_attr_u8(ct, ATTR_REPL_L3PROTO, family.afValue)
        nfct_set_attr_u8(ct, ATTR_REPL_L4PROTO, proto.number)
        setAddress(ct, reply.src, family: family, v4: ATTR_REPL_IPV4_SRC, v6: ATTR_REPL_IPV6_SRC)
        setAddress(ct, reply.dst, family: family, v4: ATTR_REPL_IPV4_DST, v6: ATTR_REPL_IPV6_DST)
        if let sport = reply.sport { nfct_set_attr_u16(ct, ATTR_REPL_PORT_SRC, sport.bigEndian) }
        if let dport = reply.dport { nfct_set_attr_u16(ct, ATTR_REPL_PORT_DST, dport.bigEndian) }
    }

    private func setAddress(_ ct: OpaquePointer, _ address: IPAddress, family: AddressFamily, v4: nf_conntrack_attr,
                            v6: nf_conntrack_attr) {
        switch family {
        case .ipv4:
            nfct_set_attr_u32(ct, v4, address.value.bigEndian)
        case .ipv6:
            address.ipv6Bytes.withUnsafeBytes { nfct_set_attr(ct, v6, $0.baseAddress) }  // copied by the library
        }
    }

    /// Everything an import sends: see docs/STATE-FORMAT.md, "What import sends".
    private func fill(_ ct: OpaquePointer, from entry: ConntrackEntry, liberal: Bool) throws(ConntrackError) {
        // With NAT, send the un-NAT'd reply and the NAT bindings: the kernel builds the NAT'd reply tuple itself
        // (nf_nat_setup_info only marks the entry as NAT'd when it changes the reply tuple).
        let reply = entry.nat == nil ? entry.reply : entry.orig.inverted
        setTuple(ct, family: entry.family, proto: entry.proto, orig: entry.orig, reply: reply)

        var status = entry.status
        status.formUnion([.seenReply, .assured])
        status.subtract(ConntrackStatus.kernelOwned)
        nfct_set_attr_u32(ct, ATTR_STATUS, status.rawValue)
        nfct_set_attr_u32(ct, ATTR_TIMEOUT, entry.timeout)
        nfct_set_attr_u32(ct, ATTR_MARK, entry.mark)
        nfct_set_attr_u16(ct, ATTR_ZONE, entry.zone)

        if let tcp = entry.tcp {
            nfct_set_attr_u8(ct, ATTR_TCP_STATE, tcp.state.kernelValue)
            // A dump reports mask 0; a mask of 0 applies nothing. mask = flags makes the kernel take the flags,
            // and with WINDOW_SCALE set in both directions it also takes both window scales.
            var origFlags = tcp.orig.flags, replyFlags = tcp.reply.flags
            if liberal {
                origFlags.insert(.beLiberal)
                replyFlags.insert(.beLiberal)
            }
            nfct_set_attr_u8(ct, ATTR_TCP_FLAGS_ORIG, origFlags.rawValue)
            nfct_set_attr_u8(ct, ATTR_TCP_MASK_ORIG, origFlags.rawValue)
            nfct_set_attr_u8(ct, ATTR_TCP_FLAGS_REPL, replyFlags.rawValue)
            nfct_set_attr_u8(ct, ATTR_TCP_MASK_REPL, replyFlags.rawValue)
            if let wscale = tcp.orig.wscale { nfct_set_attr_u8(ct, ATTR_TCP_WSCALE_ORIG, wscale) }
            if let wscale = tcp.reply.wscale { nfct_set_attr_u8(ct, ATTR_TCP_WSCALE_REPL, wscale) }
        }

        if let snat = entry.nat?.snat {
            setAddress(ct, snat.ip, family: entry.family, v4: ATTR_SNAT_IPV4, v6: ATTR_SNAT_IPV6)
            if let port = snat.port { nfct_set_attr_u16(ct, ATTR_SNAT_PORT, port.bigEndian) }
        }
        if let dnat = entry.nat?.dnat {
            setAddress(ct, dnat.ip, family: entry.family, v4: ATTR_DNAT_IPV4, v6: ATTR_DNAT_IPV6)
            if let port = dnat.port { nfct_set_attr_u16(ct, ATTR_DNAT_PORT, port.bigEndian) }
        }

        if let adjust = entry.seqAdj?.orig {
            nfct_set_attr_u32(ct, ATTR_ORIG_NAT_SEQ_CORRECTION_POS, adjust.correctionPos)
            nfct_set_attr_u32(ct, ATTR_ORIG_NAT_SEQ_OFFSET_BEFORE, adjust.offsetBefore)
            nfct_set_attr_u32(ct, ATTR_ORIG_NAT_SEQ_OFFSET_AFTER, adjust.offsetAfter)
        }
        if let adjust = entry.seqAdj?.reply {
            nfct_set_attr_u32(ct, ATTR_REPL_NAT_SEQ_CORRECTION_POS, adjust.correctionPos)
            nfct_set_attr_u32(ct, ATTR_REPL_NAT_SEQ_OFFSET_BEFORE, adjust.offsetBefore)
            nfct_set_attr_u32(ct, ATTR_REPL_NAT_SEQ_OFFSET_AFTER, adjust.offsetAfter)
        }

        if let labels = entry.labels, let highest = labels.max() {
            let bitmask = try ctCall("nfct_bitmask_new", entry: entry.description) {
                nfct_bitmask_new(UInt32(highest))
            }
            for label in labels { nfct_bitmask_set_bit(bitmask, UInt32(label)) }
            nfct_set_attr(ct, ATTR_CONNLABELS, UnsafeRawPointer(bitmask))  // owned by ct from now on
        }
    }
}

/// The raw handle crossing from the namespace thread to the caller (used by one thread at a time).
struct HandleBox: @unchecked Sendable {
    var pointer: OpaquePointer
}

/// Collects what a query's callback delivers. Owned by its ``ConntrackTable``; only touched during its queries.
final class DumpSink {
    var entries: [ConntrackEntry] = []
    var failure: String?

    func reset() {
        entries.removeAll(keepingCapacity: true)
        failure = nil
    }
}

private let conntrackCallback: @convention(c) (nf_conntrack_msg_type, OpaquePointer?, UnsafeMutableRawPointer?)
    -> Int32 = { _, ct, data in
        guard let ct, let data else { return 1 /* NFCT_CB_CONTINUE */ }
        let sink = Unmanaged<DumpSink>.fromOpaque(data).takeUnretainedValue()
        if let entry = ConntrackEntry(conntrackObject: ct) {
            sink.entries.append(entry)
        } else {
            sink.failure = "decode entry from the kernel (unknown address family \(nfct_get_attr_u8(ct, ATTR_L3PROTO)))"
        }
        return 1 /* NFCT_CB_CONTINUE */
    }

// MARK: Reading nf_conntrack objects

extension ConntrackEntry {
    /// Reads a libnetfilter_conntrack object; nil when its address family is neither IPv4 nor IPv6.
    init?(conntrackObject ct: OpaquePointer) {
        func isSet(_ attribute: nf_conntrack_attr) -> Bool { nfct_attr_is_set(ct, attribute) > 0 }
        func u8(_ attribute: nf_conntrack_attr) -> UInt8 { nfct_get_attr_u8(ct, attribute) }
        func u16(_ attribute: nf_conntrack_attr) -> UInt16 { nfct_get_attr_u16(ct, attribute) }
        func u32(_ attribute: nf_conntrack_attr) -> UInt32 { nfct_get_attr_u32(ct, attribute) }
        func u64(_ attribute: nf_conntrack_attr) -> UInt64 { nfct_get_attr_u64(ct, attribute) }
        func port(_ attribute: nf_conntrack_attr) -> UInt16? { isSet(attribute) ? UInt16(bigEndian: u16(attribute)) : nil }

        let family: AddressFamily
        switch Int32(u8(ATTR_L3PROTO)) {
        case AF_INET: family = .ipv4
        case AF_INET6: family = .ipv6
        default: return nil
        }
        func address(v4: nf_conntrack_attr, v6: nf_conntrack_attr) -> IPAddress {
            if family == .ipv4 {
                return IPAddress(UInt32(bigEndian: u32(v4)))
            }
            guard let pointer = nfct_get_attr(ct, v6) else { return IPAddress(high: 0, low: 0) }
            return IPAddress(networkBytes: UnsafeRawBufferPointer(start: pointer, count: 16))
        }

        let proto = L4Protocol(number: u8(ATTR_L4PROTO))
        var orig = ConntrackTuple(src: address(v4: ATTR_ORIG_IPV4_SRC, v6: ATTR_ORIG_IPV6_SRC),
                                  dst: address(v4: ATTR_ORIG_IPV4_DST, v6: ATTR_ORIG_IPV6_DST))
        var reply = ConntrackTuple(src: address(v4: ATTR_REPL_IPV4_SRC, v6: ATTR_REPL_IPV6_SRC),
                                   dst: address(v4: ATTR_REPL_IPV4_DST, v6: ATTR_REPL_IPV6_DST))
        if proto.isICMP {
            if isSet(ATTR_ICMP_TYPE) { orig.type = u8(ATTR_ICMP_TYPE) }
            if isSet(ATTR_ICMP_CODE) { orig.code = u8(ATTR_ICMP_CODE) }
            if isSet(ATTR_ICMP_ID) { orig.id = UInt16(bigEndian: u16(ATTR_ICMP_ID)) }
        } else {
            orig.sport = port(ATTR_ORIG_PORT_SRC)
            orig.dport = port(ATTR_ORIG_PORT_DST)
            reply.sport = port(ATTR_REPL_PORT_SRC)
            reply.dport = port(ATTR_REPL_PORT_DST)
        }
        let status = ConntrackStatus(rawValue: isSet(ATTR_STATUS) ? u32(ATTR_STATUS) : 0)

        var tcp: TCPInfo?
        if proto == .tcp {
            let state = isSet(ATTR_TCP_STATE) ? TCPState(kernelValue: u8(ATTR_TCP_STATE)) ?? .none : .none
            tcp = TCPInfo(
                state: state,
                orig: TCPDirection(flags: TCPConntrackFlags(rawValue: isSet(ATTR_TCP_FLAGS_ORIG) ? u8(ATTR_TCP_FLAGS_ORIG) : 0),
                                   wscale: isSet(ATTR_TCP_WSCALE_ORIG) ? u8(ATTR_TCP_WSCALE_ORIG) : nil),
                reply: TCPDirection(flags: TCPConntrackFlags(rawValue: isSet(ATTR_TCP_FLAGS_REPL) ? u8(ATTR_TCP_FLAGS_REPL) : 0),
                                    wscale: isSet(ATTR_TCP_WSCALE_REPL) ? u8(ATTR_TCP_WSCALE_REPL) : nil))
        }

        // NAT: the reply tuple tells where the kernel rewrites to; keep it as bindings that import replays.
        var nat = NATInfo()
        if status.contains(.srcNAT) {
            nat.snat = NATBinding(ip: reply.dst, port: proto.hasPorts ? reply.dport : nil)
        }
        if status.contains(.dstNAT) {
            nat.dnat = NATBinding(ip: reply.src, port: proto.hasPorts ? reply.sport : nil)
        }

        var seqAdj = SeqAdjustInfo()
        if isSet(ATTR_ORIG_NAT_SEQ_CORRECTION_POS) {
            seqAdj.orig = SeqAdjust(correctionPos: u32(ATTR_ORIG_NAT_SEQ_CORRECTION_POS),
                                    offsetBefore: u32(ATTR_ORIG_NAT_SEQ_OFFSET_BEFORE),
                                    offsetAfter: u32(ATTR_ORIG_NAT_SEQ_OFFSET_AFTER))
        }
        if isSet(ATTR_REPL_NAT_SEQ_CORRECTION_POS) {
            seqAdj.reply = SeqAdjust(correctionPos: u32(ATTR_REPL_NAT_SEQ_CORRECTION_POS),
                                     offsetBefore: u32(ATTR_REPL_NAT_SEQ_OFFSET_BEFORE),
                                     offsetAfter: u32(ATTR_REPL_NAT_SEQ_OFFSET_AFTER))
        }

        var labels: [Int]?
        if isSet(ATTR_CONNLABELS), let raw = nfct_get_attr(ct, ATTR_CONNLABELS) {
            let bitmask = OpaquePointer(raw)
            let maxbit = nfct_bitmask_maxbit(bitmask)
            let bits = (0...Int(maxbit)).filter { nfct_bitmask_test_bit(bitmask, UInt32($0)) != 0 }
            labels = bits.isEmpty ? nil : bits
        }

        var counters: CounterInfo?
        if isSet(ATTR_ORIG_COUNTER_PACKETS) {
            counters = CounterInfo(orig: Counter(packets: u64(ATTR_ORIG_COUNTER_PACKETS), bytes: u64(ATTR_ORIG_COUNTER_BYTES)),
                                   reply: Counter(packets: u64(ATTR_REPL_COUNTER_PACKETS), bytes: u64(ATTR_REPL_COUNTER_BYTES)))
        }

        self.init(family: family, proto: proto, orig: orig, reply: reply, tcp: tcp, status: status,
                  timeout: isSet(ATTR_TIMEOUT) ? u32(ATTR_TIMEOUT) : 0,
                  mark: isSet(ATTR_MARK) ? u32(ATTR_MARK) : 0,
                  zone: isSet(ATTR_ZONE) ? u16(ATTR_ZONE) : 0,
                  labels: labels,
                  nat: (nat.snat == nil && nat.dnat == nil) ? nil : nat,
                  seqAdj: (seqAdj.orig == nil && seqAdj.reply == nil) ? nil : seqAdj,
                  counters: counters,
                  id: isSet(ATTR_ID) ? u32(ATTR_ID) : nil)
    }
}
