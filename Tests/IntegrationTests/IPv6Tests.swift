import ConntrackState
import DyscoAgent
import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// IPv6 sessions (issue 18, item 3) on a dual-stack lab (`lab up --ipv6`): the agents queue IPv6 TCP
/// (`agent --ipv6`, ip6tables NFQUEUE rules), carry IPv6 sessions through the policies' IPv6 chains on the BPF datapath,
/// and take hostile IPv6 by the extension-header rule. Real namespaces, ip6tables strict firewalls (default DROP,
/// ESTABLISHED-only), conntrack, curl and Python's HTTP server. Labs `v6a`–`v6e`: 10.78.151.0/24–10.78.155.0/24.
@Suite struct IPv6Tests {
    /// `host`'s translations in its pinned maps, both families (the lab's agents pin under the lab's bpffs, queue 7).
    static func kernelEntries(_ lab: Lab, _ host: String) throws -> [(BPFSessionKey, BPFSessionEntry)] {
        try BPFDatapath.pinnedEntries(mapPath: "\(LabPaths.bpfFs(lab.name))/dysco-\(lab.namespace(of: host))-q7/dysco_sessions")
    }

    @Test("(c) an IPv6 chain beside IPv4 in a dual-stack lab: both downloads byte-exact at once through a strict fw1, 20 short IPv6 sessions; fw1's agent carries the IPv6 sessions (the session tuple, its subsessions) in its BPF datapath's IPv6 maps; fw1's IPv6 firewall passed them as NEW and ESTABLISHED, no INVALID drop in either family")
    func dualStackChain() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6a", middleboxes: ["fw1"], subnet: "10.78.151.0/24",
                                              agentArguments: ["--close-linger", "120"], ipv6: true)) { lab in
            let client6 = try #require(lab.ipv6Address(of: "client1")), fw16 = try #require(lab.ipv6Address(of: "fw1"))
            let server6 = try #require(lab.ipv6Address(of: "server1")), server4 = lab.address(of: "server1")
            #expect(!client6.isIPv4 && server6.description.hasPrefix("fd00:0:4e:97::"))
            // Every host's addresses are usable at once, the link-local one too (no duplicate address detection): a
            // neighbour solicitation for a packet with a foreign source (an attacker's forged one) needs it.
            for host in lab.hosts {
                let dad = try lab.exec(host.name, ["sysctl", "-n", "net.ipv6.conf.\(host.interface).accept_dad"]).stdout
                #expect(dad.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "\(host.name): accept_dad \(dad)")
                let addresses = try lab.exec(host.name, ["ip", "-6", "addr", "show", "dev", host.interface]).stdout
                #expect(addresses.contains("scope link") && !addresses.contains("tentative"), "\(host.name): \(addresses)")
            }
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

            // fw1's agent: 21 IPv6 sessions with the session tuple and both subsessions in IPv6, carried by the BPF
            // datapath (its IPv6 maps); the IPv4 download's session beside them.
            let box = try await TestSupport.snapshot(lab, "fw1")
            let sessions6 = box.sessions.filter { !$0.session.srcAddr.isIPv4 }
            #expect(sessions6.count == 21)
            for s in sessions6 {
                #expect(s.session.srcAddr == client6 && s.session.dstAddr == server6 && s.session.dstPort == 80)
                #expect(s.left?.dstAddr == fw16 && s.right?.srcAddr == fw16 && s.right?.dstAddr == server6)
                #expect(s.carrier == .kernel, "the BPF datapath carries IPv6 sessions too")
            }
            #expect(box.sessions.contains { $0.session.srcAddr.isIPv4 && $0.session.dstAddr == server4 })
            #expect(box.counters.malformedPackets == 0)
            // The kernel rewrote them: fw1's pinned dysco_sessions6 holds the IPv6 sessions' translations (four a
            // session: each direction in and out), keyed and targeted in IPv6, which carried the 16 MiB download.
            let entries6 = try Self.kernelEntries(lab, "fw1").filter(\.0.isIPv6)
            #expect(Set(entries6.map(\.1.sessionID)).count == 21 && entries6.count == 4 * 21, "\(entries6.count)")
            #expect(entries6.allSatisfy { !$0.1.target.srcAddr.isIPv4 && !$0.1.target.dstAddr.isIPv4 })
            #expect(entries6.reduce(0) { $0 + $1.1.bytes } > 16 << 20)

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
        try await TestSupport.withLab(LabSpec(name: "v6c", middleboxes: ["fw1", "fw2"], subnet: "10.78.153.0/24",
                                              policyPorts: [80, MigrationLab.pacedPort], ipv6: true)) { lab in
            let bin = try TestSupport.dyscoBinary()
            let server6 = try #require(lab.ipv6Address(of: "server1"))
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            let file = "\(lab.directory)/blob.v6"
            // A sender-paced server (2 MiB/s): the session is mid-transfer, ESTABLISHED at fw1, while its entry
            // moves (an unpaced server has sent everything and its FIN into the client's buffers at once).
            try MigrationLab.quickAck(lab)
            try PacedHTTPServer.start(lab, port: MigrationLab.pacedPort, bytesPerSecond: 2 * 1_048_576, ipv6: true)
            let curl = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "-o", file,
                                                 "http://[\(server6)]:\(MigrationLab.pacedPort)/blob"])
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

    @Test("(c) replace over IPv6: an IPv6 download moved from fw1 to fw2 of a dual-stack lab (stateful: fw1's AF_INET6 conntrack entry imported at fw2; control messages version 5 over IPv6): moved from fw1's kernel to fw2's (BPF IPv6 maps), byte-exact, fw2 carried the rest as ESTABLISHED with no NEW and no INVALID, the migration rule for the endpoints' loss counters; an IPv4 download beside it moves in the same replace")
    func ipv6Replace() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6d", middleboxes: ["fw1", "fw2"], subnet: "10.78.154.0/24",
                                              policyPorts: [80, MigrationLab.pacedPort], ipv6: true)) { lab in
            let client6 = try #require(lab.ipv6Address(of: "client1")), server6 = try #require(lab.ipv6Address(of: "server1"))
            let fw26 = try #require(lab.ipv6Address(of: "fw2"))
            // Sender-paced servers (16 MiB at 2 MiB/s each): the downloads are mid-transfer at the move, not in the
            // client's receive buffer already.
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            try PacedHTTPServer.start(lab, port: MigrationLab.pacedPort, bytesPerSecond: 2 * 1_048_576, ipv6: true)
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            let v6File = "\(lab.directory)/blob.v6", v4File = "\(lab.directory)/blob.v4"
            let v6 = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "-o", v6File,
                                               "http://[\(server6)]:\(MigrationLab.pacedPort)/blob"])
            let v4 = try lab.spawn("client1", ["curl", "-sS", "--fail", "-m", "60", "-o", v4File,
                                               "http://\(lab.address(of: "server1")):\(MigrationLab.pacedPort)/blob"])
            let live = try await TestSupport.eventually(timeout: 20) {
                let sessions = try await TestSupport.snapshot(lab, "fw1").sessions.filter { $0.state == "established" }
                return sessions.contains { !$0.session.srcAddr.isIPv4 } && sessions.contains { $0.session.srcAddr.isIPv4 }
            }
            #expect(live)
            // fw1's kernel carries the IPv6 session (its dysco_sessions6 entries rewrite packets): the move holds,
            // hands over and releases kernel translations of both families.
            #expect(try await TestSupport.eventually(timeout: 20) {
                try Self.kernelEntries(lab, "fw1").contains { $0.0.isIPv6 && $0.1.packets > 0 }
            })
            let lossBefore = try MigrationLab.lossCounters(lab)
            let replace = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            #expect(replace.status == 0, "\(replace.stdout)\n\(replace.stderr)")
            let sessions = replace.report?.sessions ?? []
            #expect(sessions.count == 2 && sessions.allSatisfy { $0.result == "moved" }, "\(replace.stdout)")
            #expect(sessions.contains { !$0.session.srcAddr.isIPv4 })

            // fw2 holds the IPv6 session on its IPv6 address, both subsessions.
            let box = try await TestSupport.snapshot(lab, "fw2")
            let taken = try #require(box.sessions.first { $0.session.srcAddr == client6 }, "\(box.sessions)")
            #expect(taken.left?.dstAddr == fw26 && taken.right?.srcAddr == fw26 && taken.right?.dstAddr == server6)
            // …and hands the rest of it to its kernel: its IPv6 translations rewrite packets.
            #expect(try await TestSupport.eventually(timeout: 20) {
                try Self.kernelEntries(lab, "fw2").contains { $0.0.isIPv6 && $0.1.sessionID == taken.id && $0.1.packets > 0 }
            }, "fw2's kernel carries none of the IPv6 session")

            v6.waitUntilExit()
            v4.waitUntilExit()
            let loss = try MigrationLab.lossCounters(lab) - lossBefore
            print("IPv6Tests replace: \(replace.stdout.split(separator: "\n").last ?? ""); endpoints' loss counters over the move: \(loss)")
            #expect(v6.terminationStatus == 0 && v4.terminationStatus == 0)
            #expect(try TestSupport.sha256(v6File) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            #expect(try TestSupport.sha256(v4File) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            #expect(loss.noByteLost, "the migration rule: no RTO, no reset, no retransmission but DSACK'd or probes: \(loss)")
            // fw2's IPv6 filter: the imported state carried the session (no NEW), nothing INVALID.
            let filter6 = try lab.firewallCounters("fw2", family: .ipv6)
            #expect(filter6.invalidDropped.packets == 0 && filter6.newAccepted.packets == 0)
            #expect(filter6.establishedAccepted.packets > 0, "fw2 forwarded nothing of the IPv6 session")
            #expect(try lab.firewallCounters("fw2").invalidDropped.packets == 0)
        }
    }

    @Test("(d) a dual-stack drain: 6 IPv4 and 6 IPv6 paced downloads drained together from fw1 to fw2 (one drain, each session to fw2's address of its family): all moved, byte-exact, fw1 left with nothing, the left ends cordon fw1 in both families (a new IPv6 session takes fw2), the migration rule, no INVALID at fw2 in either family")
    func dualStackDrain() async throws {
        try await TestSupport.withLab(LabSpec(name: "v6e", middleboxes: ["fw1", "fw2"], subnet: "10.78.155.0/24",
                                              policyPorts: [80, MigrationLab.pacedPort], ipv6: true)) { lab in
            let server6 = try #require(lab.ipv6Address(of: "server1")), fw16 = try #require(lab.ipv6Address(of: "fw1"))
            let fw26 = try #require(lab.ipv6Address(of: "fw2"))
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 0.5)
            try PacedHTTPServer.start(lab, port: MigrationLab.pacedPort, bytesPerSecond: 0.5 * 1_048_576, ipv6: true)
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 4)
            let expected = try TestSupport.sha256("\(lab.httpRoot)/blob")
            var args = ["curl", "-sS", "--fail", "-g", "-m", "60", "--parallel", "--parallel-immediate", "--parallel-max", "12"]
            var outputs: [String] = []
            for i in 0..<12 {
                let host = i % 2 == 0 ? "\(lab.address(of: "server1"))" : "[\(server6)]"
                outputs.append("\(lab.directory)/dl\(i).out")
                args += ["-o", outputs[i], "http://\(host):\(MigrationLab.pacedPort)/blob"]
            }
            let curl = try lab.spawn("client1", args)
            let live = try await TestSupport.eventually(timeout: 20) {
                let sessions = try await TestSupport.snapshot(lab, "fw1").sessions.filter { $0.state == "established" }
                return sessions.filter { $0.session.srcAddr.isIPv4 }.count == 6 && sessions.filter { !$0.session.srcAddr.isIPv4 }.count == 6
            }
            #expect(live)
            // fw1's kernel carries the IPv6 session (its dysco_sessions6 entries rewrite packets): the move holds,
            // hands over and releases kernel translations of both families.
            #expect(try await TestSupport.eventually(timeout: 20) {
                try Self.kernelEntries(lab, "fw1").contains { $0.0.isIPv6 && $0.1.packets > 0 }
            })
            let lossBefore = try MigrationLab.lossCounters(lab)
            let run = try MigrationLab.CLIRun<Evacuation.Summary>(["drain", "--lab", lab.name, "--old", "fw1", "--to", "fw2"])
            let summary = try #require(run.report, "drain printed no summary: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0, "\(run.stdout) \(run.stderr)")
            #expect(summary.total == 12 && summary.moved == 12 && summary.failures.isEmpty,
                    "\(summary.failures.map { "\($0.session) \($0.failedStep): \($0.reason)" })")
            #expect(summary.remaining == 0 && summary.succeeded)
            #expect(summary.cordons.allSatisfy { $0.error == nil }, "\(summary.cordons)")
            let fw1 = try await TestSupport.snapshot(lab, "fw1")
            #expect(fw1.sessions.filter { $0.state != "closing" }.isEmpty, "fw1 still has \(fw1.sessions.map(\.session))")
            let fw2 = try await TestSupport.snapshot(lab, "fw2").sessions.filter { $0.state == "established" }
            #expect(fw2.filter { !$0.session.srcAddr.isIPv4 }.allSatisfy { $0.left?.dstAddr == fw26 })
            #expect(fw2.filter { !$0.session.srcAddr.isIPv4 }.count == 6 && fw2.filter { $0.session.srcAddr.isIPv4 }.count == 6)

            // The client cordons fw1 in both families: a new IPv6 session takes fw2.
            let policy = try JSONDecoder().decode(PolicyReply.self, from: Data(try Command.run([try TestSupport.dyscoBinary(), "policy",
                "show", "--netns", lab.namespace(of: "client1"), "--json"]).stdout.utf8))
            #expect(policy.cordons.contains(Cordons.Cordon(address: fw16, replacements: [fw26])), "\(policy.cordons)")
            let fw2NewBefore = try lab.firewallCounters("fw2", family: .ipv6).newAccepted.packets
            try lab.exec("client1", ["curl", "-sS", "--fail", "-g", "-m", "10", "-o", "/dev/null", "http://[\(server6)]/index.html"])
            #expect(try lab.firewallCounters("fw2", family: .ipv6).newAccepted.packets == fw2NewBefore + 1)

            curl.waitUntilExit()
            #expect(curl.terminationStatus == 0)
            for output in outputs { #expect(try TestSupport.sha256(output) == expected, "\(output)") }
            let loss = try MigrationLab.lossCounters(lab) - lossBefore
            print("IPv6Tests drain: \(summary.moved) moved in \(summary.elapsedMicroseconds) µs; loss counters over the drain: \(loss)")
            #expect(loss.noByteLost, "the migration rule: no RTO, no reset, no retransmission but DSACK'd or probes: \(loss)")
            #expect(try lab.firewallCounters("fw2", family: .ipv6).invalidDropped.packets == 0)
            #expect(try lab.firewallCounters("fw2").invalidDropped.packets == 0)
        }
    }
}
