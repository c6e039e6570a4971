import DyscoLab
import Foundation
import Glibc
import Histogram

/// connect() latency to a TCP server: `count` sequential connections, each opened (timed from the call to
/// the completed handshake) and closed. Run inside the client's namespace.
public struct ConnectLatencyResult: Codable, Sendable {
    public var count: Int
    public var failures: Int
    public var p50Microseconds: Double
    public var p99Microseconds: Double
    public var meanMicroseconds: Double
}

public enum ConnectLatency {
    public static func measure(address: String, port: UInt16, count: Int) -> ConnectLatencyResult {
        var histogram = Histogram<UInt64>(highestTrackableValue: 10_000_000_000, numberOfSignificantValueDigits: .three)
        var failures = 0
        guard let target = SocketTarget(address: address, port: port) else {
            return ConnectLatencyResult(count: count, failures: count, p50Microseconds: 0, p99Microseconds: 0, meanMicroseconds: 0)
        }
        for _ in 0..<count {
            let fd = socket(target.family, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { failures += 1; continue }
            var start = timespec(), end = timespec()
            clock_gettime(CLOCK_MONOTONIC, &start)
            let rc = target.withSockaddr { connect(fd, $0, $1) }
            clock_gettime(CLOCK_MONOTONIC, &end)
            close(fd)
            if rc != 0 { failures += 1; continue }
            let ns = (end.tv_sec - start.tv_sec) * 1_000_000_000 + (end.tv_nsec - start.tv_nsec)
            _ = histogram.record(UInt64(max(ns, 1)))
        }
        return ConnectLatencyResult(count: count, failures: failures,
                                    p50Microseconds: Double(histogram.valueAtPercentile(50)) / 1000,
                                    p99Microseconds: Double(histogram.valueAtPercentile(99)) / 1000,
                                    meanMicroseconds: histogram.mean / 1000)
    }
}

/// A listener that accepts and closes connections as fast as it can (backlog 4096), so that connect()
/// latency measures the path, not a slow server's accept queue.
public enum AcceptSink {
    public static func run(address: String, port: UInt16) throws -> Never {
        guard let target = SocketTarget(address: address, port: port) else {
            throw LabError.setupFailed("accept sink: '\(address)' is not an IPv4 or IPv6 address")
        }
        let fd = socket(target.family, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = target.withSockaddr { bind(fd, $0, $1) }
        guard fd >= 0, bound == 0, listen(fd, 4096) == 0 else {
            throw LabError.setupFailed("accept sink on \(address):\(port): \(String(cString: strerror(errno)))")
        }
        while true {
            let client = accept(fd, nil, nil)
            if client >= 0 { close(client) }
        }
    }
}

/// A TCP endpoint of either family as the socket calls take it (`inet_pton` of the text; IPv6 when it has a colon).
struct SocketTarget {
    let family: Int32
    private var storage = sockaddr_storage()
    private let length: socklen_t

    init?(address: String, port: UInt16) {
        if address.contains(":") {
            var v6 = sockaddr_in6()
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = port.bigEndian
            guard inet_pton(AF_INET6, address, &v6.sin6_addr) == 1 else { return nil }
            family = AF_INET6
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: v6, as: sockaddr_in6.self) }
        } else {
            var v4 = sockaddr_in()
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = port.bigEndian
            guard inet_pton(AF_INET, address, &v4.sin_addr) == 1 else { return nil }
            family = AF_INET
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: v4, as: sockaddr_in.self) }
        }
    }

    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafeBytes(of: storage) { body($0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length) }
    }
}
