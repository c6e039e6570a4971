import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// A SYN flood on a lab, as docs/ARCHITECTURE.md "Floods and table bounds" describes the threat: one client host
/// whose agent signs every local SYN (a compromised or misbehaving host of the deployment) sends plain SYNs from
/// random ports to a server (its agent turns them into Dysco SYNs; its replies are ignored) and Dysco SYNs with
/// forged trailers straight at fw1 (outside its policy: its agent lets them pass; no key: fw1 refuses them). Shared by
/// `dysco-bench flood` and the integration test. Python with a raw socket (IPPROTO_RAW: the packets traverse the
/// sending host's OUTPUT hooks, so its agent sees them as local SYNs); checksums built once per template.
public enum SynFlood {
    public enum Kind: String, Sendable {
        /// A plain SYN (the sending host's agent, if any, turns it into a Dysco SYN).
        case plain
        /// A SYN carrying a trailer v2 with a random MAC (forged without the deployment's key).
        case dysco
    }

    /// The flooder (Resources/syn-flood.py): `python3 syn-flood.py SRC DST DPORT COUNT KIND RATE`.
    static func script() throws -> String { try LabResources.path("syn-flood.py", in: .module) }

    /// Starts `count` SYNs from `host` (source: its address of `dst`'s family) to `dst:dport` in the background, at
    /// most `rate` per second (0: as fast as Python sends).
    public static func start(_ lab: Lab, from host: String, to dst: IPAddress, dport: UInt16, count: Int,
                             kind: Kind, rate: Double = 0, output: String) throws -> Process {
        let source = try lab.address(of: host, family: dst.isIPv4 ? .ipv4 : .ipv6)
        return try lab.spawn(host, ["python3", try script(), "\(source)", "\(dst)", "\(dport)", "\(count)",
                                    kind.rawValue, "\(rate)"], logPath: output)
    }

    /// What a finished flood process printed: SYNs handed to the kernel, SYNs a local hook dropped, seconds.
    public static func result(_ output: String) -> (sent: Int, dropped: Int, seconds: Double)? {
        guard let text = try? String(contentsOfFile: output, encoding: .utf8) else { return nil }
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count >= 3, let sent = Int(fields[fields.count - 3]), let dropped = Int(fields[fields.count - 2]),
              let seconds = Double(fields[fields.count - 1]) else { return nil }
        return (sent, dropped, seconds)
    }

    /// Makes `host` ignore the replies to its flood, as a SYN flooder does: its stack's RSTs are dropped in raw
    /// OUTPUT, before its agent sees them (the SYN-ACKs then leave half-open records everywhere).
    public static func silenceResets(_ lab: Lab, _ host: String) throws {
        for tool in lab.state.ipv6 ? ["iptables", "ip6tables"] : ["iptables"] {
            try lab.exec(host, [tool, "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"])
        }
    }

    /// VmRSS of a process in KiB (nil if it is gone).
    public static func rssKiB(pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        }
        return nil
    }

    /// The agent's metrics on `host` (`--metrics 127.0.0.1:PORT`), as series → value.
    public static func metrics(_ lab: Lab, _ host: String, port: UInt16) -> [String: Double] {
        guard let text = try? lab.exec(host, ["curl", "-s", "-m", "5", "http://127.0.0.1:\(port)/metrics"], check: false).stdout
        else { return [:] }
        var out: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            out[String(line[..<space])] = value
        }
        return out
    }

    /// Packets the kernel dropped because `host`'s NFQUEUE was full (queue_dropped + user_dropped of
    /// /proc/net/netfilter/nfnetlink_queue: the agent never saw them).
    public static func queueDropped(_ lab: Lab, _ host: String) -> Int {
        guard let text = try? lab.exec(host, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check: false).stdout else { return 0 }
        return text.split(separator: "\n").reduce(0) { sum, line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return f.count >= 7 ? sum + (Int(f[5]) ?? 0) + (Int(f[6]) ?? 0) : sum
        }
    }

    /// One HTTP request from `client` to server1:80 over `family` (true if it got a response).
    public static func connects(_ lab: Lab, from client: String, family: AddressFamily = .ipv4, timeout: Int = 20) -> Bool {
        guard let server = try? lab.address(of: "server1", family: family) else { return false }
        let url = "http://\(server.urlHost):80/"
        return (try? lab.exec(client, ["curl", "-sS", "-g", "-o", "/dev/null", "-m", "\(timeout)", url], check: false).status) == 0
    }
}

/// `dysco-bench flood` and the flood test: floods fw1 of a lab (client1 legitimate, client2 the flooding host) and reports fw1's agent RSS before, at its peak during, and after the flood's records expired, the
/// flood rate, the records at the peak and whether legitimate connections succeeded during and after.
public struct FloodBenchmark: Sendable {
    public struct Options: Sendable {
        /// SYNs in all from client2: half plain (its agent signs them), half forged Dysco SYNs at fw1.
        public var syns = 100_000
        /// The agents' --syn-timeout (s).
        public var synTimeout = 10.0
        /// SYNs per second of each of the two flood processes (0: as fast as they go).
        public var rate = 0.0
        public var agentArguments: [String] = []
        public var agentBinary: String?
        /// The flood's and the legitimate connections' family (IPv6: a dual-stack lab).
        public var family: AddressFamily = .ipv4
        public init() {}
    }

    public struct Report: Codable, Sendable {
        public var plainSent: Int
        public var forgedSent: Int
        /// SYNs the flooding host's own agent dropped (its port range or cap full).
        public var droppedAtSender: Int
        public var floodSeconds: Double
        public var synsPerSecond: Double
        public var rssBeforeKiB: Int
        public var rssPeakKiB: Int
        public var rssAfterKiB: Int
        /// fw1's table at its largest during the flood, and once the flood's records expired.
        public var peakRecords: Int
        public var recordsAfter: Int
        public var legitDuringAttempts: Int
        public var legitDuringSucceeded: Int
        public var legitAfterAttempts: Int
        public var legitAfterSucceeded: Int
        /// fw1's counters: SYNs refused by the caps, forged trailers refused, SYN-only records expired.
        public var sourceCapRefused: Int
        public var sessionCapRefused: Int
        public var trailerBadMAC: Int
        public var synTimeouts: Int
        public var secondsUntilExpired: Double
        /// fw1's records before the flood.
        public var recordsBefore: Int
        /// Flood SYNs fw1's agent judged (records created + refused by a cap + forged trailers refused), and
        /// packets fw1's kernel dropped with its NFQUEUE full (the agent never saw them).
        public var judgedAtFw1: Int
        public var queueDroppedAtFw1: Int
        /// fw1's agent VmRSS (KiB) once a second from the flood's start to the "after" reading.
        public var rssSeries: [Int]
        /// The flood's family: "ipv4" or "ipv6".
        public var family: String

        public var text: String {
            """
            SYN flood on fw1 (\(family == "ipv6" ? "IPv6" : "IPv4")): \(plainSent) plain SYNs from client2 (via its agent; \(droppedAtSender) refused synchronously there) + \
            \(forgedSent) forged Dysco SYNs from client2 in \(String(format: "%.1f", floodSeconds)) s \
            (\(Int(synsPerSecond)) SYN/s)
            fw1 agent RSS: before \(rssBeforeKiB / 1024) MiB (\(rssBeforeKiB) KiB), peak \(rssPeakKiB / 1024) MiB \
            (\(rssPeakKiB) KiB), after expiry \(rssAfterKiB / 1024) MiB (\(rssAfterKiB) KiB) \
            (\(String(format: "%+.1f", Double(rssAfterKiB - rssBeforeKiB) * 100 / Double(max(rssBeforeKiB, 1)))) % vs before)
            fw1 records: peak \(peakRecords), after \(recordsAfter) (expired \(String(format: "%.1f", secondsUntilExpired)) s \
            after the flood; syn timeouts \(synTimeouts))
            fw1 judged \(judgedAtFw1) flood SYNs; its kernel dropped \(queueDroppedAtFw1) packets with the NFQUEUE full
            fw1 refused: per-source cap \(sourceCapRefused), session cap \(sessionCapRefused), bad trailer MAC \(trailerBadMAC)
            legitimate connections (client1 → server1:80): during the flood \(legitDuringSucceeded)/\(legitDuringAttempts), \
            after \(legitAfterSucceeded)/\(legitAfterAttempts)
            fw1 agent RSS every second (MiB): \(rssSeries.map { String(format: "%.1f", Double($0) / 1024) }.joined(separator: " "))
            """
        }
    }

    public static let metricsPort: UInt16 = 9464
    public let options: Options
    private let logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// The lab the benchmark (and the test, under its own name and subnet) floods; `ipv6`: dual stack, for a flood
    /// over IPv6.
    public static func spec(name: String, subnet: String, synTimeout: Double, agentArguments: [String] = [],
                            agentBinary: String? = nil, attackers: Int = 0, ipv6: Bool = false) -> LabSpec {
        LabSpec(name: name, clients: 2, middleboxes: ["fw1"], subnet: subnet, policyPorts: [80],
                agentArguments: ["--syn-timeout", "\(synTimeout)", "--metrics", "127.0.0.1:\(metricsPort)"] + agentArguments,
                agentBinary: agentBinary, attackers: attackers, ipv6: ipv6)
    }

    public func run() async throws -> Report {
        let spec = Self.spec(name: "at-bflood", subnet: "10.79.89.0/24", synTimeout: options.synTimeout,
                             agentArguments: options.agentArguments,
                             agentBinary: try options.agentBinary ?? Lab.defaultAgentBinary(), ipv6: options.family == .ipv6)
        let report = try await Lab.withBenchmarkLab(spec, logger: logger) { lab in
            try Self.flood(lab, syns: options.syns, synTimeout: options.synTimeout, rate: options.rate,
                           family: options.family, logger: logger)
        }
        return report
    }

    /// Floods `lab` (built from ``spec(name:subnet:synTimeout:agentArguments:agentBinary:attackers:ipv6:)``) over
    /// `family` (the flood and the legitimate connections) and measures.
    public static func flood(_ lab: Lab, syns: Int, synTimeout: Double, rate: Double = 0, family: AddressFamily = .ipv4,
                             logger: Logger) throws -> Report {
        guard let pid = lab.agentRecord("fw1")?.pid else { throw LabError.notFound("fw1's agent") }
        try SynFlood.silenceResets(lab, "client2")
        // Warm-up: legitimate connections, metrics scrapes and a fast-path counter poll (every 5 s), so that the
        // baseline includes what the agent allocates once (libnftables, the HTTP server, the registry).
        for _ in 0..<10 { _ = SynFlood.connects(lab, from: "client1", family: family) }
        _ = SynFlood.metrics(lab, "fw1", port: metricsPort)
        Thread.sleep(forTimeInterval: 11)  // past the warm-up's close linger (10 s) and a counter poll (5 s)
        let baseRecords = Int(SynFlood.metrics(lab, "fw1", port: metricsPort)[AgentMetricCatalog.sessions] ?? 0)
        guard let before = SynFlood.rssKiB(pid: pid) else { throw LabError.notFound("fw1's agent process \(pid)") }
        let createdBefore = Int(SynFlood.metrics(lab, "fw1", port: metricsPort)[AgentMetricCatalog.sessionsCreated] ?? 0)
        let queueDroppedBefore = SynFlood.queueDropped(lab, "fw1")
        logger.info("flood starting", metadata: ["flood.syns": "\(syns)", "fw1.rss_kib": "\(before)"])

        let samples = Samples(rss: before)
        let sampler = Thread {
            var tick = 0
            while !samples.stopped {
                if let rss = SynFlood.rssKiB(pid: pid) { samples.record(rss: rss, series: tick % 10 == 0) }
                if tick % 5 == 0, let n = SynFlood.metrics(lab, "fw1", port: metricsPort)[AgentMetricCatalog.sessions] {
                    samples.record(records: Int(n))
                }
                tick += 1
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
        sampler.start()
        let plainOut = "\(lab.directory)/flood-plain.out", forgedOut = "\(lab.directory)/flood-forged.out"
        let plain = try SynFlood.start(lab, from: "client2", to: try lab.address(of: "server1", family: family), dport: 80, count: syns - syns / 2,
                                       kind: .plain, rate: rate, output: plainOut)
        let forged = try SynFlood.start(lab, from: "client2", to: try lab.address(of: "fw1", family: family), dport: 80, count: syns / 2,
                                        kind: .dysco, rate: rate, output: forgedOut)
        // Legitimate connections while the flood runs (each with TCP's own SYN retries).
        var during = (attempts: 0, ok: 0)
        repeat {
            during.attempts += 1
            if SynFlood.connects(lab, from: "client1", family: family) { during.ok += 1 }
        } while plain.isRunning || forged.isRunning || during.attempts < 3
        plain.waitUntilExit()
        forged.waitUntilExit()
        let p = SynFlood.result(plainOut), f = SynFlood.result(forgedOut)
        guard let p, let f else { throw LabError.setupFailed("a flood process printed no result (\(plainOut), \(forgedOut))") }
        let seconds = max(p.seconds, f.seconds, 0.001)
        logger.info("flood sent", metadata: ["flood.plain": "\(p.sent)", "flood.forged": "\(f.sent)",
                                             "flood.seconds": "\(seconds)"])

        // Wait for the flood's records to expire (SYN timeout), then for the agent to give memory back.
        let flooded = Date()
        var records = Int.max
        while Date().timeIntervalSince(flooded) < synTimeout * 3 + 60 {
            records = Int(SynFlood.metrics(lab, "fw1", port: metricsPort)[AgentMetricCatalog.sessions] ?? Double(Int.max))
            if records <= baseRecords + 2 { break }
            Thread.sleep(forTimeInterval: 0.5)
        }
        let expiredAfter = Date().timeIntervalSince(flooded)
        Thread.sleep(forTimeInterval: 12)  // the agent trims at most every 10 s
        samples.stop()
        let after = SynFlood.rssKiB(pid: pid) ?? 0
        var legitAfter = (attempts: 0, ok: 0)
        for _ in 0..<5 {
            legitAfter.attempts += 1
            if SynFlood.connects(lab, from: "client1", family: family) { legitAfter.ok += 1 }
        }
        let m = SynFlood.metrics(lab, "fw1", port: metricsPort)
        func counter(_ series: String) -> Int { Int(m[series] ?? 0) }
        let syn = AgentMetricCatalog.synDropped
        let legitDuringAndAfter = during.attempts + legitAfter.attempts
        return Report(
            plainSent: p.sent + p.dropped, forgedSent: f.sent + f.dropped, droppedAtSender: p.dropped,
            floodSeconds: seconds, synsPerSecond: Double(p.sent + p.dropped + f.sent + f.dropped) / seconds,
            rssBeforeKiB: before, rssPeakKiB: samples.peakRSS, rssAfterKiB: after, peakRecords: samples.peakRecords,
            recordsAfter: records, legitDuringAttempts: during.attempts, legitDuringSucceeded: during.ok,
            legitAfterAttempts: legitAfter.attempts, legitAfterSucceeded: legitAfter.ok,
            sourceCapRefused: counter("\(syn){reason=\"source_cap\"}"), sessionCapRefused: counter("\(syn){reason=\"session_cap\"}"),
            trailerBadMAC: counter("\(syn){reason=\"trailer_bad_mac\"}"),
            synTimeouts: counter(AgentMetricCatalog.synTimeouts), secondsUntilExpired: expiredAfter,
            recordsBefore: baseRecords,
            judgedAtFw1: counter(AgentMetricCatalog.sessionsCreated) - createdBefore - legitDuringAndAfter
                + counter("\(syn){reason=\"source_cap\"}") + counter("\(syn){reason=\"session_cap\"}")
                + counter("\(syn){reason=\"trailer_bad_mac\"}"),
            queueDroppedAtFw1: SynFlood.queueDropped(lab, "fw1") - queueDroppedBefore,
            rssSeries: samples.series, family: family == .ipv6 ? "ipv6" : "ipv4")
    }

    /// The sampler's readings (another thread writes them).
    final class Samples: @unchecked Sendable {
        private let lock = NSLock()
        private var _peakRSS: Int
        private var _peakRecords = 0
        private var _stopped = false
        init(rss: Int) { _peakRSS = rss }
        private var _series: [Int] = []
        func record(rss: Int, series: Bool) {
            lock.withLock {
                _peakRSS = max(_peakRSS, rss)
                if series { _series.append(rss) }
            }
        }
        var series: [Int] { lock.withLock { _series } }
        func record(records: Int) { lock.withLock { _peakRecords = max(_peakRecords, records) } }
        func stop() { lock.withLock { _stopped = true } }
        var stopped: Bool { lock.withLock { _stopped } }
        var peakRSS: Int { lock.withLock { _peakRSS } }
        var peakRecords: Int { lock.withLock { _peakRecords } }
    }
}
