import DyscoCore
import ConntrackState
import Foundation
import Testing

private func entry(src: String = "10.201.1.10", sport: UInt16 = 40000, dst: String = "10.201.2.10", dport: UInt16 = 8080)
    -> ConntrackEntry
{
    let orig = ConntrackTuple(src: IPAddress(src)!, dst: IPAddress(dst)!, sport: sport, dport: dport)
    return ConntrackEntry(
        family: IPAddress(src)!.family, proto: .tcp, orig: orig, reply: orig.inverted,
        tcp: TCPInfo(state: .established, orig: TCPDirection(flags: [.windowScale, .sackPerm], wscale: 7),
                     reply: TCPDirection(flags: [.windowScale, .sackPerm, .maxAckSet], wscale: 9)),
        status: [.seenReply, .assured, .confirmed], timeout: 431_999, mark: 0x10, zone: 0)
}

/// An entry using every field: IPv6, SNAT + DNAT, labels, seq-adjust, counters, zone, id.
private func richEntry() -> ConntrackEntry {
    let orig = ConntrackTuple(src: IPAddress("fd00:201::10")!, dst: IPAddress("fd00:202::10")!, sport: 40001, dport: 443)
    let reply = ConntrackTuple(src: IPAddress("fd00:203::20")!, dst: IPAddress("fd00:204::1")!, sport: 8443, dport: 1025)
    return ConntrackEntry(
        family: .ipv6, proto: .tcp, orig: orig, reply: reply,
        tcp: TCPInfo(state: .finWait, orig: TCPDirection(flags: [.windowScale, .closeInit], wscale: 14),
                     reply: TCPDirection(flags: [.windowScale, .dataUnacknowledged], wscale: 0)),
        status: [.seenReply, .assured, .confirmed, .srcNAT, .dstNAT, .srcNATDone, .dstNATDone, .seqAdjust],
        timeout: 120, mark: 0xdead_beef, zone: 7, labels: [0, 5, 127],
        nat: NATInfo(snat: NATBinding(ip: IPAddress("fd00:204::1")!, port: 1025),
                     dnat: NATBinding(ip: IPAddress("fd00:203::20")!, port: 8443)),
        seqAdj: SeqAdjustInfo(orig: SeqAdjust(correctionPos: 1, offsetBefore: 2, offsetAfter: 3),
                              reply: SeqAdjust(correctionPos: 4, offsetBefore: 5, offsetAfter: 6)),
        counters: CounterInfo(orig: Counter(packets: 10, bytes: 1000), reply: Counter(packets: 20, bytes: 2_000_000)),
        id: 12345)
}

private func json(_ document: StateDocument) throws -> String {
    String(decoding: try document.encoded(), as: UTF8.self)
}

@Suite struct StateDocumentTests {
    @Test func roundTripKeepsEveryField() throws {
        let document = StateDocument(host: "fwA/ctA-fwA", exportedAt: Date(timeIntervalSince1970: 1_790_000_000.25),
                                     entries: [entry(), richEntry()])
        let decoded = try StateDocument.decode(try document.encoded())
        #expect(decoded == document)
        #expect(decoded.entries[1].orig.src == IPAddress("fd00:201::10"))
        #expect(decoded.exportedAt == document.exportedAt)
        // Compact output decodes to the same document too.
        #expect(try StateDocument.decode(try document.encoded(pretty: false)) == document)
        try decoded.validate()
    }

    @Test func jsonUsesConntrackVocabulary() throws {
        let text = try json(StateDocument(host: "h", entries: [richEntry()]))
        for needle in ["\"orig\"", "\"reply\"", "\"src\"", "\"dst\"", "\"sport\"", "\"dport\"", "\"SEEN_REPLY\"",
                       "\"ASSURED\"", "\"WINDOW_SCALE\"", "\"wscale\"", "\"snat\"", "\"dnat\"", "\"seq_adj\"",
                       "\"correction_pos\"", "\"exported_at\"", "\"schema\"", "\"version\"", "\"fd00:201::10\"",
                       "\"proto\" : \"tcp\"", "\"state\" : \"FIN_WAIT\""] {
            #expect(text.contains(needle), "missing \(needle)")
        }
    }

    @Test func unknownVersionIsRefusedBeforeTheEntries() {
        // Entries in an unknown shape must not matter: the version is checked first.
        let data = Data(#"{"schema":"dysco-conntrack-state","version":2,"entries":[{"new":"shape"}]}"#.utf8)
        #expect(throws: StateDocumentError.unsupportedVersion(found: 2, supported: 1...1)) {
            try StateDocument.decode(data)
        }
    }

    @Test func wrongSchemaAndMissingHeaderAreRefused() {
        #expect(throws: StateDocumentError.wrongSchema("iptables-save")) {
            try StateDocument.decode(Data(#"{"schema":"iptables-save","version":1}"#.utf8))
        }
        #expect(throws: StateDocumentError.malformed("missing \"version\"")) {
            try StateDocument.decode(Data(#"{"schema":"dysco-conntrack-state"}"#.utf8))
        }
    }

    @Test func malformedJSONIsReportedWithItsPath() throws {
        #expect(throws: StateDocumentError.self) { try StateDocument.decode(Data("{not json".utf8)) }
        var document = StateDocument(host: "h", entries: [entry(), entry(sport: 40001)])
        var text = try json(document)
        text = text.replacingOccurrences(of: "\"10.201.2.10\"", with: "\"10.201.2.300\"")
        do {
            _ = try StateDocument.decode(Data(text.utf8))
            Issue.record("an impossible address was accepted")
        } catch let .malformed(reason) {
            #expect(reason.contains("entries[0]"), "\(reason)")
            #expect(reason.contains("10.201.2.300"), "\(reason)")
        } catch {
            Issue.record("unexpected \(error)")
        }
        document.entries[0].tcp?.orig.flags = [.windowScale]
        text = try json(document).replacingOccurrences(of: "\"WINDOW_SCALE\"", with: "\"WINDOW_SCALING\"")
        #expect(throws: StateDocumentError.self) { try StateDocument.decode(Data(text.utf8)) }
        let port = try json(document).replacingOccurrences(of: "40001", with: "70000")
        #expect(throws: StateDocumentError.self) { try StateDocument.decode(Data(port.utf8)) }
    }

    @Test func unnamedBitsSurviveAsBitN() throws {
        var value = entry()
        value.status = ConntrackStatus(rawValue: (1 << 1) | (1 << 20))
        #expect(value.status.names == ["SEEN_REPLY", "BIT_20"])
        let decoded = try StateDocument.decode(try StateDocument(host: "h", entries: [value]).encoded())
        #expect(decoded.entries[0].status.rawValue == (1 << 1) | (1 << 20))
    }
}

@Suite struct ValidationTests {
    private func problems(_ entry: ConntrackEntry) -> [String] { entry.validationProblems() }

    @Test func goodEntriesPass() throws {
        #expect(problems(entry()).isEmpty)
        #expect(problems(entry(src: "fd00::1", dst: "fd00::2")).isEmpty)
        #expect(problems(richEntry()).isEmpty)
    }

    @Test func impossibleTuplesAreNamed() {
        var mixed = entry()
        mixed.orig.dst = IPAddress("fd00::2")!
        #expect(problems(mixed).contains { $0.contains("orig.dst fd00::2 is not an ipv4 address") })

        var badReply = entry()
        badReply.reply.src = IPAddress("10.9.9.9")!
        #expect(problems(badReply).contains { $0.contains("reply tuple") })

        var badPorts = entry()
        badPorts.reply.sport = 1
        #expect(problems(badPorts).contains { $0.contains("reply ports") })

        var noPort = entry()
        noPort.orig.sport = nil
        #expect(problems(noPort).contains { $0.contains("orig.sport missing") })

        var zero = entry()
        zero.orig.dport = 0
        zero.reply.sport = 0
        #expect(problems(zero).contains { $0.contains("orig.dport is 0") })

        var multicast = entry(dst: "224.0.0.5")
        multicast.reply = multicast.orig.inverted
        #expect(problems(multicast).contains { $0.contains("cannot be a TCP endpoint") })
    }

    @Test func tcpSpecificsAreChecked() {
        var noTCP = entry()
        noTCP.tcp = nil
        #expect(problems(noTCP).contains { $0.contains("tcp section missing") })

        var bigScale = entry()
        bigScale.tcp?.reply.wscale = 15
        #expect(problems(bigScale).contains { $0.contains("wscale 15") })

        var udp = entry()
        udp.proto = .udp
        #expect(problems(udp).contains { $0.contains("tcp section present") })

        var expired = entry()
        expired.timeout = 0
        #expect(problems(expired).contains { $0.contains("timeout is 0") })

        var labels = entry()
        labels.labels = [3, 128]
        #expect(problems(labels).contains { $0.contains("label 128") })
    }

    @Test func natMustExplainTheReplyTuple() {
        var natted = entry()
        natted.reply.dst = IPAddress("10.201.2.100")!
        #expect(!problems(natted).isEmpty)
        natted.nat = NATInfo(snat: NATBinding(ip: IPAddress("10.201.2.100")!, port: 40000))
        #expect(problems(natted).isEmpty)
        natted.nat?.snat?.port = 50000
        #expect(problems(natted).contains { $0.contains("reply ports") })
    }

    @Test func icmpNeedsTypeCodeAndID() {
        let orig = ConntrackTuple(src: IPAddress("10.0.0.1")!, dst: IPAddress("10.0.0.2")!, type: 8, code: 0, id: 77)
        let ping = ConntrackEntry(family: .ipv4, proto: .icmp, orig: orig,
                                  reply: ConntrackTuple(src: orig.dst, dst: orig.src), timeout: 30)
        #expect(problems(ping).isEmpty)
        var noID = ping
        noID.orig.id = nil
        #expect(problems(noID).contains { $0.contains("orig.id") })
        var v6 = ping
        v6.proto = .icmpv6
        #expect(problems(v6).contains { $0.contains("does not go with ipv4") })
    }

    @Test func documentValidationListsEveryIssueWithItsEntry() {
        var bad = entry(sport: 40002)
        bad.timeout = 0
        let document = StateDocument(host: "h", entries: [entry(), entry(sport: 40001), bad, entry()])
        do {
            try document.validate()
            Issue.record("an invalid document passed")
        } catch {
            #expect(error.issues.map(\.index) == [2, 3])
            #expect(error.issues[0].entry.contains("sport=40002"))
            #expect(error.issues[1].reason == "duplicate of entry #0")
            #expect(error.description.contains("nothing imported"))
        }
    }
}

@Suite struct MatchSpecTests {
    @Test func sessionTuples() throws {
        let selector = try ExportSelector.parse(matches: [
            "src=10.201.1.10,dst=10.201.2.10,sport=40000,dport=8080",
            "proto=udp src=fd00::1 dst=fd00::2 sport=53 dport=5353 zone=3",
        ])
        #expect(selector == .flows([
            FlowKey(proto: .tcp, src: IPAddress("10.201.1.10")!, sport: 40000, dst: IPAddress("10.201.2.10")!, dport: 8080),
            FlowKey(proto: .udp, src: IPAddress("fd00::1")!, sport: 53, dst: IPAddress("fd00::2")!, dport: 5353, zone: 3),
        ]))
    }

    @Test func markAllAndDefault() throws {
        #expect(try ExportSelector.parse(matches: []) == .all)
        #expect(try ExportSelector.parse(matches: ["all"]) == .all)
        #expect(try ExportSelector.parse(matches: ["mark=0x10/0xf0"]) == .mark(16, mask: 0xf0))
        #expect(try ExportSelector.parse(matches: ["mark=7"]) == .mark(7, mask: 0xffff_ffff))
    }

    @Test func badSpecsAreRefused() {
        for spec in ["src=10.0.0.1,dst=10.0.0.2,sport=1", "src=10.0.0.1,dst=fd00::1,sport=1,dport=2",
                     "src=10.0.0.1,dst=10.0.0.2,sport=1,dport=70000", "colour=blue", "mark=x",
                     "src=10.0.0.1,src=10.0.0.3,dst=10.0.0.2,sport=1,dport=2", "proto=icmp,src=10.0.0.1,dst=10.0.0.2"] {
            #expect(throws: MatchSpecError.self, "\(spec)") { try ExportSelector.parse(matches: [spec]) }
        }
        #expect(throws: MatchSpecError.self) { try ExportSelector.parse(matches: ["all", "mark=1"]) }
    }
}

@Suite struct AddressTests {
    @Test func parseAndFormat() {
        #expect(IPAddress("10.201.1.10")?.bytes == [10, 201, 1, 10])
        #expect(IPAddress("fd00:0:0::1")?.description == "fd00::1")
        #expect(IPAddress("fd00::1")?.family == .ipv6)
        // An IPv4-mapped address is the IPv4 address (one type for both families, DyscoCore's IPAddress).
        #expect(IPAddress("::ffff:10.0.0.1") == IPAddress("10.0.0.1"))
        #expect(IPAddress("fd00::1")?.bytes.count == 16)
        #expect(IPAddress(bytes: [10, 0, 0, 1]) == IPAddress("10.0.0.1"))
        #expect(IPAddress(bytes: [1, 2, 3]) == nil)
        #expect(IPAddress("10.1.1") == nil)
        #expect(IPAddress("fd00:::1") == nil)
        #expect(IPAddress("") == nil)
        #expect(L4Protocol(name: "TCP") == .tcp)
        #expect(L4Protocol(name: "47")?.description == "gre")
        #expect(TCPState(kernelValue: 3) == .established)
        #expect(TCPState.synSent2.kernelValue == 9)
    }
}
