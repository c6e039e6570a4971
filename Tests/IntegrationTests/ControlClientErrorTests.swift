import DyscoAgent
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What `dysco-migrate sessions` and the other clients say when they cannot reach an agent (issue 9: a
/// permission error was reported as "a stale socket of a stopped agent?"). No root needed.
@Suite struct ControlClientErrorTests {
    @Test("a socket file nobody listens on is called stale; a missing one says no agent runs")
    func staleAndMissing() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dysco-cc-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("agent.sock").path

        await #expect(throws: ControlError.self) { _ = try await ControlClient.request(ControlRequest(.sessions), path: path) }
        do { _ = try await ControlClient.request(ControlRequest(.sessions), path: path) } catch let error as ControlError {
            #expect(error.message.contains("no agent control socket"), "\(error.message)")
        }

        // Bind and close: the file stays, nothing listens.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            path.utf8CString.withUnsafeBytes { raw.copyMemory(from: $0) }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0)
        close(fd)
        do {
            _ = try await ControlClient.request(ControlRequest(.sessions), path: path)
            Issue.record("connected to a socket nobody listens on")
        } catch let error as ControlError {
            #expect(error.message.contains("stale socket"), "\(error.message)")
            #expect(!error.message.contains("permission"), "\(error.message)")
        }
    }

    @Test("the connect errno picks the hint: only a refused connection is a stale socket")
    func hints() {
        #expect(ControlClient.connectHint(errno: ECONNREFUSED).contains("stale"))
        #expect(ControlClient.connectHint(errno: EACCES).contains("permission denied"))
        #expect(ControlClient.connectHint(errno: EPERM).contains("permission denied"))
        #expect(!ControlClient.connectHint(errno: EACCES).contains("stale"))
        #expect(ControlClient.connectHint(errno: EIO) == "")
    }
}
