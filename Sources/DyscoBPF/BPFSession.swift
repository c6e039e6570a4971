import CLibbpf
import DyscoCore

/// The tc hook a translation belongs to (part of the map key: one map serves both hooks).
public enum BPFHook: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Subsession → session, before netfilter PREROUTING and conntrack.
    case ingress = 0
    /// Session → subsession, after POSTROUTING (the firewall, conntrack's confirmation).
    case egress = 1

    public var description: String { self == .ingress ? "ingress" : "egress" }
}

/// `dysco_value.flags` (Sources/CLibbpf/dysco_bpf.h).
public struct BPFSessionFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Held or slow: the program passes the packet untouched, to the NFQUEUE rule and the agent.
    public static let held = BPFSessionFlags(rawValue: UInt32(DYSCO_F_HELD))
    /// Installed with the SYN; the first packet with ACK and without SYN clears it (event `established`).
    public static let opening = BPFSessionFlags(rawValue: UInt32(DYSCO_F_OPENING))
    /// Set by the program when a FIN / RST passed (reported once each).
    public static let finSeen = BPFSessionFlags(rawValue: UInt32(DYSCO_F_FIN_SEEN))
    public static let rstSeen = BPFSessionFlags(rawValue: UInt32(DYSCO_F_RST_SEEN))
    /// Rewrite SYNs too (without it a SYN without ACK reaches the agent untouched).
    public static let rewriteSyn = BPFSessionFlags(rawValue: UInt32(DYSCO_F_REWRITE_SYN))
    /// With `held`: released by the agent; the program takes the translation over once the hand-over counts meet.
    public static let releasing = BPFSessionFlags(rawValue: UInt32(DYSCO_F_RELEASING))
    /// The flags the program sets itself; an update from user space keeps them (see ``BPFDatapath/setFlags``).
    public static let programOwned = BPFSessionFlags(rawValue: UInt32(DYSCO_F_PROGRAM_OWNED))
}

/// A key of `dysco_sessions`: the TCP tuple of a packet as it arrives at a hook.
public struct BPFSessionKey: Hashable, Sendable, CustomStringConvertible {
    public var tuple: FiveTuple
    public var hook: BPFHook

    public init(_ tuple: FiveTuple, hook: BPFHook) {
        self.tuple = tuple
        self.hook = hook
    }

    /// Whether the key lives in the IPv6 maps (`dysco_sessions6`, `struct dysco_key6`).
    public var isIPv6: Bool { !tuple.srcAddr.isIPv4 }

    /// The C layout of an IPv4 key: addresses and ports in network byte order, protocol TCP, padding zero.
    public var raw: dysco_key {
        precondition(!isIPv6, "an IPv6 key has the layout raw6")
        var key = dysco_key()
        key.saddr = tuple.srcAddr.value.bigEndian
        key.daddr = tuple.dstAddr.value.bigEndian
        key.sport = tuple.srcPort.bigEndian
        key.dport = tuple.dstPort.bigEndian
        key.proto = 6
        key.hook = hook.rawValue
        return key
    }

    /// The C layout of an IPv6 key (`struct dysco_key6`): the 16 address bytes, ports in network byte order.
    public var raw6: dysco_key6 {
        precondition(isIPv6, "an IPv4 key has the layout raw")
        var key = dysco_key6()
        withUnsafeMutableBytes(of: &key.saddr) { tuple.srcAddr.store(to: $0.baseAddress!) }
        withUnsafeMutableBytes(of: &key.daddr) { tuple.dstAddr.store(to: $0.baseAddress!) }
        key.sport = tuple.srcPort.bigEndian
        key.dport = tuple.dstPort.bigEndian
        key.proto = 6
        key.hook = hook.rawValue
        return key
    }

    /// The key's bytes in its family's layout (16 or 40), for calls that take the key by pointer.
    public func withRawKey<R>(_ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
        if isIPv6 {
            var key = raw6
            return try withUnsafeMutableBytes(of: &key) { try body($0.baseAddress!) }
        }
        var key = raw
        return try withUnsafeMutableBytes(of: &key) { try body($0.baseAddress!) }
    }

    /// Decodes a key; nil for a protocol other than TCP or an unknown hook.
    public init?(raw: dysco_key) {
        guard raw.proto == 6, let hook = BPFHook(rawValue: raw.hook) else { return nil }
        self.hook = hook
        tuple = FiveTuple(srcAddr: IPAddress(UInt32(bigEndian: raw.saddr)), srcPort: UInt16(bigEndian: raw.sport),
                          dstAddr: IPAddress(UInt32(bigEndian: raw.daddr)), dstPort: UInt16(bigEndian: raw.dport))
    }

    /// Decodes an IPv6 key; nil for a protocol other than TCP, an unknown hook, or an IPv4-mapped address (which
    /// the IPv6 maps never hold: the programs key IPv4 packets in `dysco_sessions`).
    public init?(raw6 raw: dysco_key6) {
        guard raw.proto == 6, let hook = BPFHook(rawValue: raw.hook) else { return nil }
        let source = withUnsafeBytes(of: raw.saddr) { IPAddress(networkBytes: $0) }
        let destination = withUnsafeBytes(of: raw.daddr) { IPAddress(networkBytes: $0) }
        guard !source.isIPv4, !destination.isIPv4 else { return nil }
        self.hook = hook
        tuple = FiveTuple(srcAddr: source, srcPort: UInt16(bigEndian: raw.sport),
                          dstAddr: destination, dstPort: UInt16(bigEndian: raw.dport))
    }

    public var description: String { "\(hook) \(tuple)" }
}

/// The TCP facts of the packets that passed one translation (one direction), before the rewrite.
public struct BPFTCPFacts: Hashable, Sendable {
    /// seq + payload length (+1 for SYN and FIN) of the last packet.
    public var sequenceEnd: UInt32 = 0
    /// The ack of the last packet with ACK.
    public var acknowledgment: UInt32 = 0
    /// The raw (unscaled) window of the last packet.
    public var window: UInt16 = 0
    /// The flags byte of the last packet.
    public var tcpFlags: UInt8 = 0

    public init(sequenceEnd: UInt32 = 0, acknowledgment: UInt32 = 0, window: UInt16 = 0, tcpFlags: UInt8 = 0) {
        self.sequenceEnd = sequenceEnd
        self.acknowledgment = acknowledgment
        self.window = window
        self.tcpFlags = tcpFlags
    }
}

/// A value of `dysco_sessions`: the tuple a packet leaves with, flags, the agent's session id, and what the
/// program records (TCP facts, counters, last-seen time).
public struct BPFSessionEntry: Hashable, Sendable {
    public var target: FiveTuple
    public var flags: BPFSessionFlags
    public var sessionID: UInt64
    public var tcp: BPFTCPFacts
    public var packets: UInt64
    public var bytes: UInt64
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) of the last packet rewritten; 0 if none.
    public var lastSeenNanoseconds: UInt64
    /// The translation's sequence delta (§3.4, ``FastPath/Translation/seqDelta``).
    public var seqDelta: Int32

    public init(target: FiveTuple, flags: BPFSessionFlags = [], sessionID: UInt64, tcp: BPFTCPFacts = BPFTCPFacts(),
                packets: UInt64 = 0, bytes: UInt64 = 0, lastSeenNanoseconds: UInt64 = 0, seqDelta: Int32 = 0) {
        self.seqDelta = seqDelta
        self.target = target
        self.flags = flags
        self.sessionID = sessionID
        self.tcp = tcp
        self.packets = packets
        self.bytes = bytes
        self.lastSeenNanoseconds = lastSeenNanoseconds
    }

    /// The C layout of an IPv4 translation's value.
    public var raw: dysco_value {
        precondition(target.srcAddr.isIPv4, "an IPv6 translation has the layout raw6")
        var value = shared
        value.new_saddr = target.srcAddr.value.bigEndian
        value.new_daddr = target.dstAddr.value.bigEndian
        return value
    }

    /// The C layout of an IPv6 translation's value (`struct dysco_value6`: the shared part, then the addresses).
    public var raw6: dysco_value6 {
        precondition(!target.srcAddr.isIPv4, "an IPv4 translation has the layout raw")
        var value = dysco_value6()
        value.v = shared
        withUnsafeMutableBytes(of: &value.new_saddr) { target.srcAddr.store(to: $0.baseAddress!) }
        withUnsafeMutableBytes(of: &value.new_daddr) { target.dstAddr.store(to: $0.baseAddress!) }
        return value
    }

    /// The value's bytes in its family's layout, for calls that take the value by pointer.
    public func withRawValue<R>(_ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
        if target.srcAddr.isIPv4 {
            var value = raw
            return try withUnsafeMutableBytes(of: &value) { try body($0.baseAddress!) }
        }
        var value = raw6
        return try withUnsafeMutableBytes(of: &value) { try body($0.baseAddress!) }
    }

    /// Everything but the IPv4 addresses (zero), which both layouts share.
    private var shared: dysco_value {
        var value = dysco_value()
        value.new_sport = target.srcPort.bigEndian
        value.new_dport = target.dstPort.bigEndian
        value.flags = flags.rawValue
        value.session_id = sessionID
        value.tcp.seq_end = tcp.sequenceEnd
        value.tcp.ack = tcp.acknowledgment
        value.tcp.window = tcp.window
        value.tcp.tcp_flags = tcp.tcpFlags
        value.packets = packets
        value.bytes = bytes
        value.last_seen_ns = lastSeenNanoseconds
        value.seq_delta = seqDelta
        return value
    }

    public init(raw: dysco_value) {
        self.init(shared: raw, source: IPAddress(UInt32(bigEndian: raw.new_saddr)),
                  destination: IPAddress(UInt32(bigEndian: raw.new_daddr)))
    }

    public init(raw6 raw: dysco_value6) {
        self.init(shared: raw.v, source: withUnsafeBytes(of: raw.new_saddr) { IPAddress(networkBytes: $0) },
                  destination: withUnsafeBytes(of: raw.new_daddr) { IPAddress(networkBytes: $0) })
    }

    private init(shared raw: dysco_value, source: IPAddress, destination: IPAddress) {
        target = FiveTuple(srcAddr: source, srcPort: UInt16(bigEndian: raw.new_sport),
                           dstAddr: destination, dstPort: UInt16(bigEndian: raw.new_dport))
        flags = BPFSessionFlags(rawValue: raw.flags)
        sessionID = raw.session_id
        tcp = BPFTCPFacts(sequenceEnd: raw.tcp.seq_end, acknowledgment: raw.tcp.ack, window: raw.tcp.window,
                          tcpFlags: raw.tcp.tcp_flags)
        packets = raw.packets
        bytes = raw.bytes
        lastSeenNanoseconds = raw.last_seen_ns
        seqDelta = raw.seq_delta
    }
}

/// One ring-buffer event (`struct dysco_event`).
public struct BPFEvent: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        case fin, rst, established
        /// A tagged SYN after the box's NAT (`DYSCO_EV_NAT_SYN`): the key is its translated tuple.
        case natSyn
        case unknown(UInt32)

        public init(_ raw: UInt32) {
            switch raw {
            case UInt32(DYSCO_EV_FIN): self = .fin
            case UInt32(DYSCO_EV_RST): self = .rst
            case UInt32(DYSCO_EV_ESTABLISHED): self = .established
            case UInt32(DYSCO_EV_NAT_SYN): self = .natSyn
            default: self = .unknown(raw)
            }
        }
    }

    public var kind: Kind
    public var sessionID: UInt64
    /// The translation's key (nil if the program wrote one this build cannot decode).
    public var key: BPFSessionKey?
    public var timestampNanoseconds: UInt64
    public var sequence: UInt32
    public var acknowledgment: UInt32
    public var tcpFlags: UInt8
    /// The translation's counters after the packet.
    public var packets: UInt64
    public var bytes: UInt64

    public init(raw: dysco_event) {
        self.init(shared: raw, key: BPFSessionKey(raw: raw.key))
    }

    /// An IPv6 packet's event (`struct dysco_event6`; its type carries `DYSCO_EV_IPV6`).
    public init(raw6: dysco_event6) {
        var shared = raw6.e
        shared.type &= ~UInt32(DYSCO_EV_IPV6)
        self.init(shared: shared, key: BPFSessionKey(raw6: raw6.key))
    }

    private init(shared raw: dysco_event, key: BPFSessionKey?) {
        kind = Kind(raw.type)
        sessionID = raw.session_id
        self.key = key
        timestampNanoseconds = raw.ts_ns
        sequence = raw.seq
        acknowledgment = raw.ack
        tcpFlags = raw.tcp_flags
        packets = raw.packets
        bytes = raw.bytes
    }

    /// Decodes a ring-buffer record: `struct dysco_event6` when its type has `DYSCO_EV_IPV6`, else `struct
    /// dysco_event`; nil if it is shorter than its layout.
    public init?(bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= MemoryLayout<dysco_event>.size, let base = bytes.baseAddress else { return nil }
        let event = base.loadUnaligned(as: dysco_event.self)
        guard event.type & UInt32(DYSCO_EV_IPV6) != 0 else {
            self.init(raw: event)
            return
        }
        guard bytes.count >= MemoryLayout<dysco_event6>.size else { return nil }
        self.init(raw6: base.loadUnaligned(as: dysco_event6.self))
    }

    public var description: String {
        "\(kind) session \(sessionID) \(key.map(String.init(describing:)) ?? "?") seq \(sequence) ack \(acknowledgment)"
    }
}

extension BPFSessionKey {
    /// The map entry of one fast-path translation (the same four per two-sided session as the nftables fast path:
    /// ``SessionTable/Record/fastPathTranslations``).
    public static func entry(_ translation: FastPath.Translation, sessionID: UInt64,
                             flags: BPFSessionFlags = []) -> (key: BPFSessionKey, entry: BPFSessionEntry) {
        let hook: BPFHook = translation.hook == .ingress ? .ingress : .egress
        return (BPFSessionKey(translation.key, hook: hook),
                BPFSessionEntry(target: translation.target, flags: flags, sessionID: sessionID,
                                seqDelta: translation.seqDelta))
    }
}

/// Sizes for capacity planning (docs/BPF.md).
public enum BPFLayout {
    public static let keySize = MemoryLayout<dysco_key>.size
    public static let valueSize = MemoryLayout<dysco_value>.size
    public static let eventSize = MemoryLayout<dysco_event>.size
    /// IPv6's maps (`dysco_sessions6`) and events.
    public static let key6Size = MemoryLayout<dysco_key6>.size
    public static let value6Size = MemoryLayout<dysco_value6>.size
    public static let event6Size = MemoryLayout<dysco_event6>.size
    /// The default capacity of `dysco_sessions` (translations, four per two-sided session).
    public static let defaultMaxEntries = Int(DYSCO_MAX_ENTRIES_DEFAULT)
}
