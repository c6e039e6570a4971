import DyscoCore
import Testing

@Suite("Port allocator")
struct PortAllocatorTests {
    @Test("hands out each port once, reports exhaustion, reuses released ports")
    func allocation() {
        var ports = PortAllocator(range: 20000...20099)
        var seen = Set<UInt16>()
        for _ in 0..<100 {
            let port = ports.allocate()
            #expect(port != nil)
            #expect(seen.insert(port!).inserted)
        }
        let exhausted = ports.allocate()
        #expect(exhausted == nil)
        #expect(seen.allSatisfy { (20000...20099).contains($0) })
        ports.release(20042)
        #expect(ports.inUse == 99)
        let reused = ports.allocate()
        #expect(reused == 20042)
        let reserveTaken = ports.reserve(20042)
        #expect(!reserveTaken)
        ports.release(20042)
        let reserveFree = ports.reserve(20042)
        let reserveOutside = ports.reserve(30000)
        #expect(reserveFree && !reserveOutside)
    }

    @Test("random: a just-released port is rarely the next one handed out (range of 1,000)")
    func randomReuse() {
        var ports = PortAllocator(range: 1000...1999)
        var same = 0
        for _ in 0..<100 {
            let first = ports.allocate()!
            ports.release(first)
            if ports.allocate() == first { same += 1 }
        }
        #expect(same < 10)
    }
}

@Suite("Session table (paper §2.1: session and subsession translations)")
struct SessionTableTests {
    let s = FiveTuple.t("10.77.0.10", 40000, "10.77.0.201", 80)

    @Test("left end: egress S→R and ingress rev(R)→rev(S)")
    func leftEnd() throws {
        var table = SessionTable(portRange: 10000...10010)
        let id = try table.insertLeftEnd(session: s, hops: [IPAddress("10.77.0.101")!, s.dstAddr], now: 0)
        let record = try #require(table.records[id])
        let r = try #require(record.right)
        #expect(r.srcAddr == s.srcAddr && r.dstAddr == IPAddress("10.77.0.101")! && r.dstPort == 80)
        #expect((10000...10010).contains(r.srcPort), "a port of the range (random: docs/ARCHITECTURE.md)")
        #expect(record.remaining == [s.dstAddr])
        #expect(table.egress[s]?.target == r)
        #expect(table.ingress[r.reversed]?.target == s.reversed)
        #expect(table.ingress.count == 1 && table.egress.count == 1)
        table.remove(id)
        #expect(table.ingress.isEmpty && table.egress.isEmpty && table.records.isEmpty && table.bySession.isEmpty)
        #expect(table.ports.inUse == 0)
    }

    @Test("middlebox: ingress L→S, egress rev(S)→rev(L); then the right subsession adds S→R, rev(R)→rev(S)")
    func middlebox() throws {
        var table = SessionTable(portRange: 10000...10010)
        let l = FiveTuple.t("10.77.0.10", 12345, "10.77.0.101", 80)
        let id = try table.insertFromLeft(session: s, left: l, remaining: [s.dstAddr], now: 0)
        #expect(table.records[id]?.role == .middlebox)
        #expect(table.ingress[l]?.target == s)
        #expect(table.egress[s.reversed]?.target == l.reversed)
        try table.openRight(id, local: l.dstAddr, next: s.dstAddr)
        let r = try #require(table.records[id]?.right)
        #expect(r.srcAddr == l.dstAddr && r.dstAddr == s.dstAddr)
        #expect(table.egress[s]?.target == r)
        #expect(table.ingress[r.reversed]?.target == s.reversed)
        table.remove(id)
        #expect(table.ingress.isEmpty && table.egress.isEmpty)
    }

    @Test("a second session with a colliding key is refused")
    func collision() throws {
        var table = SessionTable(portRange: 10000...10010)
        let l = FiveTuple.t("10.77.0.10", 12345, "10.77.0.101", 80)
        _ = try table.insertFromLeft(session: s, left: l, remaining: [], now: 0)
        #expect(throws: SessionTable.InsertError.collision(l)) {
            try table.insertFromLeft(session: .t("10.77.0.11", 1, "10.77.0.201", 80), left: l, remaining: [], now: 0)
        }
        #expect(throws: SessionTable.InsertError.self) { try table.insertLeftEnd(session: s, hops: [s.dstAddr], now: 0) }
    }

    @Test("port exhaustion is an error, not a crash, and leaves nothing behind")
    func exhaustion() throws {
        var table = SessionTable(portRange: 10000...10000)
        _ = try table.insertLeftEnd(session: s, hops: [s.dstAddr], now: 0)
        let other = FiveTuple.t("10.77.0.10", 40001, "10.77.0.201", 80)
        #expect(throws: SessionTable.InsertError.portsExhausted) { try table.insertLeftEnd(session: other, hops: [other.dstAddr], now: 0) }
        #expect(table.count == 1)
        #expect(table.bySession[other] == nil)
    }

    @Test("expiry: idle sessions and closed sessions past their deadline")
    func expiry() throws {
        var table = SessionTable(portRange: 10000...10010)
        let a = try table.insertLeftEnd(session: s, hops: [s.dstAddr], now: 0)
        let b = try table.insertLeftEnd(session: .t("10.77.0.10", 40001, "10.77.0.201", 80), hops: [s.dstAddr], now: 50)
        table.update(b) { $0.closeDeadline = 60 }
        #expect(table.expired(now: 59, idleTimeout: 100).isEmpty)
        #expect(table.expired(now: 60, idleTimeout: 100) == [b])
        #expect(Set(table.expired(now: 100, idleTimeout: 100)) == [a, b])
    }
}
