import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Owned keys on the BPF datapath (docs/BPF.md, "Owned keys"): the keys of a session the agent alone translates
/// are in `dysco_owned`; while no agent runs, the ingress program marks its packets and the queue rule without
/// `--queue-bypass` drops them (TCP retransmits them later) instead of letting them pass untranslated. Lab `own1`,
/// 10.78.121.0/24, a bpffs the test mounts on the host at `/run/dysco-own1-pins` (removed in every path).
@Suite(.serialized) struct OwnedKeysTests {
    typealias Datapath = FastPathIntegrationTests.Datapath

    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[owned-keys-tests] \(line)\n".utf8))
    }

    /// Packets the queue rules without `--queue-bypass` (the fail-closed ones) matched on `host`, every table.
    static func failClosedPackets(_ lab: Lab, _ host: String) throws -> UInt64 {
        try counted(lab, host) { $0.contains("NFQUEUE") && !$0.contains("--queue-bypass") }
    }

    /// Packets the test's counting rules (comment `own1-leak`: any TCP packet fw1 forwards or delivers) matched.
    static func leaked(_ lab: Lab, _ host: String) throws -> UInt64 {
        try counted(lab, host) { $0.contains("own1-leak") }
    }

    /// The packet counters (`iptables-save -c`) of the rules whose line satisfies `matches`, summed.
    static func counted(_ lab: Lab, _ host: String, _ matches: (Substring) -> Bool) throws -> UInt64 {
        let saved = try lab.exec(host, ["iptables-save", "-c"]).stdout
        return saved.split(separator: "\n").filter { $0.hasPrefix("[") && matches($0) }.reduce(0) { sum, line in
            let packets = line.dropFirst().prefix { $0 != ":" }
            return sum + (UInt64(packets) ?? 0)
        }
    }

    static func size(_ path: String) -> Int {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
    }

    @Test("BPF owned keys fail closed: fw1's agent (--no-fastpath: it alone translates the session) killed mid-transfer, the session's packets are dropped at fw1, none forwarded or delivered untranslated; restarted, the download completes byte-exact")
    func failClosedWhileNoAgentRuns() async throws {
        let datapath = Datapath(lab: "own1", subnet: "10.78.121.0/24")
        try await datapath.withPins {
        try await TestSupport.withLab(MigrationLab.spec(datapath.lab, subnet: datapath.subnet, middleboxes: ["fw1"],
                                                        agentArguments: ["--no-fastpath"] + datapath.arguments)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 4)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: 1)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: 1)
            // The session is owned at fw1: its ingress keys (both directions) and its egress keys in dysco_owned.
            try await MigrationLab.waitUntilRestartSafe(lab, "fw1", count: 1, bpfPins: datapath.pins)
            let session = try #require(try await MigrationLab.pacedSessions(lab, "fw1").first)
            #expect(session.carrier != .kernel, "--no-fastpath: the agent alone translates it")
            let ownedEgress = try MigrationLab.bpfOwnedKeys(lab, "fw1", pins: datapath.pins, hook: .egress)
            #expect(ownedEgress.count >= 2, "fw1's egress keys owned too: \(ownedEgress)")
            let rules = try lab.exec("fw1", ["iptables-save"]).stdout
            #expect(rules.contains("dysco_egress_owned"), "the egress fail-closed rule asks the owned filter: \(rules)")
            // Counting rules: any TCP packet fw1 forwards or delivers to itself.
            for chain in ["FORWARD", "INPUT"] {
                try lab.exec("fw1", ["iptables", "-w", "-I", chain, "1", "-p", "tcp", "-m", "comment", "--comment", "own1-leak"])
            }
            let lossBefore = try MigrationLab.lossCounters(lab)

            try lab.killAgent("fw1", signal: SIGKILL)
            #expect(!lab.agentIsAlive("fw1"))
            // What the dead agent verdicted last has left fw1 (and reached the client's file) by now.
            try await Task.sleep(for: .milliseconds(300))
            let closedBefore = try Self.failClosedPackets(lab, "fw1")
            let leakedBefore = try Self.leaked(lab, "fw1")
            let sizeBefore = Self.size(downloads.outputs[0])
            try await Task.sleep(for: .seconds(2))
            let closed = try Self.failClosedPackets(lab, "fw1") - closedBefore
            let leaked = try Self.leaked(lab, "fw1") - leakedBefore
            let sizeAfter = Self.size(downloads.outputs[0])
            Self.record("own1 while no agent runs (2 s): fail-closed rules dropped \(closed) packets, fw1 forwarded or delivered \(leaked) TCP packets, the download grew \(sizeAfter - sizeBefore) bytes (at \(sizeBefore) of \(downloads.expectedBytes))")
            #expect(sizeBefore < downloads.expectedBytes, "the download was still running")
            #expect(closed > 0, "the session's packets met the fail-closed rule")
            #expect(leaked == 0, "fw1 forwarded or delivered \(leaked) untranslated TCP packets")
            #expect(sizeAfter == sizeBefore, "nothing reached the client while fw1 had no agent")

            try lab.restartAgent("fw1")
            let log = try String(contentsOfFile: LabPaths.agentLog(lab.name, host: "fw1"), encoding: .utf8)
            #expect(log.contains("bpf.carries=false"), "the BPF path for the owned keys only")
            #expect(downloads.wait(diagnose: lab), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            let window = try MigrationLab.lossCounters(lab) - lossBefore
            Self.record("own1 loss counters over the restart: \(window)")
            #expect(window.establishedResets == 0, "resets: \(window)")
        }
        }
    }
}
