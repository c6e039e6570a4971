import DyscoCore
import DyscoAgent
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// The agent data plane on real namespaces, NFQUEUE, iptables firewalls and TCP programs (needs root).
/// Each test builds its own lab (name `dpN`, subnet 10.78.N.0/24) and removes it, also on failure.
@Suite struct DataplaneTests {
    /// Closed sessions stay listed long enough to be inspected after the transfer, however loaded the machine.
    static let keepClosedSessions = ["--close-linger", "120"]

    /// Sniffs TCP packets on `host`'s eth0 (AF_PACKET: what is on the wire) while `during` runs; returns
    /// "src sport dst dport" lines for packets touching `port` on either side.
    func sniff(_ lab: Lab, on host: String, port: UInt16, count: Int, during: () throws -> Void) throws -> [String] {
        let out = "\(lab.directory)/sniff-\(host).txt"
        let script = """
            import socket, struct, sys, time
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL: outgoing too
            s.bind(("eth0", 0)); s.settimeout(0.5)
            seen = []; end = time.time() + 20
            open(sys.argv[1] + ".ready", "w").close()
            while len(seen) < \(count) and time.time() < end:
                try: p = s.recv(70000)
                except socket.timeout: continue
                if p[12:14] != b"\\x08\\x00": continue
                ip = p[14:]
                if len(ip) < 40 or ip[9] != 6: continue
                ihl = (ip[0] & 15) * 4
                sp, dp = struct.unpack("!HH", ip[ihl:ihl + 4])
                if \(port) not in (sp, dp): continue
                seen.append("%s %d %s %d" % (socket.inet_ntoa(ip[12:16]), sp, socket.inet_ntoa(ip[16:20]), dp))
            open(sys.argv[1], "w").write("\\n".join(seen))
            """
        let sniffer = try lab.spawn(host, ["python3", "-c", script, out])
        let deadline = Date().addingTimeInterval(5)
        while !FileManager.default.fileExists(atPath: out + ".ready"), Date() < deadline { usleep(50_000) }
        try during()
        sniffer.waitUntilExit()
        return try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n").map(String.init)
    }

    @Test("(a) 64 MiB HTTP download client→fw1→server: byte-exact, fw1 tracks the session, the wire carries subsessions")
    func httpThroughFirewall() async throws {
        try await TestSupport.withLab(LabSpec(name: "dp1", middleboxes: ["fw1"], subnet: "10.78.1.0/24",
                                  agentArguments: Self.keepClosedSessions)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 64)
            let client = lab.address(of: "client1"), fw1 = lab.address(of: "fw1"), server = lab.address(of: "server1")
            let target = "\(lab.directory)/blob.client"
            let wire = try sniff(lab, on: "fw1", port: 80, count: 40) {
                try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "60", "-o", target, "http://\(server)/blob"])
            }
            #expect(try TestSupport.sha256(target) == TestSupport.sha256("\(lab.httpRoot)/blob"))

            // On the wire, only subsession tuples: client↔fw1 and fw1↔server, never client↔server.
            #expect(wire.count >= 20)
            for line in wire {
                let f = line.split(separator: " ").map(String.init)
                let pair = Set([f[0], f[2]])
                #expect(pair == [client.description, fw1.description] || pair == [fw1.description, server.description],
                        "packet on the wire with a session tuple: \(line)")
            }
            #expect(wire.contains { $0.hasPrefix("\(client) ") }, "client→fw1 subsession seen")
            #expect(wire.contains { $0.hasPrefix("\(fw1) ") && $0.contains(" \(server) ") }, "fw1→server subsession seen: \(wire)")

            // The unmodified firewall tracked the original session and accepted it as NEW then ESTABLISHED.
            let conntrack = try lab.conntrackTCP("fw1")
            #expect(conntrack.contains("src=\(client) dst=\(server)") && conntrack.contains("dport=80"), "\(conntrack)")
            let counters = try lab.firewallCounters("fw1")
            #expect(counters.newAccepted.packets >= 1)
            #expect(counters.establishedAccepted.packets > 1000)
            #expect(counters.invalidDropped.packets == 0)

            let snapshots = try await (TestSupport.snapshot(lab, "client1"), TestSupport.snapshot(lab, "fw1"),
                                       TestSupport.snapshot(lab, "server1"))
            let c = try #require(snapshots.0.sessions.first)
            #expect(c.role == .leftEnd && c.session.dstAddr == server && c.right?.dstAddr == fw1)
            let m = try #require(snapshots.1.sessions.first)
            #expect(m.role == .middlebox && m.left == c.right && m.right?.srcAddr == fw1 && m.right?.dstAddr == server)
            let s = try #require(snapshots.2.sessions.first)
            #expect(s.role == .rightEnd && s.left == m.right && s.session == c.session)
            #expect(snapshots.1.counters.malformedPackets == 0 && snapshots.1.counters.malformedDyscoSyn == 0)
        }
    }

    @Test("(b) a chain of two middleboxes: both firewalls see the session, the download is byte-exact")
    func twoMiddleboxes() async throws {
        try await TestSupport.withLab(LabSpec(name: "dp2", middleboxes: ["fw1", "fw2"], chain: ["fw1", "fw2"],
                                  subnet: "10.78.2.0/24", agentArguments: Self.keepClosedSessions)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            let client = lab.address(of: "client1"), server = lab.address(of: "server1")
            let target = "\(lab.directory)/blob.client"
            try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "60", "-o", target, "http://\(server)/blob"])
            #expect(try TestSupport.sha256(target) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            for fw in ["fw1", "fw2"] {
                #expect(try lab.conntrackTCP(fw).contains("src=\(client) dst=\(server)"), "\(fw) tracks the session")
                #expect(try lab.firewallCounters(fw).establishedAccepted.packets > 100)
            }
            let fw1 = try await TestSupport.snapshot(lab, "fw1").sessions.first
            let fw2 = try await TestSupport.snapshot(lab, "fw2").sessions.first
            #expect(fw1?.right?.dstAddr == lab.address(of: "fw2"))
            #expect(fw2?.left == fw1?.right && fw2?.right?.dstAddr == server)
        }
    }

    @Test("(c) 100 concurrent sessions through fw1, each byte-exact")
    func hundredSessions() async throws {
        try await TestSupport.withLab(LabSpec(name: "dp3", middleboxes: ["fw1"], subnet: "10.78.3.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/small", megabytes: 1)
            let server = lab.address(of: "server1")
            var args = ["curl", "-sS", "--fail", "-m", "90", "--parallel", "--parallel-immediate", "--parallel-max", "100"]
            for i in 0..<100 { args += ["-o", "\(lab.directory)/d\(i)", "http://\(server)/small"] }
            try lab.exec("client1", args)
            let expected = try TestSupport.sha256("\(lab.httpRoot)/small")
            for i in 0..<100 { #expect(try TestSupport.sha256("\(lab.directory)/d\(i)") == expected, "download \(i)") }
            let client = try await TestSupport.snapshot(lab, "client1")
            let fw = try await TestSupport.snapshot(lab, "fw1")
            #expect(client.counters.sessionsCreated >= 100)
            #expect(fw.counters.sessionsCreated >= 100)
            #expect(client.counters.collisions == 0 && client.counters.portsExhausted == 0)
            let ports = Set(client.sessions.compactMap { $0.right?.srcPort })
            #expect(ports.count == client.sessions.count, "every session has its own subsession port")
        }
    }

    @Test("(d) traffic outside the policy is left alone: no session, no rewriting, it does not cross fw1")
    func outsidePolicy() async throws {
        try await TestSupport.withLab(LabSpec(name: "dp4", middleboxes: ["fw1"], subnet: "10.78.4.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 4)
            let server = lab.address(of: "server1"), client = lab.address(of: "client1")
            let target = "\(lab.directory)/blob.client"
            // Port 8080 is not in the lab policy (80, 5201).
            let wire = try sniff(lab, on: "server1", port: 8080, count: 20) {
                try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "30", "-o", target, "http://\(server):8080/blob"])
            }
            #expect(try TestSupport.sha256(target) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            #expect(wire.count >= 10)
            #expect(wire.allSatisfy { Set($0.split(separator: " ").map(String.init)).isSuperset(of: [client.description, server.description]) },
                    "the server's wire shows the original client↔server tuple")
            for host in ["client1", "fw1", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.sessions.isEmpty, "\(host) has no session for non-policy traffic")
                #expect(snapshot.counters.translatedIngress == 0 && snapshot.counters.translatedEgress == 0)
            }
            #expect(try lab.firewallCounters("fw1").establishedAccepted.packets == 0)
            // UDP/ICMP are not even queued: ping works with agents on every host.
            try lab.exec("client1", ["ping", "-c", "1", "-W", "2", server.description])
        }
    }

    @Test("(e) agent exit with no live session removes its rules; kill -9 and restart replaces them in place; lab down leaves nothing")
    func cleanup() async throws {
        let bin = try TestSupport.dyscoBinary()
        let lab = try TestSupport.freshLab(LabSpec(name: "dp5", middleboxes: ["fw1"], subnet: "10.78.5.0/24"))
        do {
            func ourRules(_ host: String) throws -> [String] {
                try ["raw", "mangle"].flatMap { table in
                    try lab.exec(host, ["iptables", "-w", "-t", table, "-S"]).stdout.split(separator: "\n")
                        .map(String.init).filter { $0.contains("DYSCO") }
                }
            }
            let initial = try ourRules("fw1")
            // Ingress: owned (no bypass), the rest (bypass); each egress chain first returns what tc egress rewrites.
            #expect(initial.count == 14, "3 chains, each created and jumped to; 2 + 3 + 3 queue rules: \(initial)")

            // A second agent on the same queue is refused with a clear message.
            let second = try lab.exec("fw1", [bin, "agent", "--trust-key", lab.trustKeyPath, "--control-socket", "\(lab.directory)/second.sock"], check: false)
            #expect(second.status != 0)
            #expect(second.stderr.contains("cannot bind NFQUEUE"), "\(second.stderr)")

            try lab.killAgent("fw1", signal: SIGTERM)
            #expect(try ourRules("fw1").isEmpty, "SIGTERM with no live session: rules removed")

            try lab.restartAgent("fw1")
            try lab.killAgent("fw1", signal: SIGKILL)
            #expect(try ourRules("fw1").count == initial.count, "SIGKILL leaves the rules (with --queue-bypass)")
            try lab.restartAgent("fw1")
            #expect(try ourRules("fw1") == initial, "a restarted agent replaces them, no duplicates")

            // And it works: a download through the restarted fw1 agent.
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 2)
            let target = "\(lab.directory)/blob.client"
            try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "30", "-o", target, "http://\(lab.address(of: "server1"))/blob"])
            #expect(try TestSupport.sha256(target) == TestSupport.sha256("\(lab.httpRoot)/blob"))
        } catch {
            _ = try? lab.down()
            throw error
        }
        let namespaces = lab.hosts.map(\.namespace)
        _ = try lab.down()
        let left = Set(NetworkNamespace.list()).intersection(namespaces)
        #expect(left.isEmpty, "namespaces left: \(left)")
        let links = try Command.run(["ip", "-o", "link", "show"]).stdout
        #expect(!links.contains("dp5-"), "no veth of the lab in the host namespace")
        let processes = try Command.run(["ps", "-eo", "args"]).stdout
        #expect(!processes.split(separator: "\n").contains { $0.contains("dp5-") && !$0.contains("ps -eo") })
    }
}
