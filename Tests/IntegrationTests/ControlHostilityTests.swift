import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// The control channel (UDP 7411, docs/CONTROL-PROTOCOL.md) under a hostile network: (d) random loss of control
/// packets in both directions on every agent's host, (f) forged control messages and forged Dysco SYNs from an
/// off-path host (`attacker1`, no agent) while paced sessions run. Each test has its own lab (`chN`,
/// 10.78.7N.0/24) and removes it, also on failure. Needs root, iptables (statistic match) and python3-scapy.
@Suite(.serialized) struct ControlHostilityTests {
    /// The agents' hosts of a two-middlebox lab (the attacker has no agent).
    static let agentHosts = ["client1", "server1", "fw1", "fw2"]

    // MARK: - Helpers

    /// `after − before` of two control-counter maps, only the entries that changed.
    static func delta(_ before: [String: UInt64], _ after: [String: UInt64]) -> [String: Int64] {
        var out: [String: Int64] = [:]
        for key in Set(before.keys).union(after.keys) {
            let d = Int64(after[key, default: 0]) - Int64(before[key, default: 0])
            if d != 0 { out[key] = d }
        }
        return out
    }

    /// Packets the `statistic` DROP rule on UDP 7411 of `chain` in `host` matched (nil: no such rule).
    static func lossRulePackets(_ lab: Lab, _ host: String, chain: String) throws -> UInt64? {
        let out = try lab.exec(host, ["iptables", "-w", "-t", "filter", "-L", chain, "-v", "-n", "-x"]).stdout
        for line in out.split(separator: "\n") where line.contains("statistic") && line.contains("7411") {
            if let packets = line.split(separator: " ").first.flatMap({ UInt64($0) }) { return packets }
        }
        return nil
    }

    /// The paced session of `host`'s snapshot with this tuple (any state).
    static func session(_ snapshot: AgentSnapshot, _ tuple: FiveTuple) -> AgentSnapshot.Session? {
        snapshot.sessions.first { $0.session == tuple }
    }

    /// Python: an encoder of control messages built byte by byte from docs/CONTROL-PROTOCOL.md (not from our
    /// Swift codec), and `hostile(...)`, which returns the hostile datagrams for one target and how many of each
    /// drop reason they must cause there.
    static func controlForger(keyPath: String) -> String {
        """
        import hashlib, hmac, json, os, random, socket, struct, time
        LAB_KEY = bytes.fromhex(open("\(keyPath)").read().strip())
        OTHER_KEY = hashlib.sha256(b"not the lab key").digest()
        def a(x): return socket.inet_aton(x)
        # Version 4 (issue 17; the header as in versions 2 and 3, issue 20): a freshness stamp after the anchors — sender
        # id, receiver, counter, sentAt (µs).
        SENDER = random.getrandbits(63) + 1
        COUNTER = [0]
        RECEIVER = ["0.0.0.0"]
        def msg(mtype, chain, nonce, session, anchors, body=b"", key=None, version=4, magic=b"DYCM", request=0x0BADCAFE):
            src, dst, sport, dport = session
            COUNTER[0] += 1
            header = (magic + struct.pack(">BBH", version, mtype, len(body)) + struct.pack(">QQI", chain, nonce, request)
                      + a(src) + a(dst) + struct.pack(">HH", sport, dport) + a(anchors[0]) + a(anchors[1])
                      + struct.pack(">Q", SENDER) + a(RECEIVER[0]) + struct.pack(">IQ", COUNTER[0], int(time.time() * 1e6)))
            assert len(header) == 72
            m = header + body
            return m + hmac.new(LAB_KEY if key is None else key, m, hashlib.sha256).digest()[:16]
        # requestLock (rightDelta), cancelLock (reason), drainStart (stateful), oldPathFin (empty)
        BODY = {10: struct.pack(">i", 0), 13: bytes([7]) + b"hostile", 30: bytes([1]), 50: b""}
        def noise(lo, hi):
            b = os.urandom(random.randint(lo, hi))
            return b"XXXX" + b[4:] if b[:4] == b"DYCM" else b
        def hostile(receiver, chain, session, anchors, known_chains):
            RECEIVER[0] = receiver
            out, counts = [], {}
            def add(kind, payload):
                out.append(payload)
                counts["dropped." + kind] = counts.get("dropped." + kind, 0) + 1
            fake = chain
            while fake in known_chains or fake == 0: fake = random.getrandbits(64)
            good = msg(10, fake, 1, session, anchors, BODY[10])  # a well-formed requestLock, 92 bytes
            assert len(good) == 92
            for _ in range(3): add("bad-magic", noise(88, 200))                  # malformed: random bytes
            for _ in range(2): add("truncated", noise(1, 87))                    # random, shorter than header + MAC
            add("truncated", good[:47]); add("truncated", good[:87])             # a valid message cut
            add("bad-length", good[:-1])                                         # cut by one
            # One byte too many: a bundle (docs/CONTROL-PROTOCOL.md) of the valid message, for a session nobody
            # knows, and a 1-byte tail: each dropped for its own reason.
            out.append(good + b"\\0")
            for kind in ("unknown-session", "truncated"): counts["dropped." + kind] = counts.get("dropped." + kind, 0) + 1
            add("bad-version", msg(10, chain, 1, session, anchors, BODY[10], version=1))   # the old, unstamped version
            add("bad-version", msg(10, chain, 1, session, anchors, BODY[10], version=2))   # issue 15's version
            add("bad-version", msg(10, chain, 1, session, anchors, BODY[10], version=3))   # the previous version (issue 17)
            add("unknown-type", msg(0, chain, 1, session, anchors))
            add("unknown-type", msg(99, chain, 1, session, anchors))
            add("bad-mac", msg(10, chain, 1, session, anchors, BODY[10], key=OTHER_KEY))
            add("bad-mac", msg(13, chain, 1, session, anchors, BODY[13], key=OTHER_KEY))
            add("bad-mac", good[:-1] + bytes([good[-1] ^ 1]))
            add("zero-identity", msg(10, 0, 1, session, anchors, BODY[10]))
            add("forbidden-address", msg(10, chain, 1, session, (anchors[0], "127.0.0.1"), BODY[10]))
            add("bad-body", msg(10, chain, 1, session, anchors, BODY[10] + b"\\0"))          # trailing byte
            add("bad-body", msg(13, chain, 1, session, anchors, bytes([9]) + b"abc"))        # reason cut short
            add("bad-body", msg(10, chain, 1, (session[0], session[1], 0, session[3]), anchors, BODY[10]))  # port 0
            for t in (10, 13, 30, 50):  # correctly signed, the live session's chain ID, a guessed nonce
                add("wrong-nonce", msg(t, chain, random.getrandbits(64), session, anchors, BODY[t]))
            for t in (10, 13, 50):      # correctly signed, a chain ID nobody knows
                add("unknown-session", msg(t, fake, random.getrandbits(64), session, anchors, BODY[t]))
            return out, counts

        """
    }

    // MARK: - (d) loss

    @Test("(d) 30 % of control packets dropped on every host: replace still moves the sessions byte-exact, no INVALID at fw2")
    func lossyControlChannel() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ch1", subnet: "10.78.71.0/24")) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 20)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let sessions = 6
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 60)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            for host in Self.agentHosts {
                // Each control packet is dropped with p = 0.3 where it arrives (every message crosses one INPUT).
                for chain in ["INPUT"] {
                    try lab.exec(host, ["iptables", "-w", "-A", chain, "-p", "udp", "--dport", "\(ControlMessage.port)",
                                        "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j", "DROP"])
                }
            }
            var controlBefore: [String: [String: UInt64]] = [:]
            for host in Self.agentHosts { controlBefore[host] = try await TestSupport.snapshot(lab, host).control }
            let invalidBefore = try TestSupport.invalidDrops(lab, "fw2")
            let retransBefore = try MigrationLab.retransmissions(lab)
            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--deadline", "5000"])
            let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")

            let moved = report.sessions.filter { $0.result == "moved" }
            let notMoved = report.sessions.filter { $0.result != "moved" }
            #expect(report.matched == sessions && report.sessions.count == sessions, "\(run.stdout)")
            #expect(moved.count >= sessions - 1,
                    "only \(moved.count) of \(sessions) moved: \(notMoved.map { "\($0.session) \($0.result) \($0.failedStep): \($0.reason)" })")
            #expect(notMoved.allSatisfy { $0.result == "cancelled" && !$0.failedStep.isEmpty },
                    "not moved and not cancelled cleanly: \(notMoved.map { "\($0.session) \($0.result) \($0.failedStep): \($0.reason)" })")
            #expect(run.status == (notMoved.isEmpty ? 0 : 1), "replace exit status \(run.status)")

            // Moved sessions are on fw2 and no longer on fw1; cancelled ones stay on fw1 (and not on fw2); no anchor
            // is left mid-way. A moved session may stay on fw1 only if its report says the old path's teardown went
            // unanswered (by design fw1 then expires it by idleness).
            let movedTuples = Set(moved.map(\.session)), cancelledTuples = Set(notMoved.map(\.session))
            let teardownUnanswered = Set(moved.filter { $0.reason.contains("teardown unanswered") }.map(\.session))
            var placement = "", leftOnFw1 = 0
            // In any state (under load a download may end, its session closing, before this looks), but only the
            // report's sessions (the paced server's start-up probe is one too, closing on fw1).
            let reported = Set(report.sessions.map(\.session))
            let settled = try await TestSupport.eventually(timeout: 5) {
                let onFw1 = Set(try await MigrationLab.pacedSessions(lab, "fw1", anyState: true).map(\.session)).intersection(reported)
                let onFw2 = Set(try await MigrationLab.pacedSessions(lab, "fw2", anyState: true).map(\.session)).intersection(reported)
                var busy: [String] = []
                for host in ["client1", "server1"] {
                    busy += try await TestSupport.snapshot(lab, host).sessions.filter { $0.migration != nil }
                        .map { "\(host) \($0.session) \($0.migration ?? "") paths \($0.paths ?? "-")" }
                }
                let anchorsIdle = busy.isEmpty
                placement = "fw1 \(onFw1.sorted { "\($0)" < "\($1)" }), fw2 \(onFw2.sorted { "\($0)" < "\($1)" }), anchors mid-migration \(busy)"
                leftOnFw1 = onFw1.intersection(movedTuples).count
                return onFw2 == movedTuples && cancelledTuples.isSubset(of: onFw1)
                    && onFw1.subtracting(cancelledTuples).isSubset(of: teardownUnanswered) && anchorsIdle
            }
            #expect(settled, "moved \(movedTuples.count) (teardown unanswered \(teardownUnanswered.count)) / cancelled \(cancelledTuples.count), but: \(placement)")

            // The loss really happened (somewhere, in some direction).
            var drops: [String: (input: UInt64, output: UInt64)] = [:]
            for host in Self.agentHosts {
                let input = try #require(try Self.lossRulePackets(lab, host, chain: "INPUT"), "no loss rule in \(host) INPUT")
                drops[host] = (input, 0)
            }
            let totalDrops = drops.values.reduce(0) { $0 + $1.input + $1.output }
            #expect(totalDrops > 0, "the statistic rules dropped no control packet: \(drops)")

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty, "a download differs")
            #expect(try TestSupport.invalidDrops(lab, "fw2") == invalidBefore, "INVALID drops at fw2")

            // The figures (for the report).
            let retransAfter = try MigrationLab.retransmissions(lab)
            var sent: [String: Int64] = [:], received: [String: Int64] = [:], dropped: [String: Int64] = [:]
            var droppedReasons: [String: Int64] = [:]
            for host in Self.agentHosts {
                let d = Self.delta(controlBefore[host] ?? [:], try await TestSupport.snapshot(lab, host).control)
                sent[host] = d.filter { $0.key.hasPrefix("sent.") }.values.reduce(0, +)
                received[host] = d.filter { $0.key.hasPrefix("received.") }.values.reduce(0, +)
                dropped[host] = d.filter { $0.key.hasPrefix("dropped.") }.values.reduce(0, +)
                for (key, n) in d where key.hasPrefix("dropped.") { droppedReasons[key, default: 0] += n }
            }
            let totals = report.sessions.compactMap(\.phases?.total).sorted()
            print("""
                ControlHostilityTests(d): moved \(moved.count)/\(sessions), cancelled \(notMoved.count) \
                \(notMoved.map { "\($0.failedStep): \($0.reason)" }); replace \(report.elapsedMicroseconds / 1000) ms, \
                status \(run.status); moved but teardown unanswered \(teardownUnanswered.count), still on fw1 \(leftOnFw1); per-session total µs \(totals); \
                loss-rule drops (in/out) \(Self.agentHosts.map { "\($0) \(drops[$0]!.input)/\(drops[$0]!.output)" }) = \(totalDrops); \
                control sent \(sent), received \(received), dropped-by-agent \(dropped) \(droppedReasons); \
                endpoint retransmissions \(retransAfter - retransBefore)
                """)
        }
    }

    // MARK: - (f) hostile messages

    @Test("(f) forged, malformed and mis-signed control messages and forged Dysco SYNs from an off-path host change nothing")
    func hostileControlMessages() async throws {
        try await TestSupport.withLab(MigrationLab.spec("ch2", subnet: "10.78.72.0/24", attackers: 1)) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1.5)
            let sessions = 3
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 60)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)
            let attacker = lab.address(of: "attacker1").description, fw2 = lab.address(of: "fw2").description
            let client = lab.address(of: "client1").description, server = lab.address(of: "server1").description

            // 1. Hostile control messages to fw1's and client1's control port. The snapshot shows chain IDs
            //    (not nonces): the wrong-nonce messages name a live session's real chain ID.
            let targets = ["fw1", "client1"]
            var before: [String: AgentSnapshot] = [:]
            for host in targets + ["server1", "fw2"] { before[host] = try await TestSupport.snapshot(lab, host) }
            var script = Self.controlForger(keyPath: lab.trustKeyPath) + "plan = {}\n"
            for host in targets {
                let snapshot = before[host]!
                let live = try #require(snapshot.sessions.first { $0.session.dstPort == MigrationLab.pacedPort && $0.chainID != nil },
                                        "\(host) shows no paced session with a chain ID: \(snapshot.sessions)")
                let chain = try #require(UInt64(live.chainID!, radix: 16))
                let known = snapshot.sessions.compactMap { $0.chainID.flatMap { UInt64($0, radix: 16) } }
                let s = live.session
                script += """
                    plan["\(host)"] = ("\(lab.address(of: host))", hostile("\(lab.address(of: host))", \(chain), ("\(s.srcAddr)", "\(s.dstAddr)", \(s.srcPort), \(s.dstPort)), \
                    ("\(client)", "\(server)"), {\(known.map(String.init).joined(separator: ", "))}))

                    """
            }
            script += """
                for host, (addr, (payloads, counts)) in plan.items():
                    send([IP(dst=addr) / UDP(sport=random.randint(20000, 60000), dport=7411) / Raw(p) for p in payloads], inter=0.002)
                print(json.dumps({host: counts for host, (addr, (payloads, counts)) in plan.items()}))
                """
            let output = try TestSupport.scapy(lab, on: "attacker1", script)
            let expected = try JSONDecoder().decode([String: [String: Int64]].self,
                                                    from: Data((output.split(separator: "\n").last ?? "").utf8))
            let kinds = ["truncated", "bad-magic", "bad-version", "unknown-type", "bad-length", "bad-mac", "zero-identity",
                         "forbidden-address", "bad-body", "wrong-nonce", "unknown-session"].map { "dropped.\($0)" }
            for host in targets {
                #expect(Set(expected[host]?.keys.map { $0 } ?? []) == Set(kinds), "the forger sent every kind to \(host)")
            }

            // Each kind was dropped for its reason, as often as sent; nothing else moved (no reply, no receive).
            for host in targets {
                var seen: [String: Int64] = [:]
                let exact = try await TestSupport.eventually(timeout: 3) {
                    seen = Self.delta(before[host]!.control, try await TestSupport.snapshot(lab, host).control)
                    return seen == expected[host]
                }
                #expect(exact, "\(host): control counters moved by \(seen.sorted { $0.key < $1.key }), expected \(expected[host]?.sorted { $0.key < $1.key } ?? [])")
            }
            for host in ["server1", "fw2"] {
                let seen = Self.delta(before[host]!.control, try await TestSupport.snapshot(lab, host).control)
                #expect(seen.isEmpty, "\(host) was not a target, yet its control counters moved: \(seen)")
            }
            // The sessions are untouched: on fw1, established, no migration anywhere, nothing at fw2.
            #expect(try await MigrationLab.pacedSessions(lab, "fw1").count == sessions)
            for host in ["client1", "fw1", "server1"] {
                let snapshot = try await TestSupport.snapshot(lab, host)
                #expect(snapshot.sessions.allSatisfy { $0.migration == nil && $0.paths == nil },
                        "\(host): \(snapshot.sessions.filter { $0.migration != nil }.map { "\($0.session) \($0.migration ?? "")" })")
            }
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").isEmpty)

            // 2. Forged Dysco SYNs towards fw2 naming server1 as the next hop, for a live session's tuple:
            //    v1 (refused), v2 under another key and v2 replayed for another tuple (bad MAC).
            let live = try #require(try await MigrationLab.pacedSessions(lab, "client1").first).session
            let fw2Before = try await TestSupport.snapshot(lab, "fw2").counters
            let sniffer = try TrustTests.Sniffer(lab, on: "fw2")
            _ = try TestSupport.scapy(lab, on: "attacker1", TrustTests.forger(keyPath: lab.trustKeyPath) + """
                me, fw2, client, server, cport = "\(attacker)", "\(fw2)", "\(client)", "\(server)", \(live.srcPort)
                syn(me, fw2, 10001, v1(client, cport, server, \(MigrationLab.pacedPort), [server]))
                syn(me, fw2, 10002, v2(bytes(range(32)), (me, fw2, 10002, 80), client, cport, server, \(MigrationLab.pacedPort), [server]))
                syn(me, fw2, 10003, v2(LAB_KEY, (me, fw2, 10004, 80), client, cport, server, \(MigrationLab.pacedPort), [server]))
                time.sleep(1)
                """)
            let atFw2 = try sniffer.stop()
            let fw2Snapshot = try await TestSupport.snapshot(lab, "fw2")
            let c = fw2Snapshot.counters
            #expect(c.trailerVersionOneRefused == fw2Before.trailerVersionOneRefused + 1, "v1 at fw2: \(c)")
            #expect(c.trailerBadMAC == fw2Before.trailerBadMAC + 2, "v2 bad MAC at fw2: \(c)")
            #expect(c.sessionsCreated == fw2Before.sessionsCreated && c.translatedEgress == fw2Before.translatedEgress
                    && c.malformedDyscoSyn == fw2Before.malformedDyscoSyn, "\(c)")
            #expect(fw2Snapshot.sessions.isEmpty, "fw2 created a session: \(fw2Snapshot.sessions)")
            #expect(atFw2.filter { $0.src == attacker && $0.dst == fw2 && $0.isSyn }.count == 3, "\(atFw2)")
            #expect(!atFw2.contains { $0.src == fw2 }, "fw2 relayed or answered: \(atFw2)")

            // 3. The agents were not harmed: a real replace moves every session, with no drop of its messages.
            var droppedBefore: [String: [String: UInt64]] = [:]
            for host in Self.agentHosts {
                droppedBefore[host] = try await TestSupport.snapshot(lab, host).control.filter { $0.key.hasPrefix("dropped.") }
            }
            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && report.matched == sessions && report.sessions.count == sessions && report.allMoved,
                    "\(report.sessions.filter { $0.result != "moved" }.map { "\($0.session) \($0.failedStep): \($0.reason)" }) \(run.stderr)")
            #expect(try await MigrationLab.pacedSessions(lab, "fw2").count == sessions)
            for host in Self.agentHosts {
                let dropped = try await TestSupport.snapshot(lab, host).control.filter { $0.key.hasPrefix("dropped.") }
                #expect(dropped == droppedBefore[host], "\(host) dropped some of the real replace's messages: \(Self.delta(droppedBefore[host]!, dropped))")
            }

            #expect(downloads.wait(), "curl failed: \((try? String(contentsOfFile: "\(lab.directory)/curl.log", encoding: .utf8)) ?? "")")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty, "a download differs")
            #expect(try TestSupport.invalidDrops(lab, "fw1") == 0 && TestSupport.invalidDrops(lab, "fw2") == 0, "INVALID drops")
            print("ControlHostilityTests(f): dropped as expected at \(expected.mapValues { $0.values.reduce(0, +) }); " +
                  "fw2 trailer counters v1 \(c.trailerVersionOneRefused), bad MAC \(c.trailerBadMAC); replace \(report.elapsedMicroseconds / 1000) ms")
        }
    }
}
