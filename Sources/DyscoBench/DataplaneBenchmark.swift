import DyscoAgent
import DyscoLab
import DyscoSystem
import Foundation
import Logging

/// The data-plane benchmark: the same lab topology (client1 → fw1 → server1, fw1 a conntrack firewall)
/// measured with plain kernel forwarding and with the Dysco chain, one after the other in one invocation,
/// plus the C NFQUEUE reference (shared/bench/chain-nfqueue-ref.sh) run alongside. Prints figures and
/// ratios; asserts nothing.
public struct DataplaneBenchmark {
    public struct Options: Sendable {
        public var seconds = 4
        /// iperf3 runs per figure; the median is reported (single runs on 2 shared cores vary by ±5 %).
        public var repeats = 3
        public var connections = 1000
        /// The `dysco-migrate` the agents run (nil: ``Lab/defaultAgentBinary()``).
        public var agentBinary: String?
        /// The `dysco-bench` whose `sink` and `connect` run in the lab (nil: the running executable).
        public var helperBinary: String?
        public var agentArguments: [String] = []
        /// Also measure the chain with --no-fastpath (everything in NFQUEUE).
        public var includeSlowPath = true
        /// Also measure IPv6 (dual-stack labs): kernel forwarding and the chain, whose IPv6 sessions the BPF datapath
        /// carries (its IPv6 maps; docs/ARCHITECTURE.md, "IPv6 sessions").
        public var includeIPv6 = true
        public var referenceScript: String?
        public var chain = ["fw1"]
        /// RPS on the labs' switch ports (``LabSpec/flowSteering``). Its per-packet IPI is a cost of the emulated
        /// switch, paid more often by a chain with NFQUEUE verdicts than by kernel forwarding.
        public var flowSteering = true
        public init() {}
    }

    public struct Run: Codable, Sendable {
        public var label: String
        public var goodput1FlowGbps: Double
        public var goodput8FlowsGbps: Double
        public var connect: ConnectLatencyResult
        public var sessionsPerSecond: Double
    }

    public struct Report: Codable, Sendable {
        public var seconds: Int
        public var repeats: Int
        public var middleboxes: Int
        /// RPS on the switch ports in every lab of the run.
        public var flowSteering = true
        public var kernel: Run
        /// The chain with the kernel fast path (the agent's default).
        public var dysco: Run
        /// The chain with --no-fastpath: every packet through NFQUEUE.
        public var slowPath: Run?
        /// IPv6 in dual-stack labs: kernel forwarding via fw1, and the chain (its IPv6 sessions in the BPF datapath).
        public var kernelIPv6: Run?
        public var dyscoIPv6: Run?
        public var ipv6Ratio1Flow: Double? { ratio(dyscoIPv6, kernelIPv6, \.goodput1FlowGbps) }
        public var ipv6Ratio8Flows: Double? { ratio(dyscoIPv6, kernelIPv6, \.goodput8FlowsGbps) }
        public var ipv6ConnectOverheadPerMiddleboxMicroseconds: Double? {
            guard let d = dyscoIPv6, let k = kernelIPv6 else { return nil }
            return (d.connect.p50Microseconds - k.connect.p50Microseconds) / Double(max(middleboxes, 1))
        }
        private func ratio(_ a: Run?, _ b: Run?, _ figure: KeyPath<Run, Double>) -> Double? {
            guard let a, let b else { return nil }
            return a[keyPath: figure] / max(b[keyPath: figure], 1e-9)
        }
        /// The C NFQUEUE chain reference: its own kernel baseline and chain goodput (nil if not run).
        public var referenceKernelGbps: Double?
        public var referenceChainGbps: Double?
        public var ratio1Flow: Double { dysco.goodput1FlowGbps / max(kernel.goodput1FlowGbps, 1e-9) }
        public var ratio8Flows: Double { dysco.goodput8FlowsGbps / max(kernel.goodput8FlowsGbps, 1e-9) }
        public var slowRatio1Flow: Double? { slowPath.map { $0.goodput1FlowGbps / max(kernel.goodput1FlowGbps, 1e-9) } }
        public var slowRatio8Flows: Double? { slowPath.map { $0.goodput8FlowsGbps / max(kernel.goodput8FlowsGbps, 1e-9) } }
        public var referenceRatio: Double? {
            guard let k = referenceKernelGbps, let c = referenceChainGbps, k > 0 else { return nil }
            return c / k
        }
        /// The NFQUEUE-only chain's ratio to kernel forwarding over the C reference's (same work in C).
        public var slowVersusCReference: Double? {
            guard let r = referenceRatio, let s = slowRatio1Flow else { return nil }
            return s / max(r, 1e-9)
        }
        public var slowConnectOverheadPerMiddleboxMicroseconds: Double? {
            slowPath.map { ($0.connect.p50Microseconds - kernel.connect.p50Microseconds) / Double(max(middleboxes, 1)) }
        }
        public var connectOverheadPerMiddleboxMicroseconds: Double {
            (dysco.connect.p50Microseconds - kernel.connect.p50Microseconds) / Double(max(middleboxes, 1))
        }
        /// New sessions per second through the chain (fast path) over kernel forwarding's.
        public var sessionsRatio: Double { dysco.sessionsPerSecond / max(kernel.sessionsPerSecond, 1e-9) }

        enum CodingKeys: String, CodingKey {
            case seconds, repeats, middleboxes, flowSteering, kernel, dysco, slowPath, referenceKernelGbps, referenceChainGbps
            case ratio1Flow, ratio8Flows, slowRatio1Flow, slowRatio8Flows, referenceRatio, slowVersusCReference
            case connectOverheadPerMiddleboxMicroseconds, slowConnectOverheadPerMiddleboxMicroseconds, sessionsRatio
            case kernelIPv6, dyscoIPv6, ipv6Ratio1Flow, ipv6Ratio8Flows, ipv6ConnectOverheadPerMiddleboxMicroseconds
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(seconds, forKey: .seconds)
            try c.encode(repeats, forKey: .repeats)
            try c.encode(middleboxes, forKey: .middleboxes)
            try c.encode(flowSteering, forKey: .flowSteering)
            try c.encode(kernel, forKey: .kernel)
            try c.encode(dysco, forKey: .dysco)
            try c.encodeIfPresent(slowPath, forKey: .slowPath)
            try c.encodeIfPresent(referenceKernelGbps, forKey: .referenceKernelGbps)
            try c.encodeIfPresent(referenceChainGbps, forKey: .referenceChainGbps)
            try c.encode(ratio1Flow, forKey: .ratio1Flow)
            try c.encode(ratio8Flows, forKey: .ratio8Flows)
            try c.encodeIfPresent(slowRatio1Flow, forKey: .slowRatio1Flow)
            try c.encodeIfPresent(slowRatio8Flows, forKey: .slowRatio8Flows)
            try c.encodeIfPresent(referenceRatio, forKey: .referenceRatio)
            try c.encodeIfPresent(slowVersusCReference, forKey: .slowVersusCReference)
            try c.encode(connectOverheadPerMiddleboxMicroseconds, forKey: .connectOverheadPerMiddleboxMicroseconds)
            try c.encode(sessionsRatio, forKey: .sessionsRatio)
            try c.encodeIfPresent(slowConnectOverheadPerMiddleboxMicroseconds,
                                  forKey: .slowConnectOverheadPerMiddleboxMicroseconds)
            try c.encodeIfPresent(kernelIPv6, forKey: .kernelIPv6)
            try c.encodeIfPresent(dyscoIPv6, forKey: .dyscoIPv6)
            try c.encodeIfPresent(ipv6Ratio1Flow, forKey: .ipv6Ratio1Flow)
            try c.encodeIfPresent(ipv6Ratio8Flows, forKey: .ipv6Ratio8Flows)
            try c.encodeIfPresent(ipv6ConnectOverheadPerMiddleboxMicroseconds, forKey: .ipv6ConnectOverheadPerMiddleboxMicroseconds)
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            seconds = try c.decode(Int.self, forKey: .seconds)
            repeats = try c.decode(Int.self, forKey: .repeats)
            middleboxes = try c.decode(Int.self, forKey: .middleboxes)
            flowSteering = try c.decodeIfPresent(Bool.self, forKey: .flowSteering) ?? true
            kernel = try c.decode(Run.self, forKey: .kernel)
            dysco = try c.decode(Run.self, forKey: .dysco)
            slowPath = try c.decodeIfPresent(Run.self, forKey: .slowPath)
            referenceKernelGbps = try c.decodeIfPresent(Double.self, forKey: .referenceKernelGbps)
            referenceChainGbps = try c.decodeIfPresent(Double.self, forKey: .referenceChainGbps)
            kernelIPv6 = try c.decodeIfPresent(Run.self, forKey: .kernelIPv6)
            dyscoIPv6 = try c.decodeIfPresent(Run.self, forKey: .dyscoIPv6)
        }

        init(seconds: Int, repeats: Int, middleboxes: Int, flowSteering: Bool = true,
             kernel: Run, dysco: Run, slowPath: Run?,
             referenceKernelGbps: Double?, referenceChainGbps: Double?) {
            self.seconds = seconds
            self.repeats = repeats
            self.middleboxes = middleboxes
            self.flowSteering = flowSteering
            self.kernel = kernel
            self.dysco = dysco
            self.slowPath = slowPath
            self.referenceKernelGbps = referenceKernelGbps
            self.referenceChainGbps = referenceChainGbps
        }
    }

    public var options: Options
    public var logger: Logger
    /// The running executable (`dysco-bench`), whose hidden `sink` and `connect` the measurement runs in the lab.
    public static func runningExecutable() throws -> String {
        try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    }

    /// Where `dysco-bench sink` listens on server1 for the connect() measurement (in the lab policy's ports).
    public static let sinkPort: UInt16 = 9000

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public func run() throws -> Report {
        let binary = try options.agentBinary ?? Lab.defaultAgentBinary()
        let middleboxes = (1...max(options.chain.count, 1)).map { "fw\($0)" }
        var kernelSpec = LabSpec(name: "bench-k", middleboxes: middleboxes, subnet: "10.79.1.0/24", agents: false,
                                 agentBinary: binary, routeViaMiddlebox: middleboxes[0])
        kernelSpec.chain = []
        kernelSpec.flowSteering = options.flowSteering
        logger.info("measuring kernel forwarding (no agents, routes via fw1)")
        let kernel = try measure(kernelSpec, label: "kernel forwarding")
        var dyscoSpec = LabSpec(name: "bench-d", middleboxes: middleboxes, chain: options.chain, subnet: "10.79.2.0/24",
                                policyPorts: LabSpec.defaultPolicyPorts + [Self.sinkPort],
                                agentArguments: options.agentArguments,
                                agentBinary: binary)
        dyscoSpec.flowSteering = options.flowSteering
        logger.info("measuring the Dysco chain (kernel fast path)", metadata: ["bench.chain": "\(options.chain)"])
        let dysco = try measure(dyscoSpec, label: "dysco, BPF datapath")
        var slowPath: Run?
        if options.includeSlowPath {
            var slowSpec = dyscoSpec
            slowSpec.name = "bench-s"
            slowSpec.subnet = "10.79.3.0/24"
            slowSpec.agentArguments += ["--no-fastpath"]
            logger.info("measuring the Dysco chain (--no-fastpath: NFQUEUE only)")
            slowPath = try measure(slowSpec, label: "dysco, NFQUEUE only")
        }
        var refKernel: Double?, refChain: Double?
        if let script = options.referenceScript {
            logger.info("running the C NFQUEUE reference", metadata: ["bench.script": "\(script)"])
            (refKernel, refChain) = runReference(script)
        }
        let kernelMiddleboxes = options.chain.count
        var report = Report(seconds: options.seconds, repeats: options.repeats, middleboxes: kernelMiddleboxes,
                            flowSteering: options.flowSteering, kernel: kernel, dysco: dysco,
                            slowPath: slowPath, referenceKernelGbps: refKernel, referenceChainGbps: refChain)
        if options.includeIPv6 {
            func dualStack(_ spec: LabSpec, _ name: String, _ subnet: String) -> LabSpec {
                var spec = spec
                spec.name = name
                spec.subnet = subnet
                spec.ipv6 = true
                return spec
            }
            logger.info("measuring kernel forwarding over IPv6 (no agents, routes via fw1)")
            report.kernelIPv6 = try measure(dualStack(kernelSpec, "bench-k6", "10.79.4.0/24"), label: "kernel forwarding, IPv6",
                                            ipv6: true)
            logger.info("measuring the Dysco chain over IPv6 (BPF datapath)")
            report.dyscoIPv6 = try measure(dualStack(dyscoSpec, "bench-6", "10.79.5.0/24"), label: "dysco, BPF datapath, IPv6",
                                           ipv6: true)
        }
        return report
    }

    private func measure(_ spec: LabSpec, label: String, ipv6: Bool = false) throws -> Run {
        try Lab.down(name: spec.name, force: true, logger: logger)
        let lab = try Lab.up(spec, logger: logger)
        defer { _ = try? lab.down() }
        let server = ipv6 ? try lab.ipv6Address(of: "server1").map(\.description)
            ?? { throw LabError.setupFailed("lab \(spec.name) has no IPv6 addresses") }()
            : lab.address(of: "server1").description
        if !spec.agents, options.chain.count > 1, !ipv6 { try routeThroughChain(lab) }
        let g1 = try median((0..<options.repeats).map { _ in try iperf(lab, server: server, flows: 1) })
        let g8 = try median((0..<options.repeats).map { _ in try iperf(lab, server: server, flows: 8) })
        let helper = try options.helperBinary ?? Self.runningExecutable()
        try lab.spawn("server1", [helper, "sink", "--address", server, "--port", "\(Self.sinkPort)"])
        usleep(300_000)
        let started = Date()
        let out = try lab.exec("client1", [helper, "connect", "--address", server, "--port", "\(Self.sinkPort)",
                                           "--count", "\(options.connections)"])
        let elapsed = Date().timeIntervalSince(started)
        let connect = try JSONDecoder().decode(ConnectLatencyResult.self, from: Data(out.stdout.utf8))
        return Run(label: label, goodput1FlowGbps: g1, goodput8FlowsGbps: g8, connect: connect,
                   sessionsPerSecond: Double(connect.count - connect.failures) / max(elapsed, 1e-9))
    }

    /// The kernel baseline crosses the same middleboxes as the chain: client → fw1 → fw2 → … → server and back
    /// (the lab's own routes only go through the first one).
    private func routeThroughChain(_ lab: Lab) throws {
        let hops = options.chain.map { lab.address(of: $0).description }
        let client = lab.address(of: "client1").description, server = lab.address(of: "server1").description
        for (index, hop) in options.chain.enumerated() {
            if index + 1 < hops.count { try lab.exec(hop, ["ip", "route", "replace", "\(server)/32", "via", hops[index + 1]]) }
            if index > 0 { try lab.exec(hop, ["ip", "route", "replace", "\(client)/32", "via", hops[index - 1]]) }
        }
        try lab.exec("server1", ["ip", "route", "replace", "\(client)/32", "via", hops[hops.count - 1]])
    }

    private func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
    }

    private func iperf(_ lab: Lab, server: String, flows: Int) throws -> Double {
        let out = try lab.exec("client1", ["iperf3", "-c", server, "-t", "\(options.seconds)", "-P", "\(flows)", "-J"])
        guard let json = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any],
              let end = json["end"] as? [String: Any], let received = end["sum_received"] as? [String: Any],
              let bps = received["bits_per_second"] as? Double else {
            throw LabError.setupFailed("iperf3 gave no result: \(out.stdout.prefix(300))")
        }
        return bps / 1e9
    }

    private func runReference(_ script: String) -> (Double?, Double?) {
        guard let result = try? Command.run(["bash", script, "\(options.seconds)"], check: false) else { return (nil, nil) }
        var values: [String: Double] = [:]
        for field in result.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
            let parts = field.split(separator: "=")
            if parts.count == 2, let value = Double(parts[1]) { values[String(parts[0])] = value }
        }
        return (values["kernel_forward_gbps"], values["c_nfqueue_chain_gbps"])
    }
}

extension DataplaneBenchmark {
    /// The floors `bench dataplane --check` (`make bench-check`) holds the fast path to, each against kernel
    /// forwarding measured in the same invocation. Generous on purpose (2 shared cores vary by ±10 %): they catch a
    /// regression of the kind issue 21 found (connect overhead ×7, sessions/s ÷5), not noise.
    public struct Floors: Sendable, Equatable {
        /// Connect p50 overhead per middlebox, µs: below this.
        public var maxConnectOverheadMicroseconds = 1000.0
        /// New sessions per second, over kernel forwarding's: at least this.
        public var minSessionsRatio = 0.2
        /// Bulk goodput (1 flow and 8 flows), over kernel forwarding's: at least this.
        public var minBulkRatio = 0.8
        public init() {}

        /// One line per figure below its floor (empty: every floor held).
        public func violations(_ report: Report) -> [String] {
            var found: [String] = []
            let overhead = report.connectOverheadPerMiddleboxMicroseconds
            if !(overhead < maxConnectOverheadMicroseconds) {
                found.append(String(format: "connect overhead per middlebox %.0f µs (floor: < %.0f µs)", overhead,
                                    maxConnectOverheadMicroseconds))
            }
            if !(report.sessionsRatio >= minSessionsRatio) {
                found.append(String(format: "new sessions/s %.2f of kernel forwarding (floor: ≥ %.2f)", report.sessionsRatio,
                                    minSessionsRatio))
            }
            for (label, ratio) in [("1 flow", report.ratio1Flow), ("8 flows", report.ratio8Flows)] where !(ratio >= minBulkRatio) {
                found.append(String(format: "bulk goodput, %@, %.2f of kernel forwarding (floor: ≥ %.2f)", label, ratio, minBulkRatio))
            }
            return found
        }
    }
}

extension DataplaneBenchmark.Report {
    public var text: String {
        func f(_ v: Double) -> String { String(format: "%.2f", v) }
        func us(_ v: Double) -> String { String(format: "%.0f", v) }
        var lines = [
            "data plane: client1 → \(middleboxes) middlebox(es) → server1, conntrack firewall on each, switch RPS \(flowSteering ? "on" : "off"); goodput = median of \(repeats) iperf3 runs of \(seconds) s",
            "                              1 flow Gbit/s  8 flows Gbit/s  connect p50 µs  p99 µs  sessions/s",
        ]
        func row(_ run: DataplaneBenchmark.Run) -> String {
            run.label.padding(toLength: 30, withPad: " ", startingAt: 0)
                + f(run.goodput1FlowGbps).padding(toLength: 15, withPad: " ", startingAt: 0)
                + f(run.goodput8FlowsGbps).padding(toLength: 16, withPad: " ", startingAt: 0)
                + us(run.connect.p50Microseconds).padding(toLength: 16, withPad: " ", startingAt: 0)
                + us(run.connect.p99Microseconds).padding(toLength: 8, withPad: " ", startingAt: 0)
                + String(format: "%.0f", run.sessionsPerSecond)
        }
        // IPv4's rows, then IPv6's (kernel forwarding and the chain), then the ratios.
        for run in [kernel, dysco] + (slowPath.map { [$0] } ?? []) + [kernelIPv6, dyscoIPv6].compactMap({ $0 }) {
            lines.append(row(run))
        }
        lines.append("fast path / kernel forwarding: 1 flow \(f(ratio1Flow)), 8 flows \(f(ratio8Flows)) (target ≥ 0.90)")
        lines.append("fast path connect overhead per middlebox (p50): \(us(connectOverheadPerMiddleboxMicroseconds)) µs (target < 300)")
        lines.append("fast path new sessions/s / kernel forwarding: \(f(sessionsRatio))")
        if let r1 = ipv6Ratio1Flow, let r8 = ipv6Ratio8Flows, let o = ipv6ConnectOverheadPerMiddleboxMicroseconds {
            lines.append("IPv6 chain (BPF) / IPv6 kernel forwarding: 1 flow \(f(r1)), 8 flows \(f(r8)); connect overhead per middlebox (p50) \(us(o)) µs")
        }
        if let s1 = slowRatio1Flow, let s8 = slowRatio8Flows, let o = slowConnectOverheadPerMiddleboxMicroseconds {
            lines.append("NFQUEUE only / kernel forwarding: 1 flow \(f(s1)), 8 flows \(f(s8)); connect overhead per middlebox (p50) \(us(o)) µs (target < 200)")
        }
        if let k = referenceKernelGbps, let c = referenceChainGbps, let r = referenceRatio {
            lines.append("C NFQUEUE chain reference: kernel \(f(k)) Gbit/s, chain \(f(c)) Gbit/s, ratio \(f(r))")
            if let v = slowVersusCReference {
                lines.append("NFQUEUE-only 1-flow ratio / C reference ratio: \(f(v)) (target ≥ 0.75)")
            }
        } else {
            lines.append("C NFQUEUE reference: not run (pass --reference PATH to shared/bench/chain-nfqueue-ref.sh)")
        }
        return lines.joined(separator: "\n")
    }
}
