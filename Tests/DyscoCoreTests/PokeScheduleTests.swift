import DyscoCore
import Testing

@Suite("Pokes while the old path drains (paper §3.5: the old path goes once every byte sent on it is acknowledged)")
struct PokeScheduleTests {
    let peer = IPAddress(10, 0, 0, 1)

    @Test("a poke that finds the old path drained, or no session, ends the chain")
    func stopsWhenDrained() {
        #expect(PokeSchedule.next(after: .sent(length: 40, to: peer, drained: true), remaining: 50) == .stop)
        #expect(PokeSchedule.next(after: .stop, remaining: 50) == .stop)
    }

    @Test("not drained yet, or the endpoint's acknowledgment unknown (the elicit asks): poke again, one fewer left")
    func pokesAgain() {
        #expect(PokeSchedule.next(after: .sent(length: 40, to: peer, drained: false), remaining: 50) == .again(remaining: 49))
        #expect(PokeSchedule.next(after: .unknownNumbers, remaining: 7) == .again(remaining: 6))
    }

    @Test("at most `pokes` pokes per session")
    func bounded() {
        var remaining = PokeSchedule.pokes, sent = 0
        while true {
            sent += 1
            guard case .again(let left) = PokeSchedule.next(after: .sent(length: 40, to: peer, drained: false),
                                                            remaining: remaining) else { break }
            remaining = left
        }
        #expect(sent == PokeSchedule.pokes)
    }

    @Test("one session is poked every millisecond; a batch of 1,000 shares 20,000 pokes a second (50 ms each)")
    func interval() {
        #expect(PokeSchedule.interval(activeSessions: 0) == 1_000)
        #expect(PokeSchedule.interval(activeSessions: 1) == 1_000)
        #expect(PokeSchedule.interval(activeSessions: 20) == 1_000)
        #expect(PokeSchedule.interval(activeSessions: 1_000) == 50_000)
    }

    @Test("the drain counts as slow after the tenth poke, once")
    func slow() {
        #expect(PokeSchedule.isSlow(remaining: PokeSchedule.pokes - 10))
        #expect(!PokeSchedule.isSlow(remaining: PokeSchedule.pokes))
        #expect(!PokeSchedule.isSlow(remaining: 1))
    }
}
