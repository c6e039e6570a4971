import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// A test lab: hosts as network namespaces on one L2 segment, a Dysco agent on each, an unmodified iptables
/// firewall on each middlebox, iperf3 and HTTP servers on each server.
///
/// Layout (lab `NAME`, default subnet 10.77.0.0/24):
///
///     NAME-sw          switch: Linux bridge br0; one port per host, named after the host (client1, fw1, ...)
///     NAME-client<i>   eth0 = 10.77.0.(10+i)    i = 1...20
///     NAME-attacker<i> eth0 = 10.77.0.(50+i)    i = 1...20 (spec.attackers, default none)
///     NAME-<mb>        eth0 = 10.77.0.(100+i)   middleboxes in the order given (fw1 = .101, fw2 = .102)
///     NAME-server<i>   eth0 = 10.77.0.(200+i)   i = 1...20
///
/// Every address is on-link (no gateway). Each host's `eth0` is a veth whose peer lives in NAME-sw; both ends are
/// created directly in their namespaces, so nothing ever appears in the machine's own namespace. Labs have their
/// own bridges and are isolated from each other: parallel labs may reuse a subnet, not a name.
///
/// Every host: `lo` up, IPv6 off, ICMP redirects neither sent nor accepted, rp_filter off (Dysco rewrites
/// addresses, which a strict reverse-path filter would drop). Middleboxes also forward (`ip_forward=1`) and run
/// the firewall of their ``FirewallProfile`` (described in ``FirewallCounters``). Attackers are plain hosts on the
/// segment: no agent, no firewall, no forwarding.
///
/// Agents (`spec.agents`): every host but the attackers gets `dysco-migrate agent --config NAME/<host>.agent.json
/// --trust-key NAME/trust.key` (a fresh key per lab, see ``trustKeyPath``); clients carry
/// one policy per server (`lab-default-serverN`: src = subnet, dst = server/32, dport = policy ports, chain =
/// the chain's middlebox addresses; in a dual-stack lab also `lab-default-serverN-ipv6`: src = the lab's /64, dst =
/// server/128, chain = the middleboxes' IPv6 addresses), other hosts an empty policy list. An agent is ready when its control socket
/// (``AgentControlPaths/socketPath(netns:)``) appears. Without agents, `routeViaMiddlebox` adds static /32 routes
/// so that a kernel-forwarding baseline crosses the same middlebox and firewall.
///
/// Services on every server (`spec.services`): `iperf3 -s` on 5201, `python3 -m http.server` on 80 and on 8080
/// (8080 is outside the default policy ports), serving `httpRoot`. All are children of the process that built
/// the lab and are recorded in lab.json.
///
/// State: `/run/dysco-migrate/labs/NAME/lab.json` is written before anything is created and updated after each
/// step; ``Lab/down(name:force:logger:)`` uses it (or, if it is lost, the namespace names) to remove a lab even
/// after its creator crashed: processes in the lab's namespaces (`ip netns pids`) get SIGTERM, then SIGKILL
/// after 3 s; then the namespaces and the lab directory are deleted.
///
/// Thread safety: the mutable state (lab.json contents, child `Process` objects) is guarded by `lock`; every
/// method may be called from any thread, which is why the class is `@unchecked Sendable`.
public final class Lab: @unchecked Sendable {
    public let name: String
    public let logger: Logger
    private let lock = NSLock()
    private var _state: LabState
    /// Children started by this instance, by pid (nil after ``attach(name:logger:)`` for older processes).
    private var children: [Int32: Process] = [:]

    public static let agentReadyTimeout: TimeInterval = 10
    public static let serviceReadyTimeout: TimeInterval = 10
    public static let termGracePeriod: TimeInterval = 3
    public static let iperfPort: UInt16 = 5201
    public static let httpPort: UInt16 = 80
    public static let httpAltPort: UInt16 = 8080

    /// Python's threading HTTP file server with a listen backlog of 1024 (`python3 -m http.server` listens
    /// with 5, which drops SYNs, and so adds seconds of retransmission, once 100 clients connect at once).
    /// (The program: Resources/http-server.py of this module.)
    static func httpServer(address: IPAddress, port: UInt16, root: String) throws -> [String] {
        ["python3", try LabResources.path("http-server.py"), "\(address)", "\(port)", root]
    }

    private init(state: LabState, logger: Logger) {
        name = state.name
        _state = state
        var logger = logger
        logger[metadataKey: "lab.name"] = "\(state.name)"
        self.logger = logger
    }

    // MARK: - Queries

    /// A snapshot of lab.json's contents.
    public var state: LabState { lock.withLock { _state } }
    public var hosts: [LabHost] { state.hosts }
    public var subnet: IPPrefix { state.subnet }
    public var directory: String { LabPaths.directory(name) }
    public var httpRoot: String { state.httpRoot }
    /// Middlebox names of the default chain, in order.
    public var chain: [String] { state.chain }
    /// The lab's trust key file (hex text, mode 0600), written by ``up(_:logger:)`` before any agent starts.
    public var trustKeyPath: String { LabPaths.trustKey(name) }

    /// The firewall profile of middlebox `mb` (as built).
    public func firewallProfile(of mb: String) -> FirewallProfile { state.firewallProfile(of: mb) }

    public func hosts(_ role: LabRole) -> [LabHost] { hosts.filter { $0.role == role } }

    /// The host named `name` (`client1`, `fw1`, `server1`...). Traps on an unknown name: use ``findHost(_:)``
    /// to test.
    public func host(_ name: String) -> LabHost {
        guard let host = findHost(name) else { preconditionFailure("lab '\(self.name)' has no host '\(name)'") }
        return host
    }

    public func findHost(_ name: String) -> LabHost? { state.host(name) }

    public func address(of host: String) -> IPAddress { self.host(host).address }

    public func namespace(of host: String) -> String { self.host(host).namespace }

    private func requireHost(_ name: String) throws -> LabHost {
        guard let host = findHost(name) else { throw LabError.unknownHost(lab: self.name, host: name) }
        return host
    }

    // MARK: - Running things in hosts

    /// Runs a command to completion inside `host`'s namespace.
    @discardableResult
    public func exec(_ host: String, _ args: [String], input: String? = nil, check: Bool = true) throws -> CommandResult {
        try Command.run(args, netns: requireHost(host).namespace, input: input, check: check)
    }

    /// Starts a long-running command inside `host`'s namespace; it is recorded in lab.json (so `lab down`
    /// stops it) and its output goes to `logPath` (nil: discarded). Its signal mask is empty (see ``Command/spawn(_:netns:logPath:)``).
    @discardableResult
    public func spawn(_ host: String, _ args: [String], logPath: String? = nil) throws -> Process {
        let h = try requireHost(host)
        let process = try Command.spawn(args, netns: h.namespace, logPath: logPath)
        record(process, LabProcessRecord(host: h.name, kind: .custom, pid: process.processIdentifier,
                                         command: args, log: logPath))
        return process
    }

    /// Counters of the firewall on middlebox `mb` (its IPv6 filter with `.ipv6`, in a dual-stack lab).
    public func firewallCounters(_ mb: String, family: AddressFamily = .ipv4) throws -> FirewallCounters {
        let tool = family == .ipv4 ? "iptables" : "ip6tables"
        let out = try exec(mb, [tool, "-w", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"])
        return try FirewallCounters.parse(out.stdout)
    }

    /// `host`'s IPv6 address in a dual-stack lab (``LabState/ipv6Address(of:)``); nil in an IPv4-only lab.
    public func ipv6Address(of host: String) -> IPAddress? { state.ipv6Address(of: self.host(host)) }

    /// `host`'s address of `family`; for IPv6 the lab must be dual stack (``LabSpec/ipv6``).
    public func address(of host: String, family: AddressFamily) throws -> IPAddress {
        guard family == .ipv6 else { return address(of: host) }
        guard let address = ipv6Address(of: host) else { throw LabError.setupFailed("lab \(name) has no IPv6 addresses") }
        return address
    }

    /// Zeroes the firewall counters of middlebox `mb` (rules and policy).
    public func resetFirewallCounters(_ mb: String) throws {
        try exec(mb, ["iptables", "-w", "-t", "filter", "-Z", "FORWARD"])
    }

    /// Absolute values of kernel SNMP/netstat counters in `host`'s namespace (`nstat -a -s -z NAME...`), e.g.
    /// `TcpRetransSegs`. `-a` prints absolute values and `-s` writes no history, so every call returns the
    /// namespace's own kernel counter; the history file nstat would otherwise share between namespaces is pointed
    /// into the lab directory anyway. A counter the kernel does not have is missing from the result.
    public func kernelCounters(_ host: String, _ names: [String]) throws -> [String: UInt64] {
        let history = "\(directory)/nstat-\(host).history"
        let out = try exec(host, ["env", "NSTAT_HISTORY=\(history)", "nstat", "-a", "-s", "-z"] + names).stdout
        return Self.parseNstat(out)
    }

    /// `TcpRetransSegs` of `host`: TCP segments its kernel retransmitted since the namespace was made.
    public func tcpRetransmissions(_ host: String) throws -> UInt64 {
        guard let value = try kernelCounters(host, ["TcpRetransSegs"])["TcpRetransSegs"] else {
            throw LabError.setupFailed("nstat in \(host) printed no TcpRetransSegs")
        }
        return value
    }

    /// Parses nstat output (`#kernel`, then `NAME  VALUE  RATE` lines).
    static func parseNstat(_ output: String) -> [String: UInt64] {
        var result: [String: UInt64] = [:]
        for line in output.split(separator: "\n") where !line.hasPrefix("#") {
            let fields = line.split(whereSeparator: \.isWhitespace)
            guard fields.count >= 2, let value = UInt64(fields[1]) else { continue }
            result[String(fields[0])] = value
        }
        return result
    }

    /// `conntrack -L -p tcp` in `host` (its tracked TCP connections, as text).
    public func conntrackTCP(_ host: String, family: AddressFamily = .ipv4) throws -> String {
        try exec(host, ["conntrack", "-L", "-f", family == .ipv4 ? "ipv4" : "ipv6", "-p", "tcp"], check: false).stdout
    }

    // MARK: - Agents

    /// The agent process record of `host`, if one was started.
    public func agentRecord(_ host: String) -> LabProcessRecord? {
        state.processes.last { $0.host == host && $0.kind == .agent }
    }

    public func agentIsAlive(_ host: String) -> Bool {
        guard let record = agentRecord(host), let h = findHost(host) else { return false }
        return ProcessInspector.isAlive(pid: record.pid, namespace: h.namespace)
    }

    /// Sends `signal` to `host`'s agent (default SIGKILL: a crash). With `wait`, returns once it has exited
    /// (at most ``termGracePeriod`` seconds).
    public func killAgent(_ host: String, signal: Int32 = SIGKILL, wait: Bool = true) throws {
        let h = try requireHost(host)
        guard let record = agentRecord(host) else { throw LabError.notFound("no agent was started on \(host)") }
        guard ProcessInspector.isAlive(pid: record.pid, namespace: h.namespace) else { return }
        logger.info("signalling agent", metadata: ["lab.host": "\(host)", "lab.pid": "\(record.pid)",
                                                   "lab.signal": "\(signal)"])
        kill(record.pid, signal)
        if wait {
            _ = waitForExit(pid: record.pid, namespace: h.namespace, timeout: Self.termGracePeriod)
        }
    }

    /// Stops `host`'s agent (SIGTERM, then SIGKILL after 3 s) if it runs, and starts a new one with the same
    /// configuration; returns once the new one is ready.
    /// `extraArguments` are added to this start only (e.g. `--accept-state no`); `binary` replaces the lab's agent
    /// binary for this start only (another release's, for a rolling upgrade).
    public func restartAgent(_ host: String, extraArguments: [String] = [], binary: String? = nil) throws {
        let h = try requireHost(host)
        if let record = agentRecord(host), ProcessInspector.isAlive(pid: record.pid, namespace: h.namespace) {
            kill(record.pid, SIGTERM)
            if !waitForExit(pid: record.pid, namespace: h.namespace, timeout: Self.termGracePeriod) {
                kill(record.pid, SIGKILL)
                _ = waitForExit(pid: record.pid, namespace: h.namespace, timeout: Self.termGracePeriod)
            }
        }
        let s = state
        guard let binary = binary ?? s.agentBinary else { throw LabError.notFound("lab '\(name)' was built without agents") }
        guard h.role != .attacker else { throw LabError.notFound("attacker \(host) runs no agent") }
        let process = try startAgent(h, binary: binary, arguments: s.agentArguments + extraArguments)
        try waitAgentReady(h, process: process, pid: process.processIdentifier)
    }

    private func startAgent(_ h: LabHost, binary: String, arguments: [String]) throws -> Process {
        // A socket left by a killed agent would look like readiness: remove it first (it is this lab's own).
        unlink(AgentControlPaths.socketPath(netns: h.namespace))
        // A box that translates tuples tags its Dysco SYNs (docs/ARCHITECTURE.md, "Boxes that translate").
        let nat = h.role == .middlebox && state.firewallProfile(of: h.name).translates && !arguments.contains("--nat")
        let ipv6 = state.ipv6 && !arguments.contains("--ipv6")
        let args = [binary, "agent", "--config", LabPaths.agentConfig(name, host: h.name)] + (nat ? ["--nat"] : [])
            + (ipv6 ? ["--ipv6"] : [])
            + Self.trustKeyArguments(state.trustKeyPath, overriddenBy: arguments)
            + (try bpfFsArguments(overriddenBy: arguments)) + arguments
        let log = LabPaths.agentLog(name, host: h.name)
        let process = try Command.spawn(args, netns: h.namespace, logPath: log)
        logger.debug("agent started", metadata: ["lab.host": "\(h.name)", "lab.pid": "\(process.processIdentifier)"])
        record(process, LabProcessRecord(host: h.name, kind: .agent, pid: process.processIdentifier,
                                         command: args, log: log))
        return process
    }

    /// `--trust-key PATH` before the spec's agent arguments, unless there is no key to pass or those arguments
    /// carry their own `--trust-key` (argument-parser takes an option's last occurrence, so theirs would win
    /// anyway; leaving ours out keeps the command line unambiguous).
    static func trustKeyArguments(_ path: String?, overriddenBy arguments: [String]) -> [String] {
        guard let path else { return [] }
        if arguments.contains(where: { $0 == "--trust-key" || $0.hasPrefix("--trust-key=") }) { return [] }
        return ["--trust-key", path]
    }

    /// `--bpf-fs <lab dir>/bpf` (mounted here first), unless `arguments` carry their own `--bpf-fs`.
    private func bpfFsArguments(overriddenBy arguments: [String]) throws -> [String] {
        if arguments.contains(where: { $0 == "--bpf-fs" || $0.hasPrefix("--bpf-fs=") }) { return [] }
        let path = LabPaths.bpfFs(name)
        if !Self.isMountPoint(path) {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            try Command.run(["mount", "-t", "bpf", "bpf", path])
        }
        return ["--bpf-fs", path]
    }

    /// Whether `path` is a mount point (/proc/self/mounts; paths there escape spaces as \040).
    static func isMountPoint(_ path: String) -> Bool {
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return false }
        let escaped = path.replacingOccurrences(of: " ", with: "\\040")
        return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == escaped }
    }

    /// Writes a fresh key (``TrustKey/generateHex()``) to `path`, mode 0600, refusing to follow or reuse a file.
    static func writeTrustKey(_ path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw LabError.setupFailed("cannot create trust key \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let bytes = Array((TrustKey.generateHex() + "\n").utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count, fchmod(fd, 0o600) == 0 else {
            throw LabError.setupFailed("cannot write trust key \(path): \(String(cString: strerror(errno)))")
        }
    }

    private func waitAgentReady(_ h: LabHost, process: Process?, pid: Int32) throws {
        let socket = AgentControlPaths.socketPath(netns: h.namespace)
        let log = LabPaths.agentLog(name, host: h.name)
        let deadline = Date().addingTimeInterval(Self.agentReadyTimeout)
        while true {
            if FileManager.default.fileExists(atPath: socket) { return }
            let running = process?.isRunning ?? ProcessInspector.isAlive(pid: pid, namespace: h.namespace)
            if !running {
                let status = process.map { " (exit status \($0.terminationStatus))" } ?? ""
                throw LabError.agentFailed(host: h.name, reason: "exited before it was ready\(status)",
                                           logTail: ProcessInspector.tail(of: log))
            }
            if Date() > deadline {
                throw LabError.agentFailed(
                    host: h.name,
                    reason: "did not create its control socket \(socket) within \(Int(Self.agentReadyTimeout)) s",
                    logTail: ProcessInspector.tail(of: log))
            }
            usleep(50_000)
        }
    }

    // MARK: - Building

    /// Builds the lab described by `spec`. Refuses if a lab of that name (or any of its namespaces) exists.
    /// If a step fails, everything made so far is removed and the error is rethrown.
    public static func up(_ spec: LabSpec, logger: Logger) throws -> Lab {
        let plan = try spec.plan()
        let fm = FileManager.default
        if let ns = plan.namespaces.first(where: NetworkNamespace.exists) {
            throw LabError.exists("network namespace '\(ns)' already exists: lab '\(spec.name)' (or a leftover of it) "
                                  + "is there; remove it first with `dysco-migrate lab down --name \(spec.name)`")
        }
        var agentBinary: String?
        if spec.agents {
            let binary = try spec.agentBinary ?? defaultAgentBinary()
            guard fm.isExecutableFile(atPath: binary) else {
                throw LabError.invalidSpec("agent binary '\(binary)' is not an executable file")
            }
            agentBinary = binary
        }
        if let root = spec.httpRoot {
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: root, isDirectory: &isDir), isDir.boolValue else {
                throw LabError.invalidSpec("HTTP root '\(root)' is not a directory")
            }
        }
        try fm.createDirectory(atPath: LabPaths.labsDirectory, withIntermediateDirectories: true)
        let dir = LabPaths.directory(spec.name)
        // mkdir is atomic: of two concurrent `lab up`s of one name, only one gets past this point.
        if mkdir(dir, 0o755) != 0 {
            let code = errno
            if code == EEXIST {
                throw LabError.exists("lab '\(spec.name)' already exists (\(dir)); remove it first with "
                                      + "`dysco-migrate lab down --name \(spec.name)`")
            }
            throw LabError.setupFailed("cannot create \(dir): \(String(cString: strerror(code)))")
        }
        let state = LabState(
            version: LabState.currentVersion, name: spec.name, phase: .creating, createdAt: Date(),
            subnet: plan.subnet, switchNamespace: plan.switchNamespace, hosts: plan.hosts, chain: plan.chain,
            policyPorts: spec.policyPorts, agents: spec.agents, agentBinary: agentBinary,
            agentArguments: spec.agentArguments, routeViaMiddlebox: spec.routeViaMiddlebox,
            httpRoot: spec.httpRoot ?? LabPaths.defaultHTTPRoot(spec.name), processes: [],
            firewallProfiles: spec.effectiveFirewallProfiles,
            trustKeyPath: spec.agents && spec.passTrustKey ? LabPaths.trustKey(spec.name) : nil, ipv6: spec.ipv6)
        let lab = Lab(state: state, logger: logger)
        do {
            try state.save()
            try writeTrustKey(LabPaths.trustKey(spec.name))
            try lab.build(spec: spec)
        } catch {
            lab.logger.error("lab up failed; removing what was made", metadata: ["lab.error": "\(error)"])
            lab.update { $0.phase = .failed }
            do {
                _ = try Lab.down(name: spec.name, force: false, logger: logger)
            } catch let cleanup {
                lab.logger.error("cleanup after failed lab up failed too", metadata: ["lab.error": "\(cleanup)"])
            }
            throw error
        }
        return lab
    }

    /// The `dysco-migrate` the agents run when the spec names none: `$DYSCO_BIN`; else the running executable if
    /// it is `dysco-migrate`; else a `dysco-migrate` beside the running executable or in one of its parent
    /// directories (a test bundle inside the build directory).
    public static func defaultAgentBinary() throws -> String {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["DYSCO_BIN"], !env.isEmpty { return env }
        let exe = try fm.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        if URL(fileURLWithPath: exe).lastPathComponent == "dysco-migrate" { return exe }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("dysco-migrate").path
            if fm.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        throw LabError.invalidSpec("no dysco-migrate binary for the agents: \(exe) is not one and none is beside it; "
                                   + "set LabSpec.agentBinary or $DYSCO_BIN")
    }

    /// Opens a lab built earlier (for example by `dysco-migrate lab up`) from its lab.json.
    public static func attach(name: String, logger: Logger) throws -> Lab {
        guard FileManager.default.fileExists(atPath: LabPaths.stateFile(name)) else {
            throw LabError.notFound("no lab '\(name)' (\(LabPaths.stateFile(name)) does not exist)")
        }
        return Lab(state: try LabState.load(name: name), logger: logger)
    }

    private func build(spec: LabSpec) throws {
        let s = state
        let started = Date()
        logger.info("building lab", metadata: ["lab.hosts": "\(s.hosts.map(\.name).joined(separator: ","))",
                                               "lab.subnet": "\(s.subnet)", "lab.agents": "\(s.agents)"])
        // Namespaces.
        for ns in s.namespaces { try Command.run(["ip", "netns", "add", ns]) }
        // Switch: a bridge without STP (ports forward at once).
        try ipBatch(s.switchNamespace, [
            "link set lo up",
            "link add br0 type bridge stp_state 0 forward_delay 0",
            "link set br0 up",
        ])
        let prefixLength = s.subnet.length
        if s.hosts.contains(where: { s.firewallProfile(of: $0.name) == .snatShared && $0.role == .middlebox }) {
            try ipBatch(s.switchNamespace, ["addr add \(s.sharedServiceAddress)/\(prefixLength) dev br0"]
                        + (s.sharedServiceAddressIPv6.map { ["addr add \($0)/64 dev br0 nodad"] } ?? []))
        }
        for h in s.hosts {
            try Command.run(["ip", "link", "add", h.interface, "netns", h.namespace, "type", "veth",
                             "peer", "name", h.switchPort, "netns", s.switchNamespace])
            try ipBatch(s.switchNamespace, ["link set \(h.switchPort) master br0", "link set \(h.switchPort) up"])
            // IPv6 off unless dual stack; then without duplicate address detection (the addresses are usable at once)
            // and without redirects, as for IPv4.
            var sysctls = s.ipv6
                ? ["net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0", "net.ipv6.conf.all.accept_dad=0",
                   "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_redirects=0",
                   "net.ipv6.conf.default.accept_redirects=0"]
                : ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            // The interface exists already (created in the namespace): `default` no longer reaches it, and DAD runs
            // when any of `all` and the interface's own setting asks for it. Without this its link-local address stays
            // tentative for a second after `link set up`, and a neighbour solicitation that needs it (one for a packet
            // whose source is not the host's own, e.g. an attacker's forged one) waits for the retransmit timer (1 s)
            // while the packets queue behind it.
            if s.ipv6 { sysctls.append("net.ipv6.conf.\(h.interface).accept_dad=0") }
            if s.ipv6, h.role == .middlebox { sysctls.append("net.ipv6.conf.all.forwarding=1") }
            for scope in ["all", "default", h.interface] {
                sysctls += ["net.ipv4.conf.\(scope).send_redirects=0", "net.ipv4.conf.\(scope).accept_redirects=0",
                            "net.ipv4.conf.\(scope).rp_filter=0"]
            }
            if h.role == .middlebox { sysctls.append("net.ipv4.ip_forward=1") }
            if h.role == .attacker { sysctls.append("net.ipv4.ip_forward=0") }
            try Command.run(["sysctl", "-q", "-w"] + sysctls, netns: h.namespace)
            try ipBatch(h.namespace, [
                "link set lo up",
                "addr add \(h.address)/\(prefixLength) dev \(h.interface)",
                "link set \(h.interface) up",
            ] + (s.ipv6Address(of: h).map { ["addr add \($0)/64 dev \(h.interface) nodad"] } ?? []))
        }
        // Flow steering on the switch ports: without RPS a veth queues each packet on the sending CPU's backlog,
        // and a sender running on both CPUs has its flow reordered, which TCP takes for loss (spurious fast
        // retransmits; measured: scripts/retrans-probe.sh). With every CPU in rps_cpus, a flow stays on one.
        if spec.flowSteering {
            let cpus = max(1, min(ProcessInfo.processInfo.activeProcessorCount, 31))
            let mask = String((1 << cpus) - 1, radix: 16)
            try Command.run(["sh", "-c", "for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo \(mask) > $f; done"],
                            netns: s.switchNamespace)
        }
        // Firewalls.
        for h in s.hosts where h.role == .middlebox {
            let published = s.hosts.first { $0.role == .server }.map { (box: h.address, server: $0.address, ports: s.policyPorts) }
            for rule in FirewallCounters.installCommands(subnet: s.subnet.description, profile: s.firewallProfile(of: h.name),
                                                         published: published, shared: s.sharedServiceAddress) {
                try Command.run(["iptables", "-w"] + rule, netns: h.namespace)
            }
            // The same filter and NAT for IPv6 (ip6tables: the box's, the server's and the shared IPv6 addresses).
            if s.ipv6 {
                let server6 = s.hosts.first { $0.role == .server }.flatMap(s.ipv6Address(of:))
                let published6 = s.ipv6Address(of: h).flatMap { box in server6.map { (box: box, server: $0, ports: s.policyPorts) } }
                for rule in FirewallCounters.installCommands(subnet: "\(s.ipv6Prefix)/64", profile: s.firewallProfile(of: h.name),
                                                             published: published6, shared: s.sharedServiceAddressIPv6) {
                    try Command.run(["ip6tables", "-w"] + rule, netns: h.namespace)
                }
            }
        }
        // Baseline routes through a middlebox.
        if let via = s.routeViaMiddlebox, let mb = s.host(via) {
            for client in s.hosts where client.role == .client {
                for server in s.hosts where server.role == .server {
                    try Command.run(["ip", "route", "add", "\(server.address)/32", "via", "\(mb.address)",
                                     "dev", client.interface], netns: client.namespace)
                    try Command.run(["ip", "route", "replace", "\(client.address)/32", "via", "\(mb.address)",
                                     "dev", server.interface], netns: server.namespace)
                    if let mb6 = s.ipv6Address(of: mb), let client6 = s.ipv6Address(of: client), let server6 = s.ipv6Address(of: server) {
                        try Command.run(["ip", "-6", "route", "replace", "\(server6)/128", "via", "\(mb6)", "dev", client.interface],
                                        netns: client.namespace)
                        try Command.run(["ip", "-6", "route", "replace", "\(client6)/128", "via", "\(mb6)", "dev", server.interface],
                                        netns: server.namespace)
                    }
                }
            }
        }
        if spec.services { try startServices() }
        if s.agents, let binary = s.agentBinary { try startAgents(binary: binary, arguments: s.agentArguments) }
        update { $0.phase = .ready }
        logger.info("lab ready", metadata: ["lab.seconds": "\(String(format: "%.1f", Date().timeIntervalSince(started)))"])
    }

    private func ipBatch(_ namespace: String, _ lines: [String]) throws {
        try Command.run(["ip", "-n", namespace, "-batch", "-"], input: lines.joined(separator: "\n") + "\n")
    }

    private func startServices() throws {
        let s = state
        let fm = FileManager.default
        if !fm.fileExists(atPath: s.httpRoot) {
            try fm.createDirectory(atPath: s.httpRoot, withIntermediateDirectories: true)
            try Data("dysco lab \(name)\n".utf8).write(to: URL(fileURLWithPath: "\(s.httpRoot)/index.html"))
        }
        var pending: [(LabHost, String, UInt16, Process)] = []
        for h in s.hosts where h.role == .server {
            let services: [(LabProcessRecord.Kind, UInt16, [String])] = [
                // Dual stack: iperf3 on every address (it binds one address or all).
                (.iperf3, Self.iperfPort, ["iperf3", "-s", "-p", "\(Self.iperfPort)"] + (s.ipv6 ? [] : ["-B", "\(h.address)"])),
                (.http, Self.httpPort, try Self.httpServer(address: h.address, port: Self.httpPort, root: s.httpRoot)),
                (.httpAlt, Self.httpAltPort, try Self.httpServer(address: h.address, port: Self.httpAltPort, root: s.httpRoot)),
            ] + (try s.ipv6Address(of: h).map { [(.http6, Self.httpPort, try Self.httpServer(address: $0, port: Self.httpPort, root: s.httpRoot))] } ?? [])
            for (kind, port, args) in services {
                let log = LabPaths.serviceLog(name, host: h.name, service: kind.rawValue)
                let process = try Command.spawn(args, netns: h.namespace, logPath: log)
                record(process, LabProcessRecord(host: h.name, kind: kind, pid: process.processIdentifier,
                                                 command: args, log: log))
                pending.append((h, kind.rawValue, port, process))
            }
        }
        for (h, service, port, process) in pending {
            let pid = process.processIdentifier
            let log = LabPaths.serviceLog(name, host: h.name, service: service)
            let deadline = Date().addingTimeInterval(Self.serviceReadyTimeout)
            while !ProcessInspector.listeningTCPPorts(pid: pid).contains(port) {
                if !process.isRunning {
                    throw LabError.serviceFailed(host: h.name, service: service,
                                                 reason: "exited (status \(process.terminationStatus))",
                                                 logTail: ProcessInspector.tail(of: log))
                }
                if Date() > deadline {
                    throw LabError.serviceFailed(host: h.name, service: service,
                                                 reason: "does not listen on port \(port) after \(Int(Self.serviceReadyTimeout)) s",
                                                 logTail: ProcessInspector.tail(of: log))
                }
                usleep(20_000)
            }
        }
    }

    /// The agent configuration of `host` in lab state `s`.
    public static func agentConfig(for host: LabHost, in s: LabState) -> AgentConfig {
        guard host.role == .client, !s.chain.isEmpty else { return AgentConfig(policies: []) }
        let chain = s.chain.compactMap { s.host($0)?.address }
        let ports = s.policyPorts.map { PortRange(lower: $0, upper: $0) }
        var policies = s.hosts.filter { $0.role == .server }.map { server in
            Policy(name: "lab-default-\(server.name)",
                   match: SessionPredicate(src: s.subnet, dst: IPPrefix("\(server.address)/32"), dport: ports),
                   chain: chain)
        }
        // A box of the chain that publishes a server on its own address (`dnat`): sessions to it take the chain too.
        for box in s.chain.compactMap({ s.host($0) }) where s.firewallProfile(of: box.name) == .dnat {
            policies.append(Policy(name: "lab-published-\(box.name)",
                                   match: SessionPredicate(src: s.subnet, dst: IPPrefix("\(box.address)/32"), dport: ports),
                                   chain: chain))
        }
        // Dual stack: the same per server for IPv6 sessions (src = the lab's /64, dst = the server's /128), through the
        // chain's IPv6 addresses (an IPv6 chain applies to IPv6 sessions only; PacketProcessor's policy lookup).
        if s.ipv6 {
            let chain6 = s.chain.compactMap { s.host($0).flatMap(s.ipv6Address(of:)) }
            let lab6 = IPPrefix("\(s.ipv6Prefix)/64")
            for server in s.hosts.filter({ $0.role == .server }) {
                guard let address = s.ipv6Address(of: server) else { continue }
                policies.append(Policy(name: "lab-default-\(server.name)-ipv6",
                                       match: SessionPredicate(src: lab6, dst: IPPrefix("\(address)/128"), dport: ports),
                                       chain: chain6))
            }
            for box in s.chain.compactMap({ s.host($0) }) where s.firewallProfile(of: box.name) == .dnat {
                guard let address = s.ipv6Address(of: box) else { continue }
                policies.append(Policy(name: "lab-published-\(box.name)-ipv6",
                                       match: SessionPredicate(src: lab6, dst: IPPrefix("\(address)/128"), dport: ports),
                                       chain: chain6))
            }
        }
        return AgentConfig(policies: policies)
    }

    private func startAgents(binary: String, arguments: [String]) throws {
        let s = state
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let agentHosts = s.hosts.filter { $0.role != .attacker }
        for h in agentHosts {
            let config = Self.agentConfig(for: h, in: s)
            try config.validate()
            try encoder.encode(config).write(to: URL(fileURLWithPath: LabPaths.agentConfig(name, host: h.name)),
                                             options: .atomic)
        }
        // Start all, then wait for all: the agents come up in parallel.
        var started: [(LabHost, Process)] = []
        for h in agentHosts { started.append((h, try startAgent(h, binary: binary, arguments: arguments))) }
        for (h, process) in started { try waitAgentReady(h, process: process, pid: process.processIdentifier) }
        logger.info("agents ready", metadata: ["lab.agents": "\(started.count)"])
    }

    // MARK: - State bookkeeping

    private func update(_ body: (inout LabState) -> Void) {
        lock.withLock {
            body(&_state)
            do { try _state.save() } catch {
                logger.warning("cannot write lab.json", metadata: ["lab.error": "\(error)"])
            }
        }
    }

    private func record(_ process: Process, _ record: LabProcessRecord) {
        lock.withLock { children[process.processIdentifier] = process }
        update { $0.processes.append(record) }
    }

    /// Waits until `pid` has left `namespace` (exited). Our own children are reaped by Foundation.
    private func waitForExit(pid: Int32, namespace: String, timeout: TimeInterval) -> Bool {
        let child = lock.withLock { children[pid] }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let child { if !child.isRunning { return true } } else if !ProcessInspector.isAlive(pid: pid, namespace: namespace) {
                return true
            }
            usleep(20_000)
        }
        return false
    }

    // MARK: - Tearing down

    /// Removes this lab (see ``down(name:force:logger:)``).
    @discardableResult
    public func down() throws -> LabDownReport {
        let report = try Lab.down(name: name, force: false, logger: logger)
        // Let Foundation reap our children before returning, so no zombie outlives the lab.
        let kids = lock.withLock { Array(children.values) }
        let deadline = Date().addingTimeInterval(2)
        for child in kids { while child.isRunning && Date() < deadline { usleep(10_000) } }
        lock.withLock { children.removeAll() }
        return report
    }

    /// Removes lab `name`: stops every process in its namespaces (SIGTERM, SIGKILL after 3 s), deletes the
    /// namespaces (which destroys their veths and the bridge) and the lab directory, and the agents' control
    /// sockets. Works from lab.json; if that is lost, from the namespace names: `NAME-sw`, `NAME-client<digits>`,
    /// `NAME-server<digits>` and `NAME-attacker<digits>` always, other `NAME-<x>` (middleboxes) only with `force`, as nothing else
    /// proves they belong to this lab. A lab that does not exist is not an error (the report says so).
    @discardableResult
    public static func down(name: String, force: Bool = false, logger: Logger) throws -> LabDownReport {
        guard LabSpec.isValidLabName(name) else {
            throw LabError.invalidSpec("'\(name)' is not a valid lab name")
        }
        var logger = logger
        logger[metadataKey: "lab.name"] = "\(name)"
        let dir = LabPaths.directory(name)
        let fm = FileManager.default
        var report = LabDownReport(name: name)
        var namespaces: [String]
        var unattributed: [String] = []
        if let state = try? LabState.load(name: name) {
            namespaces = state.namespaces.filter(NetworkNamespace.exists)
            report.fromStateFile = true
        } else {
            let candidates = LabDownReport.fallbackNamespaces(lab: name, existing: NetworkNamespace.list(),
                                                              claimedByOtherLabs: claimedNamespaces(except: name))
            namespaces = candidates.certain
            if force { namespaces += candidates.uncertain } else { unattributed = candidates.uncertain }
        }
        report.existed = !namespaces.isEmpty || fm.fileExists(atPath: dir)
        if !report.existed && unattributed.isEmpty { return report }
        logger.info("removing lab", metadata: ["lab.namespaces": "\(namespaces.joined(separator: ","))"])

        // Processes: SIGTERM, wait, SIGKILL.
        func pids() -> [Int32] { namespaces.flatMap { ProcessInspector.pids(inNamespace: $0) } }
        var remaining = pids()
        report.stoppedProcesses = remaining.count
        if !remaining.isEmpty {
            for pid in remaining { kill(pid, SIGTERM) }
            let deadline = Date().addingTimeInterval(termGracePeriod)
            while !remaining.isEmpty && Date() < deadline {
                usleep(50_000)
                remaining = pids()
            }
            if !remaining.isEmpty {
                logger.warning("processes ignored SIGTERM; killing", metadata: ["lab.pids": "\(remaining)"])
                for pid in remaining { kill(pid, SIGKILL) }
                let killDeadline = Date().addingTimeInterval(termGracePeriod)
                while !remaining.isEmpty && Date() < killDeadline {
                    usleep(50_000)
                    remaining = pids()
                }
            }
        }
        var failures: [String] = []
        for ns in namespaces {
            let result = try Command.run(["ip", "netns", "delete", ns], check: false)
            if result.succeeded || !NetworkNamespace.exists(ns) {
                report.removedNamespaces.append(ns)
            } else {
                failures.append("\(ns): \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
            }
            unlink(AgentControlPaths.socketPath(netns: ns))
            // The namespace took the agent's rules and kernel table with it; its state file goes too.
            unlink(AgentControlPaths.statePath(socketPath: AgentControlPaths.socketPath(netns: ns)))
        }
        if !failures.isEmpty {
            throw LabError.setupFailed("could not delete namespaces of lab '\(name)': \(failures.joined(separator: "; "))")
        }
        if !unattributed.isEmpty {
            throw LabError.needsForce(
                "lab '\(name)' has no lab.json; removed \(report.removedNamespaces.joined(separator: ", ")), but "
                + "\(unattributed.joined(separator: ", ")) may belong to it (middleboxes?) or to something else: "
                + "rerun with --force to remove them too")
        }
        // The agents' pinned maps go with the lab's bpffs (the namespaces took their programs).
        let bpffs = LabPaths.bpfFs(name)
        if isMountPoint(bpffs) {
            let result = try Command.run(["umount", bpffs], check: false)
            if !result.succeeded {
                throw LabError.setupFailed("could not unmount \(bpffs): \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
            }
        }
        if fm.fileExists(atPath: dir) {
            try fm.removeItem(atPath: dir)
            report.removedDirectory = true
        }
        logger.info("lab removed", metadata: ["lab.namespaces": "\(report.removedNamespaces.count)",
                                              "lab.processes": "\(report.stoppedProcesses)"])
        return report
    }

    /// Namespaces that other labs' lab.json files name.
    static func claimedNamespaces(except lab: String) -> Set<String> {
        var claimed = Set<String>()
        for other in LabPaths.existingLabs() where other != lab {
            if let state = try? LabState.load(name: other) { claimed.formUnion(state.namespaces) }
        }
        return claimed
    }
}

/// What ``Lab/down(name:force:logger:)`` did.
public struct LabDownReport: Codable, Sendable {
    public var name: String
    public var existed = false
    public var fromStateFile = false
    public var removedNamespaces: [String] = []
    public var stoppedProcesses = 0
    public var removedDirectory = false

    public init(name: String) { self.name = name }

    /// Namespaces that look like lab `lab`'s when its lab.json is lost: `certain` ones (`LAB-sw`,
    /// `LAB-client<digits>`, `LAB-server<digits>`, `LAB-attacker<digits>`) and `uncertain` ones (`LAB-<x>`, x = [a-z][a-z0-9]{0,7},
    /// possibly middleboxes), leaving out any that another lab's lab.json names.
    public static func fallbackNamespaces(lab: String, existing: [String], claimedByOtherLabs: Set<String>)
        -> (certain: [String], uncertain: [String]) {
        var certain: [String] = [], uncertain: [String] = []
        let prefix = "\(lab)-"
        for ns in existing where ns.hasPrefix(prefix) && !claimedByOtherLabs.contains(ns) {
            let rest = String(ns.dropFirst(prefix.count))
            if rest == "sw" || numbered(rest, "client") || numbered(rest, "server") || numbered(rest, "attacker") {
                certain.append(ns)
            } else if LabSpec.isValidMiddleboxName(rest) {
                uncertain.append(ns)
            }
        }
        return (certain, uncertain)
    }

    private static func numbered(_ text: String, _ prefix: String) -> Bool {
        guard text.hasPrefix(prefix) else { return false }
        let digits = text.dropFirst(prefix.count)
        return !digits.isEmpty && digits.allSatisfy { $0.isASCII && $0.isNumber }
    }
}

/// Looks at processes through /proc and `ip netns pids`.
public enum ProcessInspector {
    /// Pids of the processes whose network namespace is `namespace` (`ip netns pids`).
    public static func pids(inNamespace namespace: String) -> [Int32] {
        guard NetworkNamespace.exists(namespace),
              let result = try? Command.run(["ip", "netns", "pids", namespace], check: false) else { return [] }
        return result.stdout.split(whereSeparator: \.isWhitespace).compactMap { Int32($0) }.filter { !isZombie(pid: $0) }
    }

    /// A zombie (exited, not yet reaped by its parent) or gone: nothing left to signal.
    public static func isZombie(pid: Int32) -> Bool {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = status.lastIndex(of: ")") else { return true }
        let state = status[status.index(after: close)...].trimmingCharacters(in: .whitespaces).prefix(1)
        return state == "Z" || state == "X"
    }

    /// Whether `pid` is a live (non-zombie) process in network namespace `namespace` (guards against pid reuse).
    public static func isAlive(pid: Int32, namespace: String) -> Bool {
        guard pid > 0 else { return false }
        var proc = stat(), ns = stat()
        guard stat("/proc/\(pid)/ns/net", &proc) == 0,
              stat("\(NetworkNamespace.directory)/\(namespace)", &ns) == 0 else { return false }
        guard proc.st_ino == ns.st_ino && proc.st_dev == ns.st_dev else { return false }
        return !isZombie(pid: pid)
    }

    /// TCP ports on which sockets in `pid`'s network namespace listen (/proc/PID/net/tcp{,6}).
    public static func listeningTCPPorts(pid: Int32) -> Set<UInt16> {
        var ports = Set<UInt16>()
        for file in ["tcp", "tcp6"] {
            guard let text = try? String(contentsOfFile: "/proc/\(pid)/net/\(file)", encoding: .utf8) else { continue }
            ports.formUnion(parseListeningPorts(text))
        }
        return ports
    }

    /// Parses /proc/net/tcp: LISTEN (state 0A) sockets' local ports.
    public static func parseListeningPorts(_ text: String) -> Set<UInt16> {
        var ports = Set<UInt16>()
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count > 3, fields[3] == "0A", let colon = fields[1].lastIndex(of: ":"),
                  let port = UInt16(fields[1][fields[1].index(after: colon)...], radix: 16) else { continue }
            ports.insert(port)
        }
        return ports
    }

    /// The last `lines` lines of a log file ("" if missing).
    public static func tail(of path: String, lines: Int = 20) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "" }
        let text = String(decoding: data.suffix(64 * 1024), as: UTF8.self)
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines + 1)
            .joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
