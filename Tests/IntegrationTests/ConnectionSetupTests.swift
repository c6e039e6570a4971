import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Connection setup in the kernel (issue 16 item 2; needs root): with `--datapath bpf` each agent installs a
/// session's translations with its SYN (marked opening), so everything but the SYNs of a short connection stays in
/// the kernel, and the ingress program refuses SYN-ACKs and RSTs that do not acknowledge an opening session's SYN.
/// Labs `ksa1`, `ksd1` (10.78.101.0/24, 10.78.102.0/24), bpffs at `/run/dysco-<lab>-pins`, removed in every path.
@Suite(.serialized) struct ConnectionSetupIntegrationTests {
    /// Python: `fetch(host, timeout)` GETs /small over HTTP/1.0 (one request, the server closes) and returns the body.
    static let fetchPython = """
        import socket
        def fetch(host, timeout):
            s = socket.create_connection((host, 80), timeout=timeout)
            s.sendall(b"GET /small HTTP/1.0\\r\\nHost: lab\\r\\n\\r\\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk: break
                buf += chunk
            s.close()
            return buf.split(b"\\r\\n\\r\\n", 1)[-1]
        """

    static let hosts = ["client1", "fw1", "server1"]
    /// Hooks at which each host's agent sees a connection's SYN (fw1: arriving and leaving).
    static let synHooks: [String: UInt64] = ["client1": 1, "fw1": 2, "server1": 1]

    func pinDirectory(_ lab: Lab, _ host: String, _ datapath: FastPathIntegrationTests.Datapath) -> String {
        "\(datapath.pins)/dysco-\(lab.namespace(of: host))-q7"
    }

    func entries(_ lab: Lab, _ host: String, _ datapath: FastPathIntegrationTests.Datapath) throws -> [(BPFSessionKey, BPFSessionEntry)] {
        try BPFDatapath.pinnedEntries(mapPath: pinDirectory(lab, host, datapath) + "/dysco_sessions")
    }

    func statistics(_ lab: Lab, _ host: String, _ datapath: FastPathIntegrationTests.Datapath) throws -> BPFStatistics {
        try BPFDatapath.pinnedStatistics(mapPath: pinDirectory(lab, host, datapath) + "/dysco_stats")
    }

    /// Every agent's table and map empty.
    func allGone(_ lab: Lab, _ datapath: FastPathIntegrationTests.Datapath) async throws -> Bool {
        for host in Self.hosts {
            if !(try await TestSupport.snapshot(lab, host).sessions.isEmpty) { return false }
            if !(try entries(lab, host, datapath).isEmpty) { return false }
        }
        return true
    }

    static func writeSmallFile(_ path: String, bytes: Int) throws {
        var generator = SystemRandomNumberGenerator()
        try Data((0..<bytes).map { _ in UInt8.random(in: 0...255, using: &generator) }).write(to: URL(fileURLWithPath: path))
    }

    @Test("(a) 5,000 short HTTP connections through client → fw1 → server: each agent's queue sees their SYNs and nothing else; every table and map empty after the close")
    func shortConnectionsStayInKernel() async throws {
        let datapath = FastPathIntegrationTests.Datapath(lab: "ksa1", subnet: "10.78.101.0/24")
        let connections = 5_000
        try await datapath.withPins {
        try await TestSupport.withLab(LabSpec(name: datapath.lab, middleboxes: ["fw1"], subnet: datapath.subnet,
                                              agentArguments: ["--close-linger", "0.5"] + datapath.arguments)) { lab in
            let source = "\(lab.httpRoot)/small"
            try Self.writeSmallFile(source, bytes: 1_500)
            var before: [String: DataplaneCounters] = [:]
            for host in Self.hosts { before[host] = try await TestSupport.snapshot(lab, host).counters }
            // HTTP/1.0, one request per connection (the server closes), 4 at a time; every body compared.
            let script = """
                \(Self.fetchPython)
                import sys, threading
                host, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
                want = open(path, "rb").read()
                bad = []
                def worker(count):
                    for i in range(count):
                        if fetch(host, 30) != want: bad.append(i)
                threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
                for t in threads: t.start()
                for t in threads: t.join()
                print("ok", n - len(bad), "bad", len(bad))
                """
            let output = try lab.exec("client1", ["python3", "-c", script, lab.address(of: "server1").description, source,
                                                  "\(connections)"]).stdout
            #expect(output.contains("ok \(connections) bad 0"), "byte check: \(output)")
            let gone = try await TestSupport.eventually(timeout: 60) { try await allGone(lab, datapath) }
            for host in Self.hosts where !gone {
                let s = try await TestSupport.snapshot(lab, host).sessions
                Issue.record("\(host): \(s.count) sessions (\(Set(s.map { "\($0.carrier) \($0.state)" }))), \(try entries(lab, host, datapath).count) map entries")
            }
            for host in Self.hosts {
                let b = try #require(before[host]), a = try await TestSupport.snapshot(lab, host).counters
                let queued = a.packets - b.packets, syns = a.queuedSyns - b.queuedSyns
                let expectedSyns = UInt64(connections) * Self.synHooks[host]!
                let stats = try statistics(lab, host, datapath)
                FileHandle.standardError.write(Data("[conn-setup] \(host): \(connections) connections, queued \(queued) packets, of them SYNs \(syns) (\(Double(queued) / Double(connections)) per connection; retransmitted SYNs \(Int64(syns) - Int64(expectedSyns))), sessions created \(a.sessionsCreated - b.sessionsCreated), installs \(a.fastPathInstalls - b.fastPathInstalls), kernel events \(a.kernelEvents - b.kernelEvents) (stale \(a.kernelEventsStale - b.kernelEventsStale), lost \(a.kernelEventsLost - b.kernelEventsLost)), rewritten \(stats.rewritten), opening refused \(stats.openingRefused)\n".utf8))
                #expect(queued == syns, "\(host): \(queued - syns) packets other than SYNs came through NFQUEUE")
                #expect(syns >= expectedSyns, "\(host): every SYN at each hook (\(syns) of \(expectedSyns))")
                #expect(a.sessionsCreated - b.sessionsCreated == UInt64(connections), "\(host)")
                #expect(a.fastPathInstalls - b.fastPathInstalls == UInt64(connections), "\(host): each installed with its SYN")
                #expect(a.queuedTeardown == b.queuedTeardown, "\(host): no FIN/RST through NFQUEUE")
                #expect(a.synTimeouts == b.synTimeouts && a.kernelEventsLost == b.kernelEventsLost)
                #expect(stats.openingRefused == 0, "\(host): no real SYN-ACK or RST refused")
            }
        }
        }
    }

    @Test("(d) forged SYN-ACKs and RSTs against an opening session, from the attacker's namespace: refused in the kernel (OPENING_REFUSED), the connection completes byte-exact, nothing reset")
    func forgedAnswersRefused() async throws {
        let datapath = FastPathIntegrationTests.Datapath(lab: "ksd1", subnet: "10.78.102.0/24")
        try await datapath.withPins {
        try await TestSupport.withLab(LabSpec(name: datapath.lab, middleboxes: ["fw1"], subnet: datapath.subnet,
                                              agentArguments: datapath.arguments, attackers: 1)) { lab in
            let source = "\(lab.httpRoot)/small"
            try Self.writeSmallFile(source, bytes: 1_500)
            // The server's SYN-ACKs are dropped before they leave it, so the session stays opening everywhere while
            // the attacker forges its answers; the rule goes once every forgery is counted.
            let dropSynAck = ["OUTPUT", "-p", "tcp", "--sport", "80", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]
            try lab.exec("server1", ["iptables", "-I"] + dropSynAck)
            var ruleInstalled = true
            defer { if ruleInstalled { _ = try? lab.exec("server1", ["iptables", "-D"] + dropSynAck, check: false) } }
            let out = "\(lab.directory)/forged"
            let script = """
                \(Self.fetchPython)
                import sys
                host, out = sys.argv[1], sys.argv[2]
                open(out, "wb").write(fetch(host, 60))
                """
            let client = try lab.spawn("client1", ["python3", "-c", script, lab.address(of: "server1").description, out])
            defer { if client.isRunning { client.terminate() } }
            // Opening on every agent: the SYN reached the server, each kernel has the session's entries.
            let opening = try await TestSupport.eventually(timeout: 20) {
                for host in Self.hosts {
                    let sessions = try await TestSupport.snapshot(lab, host).sessions
                    if sessions.count != 1 || sessions[0].carrier != .kernel { return false }
                    if try entries(lab, host, datapath).isEmpty { return false }
                }
                return true
            }
            try #require(opening, "the session did not open in every kernel")
            let c = try #require(try await TestSupport.snapshot(lab, "client1").sessions.first)
            let f = try #require(try await TestSupport.snapshot(lab, "fw1").sessions.first)
            let toClient = try #require(c.right).reversed, toFw1 = try #require(f.right).reversed
            var before: [String: BPFStatistics] = [:]
            for host in Self.hosts { before[host] = try statistics(lab, host, datapath) }
            // Per target: SYN-ACKs with random ack, RSTs without ACK (random seq), RSTs with a random ack.
            let perKind = 20
            let targets = [toClient, toFw1].map { "('\($0.srcAddr)', \($0.srcPort), '\($0.dstAddr)', \($0.dstPort))" }
                .joined(separator: ", ")
            _ = try TestSupport.scapy(lab, on: "attacker1", """
                import random
                for (src, sport, dst, dport) in [\(targets)]:
                    for i in range(\(perKind)):
                        send(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags='SA', seq=random.getrandbits(32), ack=random.getrandbits(32)))
                        send(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags='R', seq=random.getrandbits(32)))
                        send(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags='RA', seq=random.getrandbits(32), ack=random.getrandbits(32)))

                """)
            let sent = UInt64(3 * perKind)
            let counted = try await TestSupport.eventually(timeout: 10) {
                try statistics(lab, "client1", datapath).openingRefused - before["client1"]!.openingRefused == sent
                    && statistics(lab, "fw1", datapath).openingRefused - before["fw1"]!.openingRefused == sent
            }
            for host in ["client1", "fw1"] {
                let refused = try statistics(lab, host, datapath).openingRefused - before[host]!.openingRefused
                FileHandle.standardError.write(Data("[conn-setup] \(host): \(sent) forged SYN-ACKs/RSTs sent, \(refused) refused\n".utf8))
            }
            #expect(counted, "every forgery refused where it arrived")
            // Nothing the forgeries did reached a stack or an agent: still opening, no RST seen anywhere.
            for host in Self.hosts {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.sessions.count == 1 && snapshot.sessions.first?.carrier == .kernel, "\(host)")
                #expect(snapshot.counters.resetsProvisional + snapshot.counters.resetsConfirmed == 0, "\(host): no RST")
                for (key, entry) in try entries(lab, host, datapath) {
                    #expect(!entry.flags.contains(.rstSeen), "\(host) \(key)")
                }
            }
            #expect(client.isRunning, "the client's connect is still waiting for the real SYN-ACK")
            try lab.exec("server1", ["iptables", "-D"] + dropSynAck)
            ruleInstalled = false
            let done = try await TestSupport.eventually(timeout: 60) { !client.isRunning }
            #expect(done && client.terminationStatus == 0, "the connection completed")
            #expect(try Data(contentsOf: URL(fileURLWithPath: out)) == Data(contentsOf: URL(fileURLWithPath: source)),
                    "byte-exact")
            for host in Self.hosts {
                let counters = try await TestSupport.snapshot(lab, host).counters
                #expect(counters.resetsProvisional + counters.resetsConfirmed == 0, "\(host): nothing reset")
                #expect(try statistics(lab, host, datapath).openingRefused - before[host]!.openingRefused
                        == (host == "server1" ? 0 : sent), "\(host): the real SYN-ACK was not refused")
            }
        }
        }
    }
}
