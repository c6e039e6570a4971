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
        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = port.bigEndian
        inet_pton(AF_INET, address, &target.sin_addr)
        for _ in 0..<count {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { failures += 1; continue }
            var start = timespec(), end = timespec()
            clock_gettime(CLOCK_MONOTONIC, &start)
            let rc = withUnsafePointer(to: &target) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
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
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var local = sockaddr_in()
        local.sin_family = sa_family_t(AF_INET)
        local.sin_port = port.bigEndian
        inet_pton(AF_INET, address, &local.sin_addr)
        let bound = withUnsafePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, bound == 0, listen(fd, 4096) == 0 else {
            throw LabError.setupFailed("accept sink on \(address):\(port): \(String(cString: strerror(errno)))")
        }
        while true {
            let client = accept(fd, nil, nil)
            if client >= 0 { close(client) }
        }
    }
}
