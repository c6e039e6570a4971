import DyscoCore
import DyscoAgent
@testable import DyscoLab
import DyscoSystem
import Foundation
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Builds real labs (needs root): namespaces, bridge, firewall, services, teardown, crash recovery.
/// Each test uses its own lab name (lt1...lt6) and subnet; the suite runs serially (2 cores, shared lock).
@Suite(.serialized) struct LabTests {
    static let logger: Logger = {
        var l = Logger(label: "lab-tests")
        l.logLevel = .notice
        return l
    }()

    /// Namespaces whose name starts with `lab-`.
    static func namespaces(of lab: String) -> [String] {
        NetworkNamespace.list().filter { $0.hasPrefix("\(lab)-") }
    }

    /// Makes sure a lab left by an earlier, interrupted run does not fail this one.
    static func clean(_ lab: String) throws {
        try Lab.down(name: lab, force: true, logger: logger)
        #expect(namespaces(of: lab).isEmpty)
    }

    /// "open", "refused" or "timeout": a TCP connect from `host` to addr:port.
    static func tcpProbe(_ lab: Lab, from host: String, to address: IPv4Address, port: UInt16) throws -> String {
        let script = """
            import socket
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("\(address)", \(port)))
                print("open")
            except ConnectionRefusedError:
                print("refused")
            except OSError:
                print("timeout")
            """
        return try lab.exec(host, ["python3", "-c", script]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Sends one bare TCP ACK (no connection behind it) from `host` to addr:port through a raw socket.
    static func sendStrayAck(_ lab: Lab, from host: String, source: IPv4Address, to address: IPv4Address,
                             port: UInt16) throws {
        let script = """
            import socket, struct
            src, dst = "\(source)", "\(address)"
            def csum(data):
                if len(data) % 2: data += b"\\0"
                s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
                while s >> 16: s = (s & 0xffff) + (s >> 16)
                return ~s & 0xffff
            hdr = struct.pack("!HHIIBBHHH", 40000, \(port), 12345, 67890, 5 << 4, 0x10, 65535, 0, 0)
            pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
            hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            s.sendto(hdr, (dst, 0))
            """
        try lab.exec(host, ["python3", "-c", script])
    }

    @Test func buildsUsesAndRemovesALab() throws {
        try Self.clean("lt1")
        let spec = LabSpec(name: "lt1", clients: 2, servers: 1, middleboxes: ["fw1", "fw2"], subnet: "10.77.1.0/24",
                           agents: false, routeViaMiddlebox: "fw1")
        let lab = try Lab.up(spec, logger: Self.logger)
        var recordedPids: [Int32] = []
        do {
            // Namespaces and addresses.
            #expect(Set(Self.namespaces(of: "lt1")) == ["lt1-sw", "lt1-client1", "lt1-client2", "lt1-fw1", "lt1-fw2",
                                                       "lt1-server1"])
            for host in lab.hosts {
                let out = try lab.exec(host.name, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
                #expect(out.contains("inet \(host.address)/24"), "\(host.name): \(out)")
                let lo = try lab.exec(host.name, ["ip", "-o", "link", "show", "lo"]).stdout
                #expect(lo.contains("UP") || lo.contains("UNKNOWN"), "\(host.name): \(lo)")
            }
            #expect(lab.address(of: "fw2").description == "10.77.1.102")
            let ports = try Command.run(["ip", "-n", "lt1-sw", "-o", "link", "show", "master", "br0"]).stdout
            for name in ["client1", "client2", "fw1", "fw2", "server1"] { #expect(ports.contains(" \(name)@"), "\(ports)") }
            #expect(try lab.exec("fw1", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.hasPrefix("1"))
            #expect(try lab.exec("client1", ["sysctl", "-n", "net.ipv4.conf.eth0.send_redirects"]).stdout.hasPrefix("0"))

            // L2 reachability: a RST from a closed port proves the path.
            #expect(try Self.tcpProbe(lab, from: "client1", to: lab.address(of: "client2"), port: 9) == "refused")
            #expect(try Self.tcpProbe(lab, from: "client2", to: lab.address(of: "fw2"), port: 9) == "refused")

            // Through fw1 (static routes): new SYNs accepted, the rest as ESTABLISHED.
            let before = try lab.firewallCounters("fw1")
            #expect(before.policy == "DROP")
            let server = lab.address(of: "server1")
            let page = try lab.exec("client1", ["curl", "-sS", "-m", "5", "http://\(server):8080/index.html"]).stdout
            #expect(page.contains("dysco lab lt1"))
            let code = try lab.exec("client2", ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                                "http://\(server)/"]).stdout
            #expect(code == "200")
            #expect(try Self.tcpProbe(lab, from: "client1", to: server, port: 5201) == "open")
            let after = try lab.firewallCounters("fw1")
            #expect(after.newAccepted.packets >= before.newAccepted.packets + 3)
            #expect(after.establishedAccepted.packets > before.establishedAccepted.packets + 6)
            #expect(try lab.firewallCounters("fw2").newAccepted.packets == 0)
            #expect(try lab.conntrackTCP("fw1").contains("dport=8080"))

            // A mid-stream packet the firewall has no state for is not a NEW SYN: dropped.
            try Self.sendStrayAck(lab, from: "client1", source: lab.address(of: "client1"), to: server, port: 8080)
            var dropped = try lab.firewallCounters("fw1")
            for _ in 0..<20 where dropped.totalDropped == after.totalDropped {
                usleep(50_000)
                dropped = try lab.firewallCounters("fw1")
            }
            #expect(dropped.totalDropped >= after.totalDropped + 1)
            #expect(dropped.newAccepted == after.newAccepted)

            // lab.json and status.
            let state = try LabState.load(name: "lt1")
            #expect(state.phase == .ready)
            #expect(state.hosts.count == 5)
            #expect(state.processes.filter { $0.host == "server1" }.map(\.kind).sorted { $0.rawValue < $1.rawValue }
                    == [.http, .httpAlt, .iperf3])
            recordedPids = state.processes.map(\.pid)
            for pid in recordedPids { #expect(ProcessInspector.isAlive(pid: pid, namespace: "lt1-server1")) }
            let status = try #require(LabStatus.collect(name: "lt1").first)
            #expect(status.phase == "ready")
            #expect(status.hosts.first { $0.name == "fw1" }?.firewall?.newAccepted.packets == after.newAccepted.packets)
            #expect(status.hosts.allSatisfy { $0.namespaceExists })
            #expect(status.text.contains("fw1"))

            // A second lab of the same name is refused and leaves the first intact.
            #expect(throws: LabError.self) { try Lab.up(spec, logger: Self.logger) }
            #expect(Self.namespaces(of: "lt1").count == 6)
        } catch {
            _ = try? lab.down()
            throw error
        }
        let report = try lab.down()
        #expect(report.existed)
        #expect(report.removedNamespaces.count == 6)
        #expect(Self.namespaces(of: "lt1").isEmpty)
        #expect(!FileManager.default.fileExists(atPath: LabPaths.directory("lt1")))
        for pid in recordedPids { #expect(kill(pid, 0) != 0 || ProcessInspector.isZombie(pid: pid), "pid \(pid)") }
        // Nothing was ever made in the machine's own namespace.
        let links = try Command.run(["ip", "-o", "link", "show"]).stdout
        for name in ["client1", "client2", "fw1", "fw2", "server1", "br0"] { #expect(!links.contains(" \(name)@") && !links.contains(" \(name):")) }
        // Removing it again is fine.
        #expect(try Lab.down(name: "lt1", logger: Self.logger).existed == false)
    }

    @Test func downWorksWithoutStateFile() throws {
        try Self.clean("lt2")
        let lab = try Lab.up(LabSpec(name: "lt2", middleboxes: ["fw1"], subnet: "10.77.2.0/24", agents: false),
                             logger: Self.logger)
        let pids = lab.state.processes.map(\.pid)
        #expect(pids.count == 3)
        // The creator "crashes": its lab.json is gone, its servers keep running.
        try FileManager.default.removeItem(atPath: LabPaths.stateFile("lt2"))
        // Without --force only the namespaces that are surely the lab's go; the middlebox stays, and the error says why.
        let error = #expect(throws: LabError.self) { try Lab.down(name: "lt2", force: false, logger: Self.logger) }
        guard case .needsForce(let message) = error else {
            Issue.record("expected needsForce, got \(String(describing: error))")
            return
        }
        #expect(message.contains("--force") && message.contains("lt2-fw1"))
        #expect(Self.namespaces(of: "lt2") == ["lt2-fw1"])
        for pid in pids { #expect(!ProcessInspector.isAlive(pid: pid, namespace: "lt2-server1")) }
        let report = try Lab.down(name: "lt2", force: true, logger: Self.logger)
        #expect(report.removedNamespaces == ["lt2-fw1"])
        #expect(Self.namespaces(of: "lt2").isEmpty)
        #expect(!FileManager.default.fileExists(atPath: LabPaths.directory("lt2")))
    }

    @Test func downAfterProcessesWereKilled() throws {
        try Self.clean("lt3")
        let lab = try Lab.up(LabSpec(name: "lt3", clients: 1, servers: 2, middleboxes: ["fw1"], subnet: "10.77.3.0/24",
                                     agents: false), logger: Self.logger)
        // kill -9 some of them, leave the others: a half-dead lab.
        let records = lab.state.processes
        #expect(records.count == 6)
        for record in records where record.host == "server1" { kill(record.pid, SIGKILL) }
        // Static down (as `dysco-migrate lab down` after a crash would) from lab.json.
        let report = try Lab.down(name: "lt3", logger: Self.logger)
        #expect(report.fromStateFile)
        #expect(report.removedNamespaces.count == 5)
        #expect(Self.namespaces(of: "lt3").isEmpty)
        for record in records { #expect(!ProcessInspector.isAlive(pid: record.pid, namespace: "lt3-\(record.host)")) }
        #expect(!FileManager.default.fileExists(atPath: LabPaths.directory("lt3")))
    }

    /// A stand-in agent: creates its control socket like the real one, removes it on SIGTERM.
    static func fakeAgent(failing: Bool = false) throws -> String {
        let path = NSTemporaryDirectory() + "lab-fake-agent-\(failing ? "fail" : "ok")-\(getpid()).py"
        let script = """
            #!/usr/bin/env python3
            import os, signal, socket, subprocess, sys, time
            ns = subprocess.run(["ip", "netns", "identify"], capture_output=True, text=True).stdout.strip()
            print("fake agent", ns, sys.argv[1:], flush=True)
            if \(failing ? "True" : "False"):
                print("cannot open NFQUEUE: fake failure", flush=True)
                sys.exit(3)
            path = "\(AgentControlPaths.runDirectory)/agent-%s.sock" % ns
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.listen()
            def stop(*_):
                os.unlink(path)
                sys.exit(0)
            signal.signal(signal.SIGTERM, stop)
            while True:
                time.sleep(1)
            """
        try Data(script.utf8).write(to: URL(fileURLWithPath: path))
        chmod(path, 0o755)
        return path
    }

    @Test func agentsStartRestartAndStop() throws {
        try Self.clean("lt4")
        let binary = try Self.fakeAgent()
        let spec = LabSpec(name: "lt4", clients: 1, servers: 1, middleboxes: ["fw1", "fw2"], chain: ["fw2", "fw1"],
                           subnet: "10.77.4.0/24", policyPorts: [80], agents: true, agentArguments: ["--no-fastpath"],
                           agentBinary: binary, services: false)
        let lab = try Lab.up(spec, logger: Self.logger)
        do {
            for host in lab.hosts {
                #expect(lab.agentIsAlive(host.name), "\(host.name)")
                #expect(FileManager.default.fileExists(atPath: AgentControlPaths.socketPath(netns: host.namespace)))
                let config = try AgentConfig.load(path: LabPaths.agentConfig("lt4", host: host.name))
                if host.role == .client {
                    #expect(config.policies.count == 1)
                    #expect(config.policies[0].chain == [lab.address(of: "fw2"), lab.address(of: "fw1")])
                    #expect(config.policies[0].match.dport == [PortRange(lower: 80, upper: 80)])
                } else {
                    #expect(config.policies.isEmpty)
                }
            }
            let log = try String(contentsOfFile: LabPaths.agentLog("lt4", host: "fw1"), encoding: .utf8)
            #expect(log.contains("lt4-fw1") && log.contains("--no-fastpath"))
            #expect(lab.agentRecord("client1")?.command.contains("--config") == true)

            // A crash, then a restart.
            let first = try #require(lab.agentRecord("client1")?.pid)
            try lab.killAgent("client1")
            #expect(!lab.agentIsAlive("client1"))
            try lab.restartAgent("client1")
            let second = try #require(lab.agentRecord("client1")?.pid)
            #expect(second != first)
            #expect(lab.agentIsAlive("client1"))
            // Restart of a running agent (SIGTERM path).
            try lab.restartAgent("fw1")
            #expect(lab.agentIsAlive("fw1"))
            let status = try #require(LabStatus.collect(name: "lt4").first)
            #expect(status.hosts.allSatisfy { $0.agentAlive == true })
        } catch {
            _ = try? lab.down()
            throw error
        }
        let namespaces = lab.hosts.map(\.namespace)
        try lab.down()
        #expect(Self.namespaces(of: "lt4").isEmpty)
        for ns in namespaces { #expect(!FileManager.default.fileExists(atPath: AgentControlPaths.socketPath(netns: ns))) }
    }

    @Test func failedUpRemovesEverything() throws {
        try Self.clean("lt5")
        let binary = try Self.fakeAgent(failing: true)
        let error = #expect(throws: LabError.self) {
            try Lab.up(LabSpec(name: "lt5", middleboxes: ["fw1"], subnet: "10.77.5.0/24", agentBinary: binary),
                       logger: Self.logger)
        }
        guard case .agentFailed(_, let reason, let tail) = error else {
            Issue.record("expected agentFailed, got \(String(describing: error))")
            return
        }
        #expect(reason.contains("exited") && tail.contains("fake failure"))
        #expect(Self.namespaces(of: "lt5").isEmpty)
        #expect(!FileManager.default.fileExists(atPath: LabPaths.directory("lt5")))
    }

    @Test func commandLine() throws {
        let bin = try TestSupport.dyscoBinary()
        try Self.clean("lt6")
        let up = try Command.run([bin, "lab", "up", "--name", "lt6", "--no-agents", "--middleboxes", "fw1",
                                  "--subnet", "10.77.6.0/24", "--route-via", "fw1", "--json"])
        defer { _ = try? Command.run([bin, "lab", "down", "--name", "lt6"], check: false) }
        let state = try LabState.decoder.decode(LabState.self, from: Data(up.stdout.utf8))
        #expect(state.name == "lt6")
        #expect(state.routeViaMiddlebox == "fw1")
        #expect(state.hosts.map(\.name) == ["client1", "fw1", "server1"])
        // The servers outlive the command that started them.
        let attached = try Lab.attach(name: "lt6", logger: Self.logger)
        #expect(try Self.tcpProbe(attached, from: "client1", to: attached.address(of: "server1"), port: 80) == "open")
        let statusJSON = try Command.run([bin, "lab", "status", "--name", "lt6", "--json"]).stdout
        let statuses = try JSONDecoder().decode([LabStatus].self, from: Data(statusJSON.utf8))
        #expect(statuses.count == 1)
        #expect(statuses[0].hosts.first { $0.name == "fw1" }?.firewall?.newAccepted.packets == 1)
        #expect(try Command.run([bin, "lab", "status"]).stdout.contains("lab lt6: ready"))
        let refused = try Command.run([bin, "lab", "up", "--name", "lt6", "--no-agents"], check: false)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("lab down"))
        let bad = try Command.run([bin, "lab", "up", "--name", "lt6x", "--subnet", "192.168.0.0/24"], check: false)
        #expect(bad.status != 0 && bad.stderr.contains("10.A.B.0/24"))
        let down = try Command.run([bin, "lab", "down", "--name", "lt6"])
        #expect(down.stdout.contains("removed"))
        #expect(Self.namespaces(of: "lt6").isEmpty)
        let again = try Command.run([bin, "lab", "down", "--name", "lt6"])
        #expect(again.stdout.contains("nothing to remove"))
    }

    /// The real agents (the default binary lookup finds the built `dysco-migrate`): policy ports go through fw1,
    /// other ports go direct; an agent restart keeps the lab usable.
    @Test func realAgentsSteerPolicyPortsThroughTheChain() throws {
        try Self.clean("lt7")
        let lab = try Lab.up(LabSpec(name: "lt7", subnet: "10.77.7.0/24", agentBinary: try TestSupport.dyscoBinary()),
                             logger: Self.logger)
        do {
            #expect(lab.hosts.allSatisfy { lab.agentIsAlive($0.name) })
            let server = lab.address(of: "server1")
            let page = try lab.exec("client1", ["curl", "-sS", "-m", "5", "http://\(server)/index.html"]).stdout
            #expect(page.contains("dysco lab lt7"))
            let afterPolicyPort = try lab.firewallCounters("fw1")
            #expect(afterPolicyPort.newAccepted.packets == 1)
            #expect(afterPolicyPort.establishedAccepted.packets > 4)
            #expect(try lab.firewallCounters("fw2").newAccepted.packets == 0)
            // 8080 is not a policy port: straight to the server, fw1 sees nothing new.
            let alt = try lab.exec("client1", ["curl", "-sS", "-m", "5", "http://\(server):8080/index.html"]).stdout
            #expect(alt.contains("dysco lab lt7"))
            #expect(try lab.firewallCounters("fw1").newAccepted == afterPolicyPort.newAccepted)
            // Restart the client's agent; new sessions are steered again.
            try lab.restartAgent("client1")
            #expect(lab.agentIsAlive("client1"))
            let again = try lab.exec("client1", ["curl", "-sS", "-m", "5", "http://\(server)/index.html"]).stdout
            #expect(again.contains("dysco lab lt7"))
            #expect(try lab.firewallCounters("fw1").newAccepted.packets == 2)
        } catch {
            _ = try? lab.down()
            throw error
        }
        try lab.down()
        #expect(Self.namespaces(of: "lt7").isEmpty)
    }
}
