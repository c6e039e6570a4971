import CLinux
import Glibc

/// A TCP socket's state as the kernel numbers it (`include/net/tcp_states.h`; `idiag_state`).
public struct TCPSocketState: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let established = Self(rawValue: 1)
    public static let synSent = Self(rawValue: 2)
    public static let synReceived = Self(rawValue: 3)
    public static let finWait1 = Self(rawValue: 4)
    public static let finWait2 = Self(rawValue: 5)
    public static let timeWait = Self(rawValue: 6)
    public static let close = Self(rawValue: 7)
    public static let closeWait = Self(rawValue: 8)
    public static let lastAck = Self(rawValue: 9)
    public static let listen = Self(rawValue: 10)
    public static let closing = Self(rawValue: 11)
    public static let newSynReceived = Self(rawValue: 12)

    public var description: String {
        let names = ["ESTABLISHED", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT", "CLOSE",
                     "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING", "NEW-SYN-RECV"]
        return (1...names.count).contains(Int(rawValue)) ? names[Int(rawValue) - 1] : "state \(rawValue)"
    }
}

/// What the kernel reports about one TCP socket (``TCPSocketDiag/query(localAddress:localPort:peerAddress:peerPort:)``).
public struct TCPSocketInfo: Hashable, Sendable {
    public var state: TCPSocketState
    /// Bytes received and not yet read by the application (`idiag_rqueue`).
    public var receiveQueue: UInt32
    /// Bytes written and not yet acknowledged by the peer (`idiag_wqueue`).
    public var sendQueue: UInt32
    /// Whether the kernel sent its `tcp_info` (INET_DIAG_INFO): not for a TIME-WAIT or SYN-RECV socket, whose
    /// fields below are then 0.
    public var hasTCPInfo: Bool
    /// `tcpi_bytes_acked`. The kernel counts the SYN too: 1 on an active opener that has sent nothing yet.
    public var bytesAcked: UInt64
    /// `tcpi_bytes_received` (payload bytes only).
    public var bytesReceived: UInt64
    /// `tcpi_notsent_bytes`: written bytes not yet sent.
    public var notSentBytes: UInt32
    /// `tcpi_unacked`: segments in flight.
    public var unackedSegments: UInt32
    /// `tcpi_snd_wscale`: the peer's window scale (applied to the windows it sends).
    public var sendWindowScale: UInt8
    /// `tcpi_rcv_wscale`: our window scale.
    public var receiveWindowScale: UInt8
    /// `tcpi_options` (TCPI_OPT_TIMESTAMPS 1, SACK 2, WSCALE 4, ECN 8, ECN_SEEN 16, SYN_DATA 32).
    public var options: UInt8

    /// Timestamps were negotiated (TCPI_OPT_TIMESTAMPS).
    public var timestamps: Bool { options & 1 != 0 }
    /// SACK was negotiated (TCPI_OPT_SACK).
    public var selectiveAcknowledgments: Bool { options & 2 != 0 }
    /// Window scaling was negotiated (TCPI_OPT_WSCALE).
    public var windowScaling: Bool { options & 4 != 0 }

    public init(state: TCPSocketState, receiveQueue: UInt32, sendQueue: UInt32, hasTCPInfo: Bool,
                bytesAcked: UInt64, bytesReceived: UInt64, notSentBytes: UInt32, unackedSegments: UInt32,
                sendWindowScale: UInt8, receiveWindowScale: UInt8, options: UInt8) {
        self.state = state
        self.receiveQueue = receiveQueue
        self.sendQueue = sendQueue
        self.hasTCPInfo = hasTCPInfo
        self.bytesAcked = bytesAcked
        self.bytesReceived = bytesReceived
        self.notSentBytes = notSentBytes
        self.unackedSegments = unackedSegments
        self.sendWindowScale = sendWindowScale
        self.receiveWindowScale = receiveWindowScale
        self.options = options
    }
}

/// Asks the kernel about one local TCP socket by its 4-tuple (NETLINK_SOCK_DIAG, inet_diag's exact lookup), IPv4
/// or IPv6, in the calling thread's network namespace (the netlink socket is opened and closed within the call).
public enum TCPSocketDiag {
    /// The IPv4 socket whose local end is `localAddress:localPort` and whose peer is `peerAddress:peerPort`
    /// (addresses and ports in host byte order); nil when there is no such socket (ENOENT; a listener on
    /// `localPort` is not the connection asked for). Throws the netlink call's errno otherwise.
    public static func query(localAddress: UInt32, localPort: UInt16,
                             peerAddress: UInt32, peerPort: UInt16) throws(SystemCallError) -> TCPSocketInfo? {
        try query(family: AF_INET, local: withUnsafeBytes(of: localAddress.bigEndian, Array.init), localPort: localPort,
                  peer: withUnsafeBytes(of: peerAddress.bigEndian, Array.init), peerPort: peerPort,
                  name: "\(dottedQuad(localAddress)):\(localPort)->\(dottedQuad(peerAddress)):\(peerPort)")
    }

    /// The IPv6 socket of that 4-tuple: the addresses' 16 bytes in network order, ports in host byte order.
    public static func query(ipv6LocalAddress local: [UInt8], localPort: UInt16,
                             peerAddress peer: [UInt8], peerPort: UInt16) throws(SystemCallError) -> TCPSocketInfo? {
        precondition(local.count == 16 && peer.count == 16, "IPv6 addresses are 16 bytes")
        return try query(family: AF_INET6, local: local, localPort: localPort, peer: peer, peerPort: peerPort,
                         name: "[\(hex(local))]:\(localPort)->[\(hex(peer))]:\(peerPort)")
    }

    private static func query(family: Int32, local: [UInt8], localPort: UInt16, peer: [UInt8], peerPort: UInt16,
                              name: @autoclosure () -> String) throws(SystemCallError) -> TCPSocketInfo? {
        var raw = dysco_tcp_diag_info()
        // Four words each, network order (an IPv4 address in the first).
        var source = [UInt32](repeating: 0, count: 4), destination = [UInt32](repeating: 0, count: 4)
        source.withUnsafeMutableBytes { $0.copyBytes(from: local) }
        destination.withUnsafeMutableBytes { $0.copyBytes(from: peer) }
        do {
            try sysCall("sock_diag(\(name()))") {
                dysco_tcp_diag(family, source, localPort.bigEndian, destination, peerPort.bigEndian, &raw)
            }
        } catch where error.errno == ENOENT {
            return nil
        }
        return TCPSocketInfo(state: TCPSocketState(rawValue: raw.state), receiveQueue: raw.rqueue,
                             sendQueue: raw.wqueue, hasTCPInfo: raw.has_tcp_info != 0,
                             bytesAcked: raw.bytes_acked, bytesReceived: raw.bytes_received,
                             notSentBytes: raw.notsent_bytes, unackedSegments: raw.unacked,
                             sendWindowScale: raw.snd_wscale, receiveWindowScale: raw.rcv_wscale,
                             options: raw.options)
    }

    private static func hex(_ bytes: [UInt8]) -> String {
        stride(from: 0, to: bytes.count, by: 2).map { String(UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]), radix: 16) }
            .joined(separator: ":")
    }

    private static func dottedQuad(_ a: UInt32) -> String { "\(a >> 24).\(a >> 16 & 0xff).\(a >> 8 & 0xff).\(a & 0xff)" }
}
