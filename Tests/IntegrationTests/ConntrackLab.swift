import DyscoCore
import ConntrackState
import DyscoSystem
import Foundation
import Logging

/// A small lab for the conntrack tests, all in namespaces named `<prefix>-…`:
///
///     cli (10.201.N.10) ─┬─ brL ─┬─ fwA eth0 (.1)  fwA eth1 (.1) ─┬─ brR ─┬─ srv (10.201.N+1.10)
///                        │       └─ fwB eth0 (.2)  fwB eth1 (.2) ─┘       │
///                        (bridges live in the `<prefix>-sw` namespace)
///
/// Both firewalls: FORWARD policy DROP, INVALID dropped by a counted rule, ESTABLISHED,RELATED accepted; only fwA
/// accepts NEW. Strict TCP window tracking (be_liberal = 0). Routes start through fwA.
final class ConntrackLab {
    let prefix: String
    let left: Int  // third octet of the client subnet; the server subnet is left + 1
    let net: String  // the first two octets ("10.201")
    let workDir: URL
    var processes: [Process] = []

    var cli: String { "\(prefix)-cli" }
    var srv: String { "\(prefix)-srv" }
    var fwA: String { "\(prefix)-fwA" }
    var fwB: String { "\(prefix)-fwB" }
    var sw: String { "\(prefix)-sw" }
    var namespaces: [String] { [cli, srv, fwA, fwB, sw] }

    var clientIP: String { "\(net).\(left).10" }
    var serverIP: String { "\(net).\(left + 1).10" }
    /// SNAT address of the NAT test: routed by the server toward whichever firewall carries the session.
    var natIP: String { "\(net).\(left + 1).100" }
    func fwLeftIP(_ fw: String) -> String { "\(net).\(left).\(fw == fwA ? 1 : 2)" }
    func fwRightIP(_ fw: String) -> String { "\(net).\(left + 1).\(fw == fwA ? 1 : 2)" }

    let logger: Logger = {
        var logger = Logger(label: "conntrack.test")
        logger.logLevel = .warning
        return logger
    }()

    init(prefix: String, left: Int, net: String = "10.201", snat: Bool = false) throws {
        self.prefix = prefix
        self.left = left
        self.net = net
        workDir = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("\(prefix)-\(getpid())")
        Self.removeNamespaces(prefix: prefix)
        do {
            try FileManager.default.createDirectory(at: workDir, withIntermediateDirectories: true)
            try build(snat: snat)
        } catch {
            teardown()
            throw error
        }
    }

    private func ip(_ args: String..., in ns: String? = nil) throws {
        try Command.run(["ip"] + args.joined(separator: " ").split(separator: " ").map(String.init), netns: ns)
    }

    private func build(snat: Bool) throws {
        for ns in namespaces { try ip("netns add \(ns)") }
        for ns in namespaces { try ip("link set lo up", in: ns) }
        try ip("link add brL type bridge", in: sw)
        try ip("link add brR type bridge", in: sw)
        try ip("link set brL up", in: sw)
        try ip("link set brR up", in: sw)
        // veth: one end on a bridge in the switch namespace, the other (eth0/eth1) in the host namespace.
        func plug(_ host: String, _ port: String, _ ifname: String, _ bridge: String, _ address: String) throws {
            try ip("link add \(port) type veth peer name \(ifname) netns \(host)", in: sw)
            try ip("link set \(port) master \(bridge) up", in: sw)
            try ip("addr add \(address)/24 dev \(ifname)", in: host)
            try ip("link set \(ifname) up", in: host)
        }
        try plug(cli, "cli", "eth0", "brL", clientIP)
        try plug(srv, "srv", "eth0", "brR", serverIP)
        for fw in [fwA, fwB] {
            let tag = fw == fwA ? "a" : "b"
            try plug(fw, "\(tag)L", "eth0", "brL", fwLeftIP(fw))
            try plug(fw, "\(tag)R", "eth1", "brR", fwRightIP(fw))
            try Command.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], netns: fw)
            // Mid-stream packets of an unknown session must be NEW (and dropped), never silently picked up by
            // a liberal tracker: keep the kernel defaults explicit.
            try Command.run(["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0"], netns: fw)
            let rules: [[String]] = [
                ["-P", "FORWARD", "DROP"],
                ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
                ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ] + (fw == fwA ? [["-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"]] : [])
            for rule in rules { try Command.run(["iptables", "-w"] + rule, netns: fw) }
            if snat {
                // Both firewalls can SNAT to the shared address (fwB needs its nat table for imported NAT entries).
                try Command.run(["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth1", "-s", "\(net).\(left).0/24",
                                 "-j", "SNAT", "--to-source", natIP], netns: fw)
            }
        }
        try ip("route add default via \(fwLeftIP(fwA))", in: cli)
        try ip("route add default via \(fwRightIP(fwA))", in: srv)
        if snat { try ip("route add \(natIP)/32 via \(fwRightIP(fwA))", in: srv) }
    }

    /// Sends both directions through `fw` from now on.
    func routeThrough(_ fw: String, snat: Bool = false) throws {
        try ip("route replace default via \(fwLeftIP(fw))", in: cli)
        try ip("route replace default via \(fwRightIP(fw))", in: srv)
        if snat { try ip("route replace \(natIP)/32 via \(fwRightIP(fw))", in: srv) }
    }

    /// Packets counted by the INVALID-drop rule, and dropped by the FORWARD policy, on `fw`.
    func dropCounters(_ fw: String) throws -> (invalid: Int, policy: Int) {
        let text = try Command.run(["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"], netns: fw).stdout
        var invalid = -1, policy = -1
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ")
            if line.hasPrefix("Chain FORWARD"), let index = words.firstIndex(where: { $0.hasSuffix("policy") }),
               index + 2 < words.count {
                policy = Int(words[index + 2]) ?? -1
            } else if line.contains("ctstate INVALID"), let first = words.first {
                invalid = Int(first) ?? -1
            }
        }
        return (invalid, policy)
    }

    /// Firewall counters and conntrack tables, for failure messages.
    func diagnostics() -> String {
        var text = ""
        for fw in [fwA, fwB] {
            for args in [["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"], ["iptables", "-w", "-t", "nat", "-L", "-v", "-x", "-n"],
                         ["conntrack", "-L"]] {
                let result = try? Command.run(args, netns: fw, check: false)
                text += "\n[\(fw)] \(args.joined(separator: " ")):\n\(result?.stdout ?? "")\(result?.stderr ?? "")"
            }
        }
        text += "\n[curl] " + ((try? String(contentsOfFile: workDir.appendingPathComponent("curl.log").path, encoding: .utf8)) ?? "")
        return text
    }

    // MARK: The HTTP transfer

    /// Writes a random file of `megabytes` MiB for the server; returns its sha256.
    func makeBlob(megabytes: Int) throws -> String {
        let blob = workDir.appendingPathComponent("srv/blob").path
        try FileManager.default.createDirectory(atPath: workDir.appendingPathComponent("srv").path,
                                                withIntermediateDirectories: true)
        try Command.run(["sh", "-c", "head -c \(megabytes)M /dev/urandom > '\(blob)'"])
        return try sha256(blob)
    }

    func sha256(_ path: String) throws -> String {
        String(try Command.run(["sha256sum", path]).stdout.prefix(64))
    }

    private var server: Process?

    /// The drain step of a stateful replacement (DESIGN §4): the sender stops producing data and everything it
    /// sent is acknowledged, so nothing is in flight when the state moves. Stops the HTTP server process and
    /// waits until its socket has no unacknowledged or unsent byte (Send-Q 0).
    func drainServer(timeout: TimeInterval = 10) throws {
        guard let server else { throw ConntrackLabError("no server") }
        kill(server.processIdentifier, SIGSTOP)
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let text = try Command.run(["ss", "-Htn", "state", "established", "sport", "=", ":8080"], netns: srv).stdout
            let queues = text.split(separator: "\n").compactMap { line -> Int? in
                let words = line.split(separator: " ", omittingEmptySubsequences: true)
                return words.count >= 2 ? Int(words[1]) : nil
            }
            if !queues.isEmpty && queues.allSatisfy({ $0 == 0 }) { return }
            Thread.sleep(forTimeInterval: 0.02)
        }
        throw ConntrackLabError("server socket did not drain")
    }

    func resumeServer() {
        if let server { kill(server.processIdentifier, SIGCONT) }
    }

    func startServer() throws {
        let server = try Command.spawn(["python3", "-m", "http.server", "8080", "--bind", serverIP,
                                        "--directory", workDir.appendingPathComponent("srv").path],
                                       netns: srv, logPath: workDir.appendingPathComponent("server.log").path)
        processes.append(server)
        self.server = server
        let deadline = Date().addingTimeInterval(15)
        while Date() < deadline {
            if !(try Command.run(["ss", "-Hltn", "sport = :8080"], netns: srv).stdout.isEmpty) { return }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw ConntrackLabError("HTTP server in \(srv) did not start listening")
    }

    var downloadPath: String { workDir.appendingPathComponent("download").path }

    func startDownload(rate: String, maxTime: Int) throws -> Process {
        let curl = try Command.spawn(["curl", "-sS", "-o", downloadPath, "--limit-rate", rate, "--max-time", "\(maxTime)",
                                      "http://\(serverIP):8080/blob"],
                                     netns: cli, logPath: workDir.appendingPathComponent("curl.log").path)
        processes.append(curl)
        return curl
    }

    func downloadedBytes() -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: downloadPath)[.size]) as? Int) ?? 0
    }

    func waitForDownload(atLeast bytes: Int, timeout: TimeInterval) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while downloadedBytes() < bytes {
            guard Date() < deadline else { throw ConntrackLabError("download reached only \(downloadedBytes()) bytes") }
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    /// Waits for `process` to exit; returns false on timeout.
    func wait(_ process: Process, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning {
            if Date() > deadline { return false }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return true
    }

    /// The client's established connection to the server, as the agent would know it.
    func clientSession() throws -> FlowKey {
        let text = try Command.run(["ss", "-Htn", "state", "established", "dst", "\(serverIP):8080"], netns: cli).stdout
        // "0 0 10.201.N.10:40000 10.201.N+1.10:8080" (state column omitted when filtering by state)
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let local = words.first(where: { $0.hasPrefix(clientIP + ":") }),
                  let port = UInt16(local.split(separator: ":").last ?? "") else { continue }
            return FlowKey(proto: .tcp, src: IPAddress(clientIP)!, sport: port, dst: IPAddress(serverIP)!, dport: 8080)
        }
        throw ConntrackLabError("no established client connection in \(cli): \(text)")
    }

    // MARK: Teardown

    func teardown() {
        resumeServer()
        for process in processes where process.isRunning { process.terminate() }
        Self.removeNamespaces(prefix: prefix)
        try? FileManager.default.removeItem(at: workDir)
    }

    /// Stops whatever lives in our namespaces and deletes them (also left-overs of a crashed earlier run).
    static func removeNamespaces(prefix: String) {
        for ns in NetworkNamespace.list() where ns.hasPrefix(prefix + "-") {
            if let pids = try? Command.run(["ip", "netns", "pids", ns], check: false).stdout {
                for pid in pids.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
            }
            _ = try? Command.run(["ip", "netns", "del", ns], check: false)
        }
    }
}

struct ConntrackLabError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
