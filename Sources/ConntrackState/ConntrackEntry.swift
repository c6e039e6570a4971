import CConntrack
import DyscoCore

// The JSON model of one conntrack entry. Field names follow conntrack's own vocabulary (orig/reply, src, dst,
// sport, dport, mark, zone, labels, status bits and TCP flag names as the kernel headers spell them).
// docs/STATE-FORMAT.md documents the format with an example.

extension AddressFamily {
    var afValue: UInt8 { self == .ipv4 ? UInt8(AF_INET) : UInt8(AF_INET6) }
}

/// The layer-4 protocol. Written as conntrack's name ("tcp", "udp", "icmp", ...) when it has one, else as a number.
public struct L4Protocol: Hashable, Sendable, Codable, CustomStringConvertible {
    public var number: UInt8
    public init(number: UInt8) { self.number = number }

    public static let icmp = L4Protocol(number: 1)
    public static let tcp = L4Protocol(number: 6)
    public static let udp = L4Protocol(number: 17)
    public static let dccp = L4Protocol(number: 33)
    public static let gre = L4Protocol(number: 47)
    public static let icmpv6 = L4Protocol(number: 58)
    public static let sctp = L4Protocol(number: 132)
    public static let udplite = L4Protocol(number: 136)

    static let names: [UInt8: String] = [
        1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6", 132: "sctp", 136: "udplite",
    ]

    public init?(name: String) {
        if let match = Self.names.first(where: { $0.value == name.lowercased() }) {
            self.number = match.key
        } else if let value = UInt8(name) {
            self.number = value
        } else {
            return nil
        }
    }

    public var name: String? { Self.names[number] }
    public var description: String { name ?? String(number) }
    /// Protocols whose tuples carry source and destination ports.
    public var hasPorts: Bool { [6, 17, 33, 132, 136].contains(number) }
    public var isICMP: Bool { number == 1 || number == 58 }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let value = try? container.decode(UInt8.self) {
            self.number = value
            return
        }
        let text = try container.decode(String.self)
        guard let proto = L4Protocol(name: text) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "unknown protocol \"\(text)\"")
        }
        self = proto
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let name { try container.encode(name) } else { try container.encode(number) }
    }
}

/// One direction's tuple. Ports for tcp/udp/sctp/dccp/udplite; type/code/id for ICMP (original direction only).
public struct ConntrackTuple: Hashable, Sendable, Codable, CustomStringConvertible {
    public var src: IPAddress
    public var dst: IPAddress
    public var sport: UInt16?
    public var dport: UInt16?
    public var type: UInt8?
    public var code: UInt8?
    public var id: UInt16?

    public init(src: IPAddress, dst: IPAddress, sport: UInt16? = nil, dport: UInt16? = nil,
                type: UInt8? = nil, code: UInt8? = nil, id: UInt16? = nil) {
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.type = type
        self.code = code
        self.id = id
    }

    /// The same flow seen from the other end (addresses and ports swapped).
    public var inverted: ConntrackTuple {
        ConntrackTuple(src: dst, dst: src, sport: dport, dport: sport, type: type, code: code, id: id)
    }

    public var description: String {
        var text = "src=\(src) dst=\(dst)"
        if let sport { text += " sport=\(sport)" }
        if let dport { text += " dport=\(dport)" }
        if let type { text += " type=\(type)" }
        if let code { text += " code=\(code)" }
        if let id { text += " id=\(id)" }
        return text
    }
}

/// TCP connection-tracking state (`enum tcp_conntrack`).
public enum TCPState: String, Codable, Sendable, CaseIterable {
    case none = "NONE"
    case synSent = "SYN_SENT"
    case synRecv = "SYN_RECV"
    case established = "ESTABLISHED"
    case finWait = "FIN_WAIT"
    case closeWait = "CLOSE_WAIT"
    case lastAck = "LAST_ACK"
    case timeWait = "TIME_WAIT"
    case close = "CLOSE"
    case synSent2 = "SYN_SENT2"

    public var kernelValue: UInt8 { UInt8(Self.allCases.firstIndex(of: self)!) }
    public init?(kernelValue: UInt8) {
        guard Int(kernelValue) < Self.allCases.count else { return nil }
        self = Self.allCases[Int(kernelValue)]
    }
}

/// A set of named bits written in JSON as a list of names ("BIT_n" for bits without a name).
public protocol NamedBitSet: OptionSet, Codable, Sendable, Hashable where RawValue: FixedWidthInteger & Sendable {
    static var bitNames: [(bit: Int, name: String)] { get }
}

extension NamedBitSet {
    public var names: [String] {
        (0..<RawValue.bitWidth).compactMap { bit -> String? in
            guard rawValue & (RawValue(1) << bit) != 0 else { return nil }
            return Self.bitNames.first(where: { $0.bit == bit })?.name ?? "BIT_\(bit)"
        }
    }

    public init?(names: [String]) {
        var raw: RawValue = 0
        for name in names {
            if let known = Self.bitNames.first(where: { $0.name == name }) {
                raw |= RawValue(1) << known.bit
            } else if name.hasPrefix("BIT_"), let bit = Int(name.dropFirst(4)), bit >= 0, bit < RawValue.bitWidth {
                raw |= RawValue(1) << bit
            } else {
                return nil
            }
        }
        self.init(rawValue: raw)
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let names = try container.decode([String].self)
        guard let value = Self(names: names) else {
            let known = Self.bitNames.map(\.name).joined(separator: ", ")
            throw DecodingError.dataCorruptedError(
                in: container, debugDescription: "unknown flag in \(names); known: \(known), BIT_n")
        }
        self = value
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(names)
    }
}

/// Conntrack status bits (`enum ip_conntrack_status`, IPS_*).
public struct ConntrackStatus: NamedBitSet {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let expected = ConntrackStatus(rawValue: 1 << 0)
    public static let seenReply = ConntrackStatus(rawValue: 1 << 1)
    public static let assured = ConntrackStatus(rawValue: 1 << 2)
    public static let confirmed = ConntrackStatus(rawValue: 1 << 3)
    public static let srcNAT = ConntrackStatus(rawValue: 1 << 4)
    public static let dstNAT = ConntrackStatus(rawValue: 1 << 5)
    public static let seqAdjust = ConntrackStatus(rawValue: 1 << 6)
    public static let srcNATDone = ConntrackStatus(rawValue: 1 << 7)
    public static let dstNATDone = ConntrackStatus(rawValue: 1 << 8)
    public static let dying = ConntrackStatus(rawValue: 1 << 9)
    public static let fixedTimeout = ConntrackStatus(rawValue: 1 << 10)
    public static let template = ConntrackStatus(rawValue: 1 << 11)
    public static let untracked = ConntrackStatus(rawValue: 1 << 12)
    public static let helper = ConntrackStatus(rawValue: 1 << 13)
    public static let offload = ConntrackStatus(rawValue: 1 << 14)
    public static let hwOffload = ConntrackStatus(rawValue: 1 << 15)

    /// Bits the kernel owns: sending EXPECTED, CONFIRMED or DYING on create is refused with EBUSY, the others
    /// describe kernel-side machinery that a new entry cannot inherit.
    public static let kernelOwned: ConntrackStatus = [
        .expected, .confirmed, .dying, .template, .untracked, .offload, .hwOffload,
    ]

    public static let bitNames: [(bit: Int, name: String)] = [
        (0, "EXPECTED"), (1, "SEEN_REPLY"), (2, "ASSURED"), (3, "CONFIRMED"), (4, "SRC_NAT"), (5, "DST_NAT"),
        (6, "SEQ_ADJUST"), (7, "SRC_NAT_DONE"), (8, "DST_NAT_DONE"), (9, "DYING"), (10, "FIXED_TIMEOUT"),
        (11, "TEMPLATE"), (12, "UNTRACKED"), (13, "HELPER"), (14, "OFFLOAD"), (15, "HW_OFFLOAD"),
    ]
}

/// Per-direction TCP tracking flags (IP_CT_TCP_FLAG_*).
public struct TCPConntrackFlags: NamedBitSet {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let windowScale = TCPConntrackFlags(rawValue: 0x01)
    public static let sackPerm = TCPConntrackFlags(rawValue: 0x02)
    public static let closeInit = TCPConntrackFlags(rawValue: 0x04)
    public static let beLiberal = TCPConntrackFlags(rawValue: 0x08)
    public static let dataUnacknowledged = TCPConntrackFlags(rawValue: 0x10)
    public static let maxAckSet = TCPConntrackFlags(rawValue: 0x20)
    public static let challengeAck = TCPConntrackFlags(rawValue: 0x40)
    public static let simultaneousOpen = TCPConntrackFlags(rawValue: 0x80)

    public static let bitNames: [(bit: Int, name: String)] = [
        (0, "WINDOW_SCALE"), (1, "SACK_PERM"), (2, "CLOSE_INIT"), (3, "BE_LIBERAL"), (4, "DATA_UNACKNOWLEDGED"),
        (5, "MAXACK_SET"), (6, "CHALLENGE_ACK"), (7, "SIMULTANEOUS_OPEN"),
    ]
}

/// TCP tracking data of one direction: its flags and its window scale (the shift from its SYN's option).
public struct TCPDirection: Hashable, Sendable, Codable {
    public var flags: TCPConntrackFlags
    public var wscale: UInt8?
    public init(flags: TCPConntrackFlags = [], wscale: UInt8? = nil) {
        self.flags = flags
        self.wscale = wscale
    }
}

public struct TCPInfo: Hashable, Sendable, Codable {
    public var state: TCPState
    public var orig: TCPDirection
    public var reply: TCPDirection
    public init(state: TCPState, orig: TCPDirection = .init(), reply: TCPDirection = .init()) {
        self.state = state
        self.orig = orig
        self.reply = reply
    }
}

/// One NAT manipulation: the address (and port) the kernel rewrites to.
public struct NATBinding: Hashable, Sendable, Codable {
    public var ip: IPAddress
    public var port: UInt16?
    public init(ip: IPAddress, port: UInt16? = nil) {
        self.ip = ip
        self.port = port
    }
}

public struct NATInfo: Hashable, Sendable, Codable {
    public var snat: NATBinding?
    public var dnat: NATBinding?
    public init(snat: NATBinding? = nil, dnat: NATBinding? = nil) {
        self.snat = snat
        self.dnat = dnat
    }
}

/// Sequence-number adjustment of one direction (set by helpers / SYN proxies that change payload lengths).
public struct SeqAdjust: Hashable, Sendable, Codable {
    public var correctionPos: UInt32
    public var offsetBefore: UInt32
    public var offsetAfter: UInt32
    public init(correctionPos: UInt32, offsetBefore: UInt32, offsetAfter: UInt32) {
        self.correctionPos = correctionPos
        self.offsetBefore = offsetBefore
        self.offsetAfter = offsetAfter
    }
    enum CodingKeys: String, CodingKey {
        case correctionPos = "correction_pos", offsetBefore = "offset_before", offsetAfter = "offset_after"
    }
}

public struct SeqAdjustInfo: Hashable, Sendable, Codable {
    public var orig: SeqAdjust?
    public var reply: SeqAdjust?
    public init(orig: SeqAdjust? = nil, reply: SeqAdjust? = nil) {
        self.orig = orig
        self.reply = reply
    }
}

public struct Counter: Hashable, Sendable, Codable {
    public var packets: UInt64
    public var bytes: UInt64
    public init(packets: UInt64, bytes: UInt64) {
        self.packets = packets
        self.bytes = bytes
    }
}

/// Packet and byte counters: informational, never imported (the kernel starts new entries at zero).
public struct CounterInfo: Hashable, Sendable, Codable {
    public var orig: Counter
    public var reply: Counter
    public init(orig: Counter, reply: Counter) {
        self.orig = orig
        self.reply = reply
    }
}

/// One conntrack entry as exported by ``ConntrackTable`` and imported by ``ConntrackImporter``.
public struct ConntrackEntry: Hashable, Sendable, Codable, CustomStringConvertible {
    public var family: AddressFamily
    public var proto: L4Protocol
    public var orig: ConntrackTuple
    public var reply: ConntrackTuple
    public var tcp: TCPInfo?
    public var status: ConntrackStatus
    /// Remaining lifetime in seconds when exported; carried over on import.
    public var timeout: UInt32
    public var mark: UInt32
    public var zone: UInt16
    /// Connection-label bit numbers (`-m connlabel`); nil or empty when none.
    public var labels: [Int]?
    public var nat: NATInfo?
    public var seqAdj: SeqAdjustInfo?
    public var counters: CounterInfo?
    /// The kernel's id for the entry on the exporting host (informational).
    public var id: UInt32?

    public init(family: AddressFamily, proto: L4Protocol, orig: ConntrackTuple, reply: ConntrackTuple,
                tcp: TCPInfo? = nil, status: ConntrackStatus = [.seenReply, .assured, .confirmed],
                timeout: UInt32, mark: UInt32 = 0, zone: UInt16 = 0, labels: [Int]? = nil, nat: NATInfo? = nil,
                seqAdj: SeqAdjustInfo? = nil, counters: CounterInfo? = nil, id: UInt32? = nil) {
        self.family = family
        self.proto = proto
        self.orig = orig
        self.reply = reply
        self.tcp = tcp
        self.status = status
        self.timeout = timeout
        self.mark = mark
        self.zone = zone
        self.labels = labels
        self.nat = nat
        self.seqAdj = seqAdj
        self.counters = counters
        self.id = id
    }

    enum CodingKeys: String, CodingKey {
        case family, proto, orig, reply, tcp, status, timeout, mark, zone, labels, nat
        case seqAdj = "seq_adj", counters, id
    }

    /// A short human description, e.g. `tcp src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=80 zone=0`.
    public var description: String {
        "\(proto) \(orig)" + (zone != 0 ? " zone=\(zone)" : "")
    }

    /// The identity of the entry in a table: its original tuple, protocol and zone.
    public var key: FlowKey { FlowKey(proto: proto, tuple: orig, zone: zone) }
}

/// What identifies a session: protocol, a tuple (either direction) and the conntrack zone.
public struct FlowKey: Hashable, Sendable, CustomStringConvertible {
    public var proto: L4Protocol
    public var tuple: ConntrackTuple
    public var zone: UInt16

    public init(proto: L4Protocol = .tcp, tuple: ConntrackTuple, zone: UInt16 = 0) {
        self.proto = proto
        self.tuple = tuple
        self.zone = zone
    }

    public init(proto: L4Protocol = .tcp, src: IPAddress, sport: UInt16, dst: IPAddress, dport: UInt16,
                zone: UInt16 = 0) {
        self.init(proto: proto, tuple: ConntrackTuple(src: src, dst: dst, sport: sport, dport: dport), zone: zone)
    }

    public var description: String { "\(proto) \(tuple)" + (zone != 0 ? " zone=\(zone)" : "") }
}
