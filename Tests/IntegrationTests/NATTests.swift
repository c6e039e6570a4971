import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// Boxes that translate tuples (issue 18; paper §2.1 "Middleboxes that modify the five-tuple"; docs/ARCHITECTURE.md
/// "Boxes that translate"): a chain through a masquerading strict firewall (`--firewall fw1=snat`, its agent with
/// `--nat`) and through a box that publishes a server on its own address (`fw1=dnat`), on real namespaces,
/// iptables NAT, conntrack and the BPF datapath. Labs `nat1`–`nat6`: subnets 10.78.141.0/24–10.78.146.0/24.
@Suite struct NATTests {
    /// What went through the chain: a 16 MiB download from `target` (checked byte-exact) and `pages` short requests
    /// after it, each a SYN of its own through the box. Returns the peer address of each request in the server's HTTP
    /// log, and the endpoints' retransmissions meanwhile.
    func traffic(_ lab: Lab, to target: IPAddress, pages: Int) throws -> (peers: [String], retransmissions: UInt64) {
        let host = target.isIPv4 ? "\(target)" : "[\(target)]"
        try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 16)
        func retransmissions() throws -> UInt64 {
            try TestSupport.tcpRetransmissions(lab, "client1") + TestSupport.tcpRetransmissions(lab, "server1")
        }
        let before = try retransmissions()
        let download = "\(lab.directory)/blob.client"
        try lab.exec("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "-o", download, "http://\(host)/blob"])
        #expect(try TestSupport.sha256(download) == TestSupport.sha256("\(lab.httpRoot)/blob"))
        for i in 0..<pages {
            let page = try lab.exec("client1", ["curl", "-sS", "--fail", "-g", "-m", "10", "http://\(host)/index.html?\(i)"]).stdout
            #expect(page.hasPrefix("dysco lab"), "request \(i)")
        }
        let log = try String(contentsOfFile: LabPaths.serviceLog(lab.name, host: "server1", service: target.isIPv4 ? "http" : "http6"),
                             encoding: .utf8)
        let peers = log.split(separator: "\n").filter { $0.contains("GET /") }.map { String($0.split(separator: " ")[0]) }
        return (peers, try retransmissions() - before)
    }

    /// `box`'s conntrack holds `count` entries with this NAT binding: original direction `original` (source,
    /// destination), reply direction `reply`.
    func expectBindings(_ lab: Lab, on box: String, original: (IPAddress, IPAddress), reply: (IPAddress, IPAddress),
                        count: Int = 1) throws {
        let table = try lab.conntrackTCP(box, family: original.0.family)
        let bound = table.split(separator: "\n").filter {
            $0.contains("src=\(original.0) dst=\(original.1)") && $0.contains("src=\(reply.0) dst=\(reply.1)")
        }
        #expect(bound.count == count, "conntrack at \(box):\n\(table)")
    }

    /// Starts a download of a `megabytes` random file from the sender-paced server (1 MiB/s) at `target` into
    /// `output` and returns once `box` translates it (an established session with a translated tuple).
    func translatedDownload(_ lab: Lab, from target: IPAddress, megabytes: Int, to output: String,
                            translatedAt box: String) async throws -> Process {
        try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: megabytes)
        try MigrationLab.startPacedServer(lab, megabytesPerSecond: 1, family: target.family)
        let host = target.isIPv4 ? "\(target)" : "[\(target)]"
        let curl = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "-o", output,
                                             "http://\(host):\(MigrationLab.pacedPort)/blob"])
        let live = try await TestSupport.eventually(timeout: 20) {
            try await TestSupport.snapshot(lab, box).sessions.contains { $0.state == "established" && $0.translated != nil }
        }
        #expect(live, "\(box) translates the download")
        return curl
    }

    /// An 8 MiB download from the sender-paced server (1 MiB/s, `MigrationLab.startPacedServer`) at `target` through
    /// `old` (whose NAT translates it), moved to `new` by `replace` mid-transfer: moved, byte-exact, the new box's
    /// right side carries the tuple the old box's NAT made (taken from the imported binding), the right end's session
    /// unchanged and the server's socket still talking to that tuple's source after the move, the new box carried the
    /// rest with no INVALID drop, and the migration rule for the endpoints' loss counters. `check` gets the translated
    /// tuple while the download still runs. Returns whether the session was moved.
    ///
    /// Paced by the sender, not by the client (`curl --limit-rate`): a server that writes into a rate-limited
    /// receiver's buffers sends its FIN seconds before the download ends, and a session closing is rightly not moved
    /// ("a FIN or an RST seen at step lock"), which under load made the move race the server's FIN.
    @discardableResult
    func moveMidDownload(_ lab: Lab, from old: String, to new: String, target: IPAddress,
                         check: (FiveTuple) async throws -> Void) async throws -> Bool {
        let family = target.family
        let client = try lab.address(of: "client1", family: family), server = try lab.address(of: "server1", family: family)
        let download = "\(lab.directory)/blob.moved"
        let curl = try await translatedDownload(lab, from: target, megabytes: 8, to: download, translatedAt: old)
        let before = try await TestSupport.snapshot(lab, old).sessions.filter { $0.state == "established" }.compactMap(\.translated)
        let translated = try #require(before.first, "\(old) translates the download")
        #expect(before.count == 1)
        let oldInvalid = try lab.firewallCounters(old, family: family).invalidDropped.packets

        let lossBefore = try MigrationLab.lossCounters(lab)
        let replace = try MigrationLab.replace(lab, old: old, new: new)
        #expect(replace.status == 0, "\(replace.stdout)\n\(replace.stderr)")
        let sessions = replace.report?.sessions ?? []
        #expect(sessions.count == 1 && sessions.allSatisfy { $0.result == "moved" }, "\(replace.stdout)")
        if replace.status != 0 {
            // What the anchors sent and received of their own packets (elicits, probes), to tell a failed move's cause.
            for host in ["client1", new, "server1"] {
                let control = try await TestSupport.snapshot(lab, host).control.filter { !$0.key.hasPrefix("sent.") && $0.value > 0 }
                print("NATTests \(host): \(control.sorted { $0.key < $1.key })")
            }
        }

        // The new box holds the session with the binding it imported: its right side carries the translated tuple.
        let box = try await TestSupport.snapshot(lab, new)
        let taken = try #require(box.sessions.first { $0.session.srcAddr == client }, "\(new): \(box.sessions)")
        #expect(taken.translated == translated)
        #expect(try taken.right?.srcAddr == lab.address(of: new, family: family) && taken.right?.dstAddr == server)
        #expect(box.counters.translationsAdopted == 1)
        // The right end still knows the session by the tuple the NAT made (nothing changed for the server).
        let end = try await TestSupport.snapshot(lab, "server1")
        #expect(end.sessions.map(\.session).contains(translated))
        // And the server's socket, after the move, still has the translated tuple's source as its peer.
        let sockets = try lab.exec("server1", ["ss", "-Htn", "state", "established", "( sport = :\(MigrationLab.pacedPort) )"]).stdout
        let peer = translated.srcAddr.isIPv4 ? "\(translated.srcAddr):\(translated.srcPort)" : "[\(translated.srcAddr)]:\(translated.srcPort)"
        #expect(sockets.contains(" \(peer)"), "server1's sockets: \(sockets)")
        try await check(translated)

        curl.waitUntilExit()
        let loss = try MigrationLab.lossCounters(lab) - lossBefore
        print("NATTests \(old) → \(new): \(replace.stdout.split(separator: "\n").last ?? ""); endpoints' loss counters over the move: \(loss)")
        #expect(curl.terminationStatus == 0)
        #expect(try TestSupport.sha256(download) == TestSupport.sha256("\(lab.httpRoot)/blob"))
        #expect(loss.noByteLost, "the migration rule: no RTO, no reset, no retransmission but DSACK'd or probes: \(loss)")
        // The new box carried the rest (whatever the receive buffer had not taken before the move, and the close at
        // least): its ESTABLISHED rule counted it, and it dropped nothing as INVALID.
        let counters = try lab.firewallCounters(new, family: family)
        #expect(counters.invalidDropped.packets == 0)
        #expect(counters.establishedAccepted.packets > 0, "\(new) forwarded nothing")
        #expect(try lab.firewallCounters(old, family: family).invalidDropped.packets == oldInvalid)
        return sessions.first?.result == "moved"
    }

    @Test("(a) a chain through a masquerading fw1: byte-exact, the server sees fw1's address, fw1's conntrack holds the binding, no INVALID drop, no retransmission; a stateless replace of fw1 is refused with the reason, its session unharmed",
          arguments: [MigrationLab.Case(lab: "nat1", subnet: "10.78.141.0/24"),
                      MigrationLab.Case(lab: "nat1v6", subnet: "10.78.168.0/24", family: .ipv6)])
    func masqueradingBox(_ c: MigrationLab.Case) async throws {
        let family = c.family
        try await TestSupport.withLab(LabSpec(name: c.lab, middleboxes: ["fw1", "fw2"], chain: ["fw1"], subnet: c.subnet,
                                              agentArguments: ["--close-linger", "120"],
                                              firewallProfiles: ["fw1": .snat], ipv6: family == .ipv6)) { lab in
            let client = try lab.address(of: "client1", family: family), fw1 = try lab.address(of: "fw1", family: family)
            let server = try lab.address(of: "server1", family: family)
            let serverHost = family == .ipv4 ? "\(server)" : "[\(server)]"
            // Twenty short connections after the download: each SYN takes the tag-and-report way through fw1.
            let (peers, retransmits) = try traffic(lab, to: server, pages: 20)
            // The server's HTTP log: every request came from fw1 (the masquerade), none from the client.
            #expect(peers.count == 21)
            #expect(Set(peers) == ["\(fw1)"], "the server sees the box's address: \(Set(peers))")

            // fw1: every session shows the translated tuple; the kernel carried them (two passes of the SYN only).
            let box = try await TestSupport.snapshot(lab, "fw1")
            #expect(box.sessions.count == 21)
            for s in box.sessions {
                let translated = try #require(s.translated, "session \(s.session)")
                #expect(s.session.srcAddr == client && translated.srcAddr == fw1 && translated.dstAddr == server)
                #expect(s.right?.srcAddr == fw1 && s.right?.dstAddr == server)
            }
            #expect(box.counters.natSyns == 21)
            #expect(box.counters.natSynsStale == 0)
            // The right end knows each session as fw1's NAT made it.
            let end = try await TestSupport.snapshot(lab, "server1")
            #expect(Set(end.sessions.map(\.session)) == Set(box.sessions.compactMap(\.translated)))

            // fw1's conntrack: the binding (original from the client, reply to fw1).
            try expectBindings(lab, on: "fw1", original: (client, server), reply: (server, fw1), count: 21)

            #expect(try lab.firewallCounters("fw1", family: family).invalidDropped.packets == 0)
            #expect(retransmits == 0)

            // A stateless move of the NAT'ing box is refused, with the reason (no binding would move); the session it
            // carries is unharmed.
            // (A rate-limited download retransmits now and then through any box, NAT'ing or not: not counted.)
            let slow = "\(lab.directory)/blob.slow"
            let curl = try lab.spawn("client1", ["curl", "-sS", "--fail", "-g", "-m", "60", "--limit-rate", "4M", "-o", slow,
                                                 "http://\(serverHost)/blob"])
            let live = try await TestSupport.eventually(timeout: 20) {
                try await TestSupport.snapshot(lab, "fw1").sessions.contains { $0.state == "established" && $0.translated != nil }
            }
            #expect(live)
            let replace = try MigrationLab.replace(lab, old: "fw1", new: "fw2", extra: ["--stateless"])
            #expect(replace.status == 1, "\(replace.stderr)")
            let refused = replace.report?.sessions ?? []
            #expect(!refused.isEmpty && refused.allSatisfy { $0.result == "refused" && $0.reason.contains("translates the session's tuple (NAT)") },
                    "\(replace.stdout)")
            curl.waitUntilExit()
            #expect(curl.terminationStatus == 0)
            #expect(try TestSupport.sha256(slow) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            #expect(try lab.firewallCounters("fw1", family: family).invalidDropped.packets == 0)
        }
    }

    @Test("(b) a DNAT'ing fw1 publishing the server on its own address: byte-exact, the server sees the client, the chain ends at the real server, no INVALID drop, no retransmission",
          arguments: [MigrationLab.Case(lab: "nat2", subnet: "10.78.142.0/24"),
                      MigrationLab.Case(lab: "nat2v6", subnet: "10.78.169.0/24", family: .ipv6)])
    func publishingBox(_ c: MigrationLab.Case) async throws {
        let family = c.family
        try await TestSupport.withLab(LabSpec(name: c.lab, middleboxes: ["fw1"], subnet: c.subnet,
                                              agentArguments: ["--close-linger", "120"],
                                              firewallProfiles: ["fw1": .dnat], ipv6: family == .ipv6)) { lab in
            let client = try lab.address(of: "client1", family: family), fw1 = try lab.address(of: "fw1", family: family)
            let server = try lab.address(of: "server1", family: family)
            // The client asks the box's address; the box's NAT sends the session on to the server.
            let (peers, retransmits) = try traffic(lab, to: fw1, pages: 10)
            // Destination NAT keeps the client's address: the server's log names the client.
            #expect(peers.count == 11)
            #expect(Set(peers) == ["\(client)"], "the server sees the client: \(Set(peers))")

            let box = try await TestSupport.snapshot(lab, "fw1")
            #expect(box.sessions.count == 11)
            for s in box.sessions {
                #expect(s.session.dstAddr == fw1)
                let translated = try #require(s.translated, "session \(s.session)")
                #expect(translated.srcAddr == client && translated.dstAddr == server, "the chain ends at the real server")
                #expect(s.right?.dstAddr == server && s.remaining.isEmpty)
            }
            let end = try await TestSupport.snapshot(lab, "server1")
            #expect(Set(end.sessions.map(\.session)) == Set(box.sessions.compactMap(\.translated)))

            #expect(try lab.firewallCounters("fw1", family: family).invalidDropped.packets == 0)
            #expect(retransmits == 0)
        }
    }

    @Test("(b) replace a DNAT'ing fw1 by fw2 publishing the server too, mid-download: moved, byte-exact, the client keeps fw1's address, the server's socket keeps the client as its peer, fw2's conntrack holds fw1's binding, no INVALID drop",
          arguments: [MigrationLab.Case(lab: "nat5", subnet: "10.78.145.0/24"),
                      MigrationLab.Case(lab: "nat5v6", subnet: "10.78.167.0/24", family: .ipv6)])
    func publishingBoxReplace(_ c: MigrationLab.Case) async throws {
        let spec = MigrationLab.spec(c.lab, subnet: c.subnet, chain: ["fw1"], firewallProfiles: ["fw1": .dnat, "fw2": .dnat],
                                     family: c.family)
        try await TestSupport.withLab(spec) { lab in
            let client = try lab.address(of: "client1", family: c.family), fw1 = try lab.address(of: "fw1", family: c.family)
            let server = try lab.address(of: "server1", family: c.family)
            let moved = try await moveMidDownload(lab, from: "fw1", to: "fw2", target: fw1) { translated in
                #expect(translated.srcAddr == client && translated.dstAddr == server, "fw1 sends the session on to the server: \(translated)")
                // fw2 took fw1's binding as it was: the client's tuple names fw1's address, the reply comes from the server.
                try expectBindings(lab, on: "fw2", original: (client, fw1), reply: (server, client))
            }
            #expect(moved)
        }
    }

    @Test("a DNAT'ing box as the right anchor (client → fw1 → fw2 DNAT → server, fw1 replaced by fw3): refused with the reason, the download unharmed and byte-exact, no INVALID drop")
    func publishingRightAnchorRefused() async throws {
        let spec = MigrationLab.spec("nat6", subnet: "10.78.146.0/24", middleboxes: ["fw1", "fw2", "fw3"], chain: ["fw1", "fw2"],
                                     firewallProfiles: ["fw2": .dnat])
        try await TestSupport.withLab(spec) { lab in
            let download = "\(lab.directory)/blob.kept"
            let curl = try await translatedDownload(lab, from: lab.address(of: "fw2"), megabytes: 4, to: download, translatedAt: "fw2")
            let boxes = ["fw1", "fw2"]
            let invalidBefore = try boxes.map { try lab.firewallCounters($0).invalidDropped.packets }
            #expect(invalidBefore == [0, 0], "INVALID drops before the move: \(invalidBefore)")
            let replace = try MigrationLab.replace(lab, old: "fw1", new: "fw3")
            #expect(replace.status != 0, "\(replace.stdout)")
            let sessions = replace.report?.sessions ?? []
            #expect(sessions.count == 1 && sessions.allSatisfy {
                $0.result != "moved" && $0.reason.contains("translates the session's destination (DNAT)")
            }, "\(replace.stdout)")
            curl.waitUntilExit()
            #expect(curl.terminationStatus == 0)
            #expect(try TestSupport.sha256(download) == TestSupport.sha256("\(lab.httpRoot)/blob"))
            #expect(try await TestSupport.snapshot(lab, "fw3").sessions.isEmpty, "fw3 kept nothing of the refused move")
            // The refused move caused no INVALID drop at the boxes that kept the session.
            let invalidAfter = try boxes.map { try lab.firewallCounters($0).invalidDropped.packets }
            #expect(invalidAfter == invalidBefore, "INVALID drops at fw1, fw2 over the refused move: \(invalidBefore) → \(invalidAfter); \(replace.stdout)")
        }
    }

    /// By family (issue 18 (c)): the IPv6 case's boxes translate IPv6 sources to the shared address's IPv6
    /// counterpart (ip6tables SNAT, NAT66), and fw1's AF_INET6 entry carries the binding to fw2.
    @Test("(a) replace fw1 → fw2 of an HA pair translating to a shared service address, mid-download: moved, byte-exact, the server's socket keeps the shared address as its peer, fw2's conntrack holds the binding, no INVALID drop",
          arguments: [MigrationLab.Case(lab: "nat3", subnet: "10.78.143.0/24"),
                      MigrationLab.Case(lab: "nat3v6", subnet: "10.78.166.0/24", family: .ipv6)])
    func haPairReplace(_ c: MigrationLab.Case) async throws {
        let spec = MigrationLab.spec(c.lab, subnet: c.subnet, chain: ["fw1"],
                                     firewallProfiles: ["fw1": .snatShared, "fw2": .snatShared], family: c.family)
        try await TestSupport.withLab(spec) { lab in
            let client = try lab.address(of: "client1", family: c.family), server = try lab.address(of: "server1", family: c.family)
            let shared = try #require(c.family == .ipv4 ? lab.state.sharedServiceAddress : lab.state.sharedServiceAddressIPv6)
            let moved = try await moveMidDownload(lab, from: "fw1", to: "fw2", target: server) { translated in
                #expect(translated.srcAddr == shared, "fw1 translates to the shared address: \(translated)")
                try expectBindings(lab, on: "fw2", original: (client, server), reply: (server, shared))
            }
            #expect(moved)
        }
    }

    @Test("(a) drain an HA pair's NAT'ing fw1 with 20 sender-paced sessions to fw2: every session moves with its binding, byte-exact, no INVALID drop, the migration rule for the endpoints' loss counters")
    func haPairDrain() async throws {
        let spec = MigrationLab.spec("nat4", subnet: "10.78.144.0/24", chain: ["fw1"],
                                     firewallProfiles: ["fw1": .snatShared, "fw2": .snatShared])
        try await TestSupport.withLab(spec) { lab in
            let client = lab.address(of: "client1"), server = lab.address(of: "server1")
            let shared = lab.state.sharedServiceAddress
            // 20 sessions of 2 MiB at 256 KiB/s each: ~8 s mid-transfer, paced by the sender (on the wire, not in a
            // receive buffer).
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 2)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 0.25)
            let sessions = 20
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions, timeout: 90)
            try await MigrationLab.waitForKernelCarried(lab, on: "fw1", count: sessions, timeout: 40)
            let before = try MigrationLab.lossCounters(lab)

            let run = try DrainTests.drain(lab, old: "fw1", to: "fw2")
            let summary = try #require(run.report, "drain printed no summary: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && summary.moved == sessions && summary.failures.isEmpty && summary.remaining == 0,
                    "drain: \(run.stdout) \(run.stderr)")
            // fw2 took every session with the binding it imported: its right side carries the shared address.
            let box = try await TestSupport.snapshot(lab, "fw2")
            let carried = box.sessions.filter { $0.session.dstPort == MigrationLab.pacedPort && $0.state == "established" }
            #expect(carried.count == sessions && carried.allSatisfy { $0.translated?.srcAddr == shared },
                    "fw2: \(carried.map { "\($0.session) ⇒ \($0.translated.map(String.init(describing:)) ?? "-")" })")
            #expect(box.counters.translationsAdopted == UInt64(sessions))
            let table = try lab.conntrackTCP("fw2")
            let bound = table.split(separator: "\n").filter {
                $0.contains("ESTABLISHED") && $0.contains("src=\(client) dst=\(server)") && $0.contains("dst=\(shared)")
            }
            #expect(bound.count == sessions, "conntrack at fw2:\n\(table)")
            #expect(try await TestSupport.snapshot(lab, "fw1").sessions.filter { $0.state != "closing" }.isEmpty)

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
            let loss = try MigrationLab.lossCounters(lab) - before
            print("NATTests.haPairDrain: drained \(summary.moved) in \(summary.elapsedMicroseconds) µs; loss \(loss)")
            #expect(loss.noByteLost, "the migration rule: no RTO, no reset, no retransmission but DSACK'd or probes: \(loss)")
            for box in ["fw1", "fw2"] {
                #expect(try lab.firewallCounters(box).invalidDropped.packets == 0, "INVALID drops at \(box)")
            }
        }
    }
}
