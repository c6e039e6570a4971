import ConntrackState
import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Glibc
import Testing

/// ``TCPSocketDiag``: one loopback connection in a fresh namespace, asked about by its tuple from inside it, in each
/// family: IPv4, IPv6 (issue 18), and an IPv4 connection accepted by a dual-stack IPv6 listener (the kernel answers
/// for the server end as AF_INET6 with IPv4-mapped addresses).
@Suite(.serialized) struct TCPSocketDiagTests {
    @Test(arguments: [Loopback.ipv4, .ipv6, .dualStack])
    func reportsOneConnectionByItsTuple(_ kind: Loopback) async throws {
        let ns = "tdiag-\(String(UInt32.random(in: .min ... .max), radix: 16))"
        try Command.run(["ip", "netns", "add", ns])
        defer { _ = try? Command.run(["ip", "netns", "delete", ns], check: false) }
        try Command.run(["ip", "link", "set", "lo", "up"], netns: ns)

        // The sockets are opened on a thread inside the namespace; their descriptors work from any thread.
        let pair = try NamespaceThread.run(in: .named(ns)) { try LoopbackPair.open(kind) }
        defer { pair.close() }
        let loopback = kind.address
        let client = FiveTuple(srcAddr: loopback, srcPort: pair.clientPort, dstAddr: loopback, dstPort: pair.serverPort)
        let server = client.reversed
        @Sendable func query(_ tuple: FiveTuple) throws -> TCPSocketInfo? {
            try NamespaceThread.run(in: .named(ns)) { try TCPSocketDiag.query(local: tuple) }
        }

        // Established, both ends; the options and the window scales agree across the ends.
        let clientBefore = try #require(try query(client))
        let serverBefore = try #require(try query(server))
        #expect(clientBefore.state == .established && serverBefore.state == .established)
        #expect(clientBefore.hasTCPInfo && serverBefore.hasTCPInfo)
        #expect(clientBefore.timestamps && clientBefore.windowScaling && serverBefore.timestamps)
        #expect(clientBefore.sendWindowScale == serverBefore.receiveWindowScale)
        #expect(clientBefore.receiveWindowScale == serverBefore.sendWindowScale)
        #expect(clientBefore.sendQueue == 0 && serverBefore.receiveQueue == 0 && serverBefore.bytesReceived == 0)
        // The kernel counts the acknowledged SYN in tcpi_bytes_acked: 1 on the active opener before any data.
        #expect(clientBefore.bytesAcked <= 1, "\(clientBefore)")

        // N bytes client -> server; the server does not read.
        let n = 50_000
        try pair.send(n)
        var clientAfter = clientBefore
        #expect(try await TestSupport.eventually(timeout: 5) {
            clientAfter = try #require(try query(client))
            return clientAfter.bytesAcked - clientBefore.bytesAcked == UInt64(n) && clientAfter.sendQueue == 0
        }, "client: \(clientAfter)")
        #expect(clientAfter.notSentBytes == 0 && clientAfter.unackedSegments == 0)
        var serverAfter = serverBefore
        #expect(try await TestSupport.eventually(timeout: 5) {
            serverAfter = try #require(try query(server))
            return serverAfter.bytesReceived == UInt64(n) && serverAfter.receiveQueue == UInt32(n)
        }, "server: \(serverAfter)")

        // The server reads it all: its receive queue empties, its byte count stays.
        try pair.receive(n)
        #expect(try await TestSupport.eventually(timeout: 5) {
            serverAfter = try #require(try query(server))
            return serverAfter.receiveQueue == 0
        }, "server: \(serverAfter)")
        #expect(serverAfter.bytesReceived == UInt64(n))

        // No such socket: nil, also when a listener holds the local port (the kernel's lookup falls back to it).
        var otherPeer = server
        otherPeer.dstPort = pair.clientPort == 65535 ? 65534 : pair.clientPort &+ 1
        #expect(try query(otherPeer) == nil)
        var unusedPort = client
        unusedPort.srcPort = pair.serverPort == 1 ? 2 : 1
        #expect(try query(unusedPort) == nil)
        // The listener itself is the tuple with no peer.
        if kind != .dualStack {
            let any = kind == .ipv6 ? IPAddress.v6([UInt8](repeating: 0, count: 16)) : IPAddress(0)
            let listener = FiveTuple(srcAddr: loopback, srcPort: pair.serverPort, dstAddr: any, dstPort: 0)
            #expect(try query(listener)?.state == .listen)
        }
        // Only the caller's namespace: the test process's own one has no such connection.
        #expect(try TCPSocketDiag.query(local: client) == nil)
    }
}

/// The loopback connection's family: the listener's and the client's sockets.
enum Loopback: String, Sendable, CustomStringConvertible {
    /// AF_INET on 127.0.0.1.
    case ipv4
    /// AF_INET6 on ::1.
    case ipv6
    /// An AF_INET6 listener on :: (IPV6_V6ONLY off), an AF_INET client to 127.0.0.1.
    case dualStack

    var description: String { rawValue }
    var address: IPAddress { self == .ipv6 ? IPAddress("::1")! : IPAddress(127, 0, 0, 1) }
}

/// A listener, a client connected to it and the accepted server end, on the loopback of `Loopback`'s family.
private struct LoopbackPair: Sendable {
    var listener: Int32
    var client: Int32
    var server: Int32
    var serverPort: UInt16
    var clientPort: UInt16

    static func open(_ kind: Loopback) throws(SystemCallError) -> LoopbackPair {
        let stream = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        let listenerFamily = kind == .ipv4 ? AF_INET : AF_INET6
        let listener = try sysCall("socket") { socket(listenerFamily, stream, 0) }
        if kind == .dualStack {
            var off: Int32 = 0
            try sysCall("setsockopt(IPV6_V6ONLY)") {
                setsockopt(listener, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        // The listener's address: 127.0.0.1, ::1, or :: (dual stack), port chosen by the kernel.
        try withAddress(kind == .ipv4 ? .ipv4 : .ipv6, port: 0, any: kind == .dualStack) { (p, n) throws(SystemCallError) in
            try sysCall("bind") { bind(listener, p, n) }
        }
        try sysCall("listen") { listen(listener, 4) }
        let serverPort = try localPort(listener)
        let clientKind: Loopback = kind == .ipv6 ? .ipv6 : .ipv4
        let client = try sysCall("socket") { socket(clientKind == .ipv4 ? AF_INET : AF_INET6, stream, 0) }
        try withAddress(clientKind, port: serverPort, any: false) { (p, n) throws(SystemCallError) in
            try sysCall("connect") { connect(client, p, n) }
        }
        let server = try sysCall("accept") { accept(listener, nil, nil) }
        return LoopbackPair(listener: listener, client: client, server: server, serverPort: serverPort,
                            clientPort: try localPort(client))
    }
    func send(_ count: Int) throws {
        let bytes = [UInt8](repeating: 0x5a, count: count)
        var offset = 0
        while offset < count {
            let written = try bytes.withUnsafeBytes { b in
                try sysCall("write") { write(client, b.baseAddress! + offset, count - offset) }
            }
            offset += written
        }
    }

    func receive(_ count: Int) throws {
        var buffer = [UInt8](repeating: 0, count: 65536)
        var total = 0
        while total < count {
            let got = try buffer.withUnsafeMutableBytes { b in
                try sysCall("read") { read(server, b.baseAddress!, min(b.count, count - total)) }
            }
            if got == 0 { throw SystemCallError(operation: "read: end of stream after \(total) bytes", errno: EPIPE) }
            total += got
        }
    }

    func close() {
        for fd in [client, server, listener] { _ = Glibc.close(fd) }
    }

    /// The port of a bound socket of either family (the port sits at the same offset in sockaddr_in and sockaddr_in6).
    private static func localPort(_ fd: Int32) throws(SystemCallError) -> UInt16 {
        var address = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = try withUnsafeMutablePointer(to: &address) { p throws(SystemCallError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { s throws(SystemCallError) in
                try sysCall("getsockname") { getsockname(fd, s, &length) }
            }
        }
        return UInt16(bigEndian: address.sin6_port)
    }

    /// `body` with the loopback address of `kind` (.ipv4 or .ipv6; `any`: the unspecified address instead) and `port`.
    private static func withAddress(_ kind: Loopback, port: UInt16, any: Bool,
                                    _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemCallError) -> Void) throws(SystemCallError) {
        if kind == .ipv4 {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr = in_addr(s_addr: UInt32(any ? 0 : 0x7f00_0001).bigEndian)
            try withUnsafePointer(to: &address) { p throws(SystemCallError) in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { s throws(SystemCallError) in
                    try body(s, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            return
        }
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_port = port.bigEndian
        if !any { address.sin6_addr = in6addr_loopback }
        try withUnsafePointer(to: &address) { p throws(SystemCallError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { s throws(SystemCallError) in
                try body(s, socklen_t(MemoryLayout<sockaddr_in6>.size))
            }
        }
    }
}
