import Testing
@testable import DyscoCore

@Suite("`sessions` in pages (issue 9: never the whole table under the packet lock)")
struct SnapshotPagingTests {
    static func processor(sessions: Int) throws -> PacketProcessor {
        var p = PacketProcessor(config: AgentConfig(), portRange: 10000...20000, trust: TestKeys.group)
        for i in 0..<sessions {
            let s = FiveTuple.t("10.77.0.10", UInt16(30000 + i), "10.77.0.201", 80)
            _ = try p.table.insertLeftEnd(session: s, hops: [s.dstAddr], now: 0)
        }
        return p
    }

    @Test("pages list every session once, ascending, and say when more are left")
    func pagesCoverTheTable() throws {
        var p = try Self.processor(sessions: 5_000)
        // Holes in the ids, as removals leave them.
        for id in p.table.records.keys where id % 7 == 0 { p.table.remove(id) }
        var seen: [SessionTable.SessionID] = []
        var after: UInt64?
        var pages = 0
        while true {
            let page = p.snapshotSessions(now: 0, after: after, limit: 700)
            pages += 1
            #expect(page.sessions.count <= 700)
            seen += page.sessions.map(\.id)
            guard page.more else { break }
            #expect(page.sessions.count == 700, "only the last page is short")
            after = page.sessions.last?.id
        }
        #expect(seen == p.table.records.keys.sorted())
        #expect(pages == (p.table.records.count + 699) / 700)
    }

    @Test("a page after the last id is empty and final; a limit larger than the table gives it all")
    func edges() throws {
        let p = try Self.processor(sessions: 10)
        let all = p.snapshotSessions(now: 0, limit: 1_000)
        #expect(all.sessions.count == 10 && !all.more)
        let last = try #require(all.sessions.last?.id)
        let beyond = p.snapshotSessions(now: 0, after: last, limit: 5)
        #expect(beyond.sessions.isEmpty && !beyond.more)
        let exact = p.snapshotSessions(now: 0, limit: 10)
        #expect(exact.sessions.count == 10 && !exact.more, "a full last page is not followed by an empty one")
        #expect(p.snapshotSessions(now: 0, limit: 0).sessions.count == 1, "a limit below 1 is taken as 1")
    }

    @Test("a SYN-only session shows as opening, not established (issue 9, item 5)")
    func openingState() throws {
        var p = try Self.processor(sessions: 2)
        let ids = p.table.records.keys.sorted()
        p.table.update(ids[1]) { $0.established = true }
        #expect(p.snapshotSessions(now: 0).sessions.map(\.state) == ["opening", "opening"],
                "established but its right subsession not answered yet (a new box of a reconfiguration)")
        p.table.update(ids[1]) { $0.rightEstablished = true }
        let rows = p.snapshotSessions(now: 0).sessions
        #expect(rows.map(\.state) == ["opening", "established"])
        p.table.update(ids[0]) { $0.closeDeadline = 1 }
        #expect(p.snapshotSessions(now: 0).sessions.first?.state == "closing")
    }
}
