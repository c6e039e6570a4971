import DyscoCore
import DyscoAgent
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

    /// The CLI under test: $DYSCO_BIN, else `dysco-migrate` next to the test bundle (or a parent of it) —
    /// the lookup the lab itself uses for its agents.
    static func dyscoBinary() throws -> String { try Lab.defaultAgentBinary() }

    /// Runs `body` with a fresh lab that is torn down afterwards, also when `body` fails.
    static func withLab(_ spec: LabSpec, _ body: (Lab) async throws -> Void) async throws {
        let lab = try freshLab(spec)
        do {
            try await body(lab)
        } catch {
            _ = try? lab.down()
            throw error
        }
        _ = try lab.down()
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
