import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Issue 20 on real namespaces, NFQUEUE, iptables firewalls and TCP: (a) sessions moved between the same two
/// boxes back and forth, back to back (a box takes again a session it left), stateful through strict firewalls
/// and stateless through open ones; (b) a full migration's control traffic, captured on the lab segment and sent
/// again by an off-path host (`attacker1`, no agent, no key) with the recorded addresses after the session moved
/// back: every datagram is dropped as `replayed`, nothing else happens, and a real replace still works. Each test
/// has its own lab (`rtN`, 10.79.9N.0/24) and removes it, also on failure.
@Suite(.serialized) struct RoundTripReplayTests {
    static let agentHosts = ["client1", "server1", "fw1", "fw2"]

    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[round-trip-replay] \(line)\n".utf8))
    }

    static func describe(_ report: ReplaceReport) -> String {
        "\(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.result) \($0.failedStep): \($0.reason)" })"
    }

    /// Waits until `host` carries exactly `count` established paced sessions (and returns true), or `timeout`.
    static func waitForCarried(_ lab: Lab, _ host: String, count: Int, timeout: TimeInterval = 10) async throws -> Bool {
        try await TestSupport.eventually(timeout: timeout) {
            try await MigrationLab.pacedSessions(lab, host).count == count
        }
    }

    // MARK: - (a) back and forth

    func backAndForth(name: String, subnet: String, sessions: Int, stateless: Bool,
                      profiles: [String: FirewallProfile]) async throws {
        try await TestSupport.withLab(MigrationLab.spec(name, subnet: subnet, firewallProfiles: profiles)) { lab in
            // 10 MiB at 1 MiB/s: every download is mid-transfer during all four moves (they take about 2 s).
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 10)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            let invalidBefore = try ["fw1", "fw2"].map { try TestSupport.invalidDrops(lab, $0) }

            var times: [String] = []
            // Back to back: each replace starts as soon as the previous one has reported.
            for (old, new) in [("fw1", "fw2"), ("fw2", "fw1"), ("fw1", "fw2"), ("fw2", "fw1")] {
                let run = try MigrationLab.replace(lab, old: old, new: new, extra: stateless ? ["--stateless"] : [])
                let report = try #require(run.report, "\(old) → \(new): no report: \(run.stdout) \(run.stderr)")
                #expect(run.status == 0 && report.matched == sessions && report.sessions.count == sessions && report.allMoved,
                        "\(old) → \(new): matched \(report.matched), status \(run.status): \(Self.describe(report))")
                times.append("\(old)→\(new) \(report.elapsedMicroseconds / 1000) ms")
                guard report.allMoved, report.matched == sessions else { break }
            }
            Self.record("\(name) moves: \(times)")

            // fw1 carries them all again, fw2 none; no anchor is left mid-way.
            #expect(try await Self.waitForCarried(lab, "fw1", count: sessions), "fw1 does not carry the \(sessions) sessions")
            #expect(try await Self.waitForCarried(lab, "fw2", count: 0), "fw2 still carries sessions")
            for host in ["client1", "server1"] {
                let busy = try await TestSupport.snapshot(lab, host).sessions.filter { $0.migration != nil }
                #expect(busy.isEmpty, "\(host) mid-migration: \(busy.map { "\($0.session) \($0.migration ?? "")" })")
            }
            #expect(downloads.wait(diagnose: lab), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty, "a download differs")
            let invalidAfter = try ["fw1", "fw2"].map { try TestSupport.invalidDrops(lab, $0) }
            #expect(invalidAfter == invalidBefore, "INVALID drops at fw1, fw2: \(invalidBefore) → \(invalidAfter)")
            if !stateless {
                for mb in ["fw1", "fw2"] {
                    #expect(try lab.firewallCounters(mb).policyDropped.packets == 0, "\(mb) dropped packets by policy")
                }
            }
            // No agent refused one of its peers' messages as a replay.
            for host in Self.agentHosts {
                let control = try await TestSupport.snapshot(lab, host).control
                #expect(control["dropped.replayed", default: 0] == 0, "\(host) dropped genuine messages as replayed: \(control)")
            }
        }
    }

    @Test("(a) 10 live sessions fw1 → fw2 → fw1 → fw2 → fw1 (strict firewalls, stateful), back to back: each move moved, byte-exact, no INVALID")
    func backAndForthStateful() async throws {
        try await backAndForth(name: "rt1", subnet: "10.79.91.0/24", sessions: 10, stateless: false, profiles: [:])
    }

    @Test("(a') the same --stateless between two open (stateless) boxes")
    func backAndForthStateless() async throws {
        try await backAndForth(name: "rt2", subnet: "10.79.92.0/24", sessions: 6, stateless: true,
                               profiles: ["fw1": .open, "fw2": .open])
    }

    // MARK: - (b) replay

    /// Records every UDP datagram to port 7411 that enters the lab's switch (one line per datagram: source,
    /// destination, payload in hex; IPv4 fragments reassembled), except the attacker's. An AF_PACKET socket in
    /// NAME-sw sees each frame on the port it enters by (not the copy the bridge sends out on another port).
    final class ControlCapture {
        let out: String
        let process: Process

        init(_ lab: Lab) throws {
            out = "\(lab.directory)/control-capture.txt"
            for suffix in ["", ".ready", ".stop"] { try? FileManager.default.removeItem(atPath: out + suffix) }
            let script = """
                import os, socket, struct, sys, time
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL: taps see bridge ports
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                s.settimeout(0.05)
                out, skip = sys.argv[1], sys.argv[2]
                datagrams, fragments = [], {}
                def take(p, ifname, pkttype):
                    if ifname == "br0" or ifname == skip or pkttype == socket.PACKET_OUTGOING: return
                    ip = p[14:] if len(p) > 14 and p[12:14] == b"\\x08\\x00" else None
                    if ip is None or len(ip) < 20 or ip[9] != 17: return
                    ihl, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0]
                    ip = ip[:total]
                    ident, frag = struct.unpack("!HH", ip[4:8])
                    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
                    more, offset = frag & 0x2000, (frag & 0x1FFF) * 8
                    if more or offset:
                        parts = fragments.setdefault((src, dst, ident), {})
                        parts[offset] = (ip[ihl:], bool(more))
                        data, at = b"", 0
                        while at in parts:
                            chunk, mf = parts[at]
                            data += chunk; at += len(chunk)
                            if not mf:
                                del fragments[(src, dst, ident)]
                                udp(src, dst, data)
                                return
                        return
                    udp(src, dst, ip[ihl:])
                def udp(src, dst, u):
                    sport, dport = struct.unpack("!HH", u[:4])
                    if dport == 7411: datagrams.append("%s %s %s" % (src, dst, u[8:].hex()))
                open(out + ".ready", "w").close()
                end, check = time.time() + 120, 0.0
                while time.time() < end:
                    try:
                        p, addr = s.recvfrom(70000)
                        take(p, addr[0], addr[2])
                    except socket.timeout:
                        pass
                    if time.time() >= check:
                        check = time.time() + 0.02
                        if os.path.exists(out + ".stop"):
                            # Everything sent before the stop is queued on the socket already: drain it, then stop.
                            s.setblocking(False)
                            try:
                                while True:
                                    p, addr = s.recvfrom(70000)
                                    take(p, addr[0], addr[2])
                            except BlockingIOError:
                                break
                open(out + ".tmp", "w").write("\\n".join(datagrams))
                os.rename(out + ".tmp", out)
                """
            process = try Command.spawn([TestSupport.scapyPython, "-c", script, out, "attacker1"],
                                        netns: "\(lab.name)-sw", logPath: "\(lab.directory)/control-capture.log")
            let deadline = Date().addingTimeInterval(10)
            while !FileManager.default.fileExists(atPath: out + ".ready"), Date() < deadline, process.isRunning { usleep(20_000) }
            guard FileManager.default.fileExists(atPath: out + ".ready") else {
                process.terminate()
                throw LabError.setupFailed("the control capture did not start: \((try? String(contentsOfFile: "\(lab.directory)/control-capture.log", encoding: .utf8)) ?? "")")
            }
        }

        /// Stops the capture and returns the datagrams: (source, destination, payload).
        func stop() throws -> [(src: String, dst: String, payload: [UInt8])] {
            _ = FileManager.default.createFile(atPath: out + ".stop", contents: nil)
            process.waitUntilExit()
            let text = try String(contentsOfFile: out, encoding: .utf8)
            return text.split(separator: "\n").compactMap { line in
                let f = line.split(separator: " ")
                guard f.count == 3 else { return nil }
                var bytes: [UInt8] = []
                var hex = f[2].makeIterator()
                while let h = hex.next(), let l = hex.next(), let b = UInt8(String([h, l]), radix: 16) { bytes.append(b) }
                return (String(f[0]), String(f[1]), bytes)
            }
        }

        deinit { if process.isRunning { process.terminate() } }
    }

    @Test("(b) a full migration's control traffic, replayed from an off-path host after the session moved back: every datagram dropped as replayed, no lock, a real replace still moves")
    func replayedMigration() async throws {
        try await TestSupport.withLab(MigrationLab.spec("rt3", subnet: "10.79.93.0/24", attackers: 1)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 12)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1)
            let sessions = 2
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            // 1. fw1 → fw2, captured on the segment.
            let capture = try ControlCapture(lab)
            let first = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let recorded = try capture.stop()
            let firstReport = try #require(first.report, "\(first.stdout) \(first.stderr)")
            #expect(first.status == 0 && firstReport.allMoved && firstReport.matched == sessions, "\(Self.describe(firstReport))")

            // What the capture holds: datagrams per destination and the messages (frames) in them, by type.
            var framesTo: [String: Int] = [:], types: [String: Int] = [:]
            for d in recorded {
                let frames = d.payload.withUnsafeBytes { ControlMessage.frames(in: $0) }
                framesTo[d.dst, default: 0] += frames.count
                for f in frames where f.count > 5 {
                    let t = ControlMessageType(rawValue: d.payload[f.lowerBound + 5]).map { "\($0)" } ?? "?"
                    types[t, default: 0] += 1
                }
            }
            Self.record("captured \(recorded.count) datagrams, messages by destination \(framesTo), by type \(types)")
            for t in ["trigger", "requestLock", "ackLock", "newPathSyn", "newPathSynAck", "drainStart", "drained",
                      "stateRequest", "statePut", "stateInstalled", "oldPathFin", "oldPathFinAck", "triggerResult"] {
                #expect(types[t, default: 0] > 0, "the capture has no \(t): \(types)")
            }

            // 2. Back to fw1: the recorded trigger (fw1 → fw2) is a valid request for the session again.
            let onFw2 = try await Self.waitForCarried(lab, "fw2", count: sessions)
            let fw2Rows = try await TestSupport.snapshot(lab, "fw2").sessions.map { "\($0.session) \($0.state) \($0.migration ?? "-")" }
            #expect(onFw2, "fw2: \(fw2Rows)")
            let second = try MigrationLab.replace(lab, old: "fw2", new: "fw1")
            let secondReport = try #require(second.report, "\(second.stdout) \(second.stderr)")
            #expect(second.status == 0 && secondReport.allMoved && secondReport.matched == sessions, "\(second.stdout)")
            #expect(try await Self.waitForCarried(lab, "fw1", count: sessions))

            // 3. The attacker sends every recorded datagram again, in order, with the recorded addresses.
            var before: [String: [String: UInt64]] = [:]
            for host in Self.agentHosts { before[host] = try await TestSupport.snapshot(lab, host).control }
            let hostOf = Dictionary(uniqueKeysWithValues: Self.agentHosts.map { (lab.address(of: $0).description, $0) })
            var script = "datagrams = [\n"
            for d in recorded { script += "    (\"\(d.src)\", \"\(d.dst)\", bytes.fromhex(\"\(d.payload.map { String(format: "%02x", $0) }.joined())\")),\n" }
            script += """
                ]
                for src, dst, payload in datagrams:
                    p = IP(src=src, dst=dst) / UDP(sport=7411, dport=7411) / Raw(payload)
                    send(fragment(p, fragsize=1400) if len(p) > 1400 else p)
                    time.sleep(0.002)
                print(len(datagrams))
                """
            _ = try TestSupport.scapy(lab, on: "attacker1", "import time\n" + script)

            // Every replayed message is counted as replayed where it arrives, and nothing else moves anywhere.
            var seen: [String: [String: Int64]] = [:]
            let expected = Dictionary(uniqueKeysWithValues: framesTo.compactMap { dst, n in
                hostOf[dst].map { ($0, ["dropped.replayed": Int64(n)]) } })
            let exact = try await TestSupport.eventually(timeout: 10) {
                for host in Self.agentHosts {
                    seen[host] = ControlHostilityTests.delta(before[host]!, try await TestSupport.snapshot(lab, host).control)
                }
                return Self.agentHosts.allSatisfy { seen[$0, default: [:]] == expected[$0, default: [:]] }
            }
            #expect(exact, "control counters moved by \(seen), expected \(expected)")
            #expect(seen["client1"]?["received.trigger"] == nil && seen["client1"]?["sent.requestLock"] == nil,
                    "client1 acted on a replayed trigger: \(seen["client1"] ?? [:])")
            for host in ["client1", "fw1", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.sessions.allSatisfy { $0.migration == nil && $0.paths == nil },
                        "\(host): a lock or migration after the replay: \(snapshot.sessions.filter { $0.migration != nil }.map { "\($0.session) \($0.migration ?? "")" })")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions)

            // 4. A legitimate replace right after still moves every session, and no agent drops its messages.
            let third = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let thirdReport = try #require(third.report, "\(third.stdout) \(third.stderr)")
            #expect(third.status == 0 && thirdReport.allMoved && thirdReport.matched == sessions, "\(Self.describe(thirdReport))")
            #expect(try await Self.waitForCarried(lab, "fw2", count: sessions))
            for host in Self.agentHosts {
                let d = ControlHostilityTests.delta(before[host]!, try await TestSupport.snapshot(lab, host).control)
                #expect(d["dropped.replayed", default: 0] == Int64(expected[host]?["dropped.replayed"] ?? 0),
                        "\(host) dropped the real replace's messages as replayed: \(d)")
            }

            #expect(downloads.wait(diagnose: lab), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty, "a download differs")
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0 && TestSupport.invalidDrops(lab, "fw2") == 0, "INVALID drops")
            Self.record("replayed \(recorded.count) datagrams: \(expected)")
        }
    }
}
