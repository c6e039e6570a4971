import DyscoBPF
import DyscoCore
import DyscoSystem
import Foundation
import Testing

/// The BPF datapath's tc programs on real namespaces (needs root; no agent: the test writes the map itself).
/// Namespaces `bpf1-*`, subnet 10.216.0.0/16, a bpffs mounted at /run/dysco-bpf1-pins; all removed afterwards,
/// also on failure.
///
/// ```
///   bpf1-r (10.216.1.254, no forwarding)          bpf1-s (10.216.3.2, HTTP on :8080)
///        | eth0                                         | eth0
///        | eth0 10.216.1.1                              | eth1 10.216.3.1
///        +------------------ bpf1-c --------------------+      route 10.216.9.0/24 via 10.216.1.254
/// ```
/// The client asks for http://10.216.9.9:80 from port 41001 (the session). The kernel routes it to the router,
/// which would drop it; the egress program rewrites it to 10.216.3.1:52001 → 10.216.3.2:8080 (the subsession: all
/// four fields) and, the destination having changed, looks the route up itself and redirects the packet to eth1.
/// The ingress program rewrites the server's answers back. Checksums are verified by each receiving stack in
/// software (TcpInCsumErrors stays 0), both kinds the programs update: the client's eth0 keeps its offloads, so
/// its TCP hands the egress program CHECKSUM_PARTIAL (GSO) packets, which eth1 (offloads off) segments and
/// checksums after the redirect; the server sends full checksums (offloads off) that the ingress program
/// updates. Every other device has rx checksumming off: nothing is trusted unverified.
@Suite(.serialized) struct BPFDatapathTests {
    static let prefix = "bpf1"
    static let client = "bpf1-c", router = "bpf1-r", server = "bpf1-s"
    static let pinDirectory = "/run/dysco-bpf1-pins"

    static let session = FiveTuple(srcAddr: IPAddress(10, 216, 1, 1), srcPort: 41001,
                                   dstAddr: IPAddress(10, 216, 9, 9), dstPort: 80)
    static let subsession = FiveTuple(srcAddr: IPAddress(10, 216, 3, 1), srcPort: 52001,
                                      dstAddr: IPAddress(10, 216, 3, 2), dstPort: 8080)
    static let egressKey = BPFSessionKey(session, hook: .egress)
    static let ingressKey = BPFSessionKey(subsession.reversed, hook: .ingress)

    /// The repository root (three levels above this file).
    static var repository: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// $DYSCO_BPF_OBJECT, else `make bpf`'s output (built now if missing or stale: the make step is cheap).
    static func objectPath() throws -> String {
        if let path = ProcessInfo.processInfo.environment["DYSCO_BPF_OBJECT"] { return path }
        try Command.run(["make", "-s", "-C", repository.path, "bpf"])
        return repository.appendingPathComponent(".build/bpf/dysco.bpf.o").path
    }

    static func ns(_ name: String, _ arguments: [String]) throws {
        try Command.run(arguments, netns: name)
    }

    static func tearDown() {
        for name in [client, router, server] where NetworkNamespace.exists(name) {
            _ = try? Command.run(["ip", "netns", "pids", name], check: false).stdout
                .split(separator: "\n").forEach { pid in _ = try? Command.run(["kill", "-9", String(pid)], check: false) }
            _ = try? Command.run(["ip", "netns", "delete", name], check: false)
        }
        if (try? Command.run(["mountpoint", "-q", pinDirectory], check: false).succeeded) == true {
            _ = try? Command.run(["umount", pinDirectory], check: false)
        }
        try? FileManager.default.removeItem(atPath: pinDirectory)
    }

    static func setUp() throws {
        tearDown()
        for name in [client, router, server] { try Command.run(["ip", "netns", "add", name]) }
        try Command.run(["ip", "link", "add", "eth0", "netns", client, "type", "veth", "peer", "name", "eth0", "netns", router])
        try Command.run(["ip", "link", "add", "eth1", "netns", client, "type", "veth", "peer", "name", "eth0", "netns", server])
        try ns(client, ["ip", "addr", "add", "10.216.1.1/24", "dev", "eth0"])
        try ns(client, ["ip", "addr", "add", "10.216.3.1/24", "dev", "eth1"])
        try ns(router, ["ip", "addr", "add", "10.216.1.254/24", "dev", "eth0"])
        try ns(server, ["ip", "addr", "add", "10.216.3.2/24", "dev", "eth0"])
        for (name, devices) in [(client, ["lo", "eth0", "eth1"]), (router, ["lo", "eth0"]), (server, ["lo", "eth0"])] {
            for device in devices {
                try ns(name, ["ip", "link", "set", device, "up"])
                if device != "lo", !(name == client && device == "eth0") {
                    try ns(name, ["ethtool", "-K", device, "tx", "off", "rx", "off"])
                }
            }
        }
        try ns(client, ["ip", "route", "add", "10.216.9.0/24", "via", "10.216.1.254"])
        // bpf_fib_lookup needs forwarding on the device; answers from 10.216.9.9 arrive on eth1 (route: eth0).
        for setting in ["net.ipv4.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.eth1.rp_filter=0"] {
            try ns(client, ["sysctl", "-qw", setting])
        }
        try ns(router, ["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"])
        try FileManager.default.createDirectory(atPath: pinDirectory, withIntermediateDirectories: true)
        try Command.run(["mount", "-t", "bpf", "bpf", pinDirectory])
    }

    /// InCsumErrors of the Tcp line of /proc/net/snmp in a namespace.
    static func tcpChecksumErrors(_ name: String) throws -> UInt64 {
        let lines = try Command.run(["cat", "/proc/net/snmp"], netns: name).stdout.split(separator: "\n")
            .filter { $0.hasPrefix("Tcp:") }.map { $0.split(separator: " ").map(String.init) }
        guard lines.count == 2, let index = lines[0].firstIndex(of: "InCsumErrors") else { return UInt64.max }
        return UInt64(lines[1][index]) ?? UInt64.max
    }

    func curl(_ output: String, seconds: Int) throws -> CommandResult {
        try Command.run(["curl", "-sS", "--fail", "-m", "\(seconds)", "--local-port", "\(Self.session.srcPort)",
                         "-w", "%{local_ip}:%{local_port} %{remote_ip}:%{remote_port}",
                         "-o", output, "http://\(Self.session.dstAddr):\(Self.session.dstPort)/blob"],
                        netns: Self.client, check: false)
    }

    /// `count` ACK segments of the session (client → 10.216.9.9:80), sent raw from the client's namespace; they
    /// leave through eth0, so its egress program sees each one before this returns.
    func sendSessionSegments(count: Int) throws {
        let s = Self.session
        let script = "from scapy.all import *; conf.verb = 0; send(IP(src='\(s.srcAddr)', dst='\(s.dstAddr)')"
            + "/TCP(sport=\(s.srcPort), dport=\(s.dstPort), flags='A', seq=1000, ack=2000), count=\(count))"
        try Command.run([TestSupport.scapyPython, "-c", script], netns: Self.client)
    }

    @Test("tc programs rewrite a real TCP session both ways (all four fields, next hop chosen by FIB lookup), checksums verified, FIN/established events, pinned maps reused; deleting the entries stops the rewrite")
    func rewriteRealTCP() async throws {
        try Self.setUp()
        defer { Self.tearDown() }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("dysco-bpf1-\(getpid())").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        try Command.run(["dd", "if=/dev/urandom", "of=\(work)/blob", "bs=1M", "count=8", "status=none"])
        let serverLog = "\(work)/server.log"
        let httpServer = try Command.spawn(["python3", "-u", "-m", "http.server", "8080", "--bind", "10.216.3.2",
                                            "--directory", work], netns: Self.server, logPath: serverLog)
        defer { httpServer.terminate() }

        let datapath = try BPFDatapath(objectPath: try Self.objectPath(), pinDirectory: Self.pinDirectory)
        for name in ["dysco_sessions", "dysco_events", "dysco_stats", "dysco_config"] {
            #expect(FileManager.default.fileExists(atPath: "\(Self.pinDirectory)/\(name)"), "\(name) pinned")
        }
        for device in ["eth0", "eth1"] {
            let ids = try datapath.attach(interface: device, namespace: Self.client)
            #expect(ids.ingress > 0 && ids.egress > 0)
            let attached = try BPFDatapath.attached(interface: device, namespace: Self.client)
            #expect(attached.ingress == ids.ingress && attached.egress == ids.egress)
        }
        // The server listens (reached directly over eth1, no translation involved).
        let listening = try await TestSupport.eventually(timeout: 10) {
            try Command.run(["curl", "-s", "-o", "/dev/null", "-m", "2", "http://10.216.3.2:8080/"],
                            netns: Self.client, check: false).succeeded
        }
        try #require(listening, "http.server in \(Self.server)")

        try datapath.insert(Self.egressKey, BPFSessionEntry(target: Self.subsession, flags: [.rewriteSyn, .opening], sessionID: 7))
        try datapath.insert(Self.ingressKey, BPFSessionEntry(target: Self.session.reversed, sessionID: 7))
        #expect(throws: SystemCallError.self) {
            try datapath.insert(Self.egressKey, BPFSessionEntry(target: Self.subsession, sessionID: 8))
        }

        let first = try curl("\(work)/blob.1", seconds: 30)
        try #require(first.succeeded, "curl through the translation: \(first.stderr)")
        // The client's socket saw the session tuple; the server saw the subsession's source.
        #expect(first.stdout == "10.216.1.1:41001 10.216.9.9:80", "\(first.stdout)")
        #expect(try TestSupport.sha256("\(work)/blob.1") == TestSupport.sha256("\(work)/blob"))
        let log = try String(contentsOfFile: serverLog, encoding: .utf8)
        #expect(log.contains("10.216.3.1 - -") && log.contains("GET /blob"), "\(log)")
        #expect(try Self.tcpChecksumErrors(Self.client) == 0)
        #expect(try Self.tcpChecksumErrors(Self.server) == 0)

        let egress = try #require(try datapath.lookup(Self.egressKey))
        let ingress = try #require(try datapath.lookup(Self.ingressKey))
        #expect(egress.packets >= 3 && ingress.packets >= 8 * 1024 * 1024 / 1500, "\(egress) \(ingress)")
        #expect(ingress.bytes > 8 * 1024 * 1024)
        #expect(!egress.flags.contains(.opening), "the handshake's ACK cleared opening")
        #expect(egress.flags.contains(.finSeen) && ingress.flags.contains(.finSeen))
        #expect(egress.lastSeenNanoseconds > 0 && egress.tcp.tcpFlags & 0x10 != 0)
        let stats = try datapath.statistics()
        #expect(stats.rewritten == egress.packets + ingress.packets, "\(stats)")
        #expect(stats.fibRedirected + stats.neighbourRedirected == egress.packets, "\(stats)")
        #expect(stats.fibFailed == 0 && stats.eventsLost == 0)

        // Events: established once (egress), one FIN per direction.
        var events: [BPFEvent] = []
        _ = try await TestSupport.eventually(timeout: 5) {
            events += try datapath.pollEvents(timeoutMilliseconds: 100)
            return events.filter { $0.kind == .fin }.count >= 2
        }
        #expect(events.filter { $0.kind == .established }.map(\.key) == [Self.egressKey], "\(events)")
        #expect(Set(events.filter { $0.kind == .fin }.compactMap(\.key)) == [Self.egressKey, Self.ingressKey], "\(events)")
        #expect(events.allSatisfy { $0.sessionID == 7 } && !events.contains { $0.kind == .rst })

        // An RST on the subsession (sent raw from the server's namespace; the client has no socket for it any
        // more) is rewritten and reported once: judging it is the agent's (docs/BPF.md, "What is left to wire").
        let rst = "from scapy.all import *; conf.verb = 0; send(IP(src='10.216.3.2', dst='10.216.3.1')/TCP(sport=8080, dport=52001, flags='R', seq=12345), count=2)"
        try Command.run([TestSupport.scapyPython, "-c", rst], netns: Self.server)
        var resets: [BPFEvent] = []
        _ = try await TestSupport.eventually(timeout: 5) {
            resets += try datapath.pollEvents(timeoutMilliseconds: 100).filter { $0.kind == .rst }
            return !resets.isEmpty
        }
        #expect(resets.map(\.key) == [Self.ingressKey] && resets.first?.sequence == 12345, "\(resets)")
        #expect(try datapath.lookup(Self.ingressKey)?.flags.contains(.rstSeen) == true)
        #expect(try datapath.pollEvents(timeoutMilliseconds: 200).isEmpty, "the second RST is not reported again")

        // A second instance on the same pin directory (a restarted agent) finds the same map and entries.
        do {
            let restarted = try BPFDatapath(objectPath: try Self.objectPath(), pinDirectory: Self.pinDirectory)
            #expect(try restarted.lookup(Self.ingressKey)?.packets == ingress.packets + 2)
            #expect(try restarted.entries().count == 2)
            // A hold is one flag in the value; the counters stay.
            let held = try restarted.setFlags(Self.egressKey, set: .held)
            #expect(held.flags.contains(.held) && held.packets == egress.packets)
            try restarted.setFlags(Self.egressKey, clear: .held)
        }

        // Held: the packets pass untouched (to where the queue rule would hand them to the agent; here the kernel
        // routes them to the router, which drops them), and the entry's counters do not move. The packets are the
        // session's own segments sent raw from the client's namespace: a second curl from port 41001 could not
        // bind while the first connection's socket sits in TIME_WAIT (when curl closed first), and would then
        // send nothing at all.
        let beforeHold = try datapath.statistics()
        try datapath.setFlags(Self.egressKey, set: .held)
        try sendSessionSegments(count: 3)
        let heldStats = try datapath.statistics()
        #expect(heldStats.held == beforeHold.held + 3 && heldStats.rewritten == beforeHold.rewritten, "\(heldStats)")
        #expect(try datapath.lookup(Self.egressKey)?.packets == egress.packets)

        // Without the entries the session's packets go where the kernel routes them (the router drops them).
        #expect(try datapath.delete(Self.egressKey))
        #expect(try datapath.delete(Self.ingressKey))
        #expect(try datapath.delete(Self.ingressKey) == false)
        #expect(try datapath.lookup(Self.egressKey) == nil)
        try sendSessionSegments(count: 3)
        let afterDelete = try datapath.statistics()
        #expect(afterDelete.rewritten == beforeHold.rewritten && afterDelete.held == heldStats.held, "\(afterDelete)")
        let requests = try String(contentsOfFile: serverLog, encoding: .utf8).components(separatedBy: "GET /blob").count - 1
        #expect(requests == 1)

        for device in ["eth0", "eth1"] {
            try BPFDatapath.detach(interface: device, namespace: Self.client)
            let attached = try BPFDatapath.attached(interface: device, namespace: Self.client)
            #expect(attached.ingress == nil && attached.egress == nil)
        }
        try datapath.unpinMaps()
        #expect(!FileManager.default.fileExists(atPath: "\(Self.pinDirectory)/dysco_sessions"))
    }

    /// A scapy sniffer in the server's namespace: the TCP packets eth0 receives from 10.216.3.1 (`count` of them),
    /// printed as `flags seq ack sack-edges checksum-ok` lines once captured. Returns once it listens.
    func startSniffer(count: Int, output: String) async throws -> Process {
        let script = """
            from scapy.all import *
            import sys
            conf.verb = 0
            def show(p):
                t = p[TCP]
                sack = [e for k, v in t.options if k == 'SAck' for e in v]
                raw = bytes(p[IP])
                q = IP(raw); c = q[TCP].chksum; del q[TCP].chksum; ok = IP(bytes(q))[TCP].chksum == c
                return '%s %d %d %s %s' % (t.flags, t.seq, t.ack, ','.join(map(str, sack)), ok)
            s = AsyncSniffer(iface='eth0', count=\(count), timeout=20,
                             lfilter=lambda p: IP in p and TCP in p and p[IP].src == '10.216.3.1')
            s.start()
            time.sleep(0.5)
            print('listening', flush=True)
            s.join()
            print('\\n'.join(show(p) for p in (s.results or [])), flush=True)
            """
        let process = try Command.spawn([TestSupport.scapyPython, "-c", script], netns: Self.server, logPath: output)
        let listening = try await TestSupport.eventually(timeout: 15) {
            ((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").contains("listening")
        }
        try #require(listening, "sniffer: \((try? String(contentsOfFile: output, encoding: .utf8)) ?? "")")
        return process
    }

    @Test("§3.4 in the kernel: an egress translation with a delta lowers the ack and every SACK edge (aligned and odd-offset blocks), an ingress one raises the sequence number; checksums stay valid")
    func sequenceDeltas() async throws {
        try Self.setUp()
        defer { Self.tearDown() }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("dysco-bpf1d-\(getpid())").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let datapath = try BPFDatapath(objectPath: try Self.objectPath(), pinDirectory: Self.pinDirectory)
        for device in ["eth0", "eth1"] { _ = try datapath.attach(interface: device, namespace: Self.client) }
        try datapath.insert(Self.egressKey, BPFSessionEntry(target: Self.subsession, sessionID: 9, seqDelta: 100))
        try datapath.insert(Self.ingressKey, BPFSessionEntry(target: Self.session.reversed, sessionID: 9, seqDelta: 100))
        #expect(try datapath.lookup(Self.egressKey)?.seqDelta == 100)

        // Egress: two ACKs of the session from the client, NOP NOP SACK (Linux's layout) and NOP SACK (odd offset).
        let sniffed = "\(work)/egress.log"
        let sniffer = try await startSniffer(count: 2, output: sniffed)
        let s = Self.session
        let egress = "from scapy.all import *; conf.verb = 0; p = IP(src='\(s.srcAddr)', dst='\(s.dstAddr)')/TCP(sport=\(s.srcPort), dport=\(s.dstPort), flags='A', seq=1000, ack=5000, options=%s); send(p)"
        for options in ["[('NOP', None), ('NOP', None), ('SAck', (6000, 7000, 8050, 9000))]",
                        "[('NOP', None), ('SAck', (6000, 7000)), ('EOL', None)]"] {
            try Command.run([TestSupport.scapyPython, "-c", egress.replacingOccurrences(of: "%s", with: options)],
                            netns: Self.client)
        }
        sniffer.waitUntilExit()
        let lines = try String(contentsOfFile: sniffed, encoding: .utf8).split(separator: "\n").filter { $0.hasPrefix("A ") }
        #expect(lines == ["A 1000 4900 5900,6900,7950,8900 True", "A 1000 4900 5900,6900 True"], "\(lines)")

        // Ingress: a segment without ACK from the server on the subsession; the client's stack (no socket) answers
        // with an RST acknowledging seq + 1, in the client's numbering (the egress entry now without a delta, so the
        // answer shows what the ingress program made of the sequence number).
        try datapath.write(Self.egressKey, BPFSessionEntry(target: Self.subsession, sessionID: 9), mode: .replace)
        let answers = "\(work)/ingress.log"
        let sniffer2 = try await startSniffer(count: 1, output: answers)
        let ingress = "from scapy.all import *; conf.verb = 0; send(IP(src='10.216.3.2', dst='10.216.3.1')/TCP(sport=8080, dport=52001, flags='P', seq=70000)/Raw(b'x'))"
        try Command.run([TestSupport.scapyPython, "-c", ingress], netns: Self.server)
        sniffer2.waitUntilExit()
        let reply = try String(contentsOfFile: answers, encoding: .utf8).split(separator: "\n").filter { $0.hasPrefix("RA ") }
        #expect(reply == ["RA 0 70101  True"], "the client acknowledged 70000 + 100 + 1: \(reply)")
        #expect(try Self.tcpChecksumErrors(Self.client) == 0)
        #expect(try Self.tcpChecksumErrors(Self.server) == 0)
        for device in ["eth0", "eth1"] { try BPFDatapath.detach(interface: device, namespace: Self.client) }
        try datapath.unpinMaps()
    }
}
