import DyscoBPF
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// The BPF datapath's ring-buffer consumer (needs root): a kernel-carried session's FIN and RST stay in the kernel
/// (tc rewrites them at both hooks and reports them through `dysco_events`) and the agents' tables still learn of
/// them. Labs `fpeN`, subnets 10.78.8N.0/24, bpffs at `/run/dysco-fpeN-pins`; each checks the agents' counters:
/// no FIN/RST of the sessions came through NFQUEUE (`queuedTeardown`), the kernel reported them
/// (`kernelEvents`), none lost.
@Suite struct BPFEventTests {
    static let hosts = ["client1", "fw1", "server1"]

    func entries(_ lab: Lab, _ host: String, _ datapath: FastPathIntegrationTests.Datapath) throws -> [(BPFSessionKey, BPFSessionEntry)] {
        try BPFDatapath.pinnedEntries(mapPath: "\(datapath.pins)/dysco-\(lab.namespace(of: host))-q7/dysco_sessions")
    }

    /// Every host's agent: the kernel carried a session, reported its close, and no FIN/RST reached the queue.
    func expectNoQueuedTeardown(_ lab: Lab, minimumEvents: [String: UInt64]) async throws {
        for host in Self.hosts {
            let c = try await TestSupport.snapshot(lab, host).counters
            FileHandle.standardError.write(Data("[bpf-events] \(host): installs \(c.fastPathInstalls), events \(c.kernelEvents) (stale \(c.kernelEventsStale), lost \(c.kernelEventsLost)), queued FIN/RST \(c.queuedTeardown)\n".utf8))
            #expect(c.fastPathInstalls >= 1, "\(host): the kernel carried the session")
            #expect(c.queuedTeardown == 0, "\(host): \(c.queuedTeardown) FIN/RST of the sessions came through NFQUEUE")
            #expect(c.kernelEvents >= minimumEvents[host, default: 1], "\(host): \(c.kernelEvents) events")
            #expect(c.kernelEventsLost == 0)
        }
    }

    @Test("a kernel-carried session closed with FINs leaves every agent's table; its FINs never reach NFQUEUE")
    func finCloses() async throws {
        let datapath = FastPathIntegrationTests.Datapath(lab: "fpe1", subnet: "10.78.81.0/24")
        try await datapath.withPins {
        try await TestSupport.withLab(LabSpec(name: datapath.lab, middleboxes: ["fw1"], subnet: datapath.subnet,
                                              agentArguments: ["--close-linger", "0.5", "--fastpath-after", "0"]
                                                  + datapath.arguments)) { lab in
            let source = "\(lab.httpRoot)/blob"
            try TestSupport.makeRandomFile(source, megabytes: 16)
            let target = "\(lab.directory)/blob.fin"
            try lab.exec("client1", ["curl", "-sS", "--fail", "-m", "60", "-o", target, "http://\(lab.address(of: "server1"))/blob"])
            #expect(try TestSupport.sha256(target) == TestSupport.sha256(source))
            // Both FINs were reported at each end's two translations and at fw1's four: closed, off the kernel,
            // gone after the 0.5 s linger (expiry runs every second).
            let gone = try await TestSupport.eventually(timeout: 15) {
                for host in Self.hosts {
                    if !(try await TestSupport.snapshot(lab, host).sessions.isEmpty) { return false }
                    if !(try entries(lab, host, datapath).isEmpty) { return false }
                }
                return true
            }
            for host in Self.hosts where !gone {
                let s = try await TestSupport.snapshot(lab, host).sessions
                Issue.record("\(host): \(s.map { "\($0.carrier) \($0.state)" }), \(try entries(lab, host, datapath).count) map entries")
            }
            try await expectNoQueuedTeardown(lab, minimumEvents: ["client1": 2, "fw1": 4, "server1": 2])
        }
        }
    }

    @Test("a kernel-carried session reset by the client leaves every agent's table (confirmed leaving the client and fw1; at the server by the probe of its socket) and every kernel; its RST never reaches NFQUEUE")
    func resetRemoves() async throws {
        let datapath = FastPathIntegrationTests.Datapath(lab: "fpe2", subnet: "10.78.82.0/24")
        try await datapath.withPins {
        try await TestSupport.withLab(LabSpec(name: datapath.lab, middleboxes: ["fw1"], subnet: datapath.subnet,
                                              agentArguments: ["--fastpath-after", "0"] + datapath.arguments)) { lab in
            let source = "\(lab.httpRoot)/blob"
            try TestSupport.makeRandomFile(source, megabytes: 16)
            let prefix = 4 << 20
            let out = "\(lab.directory)/reset"
            // Reads 4 MiB of the blob, waits for the test's go, then closes with SO_LINGER 0: an RST from the client.
            let script = """
                import hashlib, os, socket, struct, sys, time
                host, out, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
                s = socket.create_connection((host, 80), timeout=20)
                s.sendall(b"GET /blob HTTP/1.0\\r\\nHost: lab\\r\\n\\r\\n")
                buf = b""
                while b"\\r\\n\\r\\n" not in buf: buf += s.recv(65536)
                body = buf.split(b"\\r\\n\\r\\n", 1)[1]
                while len(body) < want:
                    chunk = s.recv(65536)
                    if not chunk: break
                    body += chunk
                open(out + ".sha", "w").write(hashlib.sha256(body[:want]).hexdigest())
                end = time.time() + 60
                while not os.path.exists(out + ".go") and time.time() < end: time.sleep(0.02)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                open(out, "w").write("reset")
                """
            let client = try lab.spawn("client1", ["python3", "-c", script, lab.address(of: "server1").description, out, "\(prefix)"])
            defer { if client.isRunning { client.terminate() } }
            let read = try await TestSupport.eventually(timeout: 30) { FileManager.default.fileExists(atPath: out + ".sha") }
            try #require(read, "the client did not read \(prefix) bytes")
            let expected = try Command.run(["sh", "-c", "head -c \(prefix) \(source) | sha256sum"]).stdout.split(separator: " ").first
            #expect(try String(contentsOfFile: out + ".sha", encoding: .utf8) == expected.map(String.init))
            // Every agent's kernel carries the session before the reset.
            let carried = try await TestSupport.eventually(timeout: 15) {
                for host in Self.hosts {
                    let sessions = try await TestSupport.snapshot(lab, host).sessions
                    if sessions.count != 1 || sessions[0].carrier != .kernel { return false }
                }
                return true
            }
            try #require(carried, "the kernels did not take the session")
            _ = FileManager.default.createFile(atPath: out + ".go", contents: nil)
            let closed = try await TestSupport.eventually(timeout: 30) { !client.isRunning }
            #expect(closed && (try? String(contentsOfFile: out, encoding: .utf8)) == "reset")
            // The client's RST left the client (egress: confirmed) and fw1 (its egress report confirms it): both
            // agents forget the session after the 1 s reset linger. The server's agent saw it arrive only
            // (ingress: provisional, RFC 5961), but the server's stack took it: the agent's probe finds the socket
            // gone and confirms it (issue 19 item 4.4), so the server forgets the session too.
            let gone = try await TestSupport.eventually(timeout: 15) {
                for host in Self.hosts where !(try await TestSupport.snapshot(lab, host).sessions.isEmpty) { return false }
                for host in Self.hosts where !(try entries(lab, host, datapath).isEmpty) { return false }
                let server = try await TestSupport.snapshot(lab, "server1").counters
                return server.resetsProvisional >= 1 && server.resetsConfirmedByProbe >= 1
            }
            for host in Self.hosts where !gone {
                let s = try await TestSupport.snapshot(lab, host)
                Issue.record("\(host): \(s.sessions.map { "\($0.carrier) \($0.state)" }), \(try entries(lab, host, datapath).count) map entries, resets confirmed \(s.counters.resetsConfirmed) provisional \(s.counters.resetsProvisional)")
            }
            #expect(try await TestSupport.snapshot(lab, "client1").counters.resetsConfirmed >= 1)
            #expect(try await TestSupport.snapshot(lab, "fw1").counters.resetsConfirmed >= 1)
            try await expectNoQueuedTeardown(lab, minimumEvents: ["client1": 1, "fw1": 2, "server1": 1])
        }
        }
    }

    @Test("a full ring loses fw1's events while its agent is stopped: counted, and the sessions' FINs recovered from the map's flags")
    func lostEventsRecovered() async throws {
        let datapath = FastPathIntegrationTests.Datapath(lab: "fpe3", subnet: "10.78.83.0/24")
        // A one-page ring: 56 events of 64 bytes (+ 8 header); 40 sessions closing at fw1 report 160.
        try await datapath.withPins {
        try await TestSupport.withLab(LabSpec(name: datapath.lab, middleboxes: ["fw1"], subnet: datapath.subnet,
                                              agentArguments: ["--close-linger", "0.5", "--fastpath-after", "0",
                                                               "--bpf-ring-bytes", "4096"] + datapath.arguments)) { lab in
            let sessions = 40
            let out = "\(lab.directory)/lost"
            let script = """
                import os, socket, sys, time
                socks = [socket.create_connection((sys.argv[1], 80), timeout=10) for _ in range(int(sys.argv[3]))]
                open(sys.argv[2] + ".ready", "w").close()
                end = time.time() + 60
                while not os.path.exists(sys.argv[2] + ".close") and time.time() < end: time.sleep(0.02)
                for s in socks: s.close()
                open(sys.argv[2], "w").write(str(len(socks)))
                """
            let client = try lab.spawn("client1", ["python3", "-c", script, lab.address(of: "server1").description, out, "\(sessions)"])
            defer { if client.isRunning { client.terminate() } }
            let carried = try await TestSupport.eventually(timeout: 30) {
                guard FileManager.default.fileExists(atPath: out + ".ready") else { return false }
                let fw1 = try await TestSupport.snapshot(lab, "fw1").sessions
                return fw1.count == sessions && fw1.allSatisfy { $0.carrier == .kernel }
            }
            try #require(carried, "fw1's kernel did not take the \(sessions) sessions")
            let agent = try #require(lab.agentRecord("fw1")).pid
            // fw1's agent stops reading; the sessions close through its kernel (its entries stay).
            kill(agent, SIGSTOP)
            var stopped = true
            defer { if stopped { kill(agent, SIGCONT) } }
            _ = FileManager.default.createFile(atPath: out + ".close", contents: nil)
            // Both ends' agents saw both FINs (their maps are empty): every FIN has passed fw1's programs.
            let passed = try await TestSupport.eventually(timeout: 30) {
                try ["client1", "server1"].allSatisfy { try entries(lab, $0, datapath).isEmpty }
            }
            #expect(passed && (try? String(contentsOfFile: out, encoding: .utf8)) == "\(sessions)")
            #expect(try entries(lab, "fw1", datapath).count == 4 * sessions, "fw1's entries wait for its agent")
            kill(agent, SIGCONT)
            stopped = false
            let recovered = try await TestSupport.eventually(timeout: 20) {
                let fw1 = try await TestSupport.snapshot(lab, "fw1")
                let empty = try entries(lab, "fw1", datapath).isEmpty
                return fw1.sessions.isEmpty && fw1.counters.kernelEventsLost > 0 && empty
            }
            let fw1 = try await TestSupport.snapshot(lab, "fw1")
            let c = fw1.counters
            FileHandle.standardError.write(Data("[bpf-events] fw1 after the stop: events \(c.kernelEvents) (stale \(c.kernelEventsStale), lost \(c.kernelEventsLost)), queued FIN/RST \(c.queuedTeardown), sessions \(fw1.sessions.count)\n".utf8))
            let left = try entries(lab, "fw1", datapath).count
            #expect(recovered, "fw1: \(fw1.sessions.map { "\($0.carrier) \($0.state)" }), lost \(c.kernelEventsLost), \(left) entries")
            #expect(c.queuedTeardown == 0, "the lost FINs were recovered from the map, not from NFQUEUE")
        }
        }
    }
}
