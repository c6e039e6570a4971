import DyscoDataplane
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// Shared by the integration tests: the built binary, files with known content, digests, agent snapshots.
enum TestSupport {
    static let logger: Logger = {
        var logger = Logger(label: "integration-tests")
        logger.logLevel = .notice
        return logger
    }()

    /// The CLI under test: $DYSCO_BIN, else `dysco-migrate` next to the test bundle (or a parent of it).
    static func dyscoBinary() throws -> String {
        if let path = ProcessInfo.processInfo.environment["DYSCO_BIN"], !path.isEmpty { return path }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("dysco-migrate").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        throw LabError.notFound("dysco-migrate binary not found near \(CommandLine.arguments[0]); set DYSCO_BIN")
    }

    /// Writes `megabytes` MiB of random bytes to `path`.
    static func makeRandomFile(_ path: String, megabytes: Int) throws {
        try Command.run(["dd", "if=/dev/urandom", "of=\(path)", "bs=1M", "count=\(megabytes)", "status=none"])
    }

    static func sha256(_ path: String) throws -> String {
        let out = try Command.run(["sha256sum", path]).stdout
        return String(out.split(separator: " ").first ?? "")
    }

    /// The agent snapshot of `host` (its `sessions --json`).
    static func snapshot(_ lab: Lab, _ host: String) async throws -> AgentSnapshot {
        let data = try await ControlClient.request(ControlRequest(.sessions), path: AgentControlPaths.socketPath(netns: lab.namespace(of: host)))
        return try JSONDecoder().decode(AgentSnapshot.self, from: data)
    }

    /// Removes a lab an interrupted earlier run may have left.
    static func freshLab(_ spec: LabSpec) throws -> Lab {
        try Lab.down(name: spec.name, force: true, logger: logger)
        return try Lab.up(spec, logger: logger)
    }
}
