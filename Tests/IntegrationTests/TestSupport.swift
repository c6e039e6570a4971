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

    /// The LD_PRELOAD interposer for splicing proxies: `libdysco-splice.so` beside ``dyscoBinary()`` (`make release`
    /// builds it with the binaries).
    static func spliceLibrary() throws -> String {
        let path = URL(fileURLWithPath: try dyscoBinary()).deletingLastPathComponent().appendingPathComponent("libdysco-splice.so").path
        guard FileManager.default.fileExists(atPath: path) else {
            throw LabError.invalidSpec("no \(path): build it with `make release` (swift build --product dysco-splice)")
        }
        return path
    }

    /// The benchmarks' executable (its hidden helpers, such as `sink`): `dysco-bench` beside ``dyscoBinary()``
    /// (the same directory as $DYSCO_BIN; `swift build` puts both products there).
    static func benchBinary() throws -> String {
        let path = URL(fileURLWithPath: try dyscoBinary()).deletingLastPathComponent().appendingPathComponent("dysco-bench").path
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw LabError.invalidSpec("no dysco-bench beside \(try dyscoBinary()): build it (swift build -c release, or make release)")
        }
        return path
    }

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
    /// Polls `condition` every 100 ms until it holds or `timeout` passes; returns its last value.
    static func eventually(timeout: TimeInterval, _ condition: () async throws -> Bool) async throws -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if try await condition() { return true }
            if Date() >= deadline { return false }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    static func makeRandomFile(_ path: String, megabytes: Int) throws {
        try Command.run(["dd", "if=/dev/urandom", "of=\(path)", "bs=1M", "count=\(megabytes)", "status=none"])
    }

    static func sha256(_ path: String) throws -> String {
        let out = try Command.run(["sha256sum", path]).stdout
        return String(out.split(separator: " ").first ?? "")
    }

    /// The agent snapshot of `host` (its `sessions --json`).
    static func snapshot(_ lab: Lab, _ host: String) async throws -> AgentSnapshot {
        try await ControlClient.snapshot(path: AgentControlPaths.socketPath(netns: lab.namespace(of: host)))
    }

    /// The Python that has scapy: Debian's `/usr/bin/python3` (python3-scapy, see scripts/setup.sh), not
    /// whatever `python3` comes first on PATH (a pyenv shim, say).
    static var scapyPython: String {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "python3"
    }

    /// Runs `script` with `python3 -c` in `host`'s namespace after `from scapy.all import *` and `conf.verb = 0`;
    /// returns its stdout. Throws (with stderr) if it exits non-zero.
    static func scapy(_ lab: Lab, on host: String, _ script: String) throws -> String {
        let prelude = """
            import logging
            logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
            from scapy.all import *
            conf.verb = 0

            """
        return try lab.exec(host, [scapyPython, "-c", prelude + script]).stdout
    }

    /// TCP segments `host`'s kernel retransmitted (absolute `TcpRetransSegs` of its namespace, from nstat).
    static func tcpRetransmissions(_ lab: Lab, _ host: String) throws -> UInt64 {
        try lab.tcpRetransmissions(host)
    }

    /// Packets middlebox `mb`'s firewall dropped as conntrack INVALID (0 on an open, stateless box).
    static func invalidDrops(_ lab: Lab, _ mb: String, family: AddressFamily = .ipv4) throws -> UInt64 {
        try lab.firewallCounters(mb, family: family).invalidDropped.packets
    }

    /// Removes a lab an interrupted earlier run may have left.
    static func freshLab(_ spec: LabSpec) throws -> Lab {
        try Lab.down(name: spec.name, force: true, logger: logger)
        return try Lab.up(spec, logger: logger)
    }
}
