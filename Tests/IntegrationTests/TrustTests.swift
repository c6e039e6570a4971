import DyscoCore
import DyscoAgent
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Trust (paper §2.3, DESIGN §9) on real namespaces: a host on the lab segment that runs no agent (`attacker1`)
/// forges Dysco SYNs with scapy. Every agent of the lab shares the lab's key (``Lab/trustKeyPath``); the
/// attacker only reads it where a test needs a correctly signed trailer. Needs root and python3-scapy.
@Suite(.serialized) struct TrustTests {
    static let spec = LabSpec(name: "trust1", middleboxes: ["fw1"], subnet: "10.78.40.0/24", attackers: 1)

    /// Python helpers the attacker's scripts share: trailers v1 and v2 built byte by byte from the documented
    /// layout (DyscoSynPayload), not from our Swift code.
    static func forger(keyPath: String) -> String {
        """
        import hmac, hashlib, socket, struct, time
        LAB_KEY = bytes.fromhex(open("\(keyPath)").read().strip())
        def a(x): return socket.inet_aton(x)
        def v1(src, sport, dst, dport, hops):
            b = bytes([1, 4, len(hops), 0]) + a(src) + a(dst) + struct.pack(">HH", sport, dport) + b"".join(a(h) for h in hops)
            return b + struct.pack(">H", len(b) + 6) + b"DYSC"
        def v2(key, tup, src, sport, dst, dport, hops, chain=0x5eed0001, nonce=0x5eed0002):
            body = (bytes([2, 4, len(hops), 0]) + struct.pack(">QQ", chain, nonce)
                    + a(src) + a(dst) + struct.pack(">HH", sport, dport) + b"".join(a(h) for h in hops))
            t = a(tup[0]) + a(tup[1]) + struct.pack(">HH", tup[2], tup[3])
            mac = hmac.new(key, body + t, hashlib.sha256).digest()[:16]
            return body + mac + struct.pack(">H", len(body) + 22) + b"DYSC"
        def syn(src, dst, sport, payload):
            send(IP(src=src, dst=dst) / TCP(sport=sport, dport=80, flags="S", seq=1000) / Raw(payload))
            time.sleep(0.2)

        """
    }

    /// Records TCP packets on `host`'s eth0 (AF_PACKET: what is on the wire, both directions) until ``stop()``.
    final class Sniffer {
        let out: String
        let process: Process

        init(_ lab: Lab, on host: String) throws {
            out = "\(lab.directory)/trust-sniff-\(host).txt"
            for suffix in ["", ".ready", ".stop"] { try? FileManager.default.removeItem(atPath: out + suffix) }
            let script = """
                import os, socket, struct, sys, time
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
                s.bind(("eth0", 0)); s.settimeout(0.2)
                seen = []; end = time.time() + 60
                open(sys.argv[1] + ".ready", "w").close()
                while not os.path.exists(sys.argv[1] + ".stop") and time.time() < end:
                    try: p = s.recv(70000)
                    except socket.timeout: continue
                    if p[12:14] != b"\\x08\\x00": continue
                    ip = p[14:]
                    if len(ip) < 40 or ip[9] != 6: continue
                    ihl = (ip[0] & 15) * 4
                    sp, dp = struct.unpack("!HH", ip[ihl:ihl + 4])
                    seen.append("%s %d %s %d %d" % (socket.inet_ntoa(ip[12:16]), sp, socket.inet_ntoa(ip[16:20]), dp,
                                                    ip[ihl + 13]))
                open(sys.argv[1], "w").write("\\n".join(seen))
                """
            process = try lab.spawn(host, [TestSupport.scapyPython, "-c", script, out])
            let deadline = Date().addingTimeInterval(5)
            while !FileManager.default.fileExists(atPath: out + ".ready"), Date() < deadline { usleep(50_000) }
        }

        /// Packets seen, as "src sport dst dport flags" lines.
        func stop() throws -> [Packet] {
            _ = FileManager.default.createFile(atPath: out + ".stop", contents: nil)
            process.waitUntilExit()
            return try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n").compactMap(Packet.init)
        }
    }

    struct Packet: CustomStringConvertible {
        var src: String, sport: UInt16, dst: String, dport: UInt16, flags: UInt8
        init?(_ line: Substring) {
            let f = line.split(separator: " ")
            guard f.count == 5, let sport = UInt16(f[1]), let dport = UInt16(f[3]), let flags = UInt8(f[4]) else { return nil }
            (src, self.sport, dst, self.dport, self.flags) = (String(f[0]), sport, String(f[2]), dport, flags)
        }
        var isSyn: Bool { flags & 0x12 == 0x02 }
        var description: String { "\(src):\(sport)->\(dst):\(dport) flags \(String(flags, radix: 16))" }
    }

    @Test("forged (v1), wrong-key, replayed-tuple and loopback-hop trailers from an off-path host create nothing and reach no server")
    func forgedTrailers() async throws {
        try await TestSupport.withLab(Self.spec) { lab in
            let attacker = lab.address(of: "attacker1").description, fw1 = lab.address(of: "fw1").description
            let client = lab.address(of: "client1").description, server = lab.address(of: "server1").description
            let firewallBefore = try lab.firewallCounters("fw1")
            let fw1Sniffer = try Sniffer(lab, on: "fw1"), serverSniffer = try Sniffer(lab, on: "server1")

            // (a) v1 trailer: session client1 → server1, next hop server1 (the open relay of DESIGN §9).
            // (b) v2 under a key that is not the lab's.
            // (c) v2 under the lab's key, but signed for another source port than the packet's (a replay).
            // (d) v2 under the lab's key for this very tuple, naming 127.0.0.1 as the next hop.
            _ = try TestSupport.scapy(lab, on: "attacker1", Self.forger(keyPath: lab.trustKeyPath) + """
                me, fw1, client, server = "\(attacker)", "\(fw1)", "\(client)", "\(server)"
                syn(me, fw1, 10001, v1(client, 40001, server, 80, [server]))
                syn(me, fw1, 10002, v2(bytes(range(32)), (me, fw1, 10002, 80), client, 40002, server, 80, [server]))
                syn(me, fw1, 10003, v2(LAB_KEY, (me, fw1, 10004, 80), client, 40003, server, 80, [server]))
                syn(me, fw1, 10005, v2(LAB_KEY, (me, fw1, 10005, 80), client, 40005, server, 80, ["127.0.0.1"]))
                # Straight to the server's agent, passing as client1 (DESIGN §9): a v1 trailer with no hops left.
                syn(me, server, 10006, v1(client, 40006, server, 80, []))
                time.sleep(1)
                """)
            let atFw1 = try fw1Sniffer.stop(), atServer = try serverSniffer.stop()

            let snapshot = try await TestSupport.snapshot(lab, "fw1")
            let c = snapshot.counters
            #expect(c.trailerVersionOneRefused == 1, "(a) \(c)")
            #expect(c.trailerBadMAC == 2, "(b) and (c) \(c)")
            #expect(c.trailerForbiddenAddress == 1, "(d) \(c)")
            #expect(c.malformedDyscoSyn == 0 && c.sessionsCreated == 0 && c.translatedEgress == 0, "\(c)")
            #expect(snapshot.sessions.isEmpty, "fw1 has no session: \(snapshot.sessions)")
            let serverSnapshot = try await TestSupport.snapshot(lab, "server1")
            #expect(serverSnapshot.counters.trailerVersionOneRefused == 1, "\(serverSnapshot.counters)")
            #expect(serverSnapshot.sessions.isEmpty && serverSnapshot.counters.sessionsCreated == 0)

            // fw1's firewall never saw a SYN of the claimed session (the agent dropped them at raw PREROUTING).
            let firewall = try lab.firewallCounters("fw1")
            #expect(firewall.newAccepted.packets == firewallBefore.newAccepted.packets, "\(firewall)")
            #expect(firewall.establishedAccepted.packets == firewallBefore.establishedAccepted.packets)

            // The wire: the four SYNs reached fw1; fw1 sent nothing; server1 got only the attacker's own SYN.
            #expect(atFw1.filter { $0.src == attacker && $0.dst == fw1 && $0.isSyn }.count == 4, "\(atFw1)")
            #expect(!atFw1.contains { $0.src == fw1 }, "fw1 relayed or answered: \(atFw1)")
            #expect(!atServer.contains { $0.src == fw1 }, "fw1 → server1 traffic: \(atServer)")
            #expect(atServer.filter { $0.src == attacker && $0.dst == server }.count == 1, "\(atServer)")
            #expect(!atServer.contains { $0.src == server && $0.dst == attacker }, "server1 answered the forgery: \(atServer)")

            // Control: the same forger, with the lab's key, the packet's tuple and an allowed hop, is accepted —
            // so the refusals above were for the reasons counted, and the sniffers would have seen a relay.
            let controlSniffer = try Sniffer(lab, on: "server1")
            _ = try TestSupport.scapy(lab, on: "attacker1", Self.forger(keyPath: lab.trustKeyPath) + """
                me, fw1 = "\(attacker)", "\(fw1)"
                syn(me, fw1, 10007, v2(LAB_KEY, (me, fw1, 10007, 80), "\(client)", 40007, "\(server)", 80, ["\(server)"]))
                time.sleep(1)
                """)
            let control = try controlSniffer.stop()
            #expect(control.contains { $0.src == fw1 && $0.dst == server && $0.dport == 80 && $0.isSyn }, "\(control)")
            let after = try await TestSupport.snapshot(lab, "fw1").counters
            #expect(after.sessionsCreated == 1 && after.trailerBadMAC == 2 && after.trailerForbiddenAddress == 1, "\(after)")
        }
    }

    /// Replaces `host`'s agent (the lab's, or `replacing`, one this test started) by one with the given trust
    /// arguments and the lab's config; returns it once it answers. The old one has exited first (on exit an
    /// agent removes its queue rules, which must not hit the new one's).
    func restartAgent(_ lab: Lab, _ host: String, trust: [String], replacing previous: Process? = nil) async throws -> Process {
        if let previous {
            previous.terminate()
            previous.waitUntilExit()
        } else {
            try lab.killAgent(host, signal: SIGTERM)
        }
        let socket = AgentControlPaths.socketPath(netns: lab.namespace(of: host))
        unlink(socket)
        let log = "\(lab.directory)/\(host).trust-agent.log"
        let process = try lab.spawn(host, [try TestSupport.dyscoBinary(), "agent", "--config",
                                           LabPaths.agentConfig(lab.name, host: host)] + trust, logPath: log)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, process.isRunning {
            if FileManager.default.fileExists(atPath: socket), (try? await TestSupport.snapshot(lab, host)) != nil { return process }
            usleep(100_000)
        }
        Issue.record("agent on \(host) not ready: \(ProcessInspector.tail(of: log))")
        return process
    }

    /// One small HTTP GET client1 → server1 (through fw1, by the lab's policy); true if it succeeded.
    func fetch(_ lab: Lab) throws -> Bool {
        let result = try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "4", "-o", "/dev/null",
                                              "http://\(lab.address(of: "server1"))/index.html"], check: false)
        return result.status == 0
    }

    @Test("the lab's key carries real chains; a middlebox with another key refuses them; rotation with a previous key works")
    func legitimateChainAndRotation() async throws {
        try await TestSupport.withLab(LabSpec(name: "trust2", middleboxes: ["fw1"], subnet: "10.78.41.0/24")) { lab in
            #expect(try fetch(lab), "client1 → fw1 → server1 with v2 trailers under the lab's key")
            for host in ["client1", "fw1", "server1"] {
                let c = try await TestSupport.snapshot(lab, host).counters
                #expect(c.trailerBadMAC == 0 && c.trailerVersionOneRefused == 0 && c.trailerForbiddenAddress == 0
                        && c.malformedDyscoSyn == 0, "\(host): \(c)")
                #expect(c.sessionsCreated == 1, "\(host): \(c)")
            }

            // fw1 runs another key only: it refuses the client's SYNs (TCP retries them; all are counted).
            let newKey = "\(lab.directory)/trust-new.key"
            try TrustKeyFile.generate(path: newKey, force: true)  // mode 0600 (the agent refuses a key others may read)
            let outsider = try await restartAgent(lab, "fw1", trust: ["--trust-key", newKey])
            #expect(try !fetch(lab), "a middlebox outside the trust group relays nothing")
            let refused = try await TestSupport.snapshot(lab, "fw1")
            #expect(refused.counters.trailerBadMAC >= 1 && refused.sessions.isEmpty, "\(refused.counters)")

            // Mid-rotation: fw1 signs with the new key and still accepts the lab's; server1 still signs with the
            // lab's key and already accepts the new one. The chain works again.
            _ = try await restartAgent(lab, "fw1", trust: ["--trust-key", newKey, "--trust-key-previous", lab.trustKeyPath],
                                       replacing: outsider)
            _ = try await restartAgent(lab, "server1", trust: ["--trust-key", lab.trustKeyPath, "--trust-key-previous", newKey])
            #expect(try fetch(lab), "rotation: current and previous keys accepted")
            for host in ["fw1", "server1"] {
                let c = try await TestSupport.snapshot(lab, host).counters
                #expect(c.trailerBadMAC == 0 && c.sessionsCreated == 1, "\(host): \(c)")
            }
        }
    }
}
