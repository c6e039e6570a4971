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
/// Each test uses its own lab name (lt1...lt10) and subnet; the suite runs serially (2 cores, shared lock).
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
    static func tcpProbe(_ lab: Lab, from host: String, to address: IPAddress, port: UInt16) throws -> String {
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
    static func sendStrayAck(_ lab: Lab, from host: String, source: IPAddress, to address: IPAddress,
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
            // The lab's trust key: written for every lab, passed (before the spec's arguments) when enabled.
            #expect(FileManager.default.fileExists(atPath: lab.trustKeyPath))
            let command = try #require(lab.agentRecord("fw1")?.command)
            #expect(spec.passTrustKey)
            #expect(lab.state.trustKeyPath == lab.trustKeyPath)
            let at = try #require(command.firstIndex(of: "--trust-key"))
            #expect(command[at + 1] == lab.trustKeyPath)
            #expect(at < command.firstIndex(of: "--no-fastpath")!)
            #expect(log.contains(lab.trustKeyPath))

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
        for ns in namespaces {
            #expect(!FileManager.default.fileExists(atPath: AgentControlPaths.socketPath(netns: ns)))
            #expect(!FileManager.default.fileExists(atPath: AgentControlPaths.statePath(socketPath: AgentControlPaths.socketPath(netns: ns))),
                    "lab down removes the agents' state files")
        }
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

    /// `lab.trustKeyPath`: hex text that loads as a 32-byte ``TrustKey``, mode 0600, fresh per lab.
    static func checkTrustKey(_ lab: Lab) throws -> TrustKey {
        var st = stat()
        #expect(stat(lab.trustKeyPath, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600, "mode \(String(st.st_mode & 0o777, radix: 8))")
        let key = try TrustKey.load(path: lab.trustKeyPath)
        #expect(key.bytes.count == 32)
        return key
    }

    /// A chain that skips a middlebox: `--middleboxes fw1,fw2,fw3 --chain fw1,fw3` with the real agents carries a
    /// 16 MiB HTTP download byte-exact through fw1 and fw3; fw2, on the same segment, sees none of it.
    @Test func chainOfFirstAndThirdMiddlebox() throws {
        try Self.clean("lt8")
        let spec = LabSpec(name: "lt8", middleboxes: ["fw1", "fw2", "fw3"], chain: ["fw1", "fw3"],
                           subnet: "10.77.8.0/24", agentBinary: try TestSupport.dyscoBinary())
        let lab = try Lab.up(spec, logger: Self.logger)
        do {
            #expect(lab.chain == ["fw1", "fw3"])
            #expect(lab.hosts(.middlebox).map(\.name) == ["fw1", "fw2", "fw3"])
            #expect(lab.hosts.allSatisfy { lab.agentIsAlive($0.name) })
            let key = try Self.checkTrustKey(lab)
            #expect(lab.state.trustKeyPath == lab.trustKeyPath)
            for h in lab.hosts { #expect(lab.agentRecord(h.name)?.command.contains(lab.trustKeyPath) == true) }
            let config = try AgentConfig.load(path: LabPaths.agentConfig("lt8", host: "client1"))
            #expect(config.policies.first?.chain == [lab.address(of: "fw1"), lab.address(of: "fw3")])

            let retransBefore = try (TestSupport.tcpRetransmissions(lab, "client1"),
                                     TestSupport.tcpRetransmissions(lab, "server1"))
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            let client = lab.address(of: "client1"), server = lab.address(of: "server1")
            let target = "\(lab.directory)/blob.client"
            try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "60", "-o", target, "http://\(server)/blob"])
            #expect(try TestSupport.sha256(target) == TestSupport.sha256("\(lab.httpRoot)/blob"))

            for fw in ["fw1", "fw3"] {
                let counters = try lab.firewallCounters(fw)
                #expect(counters.newAccepted.packets >= 1, "\(fw)")
                #expect(counters.establishedAccepted.packets > 100, "\(fw): \(counters.establishedAccepted)")
                #expect(try TestSupport.invalidDrops(lab, fw) == 0, "\(fw)")
                #expect(try lab.conntrackTCP(fw).contains("src=\(client) dst=\(server)"), "\(fw) tracks the session")
            }
            let fw2 = try lab.firewallCounters("fw2")
            #expect(fw2.establishedAccepted.packets == 0, "fw2 is not in the chain: \(fw2)")
            #expect(fw2.newAccepted.packets == 0 && fw2.totalDropped == 0)
            #expect(!(try lab.conntrackTCP("fw2")).contains("dport=80"))

            let retransAfter = try (TestSupport.tcpRetransmissions(lab, "client1"),
                                    TestSupport.tcpRetransmissions(lab, "server1"))
            #expect(retransAfter.0 >= retransBefore.0 && retransAfter.1 >= retransBefore.1)

            // A restarted agent keeps the lab's key (the file is the same; the command line names it again).
            try lab.restartAgent("fw3")
            #expect(try TrustKey.load(path: lab.trustKeyPath) == key)
            #expect(lab.agentRecord("fw3")?.command.contains(lab.trustKeyPath) == true)
        } catch {
            _ = try? lab.down()
            throw error
        }
        try lab.down()
        #expect(Self.namespaces(of: "lt8").isEmpty)
    }

    /// `lab up --firewall fw2=open --attackers 1` (no agents, routed via the open fw2): the open box forwards
    /// statelessly without conntrack; the strict fw1 drops an INVALID packet; attacker1 reaches the server
    /// directly with scapy; nstat's TcpRetransSegs is the namespace's own absolute, growing counter.
    @Test func firewallProfilesAttackersAndCounters() throws {
        let bin = try TestSupport.dyscoBinary()
        try Self.clean("lt9")
        let up = try Command.run([bin, "lab", "up", "--name", "lt9", "--no-agents", "--middleboxes", "fw1,fw2",
                                  "--firewall", "fw2=open", "--attackers", "1", "--route-via", "fw2",
                                  "--subnet", "10.77.9.0/24", "--json"])
        defer { _ = try? Command.run([bin, "lab", "down", "--name", "lt9"], check: false) }
        let state = try LabState.decoder.decode(LabState.self, from: Data(up.stdout.utf8))
        #expect(state.firewallProfiles == ["fw1": .strict, "fw2": .open])
        #expect(state.hosts.map(\.name) == ["client1", "attacker1", "fw1", "fw2", "server1"])
        #expect(state.host("attacker1")?.role == .attacker)
        #expect(state.host("attacker1")?.address.description == "10.77.9.51")
        let lab = try Lab.attach(name: "lt9", logger: Self.logger)
        #expect(lab.hosts(.attacker).map(\.name) == ["attacker1"])
        #expect(lab.firewallProfile(of: "fw2") == .open && lab.firewallProfile(of: "fw1") == .strict)
        _ = try Self.checkTrustKey(lab)
        #expect(state.trustKeyPath == nil, "no agents, no key passed")

        // The open box: policy ACCEPT, one counting rule, no conntrack; traffic through it works.
        let server = lab.address(of: "server1")
        let openBefore = try lab.firewallCounters("fw2")
        #expect(openBefore.policy == "ACCEPT" && openBefore.rules.count == 1 && openBefore.profile == .open)
        let page = try lab.exec("client1", ["curl", "-sS", "-m", "5", "http://\(server)/index.html"]).stdout
        #expect(page.contains("dysco lab lt9"))
        let openAfter = try lab.firewallCounters("fw2")
        #expect(openAfter.openAccepted.packets >= openBefore.openAccepted.packets + 8, "\(openAfter)")
        #expect(try lab.conntrackTCP("fw2").isEmpty, "an open box tracks nothing")
        #expect(try lab.firewallCounters("fw1").profile == .strict)

        // lab status shows the profiles.
        let statuses = try JSONDecoder().decode([LabStatus].self, from: Data(
            try Command.run([bin, "lab", "status", "--name", "lt9", "--json"]).stdout.utf8))
        let hosts = try #require(statuses.first).hosts
        #expect(hosts.first { $0.name == "fw2" }?.firewallProfile == .open)
        #expect(hosts.first { $0.name == "fw1" }?.firewallProfile == .strict)
        #expect(hosts.first { $0.name == "fw2" }?.firewall?.openAccepted.packets ?? 0 >= openAfter.openAccepted.packets)
        #expect(hosts.first { $0.name == "attacker1" }?.firewallProfile == nil)
        let text = try Command.run([bin, "lab", "status", "--name", "lt9"]).stdout
        #expect(text.contains("firewall open") && text.contains("firewall strict") && text.contains("attacker1"), "\(text)")

        // The attacker: no agent, no forwarding, but on the segment: a scapy SYN gets the server's SYN-ACK.
        #expect(!lab.state.processes.contains { $0.host == "attacker1" })
        #expect(try lab.exec("attacker1", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.hasPrefix("0"))
        let reply = try TestSupport.scapy(lab, on: "attacker1", """
            r = sr1(IP(dst="\(server)")/TCP(sport=40001, dport=80, flags="S", seq=1000), timeout=3)
            print(r[TCP].flags if r is not None and TCP in r else "none")
            """)
        #expect(reply.trimmingCharacters(in: .whitespacesAndNewlines) == "SA")

        // A SYN+FIN (conntrack: INVALID) sent through each middlebox: the strict one drops it, the open one forwards.
        func sendSynFin(via mb: String) throws {
            _ = try TestSupport.scapy(lab, on: "attacker1", """
                mac = getmacbyip("\(lab.address(of: mb))")
                sendp(Ether(dst=mac)/IP(src="\(lab.address(of: "attacker1"))", dst="\(server)")
                      /TCP(sport=40002, dport=8080, flags="SF"), iface="eth0")
                """)
        }
        let invalidBefore = try TestSupport.invalidDrops(lab, "fw1")
        try sendSynFin(via: "fw1")
        var invalidAfter = try TestSupport.invalidDrops(lab, "fw1")
        for _ in 0..<20 where invalidAfter == invalidBefore {
            usleep(50_000)
            invalidAfter = try TestSupport.invalidDrops(lab, "fw1")
        }
        #expect(invalidAfter == invalidBefore + 1)
        let forwardedBefore = try lab.firewallCounters("fw2").openAccepted.packets
        try sendSynFin(via: "fw2")
        var forwardedAfter = try lab.firewallCounters("fw2").openAccepted.packets
        for _ in 0..<20 where forwardedAfter == forwardedBefore {
            usleep(50_000)
            forwardedAfter = try lab.firewallCounters("fw2").openAccepted.packets
        }
        #expect(forwardedAfter >= forwardedBefore + 1)
        #expect(try TestSupport.invalidDrops(lab, "fw2") == 0)

        // TcpRetransSegs: a number, the same on two idle reads (no history turns it into a delta), equal to the
        // namespace's /proc/net/snmp, and growing by the SYN retransmissions of a connect the server ignores.
        func snmpRetrans(_ host: String) throws -> UInt64? {
            let lines = try lab.exec(host, ["cat", "/proc/net/snmp"]).stdout.split(separator: "\n").filter { $0.hasPrefix("Tcp:") }
            guard lines.count == 2 else { return nil }
            let names = lines[0].split(separator: " "), values = lines[1].split(separator: " ")
            return names.firstIndex(of: "RetransSegs").flatMap { UInt64(values[$0]) }
        }
        let r0 = try TestSupport.tcpRetransmissions(lab, "client1")
        let r1 = try TestSupport.tcpRetransmissions(lab, "client1")
        #expect(r1 == r0)
        #expect(try snmpRetrans("client1") == r1)
        try lab.exec("server1", ["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP"])
        #expect(try Self.tcpProbe(lab, from: "client1", to: server, port: 9999) == "timeout")
        let r2 = try TestSupport.tcpRetransmissions(lab, "client1")
        #expect(r2 >= r1 + 1, "a SYN retransmission: \(r1) → \(r2)")
        #expect(try TestSupport.tcpRetransmissions(lab, "client1") >= r2)
        #expect(try snmpRetrans("client1") ?? 0 >= r2)
        // Other namespaces have their own counters: the attacker retransmitted nothing.
        #expect(try TestSupport.tcpRetransmissions(lab, "attacker1") == 0)

        let down = try Command.run([bin, "lab", "down", "--name", "lt9"])
        #expect(down.stdout.contains("removed"))
        #expect(Self.namespaces(of: "lt9").isEmpty)
    }

    /// A test's own `--trust-key` replaces the lab's; attackers get no agent (fake agents).
    @Test func trustKeyOverrideAndAttackersWithoutAgents() throws {
        try Self.clean("lt10")
        let binary = try Self.fakeAgent()
        let custom = NSTemporaryDirectory() + "lab-lt10-\(getpid()).key"
        try TrustKeyFile.save(hex: TrustKey.generateHex(), to: custom, replace: true)
        defer { unlink(custom) }
        let spec = LabSpec(name: "lt10", middleboxes: ["fw1"], subnet: "10.77.10.0/24",
                           agentArguments: ["--trust-key", custom], agentBinary: binary, services: false, attackers: 2)
        let lab = try Lab.up(spec, logger: Self.logger)
        do {
            #expect(lab.hosts(.attacker).map(\.address.description) == ["10.77.10.51", "10.77.10.52"])
            for h in lab.hosts where h.role != .attacker {
                #expect(lab.agentIsAlive(h.name), "\(h.name)")
                let command = try #require(lab.agentRecord(h.name)?.command)
                #expect(command.filter { $0 == "--trust-key" }.count == 1)
                #expect(command[command.firstIndex(of: "--trust-key")! + 1] == custom)
            }
            for h in lab.hosts(.attacker) {
                #expect(lab.agentRecord(h.name) == nil)
                #expect(!FileManager.default.fileExists(atPath: LabPaths.agentConfig("lt10", host: h.name)))
                #expect(!FileManager.default.fileExists(atPath: AgentControlPaths.socketPath(netns: h.namespace)))
                #expect(throws: LabError.self) { try lab.restartAgent(h.name) }
            }
            // Attackers are on the segment (the server answers on a closed port with a RST).
            #expect(try Self.tcpProbe(lab, from: "attacker2", to: lab.address(of: "server1"), port: 9) == "refused")
            _ = try Self.checkTrustKey(lab)
            let status = try #require(LabStatus.collect(name: "lt10").first)
            #expect(status.hosts.filter { $0.role == .attacker }.allSatisfy { $0.agentAlive == nil })
            #expect(status.text.contains("attacker (no agent)"))
        } catch {
            _ = try? lab.down()
            throw error
        }
        try lab.down()
        #expect(Self.namespaces(of: "lt10").isEmpty)
    }
}
