import ConntrackState
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// IPv6 sessions (issue 18, item 3) on a dual-stack lab (`lab up --ipv6`): the agents queue IPv6 TCP
/// (`agent --ipv6`, ip6tables NFQUEUE rules), carry IPv6 sessions through the policies' IPv6 chains on the slow path,
/// and take hostile IPv6 by the extension-header rule. Real namespaces, ip6tables strict firewalls (default DROP,
/// ESTABLISHED-only), conntrack, curl and Python's HTTP server. Labs `v6a`–`v6c`: 10.78.151.0/24–10.78.153.0/24.
@Suite struct IPv6Tests {
    @Test("(c) an IPv6 chain beside IPv4 in a dual-stack lab: both downloads byte-exact at once through a strict fw1, 20 short IPv6 sessions; fw1's agent carries the IPv6 sessions (the session tuple, its subsessions); fw1's IPv6 firewall passed them as NEW and ESTABLISHED, no INVALID drop in either family")
    func dualStackChain() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6a", middleboxes: ["fw1"], subnet: "10.78.151.0/24",
                                              agentArguments: ["--close-linger", "120"], ipv6: true)) { lab in
            let client6 = try #require(lab.ipv6Address(of: "client1")), fw16 = try #require(lab.ipv6Address(of: "fw1"))
            let server6 = try #require(lab.ipv6Address(of: "server1")), server4 = lab.address(of: "server1")
            #expect(!client6.isIPv4 && server6.description.hasPrefix("fd00:0:4e:97::"))
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            let expected = try TestSupport.sha256("\(lab.httpRoot)/blob")
            let v6File = "\(lab.directory)/blob.v6", v4File = "\(lab.directory)/blob.v4"
            let v6 = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "90", "-o", v6File, "http://[\(server6)]/blob"])
            let v4 = try lab.spawn("client1", ["curl", "-sS", "--fail", "-m", "90", "-o", v4File, "http://\(server4)/blob"])
            v6.waitUntilExit()
            v4.waitUntilExit()
            #expect(v6.terminationStatus == 0 && v4.terminationStatus == 0)
            #expect(try TestSupport.sha256(v6File) == expected)
            #expect(try TestSupport.sha256(v4File) == expected)
            for i in 0..<20 {
                let page = try lab.exec("client1", ["curl", "-sS", "--fail", "-g", "-m", "10", "http://[\(server6)]/index.html?\(i)"])
                #expect(page.stdout.hasPrefix("dysco lab"), "request \(i)")
            }
            // The server's IPv6 HTTP log: every request from the client's own address (no NAT in the chain).
            let log = try String(contentsOfFile: LabPaths.serviceLog(lab.name, host: "server1", service: "http6"), encoding: .utf8)
            let peers = Set(log.split(separator: "\n").filter { $0.contains("GET /") }.map { String($0.split(separator: " ")[0]) })
            #expect(peers == ["\(client6)"], "\(peers)")

            // fw1's agent: 21 IPv6 sessions with the session tuple and both subsessions in IPv6, on the slow path;
            // the IPv4 download's session beside them.
            let box = try await TestSupport.snapshot(lab, "fw1")
            let sessions6 = box.sessions.filter { !$0.session.srcAddr.isIPv4 }
            #expect(sessions6.count == 21)
            for s in sessions6 {
                #expect(s.session.srcAddr == client6 && s.session.dstAddr == server6 && s.session.dstPort == 80)
                #expect(s.left?.dstAddr == fw16 && s.right?.srcAddr == fw16 && s.right?.dstAddr == server6)
                #expect(s.carrier == .slow, "the kernel datapath carries IPv4 only")
            }
            #expect(box.sessions.contains { $0.session.srcAddr.isIPv4 && $0.session.dstAddr == server4 })
            #expect(box.counters.malformedPackets == 0)

            // fw1's IPv6 filter saw every session's SYN as NEW and the rest as ESTABLISHED; nothing INVALID.
            let filter6 = try lab.firewallCounters("fw1", family: .ipv6)
            #expect(filter6.newAccepted.packets == 21)
            #expect(filter6.establishedAccepted.bytes > 16 << 20)
            #expect(filter6.invalidDropped.packets == 0 && filter6.policyDropped.packets == 0)
            #expect(try lab.firewallCounters("fw1").invalidDropped.packets == 0)
        }
    }

    @Test("(e) hostile IPv6 from the attacker namespace: extension-header chains, truncated headers, fragments, ESP, a jumbogram, random chains and a forged family-6 Dysco trailer; each counted by the documented rule, no agent crashes, the chain still carries an IPv6 download byte-exact")
    func hostileIPv6() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6b", middleboxes: ["fw1"], subnet: "10.78.152.0/24", attackers: 1,
                                              ipv6: true)) { lab in
            let fw16 = try #require(lab.ipv6Address(of: "fw1")), server6 = try #require(lab.ipv6Address(of: "server1"))
            let attacker6 = try #require(lab.ipv6Address(of: "attacker1"))
            let before = try await TestSupport.snapshot(lab, "fw1").counters
            // Every packet to fw1's own address (its agent's ingress queue takes TCP before the local stack).
            let sent = try TestSupport.scapy(lab, on: "attacker1", """
                import random, struct
                random.seed(18)
                dst, src = "\(fw16)", "\(attacker6)"
                def raw(nh, body, plen=None):
                    hdr = IPv6(src=src, dst=dst, nh=nh, hlim=64)
                    b = bytes(hdr)[:40]
                    ln = len(body) if plen is None else plen
                    b = b[:4] + struct.pack(">H", ln) + b[6:]
                    return b + body
                syn = bytes(TCP(sport=40000, dport=80, flags="S", seq=1))
                def dest_opts(nh):
                    return bytes([nh, 0, 1, 4, 0, 0, 0, 0])
                pkts = []
                # nine Destination Options headers before a SYN: past the walk's limit of eight (extension-chain)
                chain = b"".join(dest_opts(60) for _ in range(8)) + dest_opts(6)
                pkts.append(raw(60, chain + syn))
                # a Destination Options header claiming 248 bytes in a 20-byte packet (truncated: malformed)
                pkts.append(raw(60, bytes([6, 30]) + bytes(18)))
                # a TCP header cut to 10 bytes (malformed)
                pkts.append(raw(6, syn[:10]))
                # a first fragment carrying the SYN, and a later one (fragment)
                pkts.append(raw(44, bytes([6, 0, 0, 1]) + struct.pack(">I", 7) + syn))
                pkts.append(raw(44, bytes([6, 0, 0, 8]) + struct.pack(">I", 7) + bytes(16)))
                # ESP, UDP and No Next Header (not TCP: never queued)
                pkts.append(raw(50, bytes(24)))
                pkts.append(raw(17, bytes(UDP(sport=1, dport=2) / b"x")))
                pkts.append(raw(59, bytes(8)))
                # a jumbogram: payload length 0 and a Hop-by-Hop Jumbo Payload option (the kernel's own parser judges it)
                pkts.append(raw(0, bytes([6, 0, 0xc2, 4]) + struct.pack(">I", 70000) + syn, plen=0))
                # random chains: random next headers and lengths, random bytes
                for _ in range(300):
                    body = bytes(random.getrandbits(8) for _ in range(random.randint(0, 120)))
                    pkts.append(raw(random.choice([0, 6, 43, 44, 50, 51, 59, 60, 17, 255]), body,
                                    plen=random.choice([None, None, 0, random.randint(0, 200)])))
                # a forged Dysco SYN: a family-6 trailer whose MAC is not the group's (trailer_bad_mac)
                session = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "\(server6)") + struct.pack(">HH", 40001, 80)
                signed = bytes([2, 6, 1, 0]) + struct.pack(">QQ", 0x1234, 0x5678) + session + socket.inet_pton(socket.AF_INET6, "\(server6)")
                trailer = signed + bytes(random.getrandbits(8) for _ in range(16)) + struct.pack(">H", len(signed) + 22) + b"DYSC"
                pkts.append(raw(6, bytes(TCP(sport=40001, dport=80, flags="S", seq=9) / trailer)))
                # A raw IPv6 socket of protocol IPPROTO_RAW sends each header as written (IPV6_HDRINCL).
                s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
                for p in pkts:
                    s.sendto(p, (dst, 0))
                print(len(pkts))
                """)
            #expect(Int(sent.trimmingCharacters(in: .whitespacesAndNewlines)) == 310)
            // fw1 counted what reached its queue, by the rule; the agents live on.
            let counted = try await TestSupport.eventually(timeout: 10) {
                let c = try await TestSupport.snapshot(lab, "fw1").counters
                return c.ipv6LongChain > before.ipv6LongChain && c.trailerBadMAC > before.trailerBadMAC
            }
            #expect(counted)
            let after = try await TestSupport.snapshot(lab, "fw1").counters
            #expect(after.ipv6LongChain > before.ipv6LongChain)
            #expect(after.ipv6Fragment > before.ipv6Fragment)
            // ESP, UDP and No Next Header never reach the queue: ip6tables' `-p tcp` walks the extension headers itself.
            #expect(after.ipv6Encrypted == before.ipv6Encrypted)
            #expect(after.malformedPackets > before.malformedPackets)
            #expect(after.trailerBadMAC == before.trailerBadMAC + 1)
            #expect(try await TestSupport.snapshot(lab, "fw1").sessions.isEmpty, "nothing hostile became a session")
            for host in ["client1", "fw1", "server1"] { #expect(lab.agentIsAlive(host), "\(host)'s agent") }

            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 4)
            let file = "\(lab.directory)/blob.v6"
            try lab.exec("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "-o", file, "http://[\(server6)]/blob"])
            #expect(try TestSupport.sha256(file) == TestSupport.sha256("\(lab.httpRoot)/blob"))
        }
    }

    @Test("(c) a live IPv6 session's conntrack entry moves between boxes with the CLI: exported from fw1 by its tuple (AF_INET6), validated, imported into fw2, which then holds it ESTABLISHED with the window data; the download stays byte-exact")
    func ipv6StateTransfer() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6c", middleboxes: ["fw1", "fw2"], subnet: "10.78.153.0/24", ipv6: true)) { lab in
            let bin = try TestSupport.dyscoBinary()
            let server6 = try #require(lab.ipv6Address(of: "server1"))
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            let file = "\(lab.directory)/blob.v6"
            let curl = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "--limit-rate", "2M", "-o", file,
                                                 "http://[\(server6)]/blob"])
            var session: FiveTuple?
            let live = try await TestSupport.eventually(timeout: 20) {
                session = try await TestSupport.snapshot(lab, "fw1").sessions.first { $0.state == "established" && !$0.session.srcAddr.isIPv4 }?.session
                return session != nil
            }
            #expect(live)
            let s = try #require(session)
            let match = "src=\(s.srcAddr),dst=\(s.dstAddr),sport=\(s.srcPort),dport=\(s.dstPort)"
            let exported = try Command.run([bin, "state", "export", "--netns", lab.namespace(of: "fw1"), "--match", match]).stdout
            let document = try StateDocument.decode(Data(exported.utf8))
            let entry = try #require(document.entries.first)
            #expect(document.entries.count == 1 && entry.family == .ipv6 && entry.orig.src == s.srcAddr && entry.orig.dst == s.dstAddr)
            #expect(entry.tcp?.state == .established)
            #expect(try Command.run([bin, "state", "validate", "-"], input: exported).succeeded)
            let imported = try Command.run([bin, "state", "import", "--netns", lab.namespace(of: "fw2"), "-"], input: exported)
            #expect(imported.stdout.contains("1 created"), "\(imported.stdout)")
            let atFw2 = try StateDocument.decode(Data(try Command.run([bin, "state", "export", "--netns", lab.namespace(of: "fw2"),
                                                                       "--match", match]).stdout.utf8))
            #expect(atFw2.entries.map(\.key) == [entry.key])
            #expect(atFw2.entries.first?.tcp?.state == .established)
            #expect(atFw2.entries.first?.tcp?.orig.wscale == entry.tcp?.orig.wscale)
            curl.waitUntilExit()
            #expect(curl.terminationStatus == 0)
            #expect(try TestSupport.sha256(file) == TestSupport.sha256("\(lab.httpRoot)/blob"))
        }
    }
}
