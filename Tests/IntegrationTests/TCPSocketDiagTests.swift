import ConntrackState
import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Glibc
import Testing

/// ``TCPSocketDiag``: one loopback connection in a fresh namespace, asked about by its tuple from inside it.
@Suite(.serialized) struct TCPSocketDiagTests {
    static let loopback = IPAddress(127, 0, 0, 1)

    @Test func reportsOneConnectionByItsTuple() async throws {
        let ns = "tdiag-\(String(UInt32.random(in: .min ... .max), radix: 16))"
        try Command.run(["ip", "netns", "add", ns])
        defer { _ = try? Command.run(["ip", "netns", "delete", ns], check: false) }
        try Command.run(["ip", "link", "set", "lo", "up"], netns: ns)

        // The sockets are opened on a thread inside the namespace; their descriptors work from any thread.
        let pair = try NamespaceThread.run(in: .named(ns)) { try LoopbackPair.open() }
        defer { pair.close() }
        let client = FiveTuple(srcAddr: Self.loopback, srcPort: pair.clientPort, dstAddr: Self.loopback, dstPort: pair.serverPort)
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
        let listener = FiveTuple(srcAddr: Self.loopback, srcPort: pair.serverPort, dstAddr: IPAddress(0), dstPort: 0)
        #expect(try query(listener)?.state == .listen)
        // Only the caller's namespace: the test process's own one has no such connection.
        #expect(try TCPSocketDiag.query(local: client) == nil)
    }
}

/// A listener, a client connected to it and the accepted server end, all on 127.0.0.1.
private struct LoopbackPair: Sendable {
    var listener: Int32
    var client: Int32
    var server: Int32
    var serverPort: UInt16
    var clientPort: UInt16

    static func open() throws(SystemCallError) -> LoopbackPair {
        let listener = try sysCall("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr = in_addr(s_addr: UInt32(0x7f00_0001).bigEndian)
        try withSockaddr(&address) { (p, n) throws(SystemCallError) in try sysCall("bind") { bind(listener, p, n) } }
        try sysCall("listen") { listen(listener, 4) }
        let serverPort = try localPort(listener)
        address.sin_port = serverPort.bigEndian
        let client = try sysCall("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        try withSockaddr(&address) { (p, n) throws(SystemCallError) in try sysCall("connect") { connect(client, p, n) } }
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

    private static func localPort(_ fd: Int32) throws(SystemCallError) -> UInt16 {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = try withUnsafeMutablePointer(to: &address) { p throws(SystemCallError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { s throws(SystemCallError) in
                try sysCall("getsockname") { getsockname(fd, s, &length) }
            }
        }
        return UInt16(bigEndian: address.sin_port)
    }

    private static func withSockaddr(_ address: inout sockaddr_in,
                                     _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemCallError) -> Void) throws(SystemCallError) {
        try withUnsafePointer(to: &address) { p throws(SystemCallError) in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { s throws(SystemCallError) in
                try body(s, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
    }
}
