import DyscoCore
import DyscoSystem

extension TCPSocketDiag {
    /// The local socket of `tuple` as its outgoing packets carry it (src = the local end, dst = the peer), in the
    /// calling thread's network namespace; nil when there is none. For an incoming packet's tuple, pass `.reversed`.
    public static func query(local tuple: FiveTuple) throws(SystemCallError) -> TCPSocketInfo? {
        guard tuple.srcAddr.isIPv4 else {
            return try query(ipv6LocalAddress: tuple.srcAddr.ipv6Bytes, localPort: tuple.srcPort,
                             peerAddress: tuple.dstAddr.ipv6Bytes, peerPort: tuple.dstPort)
        }
        return try query(localAddress: tuple.srcAddr.value, localPort: tuple.srcPort,
                         peerAddress: tuple.dstAddr.value, peerPort: tuple.dstPort)
    }
}
