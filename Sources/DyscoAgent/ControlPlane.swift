import CLinux
import DyscoCore
import DyscoSystem
import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// The agents' UDP control channel (paper §3.3; wire format in docs/CONTROL-PROTOCOL.md): one socket on
/// ``ControlMessage/port`` in this namespace, SwiftNIO. Received datagrams go to `receive` with the sender's
/// address and the datagram's destination address (IP_PKTINFO; the freshness stamp names it, issue 20);
/// `send` writes one datagram to another agent's control port.
final class ControlPlane: Sendable {
    private let group: any EventLoopGroup
    /// The group was made for this socket (nil `group` at init) and goes with it.
    private let ownsGroup: Bool
    private let channel: Mutex<Channel?>
    /// The IPv6 socket (`agent --ipv6`: IPv6 sessions' control messages, version 5), beside the IPv4 one; nil
    /// without IPv6.
    private let channel6: Mutex<Channel?>
    private let ipv6: Bool
    private let closing = Atomic<Bool>(false)
    private let receive: @Sendable ([UInt8], IPAddress, IPAddress?) -> Void
    let port: UInt16
    /// Times the socket was opened again after SwiftNIO closed it (a send error it deems fatal, e.g. EPERM from
    /// a firewall's OUTPUT rule, closes a datagram channel).
    let reopened = Atomic<Int>(0)

    /// `group`: the event loops to run on (the agent's shared group); nil: a one-thread group of its own.
    init(port: UInt16, group: (any EventLoopGroup)? = nil, ipv6: Bool = false,
         receive: @escaping @Sendable ([UInt8], IPAddress, IPAddress?) -> Void) throws {
        ownsGroup = group == nil
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.port = port
        self.receive = receive
        self.ipv6 = ipv6
        channel = Mutex(nil)
        channel6 = Mutex(nil)
        do {
            try open(ipv6: false)
            if ipv6 { try open(ipv6: true) }
        } catch {
            if ownsGroup { try? self.group.syncShutdownGracefully() }
            throw ControlError(message: "cannot bind the control port udp/\(port): \(error)")
        }
    }

    /// Binds the IPv4 socket (0.0.0.0) or the IPv6 one ([::], IPv6 only: the IPv4 socket keeps IPv4).
    private func open(ipv6: Bool) throws {
        let receive = receive
        var bootstrap = DatagramBootstrap(group: group)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
        if ipv6 { bootstrap = bootstrap.channelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 1) }
        let opened = try bootstrap
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelOption(.receivePacketInfo, value: true)
            // SwiftNIO reads datagrams into 2,048-byte buffers by default: bundles and state documents are longer.
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: ControlMessage.maxLength))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Inbound(receive: receive))
                }
            }
            .bind(host: ipv6 ? "::" : "0.0.0.0", port: Int(port))
            .wait()
        if ipv6 { channel6.withLock { $0 = opened } } else { channel.withLock { $0 = opened } }
        opened.closeFuture.whenComplete { [weak self] _ in
            guard let self, !self.closing.load(ordering: .relaxed) else { return }
            // Reopen on the event loop's thread pool, not inside the close callback.
            DispatchQueue.global().async {
                guard !self.closing.load(ordering: .relaxed) else { return }
                if (try? self.open(ipv6: ipv6)) != nil { self.reopened.add(1, ordering: .relaxed) }
            }
        }
    }

    func send(_ bytes: [UInt8], to address: IPAddress) {
        guard let remote = try? SocketAddress(ipAddress: address.description, port: Int(port)),
              let channel = address.isIPv4 ? channel.withLock({ $0 }) : channel6.withLock({ $0 }) else { return }
        let buffer = channel.allocator.buffer(bytes: bytes)
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
    }

    func close() {
        closing.store(true, ordering: .relaxed)
        try? channel.withLock({ $0 })?.close().wait()
        try? channel6.withLock({ $0 })?.close().wait()
        if ownsGroup { try? group.syncShutdownGracefully() }
    }

    private final class Inbound: ChannelInboundHandler, Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let receive: @Sendable ([UInt8], IPAddress, IPAddress?) -> Void
        init(receive: @escaping @Sendable ([UInt8], IPAddress, IPAddress?) -> Void) { self.receive = receive }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let envelope = unwrapInboundIn(data)
            // From the sockaddr_in, not through text: inet_ntop and parsing twice per datagram were a fifth of a
            // right anchor's CPU in a drain of 10,000 sessions (`dysco-bench drain`, perf).
            guard let from = IPAddress(envelope.remoteAddress) else { return }
            let destination = envelope.metadata?.packetInfo.flatMap { IPAddress($0.destinationAddress) }
            var buffer = envelope.data
            receive(buffer.readBytes(length: buffer.readableBytes) ?? [], from, destination)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            // A failed send or receive of one datagram: keep the channel (SwiftNIO closes it itself only for the
            // errors it deems fatal; ControlPlane reopens it then).
        }
    }
}

extension IPAddress {
    /// The address of an IPv4 or IPv6 socket address, read from its `sockaddr_in`/`sockaddr_in6` (network byte order;
    /// an IPv4-mapped IPv6 address is the IPv4 address); nil for any other family.
    init?(_ address: SocketAddress) {
        switch address {
        case .v4(let v4): self.init(sockaddrIn: v4.address)
        case .v6(let v6):
            var raw = v6.address.sin6_addr
            self = withUnsafeBytes(of: &raw) { IPAddress(networkBytes: $0) }
        default: return nil
        }
    }

    init?(sockaddrIn address: sockaddr_in) {
        guard address.sin_family == sa_family_t(AF_INET) else { return nil }
        self.init(UInt32(bigEndian: address.sin_addr.s_addr))
    }
}

/// Sends packets the agent built itself (the anchors' window-opening probes) through a raw IPv4 socket. The
/// packets carry the egress fast-path mark, so this host's NFQUEUE egress rules let them pass untouched.
final class RawPacketSender: Sendable {
    private let fd: Int32
    /// The IPv6 raw socket (IPPROTO_RAW: the header is the packet's own, IPV6_HDRINCL); nil where IPv6 is off.
    private let fd6: Int32?

    init() throws {
        fd = try Self.markedSocket("socket(AF_INET, SOCK_RAW, IPPROTO_RAW)") { dysco_raw_ipv4_socket() }
        fd6 = try? Self.markedSocket("socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)") { dysco_raw_ipv6_socket() }
    }

    private static func markedSocket(_ call: String, _ open: () -> Int32) throws -> Int32 {
        let fd = try sysCall(call) { open() }
        var mark = FastPath.egressMark
        do {
            try sysCall("setsockopt(SO_MARK)") {
                setsockopt(fd, SOL_SOCKET, dysco_so_mark(), &mark, socklen_t(MemoryLayout<UInt32>.size))
            }
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    deinit {
        close(fd)
        if let fd6 { close(fd6) }
    }

    /// Sends a whole IPv4 or IPv6 packet (header included) to its destination address.
    func send(_ packet: UnsafeRawBufferPointer, to destination: IPAddress) throws {
        guard destination.isIPv4 else {
            guard let fd6 else { throw SystemCallError(operation: "sendto(raw probe to \(destination))", errno: EAFNOSUPPORT) }
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            withUnsafeMutableBytes(of: &address.sin6_addr) { destination.store(to: $0.baseAddress!) }
            let sent = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd6, packet.baseAddress, packet.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
            if sent < 0 { throw SystemCallError(operation: "sendto(raw probe to \(destination))", errno: errno) }
            return
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = destination.value.bigEndian
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, packet.baseAddress, packet.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if sent < 0 { throw SystemCallError(operation: "sendto(raw probe to \(destination))", errno: errno) }
    }
}

/// The packet thread's wake-up (eventfd): other threads post work and signal; the packet thread polls the
/// queue socket and this descriptor together, so work runs within microseconds on an idle queue too.
final class Wakeup: Sendable {
    let fd: Int32

    init() throws { fd = try sysCall("eventfd") { dysco_eventfd() } }
    deinit { close(fd) }

    func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    func drain() {
        var value: UInt64 = 0
        _ = read(fd, &value, 8)
    }
}
