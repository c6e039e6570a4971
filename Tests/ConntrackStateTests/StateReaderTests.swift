import DyscoCore
import DyscoBench
@testable import ConntrackState
import Foundation
import Logging
import Testing

/// A valid compact document of `count` entries (10.79.70.x → 10.79.71.1), as text.
private func documentText(_ count: Int = 2, pretty: Bool = false) throws -> String {
    let entries = (0..<count).map { ConntrackBenchmark.syntheticEntry($0, base: 79) }
    return String(decoding: try StateDocument(host: "fw/sd", entries: entries).encoded(pretty: pretty), as: UTF8.self)
}

/// The refusal of `text` (fails the test if it was accepted).
private func refusal(_ text: String, limits: StateDocumentLimits = StateDocumentLimits(),
                     endpoints: EndpointPolicy = .off) -> StateValidationError? {
    refusal(Array(text.utf8), limits: limits, endpoints: endpoints)
}

private func refusal(_ bytes: [UInt8], limits: StateDocumentLimits = StateDocumentLimits(),
                     endpoints: EndpointPolicy = .off) -> StateValidationError? {
    do {
        let document = try StateDocumentReader(limits: limits, endpoints: endpoints).read(.bytes(bytes))
        Issue.record("accepted a hostile document (\(document.entryCount) entries)")
        return nil
    } catch {
        return error
    }
}

/// The only issue's description, or all of them.
private func text(_ error: StateValidationError?) -> String {
    error?.issues.map(\.description).joined(separator: "\n") ?? "<accepted>"
}

@Suite struct StateReaderTests {
    @Test func exporterOutputIsAcceptedPrettyAndCompact() throws {
        for pretty in [false, true] {
            let text = try documentText(3, pretty: pretty)
            let document = try StateDocumentReader().read(.bytes(Array(text.utf8)))
            #expect(document.entryCount == 3 && document.entries.count == 3 && document.host == "fw/sd")
            #expect(document.entries == (0..<3).map { ConntrackBenchmark.syntheticEntry($0, base: 79) })
            let validated = try StateDocumentReader().validate(.bytes(Array(text.utf8)))
            #expect(validated.entryCount == 3 && validated.entries.isEmpty, "validate keeps nothing")
        }
    }

    @Test func aLargeFileIsReadAcrossChunks() throws {
        let path = NSTemporaryDirectory() + "sd-reader-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let size = try StateValidateBenchmark.generate(path: path, count: 3000)
        #expect(size > 3 * 256 * 1024, "spans several 256 KiB chunks")
        let document = try StateDocumentReader().validate(.file(path))
        #expect(document.entryCount == 3000 && document.byteCount == size)
        // The same file under a smaller limit: refused from its size, before parsing.
        do {
            _ = try StateDocumentReader(limits: StateDocumentLimits(maxBytes: size - 1)).read(.file(path))
            Issue.record("a document over the limit was accepted")
        } catch {
            #expect(error.issues.count == 1 && error.issues[0].path == "$", "\(error)")
            #expect(error.issues[0].reason.contains("larger than the limit of \(size - 1) bytes"), "\(error)")
            #expect(error.issues[0].reason.contains("nothing was parsed"), "\(error)")
        }
        // Through a stream (no size known): refused at the byte that crosses the limit.
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        do {
            _ = try StateDocumentReader(limits: StateDocumentLimits(maxBytes: 100_000)).read(.handle(handle))
            Issue.record("a streamed document over the limit was accepted")
        } catch {
            #expect(error.issues.last?.path == "$" && error.issues.last?.reason.contains("refused at byte 100001") == true,
                    "\(error)")
        }
    }

    @Test func truncationNamesTheByteOffset() throws {
        let full = try documentText(2)
        for cut in [1, 40, full.utf8.count / 2, full.utf8.count - 1] {
            let error = refusal(String(full.utf8.prefix(cut))!)
            #expect(error?.issues.last?.reason.contains("unexpected end of document at byte \(cut)") == true, "cut \(cut): \(text(error))")
            #expect(error?.issues.last?.reason.contains("truncated") == true)
        }
        #expect(text(refusal("")).contains("unexpected end of document at byte 0"))
    }

    @Test func outOfRangeNumbersHaveTheirPath() throws {
        let good = try documentText(3)
        // Entry 1's sport (1025): only that entry; entry 2's timeout and mark (u32), a wscale (u8), a zone (u16).
        let cases: [(String, String, String)] = [
            ("\"sport\":1025", "\"sport\":70000", "$.entries[1].orig.sport: 70000 is out of range (0–65535)"),
            ("\"timeout\":3600", "\"timeout\":4294967296", "$.entries[0].timeout: 4294967296 is out of range (0–4294967295)"),
            ("\"wscale\":7", "\"wscale\":256", "$.entries[0].tcp.orig.wscale: 256 is out of range (0–255)"),
            ("\"zone\":0", "\"zone\":-1", "$.entries[0].zone: -1 is out of range (0–65535)"),
            ("\"timeout\":3600", "\"timeout\":36e2", "$.entries[0].timeout: 36e2 is not an integer"),
            ("\"sport\":1025", "\"sport\":99999999999999999999999", "$.entries[1].orig.sport: 99999999999999999999999 is out of range"),
            ("\"version\":1", "\"version\":1.5", "$.version: 1.5 is not an integer"),
        ]
        for (find, replace, expected) in cases {
            let range = try #require(good.range(of: find))
            let hostile = good.replacingCharacters(in: range, with: replace)
            let error = refusal(hostile)
            #expect(error?.issues.contains { $0.description.hasPrefix(expected) } == true, "\(replace): \(text(error))")
        }
    }

    @Test func wrongTypesAndMissingFieldsHaveTheirPath() throws {
        let good = try documentText(2)
        let cases: [(String, String, String)] = [
            ("\"dport\":80", "\"dport\":\"80\"", "$.entries[0].orig.dport: wrong type"),
            ("\"mark\":1", "\"mark\":null", "$.entries[1].mark: null where"),
            (",\"zone\":0", "", "$.entries[0].zone: missing"),
            ("\"src\":\"10.79.0.1\"", "\"src\":\"10.79.0.300\"", "$.entries[0].orig.src: '10.79.0.300' is not an IP address"),
            ("\"state\":\"ESTABLISHED\"", "\"state\":\"OPEN\"", "$.entries[0].tcp.state:"),
            ("\"host\":\"fw/sd\"", "\"host\":7", "$.host: expected a string, found a number"),
            ("\"host\":\"fw/sd\"", "\"host\":[]", "$.host: expected a string, found an array"),
            ("\"version\":1", "\"version\":\"1\"", "$.version: expected an integer, found a string"),
        ]
        for (find, replace, expected) in cases {
            guard let range = good.range(of: find) else { continue }
            let error = refusal(good.replacingCharacters(in: range, with: replace))
            #expect(error?.issues.contains { $0.description.hasPrefix(expected) } == true, "\(replace): \(text(error))")
        }
        #expect(text(refusal(#"[1,2]"#)).hasPrefix("$: expected an object, found an array"))
        #expect(text(refusal(#"{"schema":"dysco-conntrack-state","version":1,"host":"h","exported_at":"2026-01-01T00:00:00Z","entries":[1]}"#))
            .hasPrefix("$.entries[0]: expected an object, found a number"))
        #expect(text(refusal(#"{"schema":"dysco-conntrack-state","version":1,"host":"h","exported_at":"yesterday","entries":[]}"#))
            == "$.exported_at: not an ISO 8601 time: \"yesterday\"")
        let missing = text(refusal(#"{"schema":"dysco-conntrack-state","version":1}"#))
        #expect(missing.contains("$.host: missing") && missing.contains("$.entries: missing") && missing.contains("$.exported_at: missing"))
    }

    @Test func strictJSON() throws {
        let good = try documentText(1)
        let bom = refusal([0xef, 0xbb, 0xbf] + Array(good.utf8))
        #expect(text(bom) == "$: malformed JSON: the document starts with a UTF-8 byte order mark (not allowed in JSON, RFC 8259 §8.1)")
        #expect(text(refusal(good + " x")).hasPrefix("$: malformed JSON: trailing data after the document at byte \(good.utf8.count + 1)"))
        #expect(text(refusal(good + "{}")).hasPrefix("$: malformed JSON: trailing data"))
    }

    @Test func whitespaceAfterTheDocumentIsFine() throws {
        _ = try StateDocumentReader().read(.bytes(Array((try documentText(1) + " \n\t\r\n").utf8)))
    }

    @Test func syntaxErrorsAreRefusedWithThePath() throws {
        let good = try documentText(1)
        let cases: [(String, String, String)] = [
            ("\"mark\":0", "\"mark\":00", "$.entries[0].mark: malformed JSON: number with a leading zero"),
            ("\"mark\":0", "\"mark\":+1", "$.entries[0].mark: malformed JSON: unexpected '+'"),
            ("\"mark\":0", "\"mark\":tru", "$.entries[0].mark: malformed JSON: invalid literal"),
            ("\"mark\":0,", "\"mark\":0,,", "$.entries[0]: malformed JSON: unexpected ','"),
            ("\"proto\":\"tcp\"", "\"proto\":\"t\\qp\"", "$.entries[0].proto: malformed JSON: bad escape"),
            ("\"proto\":\"tcp\"", "\"proto\":\"tc\np\"", "$.entries[0].proto: malformed JSON: unescaped control character 0x0a"),
            ("\"proto\":\"tcp\"", "\"proto\":\"\\ud800\"", "$.entries[0].proto: malformed JSON: lone UTF-16 surrogate"),
            ("\"proto\":\"tcp\"", "\"proto\":\"\\udc00x\"", "$.entries[0].proto: malformed JSON: lone UTF-16 surrogate"),
        ]
        for (find, replace, expected) in cases {
            let range = try #require(good.range(of: find), "\(find)")
            let error = refusal(good.replacingCharacters(in: range, with: replace))
            #expect(text(error).hasPrefix(expected), "\(replace): \(text(error))")
        }
        // Invalid UTF-8: a lone continuation byte, an overlong "/", an encoded surrogate, a truncated sequence.
        for bad: [UInt8] in [[0x80], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xe2, 0x82]] {
            let prefix = Array(#"{"schema":"dysco-conntrack-state","host":""#.utf8)
            let error = refusal(prefix + bad + Array(#"","version":1}"#.utf8))
            #expect(text(error).hasPrefix("$.host: malformed JSON: invalid UTF-8 at byte \(prefix.count)"), "\(bad): \(text(error))")
        }
        // Valid multi-byte UTF-8 and escapes pass.
        let host = "fw-ü-€-😀-\\u00fc-\\ud83d\\ude00"
        let document = try StateDocumentReader().read(.bytes(Array(good.replacingOccurrences(of: "fw/sd", with: host).utf8)))
        #expect(document.host.hasPrefix("fw-ü-€-😀-ü"))
    }

    @Test func duplicateKeysAreRefused() throws {
        let good = try documentText(1)
        #expect(text(refusal(good.replacingOccurrences(of: "\"version\":1", with: "\"version\":1,\"version\":2")))
            .hasPrefix("$.version: duplicate key \"version\""))
        #expect(text(refusal(good.replacingOccurrences(of: "\"entries\":[", with: "\"entries\":[],\"entries\":[")))
            .hasPrefix("$.entries: duplicate key \"entries\""))
        #expect(text(refusal(good.replacingOccurrences(of: "\"sport\":1024", with: "\"sport\":1024,\"sport\":80")))
            .hasPrefix("$.entries[0].orig.sport: duplicate key \"sport\""))
    }

    @Test func limitsOfDepthStringsKeysAndEntries() throws {
        let good = try documentText(1)
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        let nested = refusal(good.replacingOccurrences(of: "\"host\":", with: "\"x\":\(deep),\"host\":"))
        #expect(text(nested).hasPrefix("$.x[0]") && text(nested).contains("nested deeper than 16 levels"), "\(text(nested))")
        let huge = String(repeating: "a", count: 50_000_000)
        let long = refusal(good.replacingOccurrences(of: "fw/sd", with: huge))
        #expect(text(long).hasPrefix("$.host: string longer than 1024 bytes"), "\(text(long).prefix(200))")
        let keys = (0..<100).map { "\"k\($0)\":0" }.joined(separator: ",")
        #expect(text(refusal(good.replacingOccurrences(of: "\"mark\":", with: "\(keys),\"mark\":")))
            .hasPrefix("$.entries[0]: more than 64 keys in one object"))
        var limits = StateDocumentLimits()
        limits.maxEntryBytes = 200
        let entryLimit = refusal(good, limits: limits)
        #expect(text(entryLimit).hasPrefix("$.entries[0]: entry larger than the limit of 200 bytes"), "\(text(entryLimit))")
        let small = StateDocumentLimits(maxBytes: 100)
        #expect(text(refusal(good, limits: small)).hasPrefix("$: document of \(good.utf8.count) bytes is larger than the limit of 100 bytes"))
    }

    @Test func schemaAndVersionComeFirstWhereverTheyAre() throws {
        // Sorted keys put "entries" first: an unknown version still wins over the entries' problems.
        let v2 = #"{"entries":[{"new":"shape"}],"exported_at":"2026-01-01T00:00:00Z","host":"h","schema":"dysco-conntrack-state","version":2}"#
        #expect(text(refusal(v2)) == "$.version: unsupported state document version 2 (this build reads 1...1)")
        let other = #"{"entries":[{"new":"shape"}],"schema":"iptables-save","version":1}"#
        #expect(text(refusal(other)).hasPrefix("$.schema: \"iptables-save\" is not \"dysco-conntrack-state\""))
    }

    @Test func entryRulesAndDuplicatesHavePaths() throws {
        var entries = (0..<4).map { ConntrackBenchmark.syntheticEntry($0, base: 79) }
        entries[1].timeout = 0
        entries[2].labels = [3, 200]
        entries[3] = entries[0]
        let text = String(decoding: try StateDocument(host: "h", entries: entries).encoded(pretty: false), as: UTF8.self)
        let error = try #require(refusal(text))
        let lines = error.issues.map(\.description)
        #expect(lines.contains { $0.hasPrefix("$.entries[1].timeout: timeout is 0") && $0.contains("entry #1 (tcp src=10.79.0.1") })
        #expect(lines.contains { $0.hasPrefix("$.entries[2].labels[1]: label 200 out of range") })
        #expect(error.issues.contains { $0.path == "$.entries[3]" && $0.reason == "duplicate of entry #0" && $0.index == 3 })
    }

    @Test func issuesAreCappedAndCounted() throws {
        var entries = (0..<250).map { ConntrackBenchmark.syntheticEntry($0, base: 79) }
        for index in entries.indices { entries[index].timeout = 0 }
        let text = String(decoding: try StateDocument(host: "h", entries: entries).encoded(pretty: false), as: UTF8.self)
        let error = try #require(refusal(text))
        #expect(error.issues.count == 100 && error.moreIssues == 150 && error.count == 250)
        #expect(error.description.contains("(250 problems)") && error.description.contains("… and 150 more"))
    }

    @Test func onlyLocalRefusesSpecialAddresses() throws {
        let basic = EndpointPolicy(rule: .basic)
        let cases: [(String, String, String)] = [
            ("10.0.0.1", "127.0.0.1", "127.0.0.1 is loopback (--only-local)"),
            ("fd00::1", "::1", "::1 is loopback"),
            ("10.0.0.1", "169.254.1.1", "169.254.1.1 is link-local"),
            ("fd00::1", "fe80::1", "fe80::1 is link-local"),
            ("10.0.0.1", "224.0.0.5", "224.0.0.5 is multicast"),
            ("10.0.0.1", "0.1.2.3", "0.1.2.3 is in 0.0.0.0/8"),
            ("10.0.0.1", "::ffff:127.0.0.1", "127.0.0.1 is loopback"),  // IPv4-mapped: the IPv4 address
        ]
        for (src, dst, expected) in cases {
            let orig = ConntrackTuple(src: IPAddress(src)!, dst: IPAddress(dst)!, sport: 40000, dport: 80)
            let entry = ConntrackEntry(family: IPAddress(src)!.family, proto: .udp, orig: orig, reply: orig.inverted, timeout: 30)
            let findings = basic.findings(entry)
            #expect(findings.contains { $0.field == "orig.dst" && $0.message.hasPrefix(expected) }, "\(dst): \(findings)")
            #expect(findings.contains { $0.field == "reply.src" }, "the reply names it too")
            #expect(EndpointPolicy.off.findings(entry).isEmpty)
        }
        // Through a document: the path and the option name.
        var loopback = ConntrackBenchmark.syntheticEntry(0, base: 79)
        loopback.orig.src = IPAddress("127.0.0.1")!
        loopback.reply = loopback.orig.inverted
        let text = String(decoding: try StateDocument(host: "h", entries: [loopback]).encoded(pretty: false), as: UTF8.self)
        let error = refusal(text, endpoints: EndpointPolicy(rule: .basic, option: "--state-only-local"))
        #expect(error?.issues.first?.description.hasPrefix("$.entries[0].orig.src: 127.0.0.1 is loopback (--state-only-local)") == true,
                "\(String(describing: error))")
        #expect(try StateDocumentReader().read(.bytes(Array(text.utf8))).entryCount == 1, "the format alone allows it")
    }

    @Test func onlyLocalRoutesNeedsOneEndpointOnARoute() throws {
        let local = LocalAddresses(prefixes: [.init(network: [10, 79, 70, 0], length: 24), .init(network: [10, 79, 72, 1], length: 32)])
        let policy = EndpointPolicy(rule: .routes, local: local)
        func entry(_ src: String, _ dst: String) -> ConntrackEntry {
            let orig = ConntrackTuple(src: IPAddress(src)!, dst: IPAddress(dst)!, sport: 40000, dport: 80)
            return ConntrackEntry(family: .ipv4, proto: .udp, orig: orig, reply: orig.inverted, timeout: 30)
        }
        #expect(policy.findings(entry("10.79.70.9", "192.0.2.1")).isEmpty)
        #expect(policy.findings(entry("192.0.2.1", "10.79.72.1")).isEmpty)
        let far = policy.findings(entry("192.0.2.1", "10.79.72.2"))
        #expect(far.count == 1 && far[0].field == "orig" && far[0].message.contains("(--only-local=routes)"), "\(far)")
    }

    @Test func routeTablesParse() {
        let route4 = """
            Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
            eth0\t00000000\t0146460A\t0003\t0\t0\t0\t00000000\t0\t0\t0
            eth0\t0046460A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
            eth1\t0047460A\t00000000\t0201\t0\t0\t0\t00FFFFFF\t0\t0\t0
            """
        let prefixes4 = LocalAddresses.parseRoutes4(route4)
        #expect(prefixes4 == [.init(network: [10, 70, 70, 0], length: 24)], "default and reject routes do not count: \(prefixes4)")
        let route6 = """
            fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0
            00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001 lo
            """
        let prefixes6 = LocalAddresses.parseRoutes6(route6)
        #expect(prefixes6 == [.init(network: [0xfd] + [UInt8](repeating: 0, count: 15), length: 64)], "\(prefixes6)")
        let here = try? LocalAddresses.read()
        #expect(here?.contains(IPAddress("127.0.0.1")!) == true, "getifaddrs lists lo's address")
    }

    @Test func packedKeysTellFlowsApart() {
        let a = ConntrackBenchmark.syntheticEntry(1), b = ConntrackBenchmark.syntheticEntry(2)
        #expect(PackedFlowKey(a.key) == PackedFlowKey(a.key))
        #expect(PackedFlowKey(a.key) != PackedFlowKey(b.key))
        var zoned = a
        zoned.zone = 3
        #expect(PackedFlowKey(a.key) != PackedFlowKey(zoned.key))
        let v6a = FlowKey(src: IPAddress("fd00::1")!, sport: 1, dst: IPAddress("fd00::2")!, dport: 2)
        let v6b = FlowKey(src: IPAddress("fd00::2")!, sport: 1, dst: IPAddress("fd00::1")!, dport: 2)
        #expect(PackedFlowKey(v6a) == nil)
        var seen = SeenKeys()
        #expect(seen.insert(a.key, at: 0) == nil && seen.insert(v6a, at: 1) == nil && seen.insert(v6b, at: 2) == nil)
        #expect(seen.insert(b.key, at: 3) == nil && seen.insert(zoned.key, at: 4) == nil)
        #expect(seen.insert(a.key, at: 5) == 0 && seen.insert(v6a, at: 6) == 1 && seen.insert(zoned.key, at: 7) == 4)
    }

    /// A NAT binding re-keys the new box's right side (docs/ARCHITECTURE.md, "Boxes that translate"): the tuple the
    /// flow leaves the box with is the reply tuple inverted, in either family; an untranslated entry maps to itself.
    @Test func importedEntriesGiveTheTupleTheFlowLeavesWith() throws {
        func tcp(_ orig: ConntrackTuple, _ reply: ConntrackTuple) -> ConntrackEntry {
            ConntrackEntry(family: orig.src.family, proto: .tcp, orig: orig, reply: reply, timeout: 100)
        }
        let masq4 = tcp(ConntrackTuple(src: IPAddress("10.1.0.11")!, dst: IPAddress("10.1.0.201")!, sport: 40000, dport: 80),
                        ConntrackTuple(src: IPAddress("10.1.0.201")!, dst: IPAddress("10.1.0.101")!, sport: 80, dport: 61000))
        let masq6 = tcp(ConntrackTuple(src: IPAddress("fd00::b")!, dst: IPAddress("fd00::c9")!, sport: 40000, dport: 80),
                        ConntrackTuple(src: IPAddress("fd00::c9")!, dst: IPAddress("fd00::65")!, sport: 80, dport: 61000))
        let plain6 = ConntrackTuple(src: IPAddress("fd00::b")!, dst: IPAddress("fd00::c9")!, sport: 40001, dport: 80)
        let translations = ConntrackStateStore.translations([masq4, masq6, tcp(plain6, plain6.inverted)])
        #expect(translations[FiveTuple(parsing: "10.1.0.11:40000->10.1.0.201:80")!] == FiveTuple(parsing: "10.1.0.101:61000->10.1.0.201:80")!)
        #expect(translations[FiveTuple(parsing: "[fd00::b]:40000->[fd00::c9]:80")!] == FiveTuple(parsing: "[fd00::65]:61000->[fd00::c9]:80")!)
        #expect(translations[FiveTuple(parsing: "[fd00::b]:40001->[fd00::c9]:80")!] == FiveTuple(parsing: "[fd00::b]:40001->[fd00::c9]:80")!)
    }

    /// The agent's store refuses before it opens a conntrack handle: these run without root and without a table.
    @Test func theAgentsStoreRefusesBeforeTouchingTheKernel() throws {
        let store = ConntrackStateStore(logger: Logger(label: "sd.unit"))
        let big = Array(try documentText(200).utf8)
        #expect(big.count > 60_000)
        #expect(throws: (any Error).self) { try store.importState(big) }
        do { try store.importState(big) } catch {
            #expect("\(error)".contains("$: document of \(big.count) bytes is larger than the limit of 60000 bytes (--state-max-bytes)"),
                    "\(error)")
        }
        var loopback = ConntrackBenchmark.syntheticEntry(0, base: 79)
        loopback.orig.dst = IPAddress("127.0.0.53")!
        loopback.reply = loopback.orig.inverted
        let text = Array(String(decoding: try StateDocument(host: "h", entries: [loopback]).encoded(pretty: false), as: UTF8.self).utf8)
        do {
            try store.importState(text)
            Issue.record("the store imported a loopback entry")
        } catch {
            #expect("\(error)" == "state document refused, nothing imported: $.entries[0].orig.dst: 127.0.0.53 is loopback "
                + "(--state-only-local) — entry #0 (tcp src=10.79.0.1 dst=127.0.0.53 sport=1024 dport=80) (+1 more)", "\(error)")
        }
    }
}
