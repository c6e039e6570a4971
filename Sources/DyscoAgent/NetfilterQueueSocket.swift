import DyscoCore
import CNetfilterQueue
import DyscoSystem
import Glibc

/// One NFQUEUE queue bound over a libmnl netlink socket (the libmnl-based libnetfilter_queue API, as in the
/// library's examples/nf-queue.c). Not thread-safe: one thread receives and issues verdicts.
public final class NetfilterQueueSocket {
    public enum NetfilterHook: UInt8, Sendable {
        case preRouting = 0, localIn = 1, forward = 2, localOut = 3, postRouting = 4
    }

    /// One queued packet; `payload` points into the receive buffer until the next `receive`.
    public struct Packet {
        public var id: UInt32
        public var hook: NetfilterHook?
        /// NFQA_SKB_CSUMNOTREADY: CHECKSUM_PARTIAL, the TCP checksum field holds only the pseudo-header sum.
        public var checksumNotReady: Bool
        public var isGSO: Bool
        /// The packet's mark (NFQA_MARK; 0 when absent): the fast path's bits (``FastPath``).
        public var mark: UInt32
        public var payload: UnsafeMutableRawPointer?
        public var length: Int
    }

    public let queue: UInt16
    /// The netlink socket, for poll(2) (the packet thread waits on it and on its wake-up eventfd).
    public var fileDescriptor: Int32 { fd }
    private let nl: OpaquePointer
    private let portID: UInt32
    private let fd: Int32
    private let receiveBuffer: UnsafeMutableRawPointer
    private let receiveCapacity = 256 * 1024
    private static let paddingOffset = 248
    private let headerBuffer: UnsafeMutableRawPointer

    /// Opens a netlink socket and binds `queue` (copy whole packets, GSO without segmentation, `maxLength`
    /// packets held at most). Throws with errno EBUSY when another process holds the queue, EPERM without
    /// CAP_NET_ADMIN.
    public init(queue: UInt16, maxLength: UInt32 = 8192, receiveBufferBytes: Int32 = 64 << 20) throws {
        self.queue = queue
        let nl = try sysCall("mnl_socket_open(NETLINK_NETFILTER)") { mnl_socket_open(dysco_netlink_netfilter()) }
        let fd = mnl_socket_get_fd(nl)
        do {
            try sysCall("mnl_socket_bind") { mnl_socket_bind(nl, 0, pid_t(bitPattern: dysco_mnl_autopid())) }
            var size = receiveBufferBytes
            // SO_RCVBUFFORCE (root) lifts the rmem_max cap; fall back to SO_RCVBUF.
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
                try sysCall("setsockopt(SO_RCVBUF)") {
                    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
                }
            }
            var one: Int32 = 1
            try sysCall("setsockopt(NETLINK_NO_ENOBUFS)") {
                setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, socklen_t(MemoryLayout<Int32>.size))
            }
        } catch {
            mnl_socket_close(nl)
            throw error
        }
        self.nl = nl
        self.fd = fd
        portID = mnl_socket_get_portid(nl)
        receiveBuffer = .allocate(byteCount: receiveCapacity, alignment: 16)
        // Verdict headers take < 64 bytes; the buffer's last bytes stay zero and serve as attribute padding.
        headerBuffer = .allocate(byteCount: 256, alignment: 16)
        headerBuffer.initializeMemory(as: UInt8.self, repeating: 0, count: 256)
        // From here on a throw runs deinit, which unbinds and closes.
        let buffer = headerBuffer.assumingMemoryBound(to: CChar.self)
        try request("bind queue \(queue)", dysco_nfq_config_bind(buffer, queue, dysco_nfq_cmd_bind()))
        try request("configure queue \(queue)", dysco_nfq_config_params(buffer, queue, maxLength))
    }

    deinit {
        let buffer = headerBuffer.assumingMemoryBound(to: CChar.self)
        _ = try? request("unbind queue \(queue)", dysco_nfq_config_bind(buffer, queue, dysco_nfq_cmd_unbind()))
        mnl_socket_close(nl)
        receiveBuffer.deallocate()
        headerBuffer.deallocate()
    }

    private func request(_ operation: String, _ nlh: UnsafeMutablePointer<nlmsghdr>!) throws {
        try sysCall("\(operation): send") { mnl_socket_sendto(nl, nlh, Int(nlh.pointee.nlmsg_len)) }
        let n = try sysCall("\(operation): receive ack") { mnl_socket_recvfrom(nl, receiveBuffer, receiveCapacity) }
        try sysCall(operation) { dysco_mnl_check_ack(receiveBuffer, n, 0, portID) }
    }

    /// Reads the next netlink datagram if one is waiting (never blocks: the packet thread polls first) and
    /// calls `body` for each packet message in it. Returns false when nothing was waiting.
    public func receive(_ body: (inout Packet) throws -> Void) throws -> Bool {
        let n = recv(fd, receiveBuffer, receiveCapacity, Int32(MSG_DONTWAIT))
        if n < 0 {
            let code = errno
            if code == EAGAIN || code == EWOULDBLOCK { return false }
            if code == ENOBUFS || code == EINTR { return true }
            throw SystemCallError(operation: "recv(nfqueue \(queue))", errno: code)
        }
        if n == 0 { return false }
        var offset = 0
        while offset + MemoryLayout<nlmsghdr>.size <= n {
            let nlh = (receiveBuffer + offset).assumingMemoryBound(to: nlmsghdr.self)
            let length = Int(nlh.pointee.nlmsg_len)
            guard length >= MemoryLayout<nlmsghdr>.size, offset + length <= n else { break }
            var raw = dysco_nfq_packet()
            if dysco_nfq_parse(nlh, &raw) == 0 {
                var packet = Packet(id: raw.id, hook: NetfilterHook(rawValue: raw.hook),
                                    checksumNotReady: raw.skb_info & UInt32(NFQA_SKB_CSUMNOTREADY) != 0,
                                    isGSO: raw.skb_info & UInt32(NFQA_SKB_GSO) != 0, mark: raw.mark,
                                    payload: raw.payload.map { UnsafeMutableRawPointer($0) },
                                    length: Int(raw.payload_len))
                try body(&packet)
            }
            offset += (length + 3) & ~3
        }
        return true
    }

    /// Issues a verdict; with `packet`, the packet is replaced by those bytes (one sendmsg, no copy); with `mark`,
    /// the packet's mark becomes that.
    public func verdict(id: UInt32, accept: Bool, packet: UnsafeRawBufferPointer? = nil, mark: UInt32? = nil) throws {
        let buffer = headerBuffer.assumingMemoryBound(to: CChar.self)
        let payloadLength = UInt32(packet?.count ?? 0)
        let headerLength = dysco_nfq_verdict_header(buffer, queue, id, accept ? UInt32(NF_ACCEPT) : UInt32(NF_DROP),
                                                    payloadLength, mark == nil ? 0 : 1, mark ?? 0)
        var address = sockaddr_nl()
        address.nl_family = sa_family_t(AF_NETLINK)
        var iov = (
            iovec(iov_base: headerBuffer, iov_len: headerLength),
            iovec(iov_base: UnsafeMutableRawPointer(mutating: packet?.baseAddress), iov_len: Int(payloadLength)),
            iovec(iov_base: headerBuffer + Self.paddingOffset, iov_len: Int(dysco_nfq_padding(payloadLength)))
        )
        let sent = withUnsafeMutablePointer(to: &address) { addressPointer in
            withUnsafeMutableBytes(of: &iov) { iovBytes in
                var message = msghdr()
                message.msg_name = UnsafeMutableRawPointer(addressPointer)
                message.msg_namelen = socklen_t(MemoryLayout<sockaddr_nl>.size)
                message.msg_iov = iovBytes.baseAddress!.assumingMemoryBound(to: iovec.self)
                message.msg_iovlen = payloadLength == 0 ? 1 : 3
                return sendmsg(fd, &message, 0)
            }
        }
        if sent < 0 { throw SystemCallError(operation: "sendmsg(nfqueue \(queue) verdict)", errno: errno) }
    }
}
