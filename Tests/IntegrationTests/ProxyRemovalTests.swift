import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Issue 17 (d): a session-terminating proxy — Debian's HAProxy in TCP mode, unmodified, splicing — taken out of
/// live downloads (paper §2.2, §3.4, §4). The client's agent carries each download to the proxy (a chain without
/// middleboxes), HAProxy opens its own session to the server (its agent carries that one too), and the
/// LD_PRELOAD interposer (libdysco-splice.so) reports each pair of sockets HAProxy splices. The proxy's agent
/// joins the two sessions and removes itself; the client and the server then talk directly, the anchors
/// translating sequence numbers, acknowledgments, SACK blocks and timestamps.
@Suite("Issue 17 (d): HAProxy (TCP mode, splice) removed from live downloads", .serialized)
struct ProxyRemovalTests {
    static let proxyPort: UInt16 = 8080

    static func haproxyConfig(proxy: IPAddress, server: IPAddress, log: String) -> String {
        """
        global
            maxconn 1000
            log stdout format raw local0 info
        defaults
            mode tcp
            log global
            option tcplog
            option splice-request
            option splice-response
            timeout connect 5s
            timeout client 120s
            timeout server 120s
        frontend downloads
            bind \(proxy):\(proxyPort)
            default_backend paced
        backend paced
            server server1 \(server):\(MigrationLab.pacedPort)

        """
    }

    /// The client's downloads go to the proxy, the proxy's own sessions to the server: both chains have no
    /// middlebox (the agents carry the sessions end to end).
    static func configurePolicies(_ lab: Lab) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let subnet = IPPrefix("\(lab.address(of: "client1"))/24")
        let toProxy = Policy(name: "to-proxy", match: SessionPredicate(src: subnet, dst: IPPrefix("\(lab.address(of: "proxy"))/32"),
                                                                         dport: [PortRange(lower: proxyPort, upper: proxyPort)]), chain: [])
        let toServer = Policy(name: "to-server", match: SessionPredicate(dst: IPPrefix("\(lab.address(of: "server1"))/32"),
                                                                         dport: [PortRange(lower: MigrationLab.pacedPort, upper: MigrationLab.pacedPort)]),
                              chain: [])
        for (host, policy) in [("client1", toProxy), ("proxy", toServer)] {
            try encoder.encode(AgentConfig(policies: [policy])).write(to: URL(fileURLWithPath: LabPaths.agentConfig(lab.name, host: host)))
            let out = try Command.run([try TestSupport.dyscoBinary(), "policy", "reload", "--netns", lab.namespace(of: host), "--json"])
            #expect(out.stdout.contains(policy.name), "\(host) took the policy: \(out.stdout)")
        }
    }

    static func counters(_ lab: Lab, _ host: String) throws -> [String: UInt64] {
        try lab.kernelCounters(host, ["TcpRetransSegs", "TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData",
                                      "TcpExtTCPAbortOnClose", "TcpExtPAWSEstab", "TcpExtTCPACKSkippedPAWS", "TcpExtTCPLossProbes",
                                      "TcpExtTCPTimeouts", "TcpExtTCPFastRetrans", "TcpExtTCPSlowStartRetrans", "TcpExtTCPSACKReorder",
                                      "TcpExtTCPOFOQueue", "TcpExtTCPDSACKRecv", "TcpExtTCPSpuriousRTOs", "TcpExtTCPLostRetransmit"])
    }

    @Test("(d) HAProxy removed from 50 paced downloads after their splice: byte-exact, no reset, the proxy's sockets closed with FINs; no PAWS drop, no retransmission, each release after the proxy emptied (lab px1, 10.78.150.0/24)")
    func haproxyRemoved() async throws {
        let sessions = 50
        try await TestSupport.withLab(MigrationLab.spec("px1", subnet: "10.78.150.0/24", middleboxes: ["proxy"],
                                                        firewallProfiles: ["proxy": .open])) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            try Self.configurePolicies(lab)
            let proxy = lab.address(of: "proxy"), server = lab.address(of: "server1")
            let config = "\(lab.directory)/haproxy.cfg"
            try Self.haproxyConfig(proxy: proxy, server: server, log: "").write(toFile: config, atomically: true, encoding: .utf8)
            let spliceLog = "\(lab.directory)/splice.log"
            let library = try TestSupport.spliceLibrary()
            let haproxy = try lab.spawn("proxy", ["env", "LD_PRELOAD=\(library)",
                                                  "DYSCO_CONTROL_SOCKET=\(AgentControlPaths.socketPath(netns: lab.namespace(of: "proxy")))",
                                                  "DYSCO_SPLICE_LOG=\(spliceLog)", "haproxy", "-f", config, "-db"],
                                        logPath: "\(lab.directory)/haproxy.log")
            defer { haproxy.terminate() }
            let listening = try await TestSupport.eventually(timeout: 10) {
                (try? lab.exec("proxy", ["ss", "-ltn", "sport = :\(Self.proxyPort)"]).stdout.contains("LISTEN")) ?? false
            }
            try #require(listening, "haproxy: \((try? String(contentsOfFile: "\(lab.directory)/haproxy.log", encoding: .utf8)) ?? "")")
            let before = try ["client1", "server1", "proxy"].map { try Self.counters(lab, $0) }

            var args = ["curl", "-sS", "--fail", "-m", "120", "--parallel", "--parallel-immediate", "--parallel-max", "\(sessions)"]
            var outputs: [String] = []
            for i in 0..<sessions {
                outputs.append("\(lab.directory)/px\(i).out")
                args += ["-o", outputs[i], "http://\(proxy):\(Self.proxyPort)/blob"]
            }
            let curl = try lab.spawn("client1", args, logPath: "\(lab.directory)/curl.log")

            // Every download's sockets are spliced, joined and the proxy removed: the client's sessions then go
            // straight to the server, with the proxy's sequence and timestamp deltas.
            func logged() -> String { (try? String(contentsOfFile: spliceLog, encoding: .utf8)) ?? "" }
            let moved = try await TestSupport.eventually(timeout: 60) {
                let client = try await Self.downloads(lab, "client1")
                return client.count == sessions && client.allSatisfy { $0.right?.dstAddr == server && $0.rightDelta != nil }
                    && client.allSatisfy { $0.session.dstPort == Self.proxyPort }
            }
            let atClient = try await Self.downloads(lab, "client1")
            #expect(moved, "client → server directly: \(atClient.map { "\($0.right.map { "\($0)" } ?? "-") Δ\($0.rightDelta ?? 0)" }); splice log: \(logged().suffix(2000))")
            let joined = logged().split(separator: "\n").filter { $0.contains("\"removal\":\"started\"") }.count
            #expect(joined == sessions, "every pair reported and joined once: \(joined); \(logged().suffix(1500))")
            let atProxy = try await TestSupport.eventually(timeout: 30) { try await Self.downloads(lab, "proxy").isEmpty }
            let left = try await Self.downloads(lab, "proxy").count
            #expect(atProxy, "the proxy's agent still carries \(left) sessions")

            // Diagnostics only: a download that stops growing for 5 s while curl runs gets the hosts' sockets, the
            // agents' records and logs written out, once, while the stall is live.
            let expected = 8 << 20
            var lastSizes: [Int] = [], lastChange = Date(), reported = false
            while curl.isRunning {
                let sizes = outputs.map { (try? FileManager.default.attributesOfItem(atPath: $0)[.size] as? Int) ?? 0 }
                if sizes != lastSizes { lastSizes = sizes; lastChange = Date() }
                if !reported, Date().timeIntervalSince(lastChange) > 5, sizes.contains(where: { $0 < expected }) {
                    reported = true
                    let stalled = sizes.enumerated().filter { $0.element < expected }.map { "px\($0.offset): \($0.element) bytes" }
                    Self.record("stalled downloads: \(stalled)\n\(Self.stallReport(lab))")
                }
                try await Task.sleep(for: .milliseconds(500))
            }
            curl.waitUntilExit()
            #expect(curl.terminationStatus == 0, "curl: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            let original = try Data(contentsOf: URL(fileURLWithPath: "\(lab.httpRoot)/blob"))
            let intact = try outputs.filter { try Data(contentsOf: URL(fileURLWithPath: $0)) == original }.count
            #expect(intact == sessions, "\(intact) of \(sessions) downloads byte-exact")

            // The proxy's sockets: closed by the agent's FINs (HAProxy ends both connections normally), none left.
            let closed = try await TestSupport.eventually(timeout: 15) {
                let out = try lab.exec("proxy", ["ss", "-Htn", "state", "connected", "( sport = :\(Self.proxyPort) or dport = :\(MigrationLab.pacedPort) )"]).stdout
                return out.split(separator: "\n").allSatisfy { $0.hasPrefix("TIME-WAIT") }
            }
            #expect(closed, "proxy sockets: \((try? lab.exec("proxy", ["ss", "-tan"]).stdout) ?? "")")
            let after = try ["client1", "server1", "proxy"].map { try Self.counters(lab, $0) }
            for (i, host) in ["client1", "server1", "proxy"].enumerated() {
                let delta = after[i].merging(before[i]) { $0 - $1 }
                Self.record("\(host): \(delta.sorted { $0.key < $1.key })")
                for name in ["TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose"] {
                    #expect((delta[name] ?? 0) == 0, "\(host) \(name) \(delta[name] ?? 0)")
                }
                // No segment behind its timestamp at an endpoint (RFC 7323 PAWS) and no retransmission the removal
                // caused: the proxy emptied before the release (its `drained`), so nothing it acknowledged is lost.
                // Tail-loss probes are not counted (the other reconfiguration tests record them too).
                let retransmitted = Int64(delta["TcpRetransSegs"] ?? 0) - Int64(delta["TcpExtTCPLossProbes"] ?? 0)
                Self.record("\(host): PAWS drops \(delta["TcpExtPAWSEstab"] ?? 0), retransmissions besides tail-loss probes \(max(0, retransmitted))")
                #expect((delta["TcpExtPAWSEstab"] ?? 0) == 0, "\(host): segments dropped by PAWS")
                #expect(retransmitted <= 0, "\(host): \(retransmitted) retransmissions besides tail-loss probes")
            }
            // Every removal's release waited for the proxy to empty (its answer to the left anchor's drainStart).
            let proxyAgentLog = (try? String(contentsOfFile: LabPaths.agentLog(lab.name, host: "proxy"), encoding: .utf8)) ?? ""
            let drains = proxyAgentLog.components(separatedBy: "proxy empty: drained").count - 1
            Self.record("proxy drains answered: \(drains)")
            #expect(drains >= sessions, "the proxy answered \(drains) drains for \(sessions) removals")
            let haproxyLog = (try? String(contentsOfFile: "\(lab.directory)/haproxy.log", encoding: .utf8)) ?? ""
            #expect(!haproxyLog.contains(" SD ") && !haproxyLog.contains(" CD "), "haproxy saw aborted connections: \(haproxyLog.suffix(1500))")
        }
    }

    /// The downloads' sessions an agent carries (not closing): the client's to the proxy; at the proxy also its own to
    /// the server.
    static func downloads(_ lab: Lab, _ host: String) async throws -> [AgentSnapshot.Session] {
        let proxy = lab.address(of: "proxy")
        return try await ControlClient.snapshot(path: AgentControlPaths.socketPath(netns: lab.namespace(of: host))).sessions.filter {
            ($0.session.dstAddr == proxy && $0.session.dstPort == proxyPort)
                || ($0.session.srcAddr == proxy && $0.session.dstPort == MigrationLab.pacedPort)
        }.filter { $0.state != "closing" }
    }

    /// The hosts' download sockets (with TCP info), the agents' records of them and the tails of the agents' logs.
    static func stallReport(_ lab: Lab) -> String {
        var report = ""
        for host in ["client1", "proxy", "server1"] {
            let sockets = (try? lab.exec(host, ["ss", "-tnio", "state", "connected"], check: false).stdout) ?? ""
            let sessions = (try? Command.run([try TestSupport.dyscoBinary(), "sessions", "--netns", lab.namespace(of: host), "--json"],
                                            check: false).stdout) ?? ""
            let log = (try? String(contentsOfFile: LabPaths.agentLog(lab.name, host: host), encoding: .utf8)) ?? ""
            report += "== \(host) sockets\n\(sockets)\n== \(host) sessions\n\(sessions)\n== \(host) agent log (tail)\n"
            report += log.split(separator: "\n").suffix(60).joined(separator: "\n") + "\n"
        }
        return report
    }

    static func record(_ line: String) {
        FileHandle.standardError.write(Data("px1: \(line)\n".utf8))
    }
}
