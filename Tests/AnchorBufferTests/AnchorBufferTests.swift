import AnchorBuffer
import Testing

/// AnchorBuffer is ~Copyable: #expect cannot capture it, so each check reads into a local first.
@Suite("AnchorBuffer (paper §3.5: the anchors buffer new data while the state moves)")
struct AnchorBufferTests {
    @Test("FIFO per session; take empties that session only")
    func fifo() {
        var buffer = AnchorBuffer<String>()
        let accepted = [buffer.append("a1", size: 10, session: 1), buffer.append("b1", size: 20, session: 2),
                        buffer.append("a2", size: 30, session: 1), buffer.append("a3", size: 40, session: 1)]
        #expect(accepted == [true, true, true, true])
        var counts = (buffer.count(session: 1), buffer.bytes(session: 1), buffer.count(session: 2), buffer.bytes(session: 2))
        #expect(counts == (3, 80, 1, 20))
        var totals = (buffer.totalBytes, buffer.totalPackets)
        #expect(totals == (100, 4))
        var sessions = Set(buffer.sessions)
        #expect(sessions == [1, 2])
        let first = buffer.take(session: 1)
        #expect(first == ["a1", "a2", "a3"])
        counts = (buffer.count(session: 1), buffer.bytes(session: 1), buffer.count(session: 2), buffer.bytes(session: 2))
        #expect(counts == (0, 0, 1, 20))
        let again = buffer.take(session: 1)
        #expect(again == [])
        totals = (buffer.totalBytes, buffer.totalPackets)
        #expect(totals == (20, 1))
        sessions = Set(buffer.sessions)
        #expect(sessions == [2])
        let second = buffer.take(session: 2)
        #expect(second == ["b1"])
        totals = (buffer.totalBytes, buffer.totalPackets)
        #expect(totals == (0, 0))
        let none = buffer.take(session: 99)
        #expect(none == [] && buffer.sessions.isEmpty)
    }

    @Test("per-session packet limit: the packet that does not fit is refused and not taken")
    func packetLimit() {
        var buffer = AnchorBuffer<Int>(limits: .init(perSessionPackets: 2, perSessionBytes: 1000, totalBytes: 10_000))
        let accepted = [buffer.append(1, size: 1, session: 7), buffer.append(2, size: 1, session: 7),
                        buffer.append(3, size: 1, session: 7)]
        #expect(accepted == [true, true, false])
        let state = (buffer.refused, buffer.count(session: 7), buffer.bytes(session: 7), buffer.totalPackets, buffer.totalBytes)
        #expect(state == (1, 2, 2, 2, 2))
        let other = buffer.append(4, size: 1, session: 8)  // another session has its own limit
        #expect(other)
        let taken = buffer.take(session: 7)
        #expect(taken == [1, 2])
        let roomAgain = buffer.append(5, size: 1, session: 7)
        #expect(roomAgain)
    }

    @Test("per-session byte limit refuses without taking; an exact fit is accepted")
    func byteLimit() {
        var buffer = AnchorBuffer<Int>(limits: .init(perSessionPackets: 100, perSessionBytes: 100, totalBytes: 10_000))
        let accepted = [buffer.append(1, size: 60, session: 1), buffer.append(2, size: 41, session: 1)]
        #expect(accepted == [true, false])
        var state = (buffer.refused, buffer.bytes(session: 1), buffer.count(session: 1))
        #expect(state == (1, 60, 1))
        let exact = buffer.append(3, size: 40, session: 1)
        let over = buffer.append(4, size: 1, session: 1)
        #expect(exact && !over)
        state = (buffer.refused, buffer.bytes(session: 1), buffer.count(session: 1))
        #expect(state == (2, 100, 2))
        let taken = buffer.take(session: 1)
        #expect(taken == [1, 3])
    }

    @Test("total limit across sessions refuses without taking")
    func totalLimit() {
        var buffer = AnchorBuffer<Int>(limits: .init(perSessionPackets: 100, perSessionBytes: 100, totalBytes: 150))
        let accepted = [buffer.append(1, size: 100, session: 1), buffer.append(2, size: 60, session: 2)]
        #expect(accepted == [true, false])
        let state = (buffer.refused, buffer.count(session: 2), buffer.totalBytes, buffer.sessions.contains(2))
        #expect(state == (1, 0, 100, false))
        let fits = buffer.append(3, size: 50, session: 2)
        let total = buffer.totalBytes
        #expect(fits && total == 150)
        _ = buffer.take(session: 1)
        let after = buffer.totalBytes
        let fitsAgain = buffer.append(4, size: 60, session: 3)
        #expect(after == 50 && fitsAgain)
    }

    @Test("peakBytes records the high-water mark and does not fall on take")
    func peak() {
        var buffer = AnchorBuffer<Int>()
        var peak = buffer.peakBytes
        #expect(peak == 0)
        _ = buffer.append(1, size: 300, session: 1)
        _ = buffer.append(2, size: 200, session: 2)
        peak = buffer.peakBytes
        #expect(peak == 500)
        _ = buffer.take(session: 1)
        let state = (buffer.peakBytes, buffer.totalBytes)
        #expect(state == (500, 200))
        _ = buffer.append(3, size: 100, session: 1)
        peak = buffer.peakBytes
        #expect(peak == 500)
        _ = buffer.append(4, size: 400, session: 3)
        peak = buffer.peakBytes
        #expect(peak == 700)
        // A refused packet does not count towards the peak.
        var small = AnchorBuffer<Int>(limits: .init(perSessionPackets: 10, perSessionBytes: 10, totalBytes: 10))
        _ = small.append(1, size: 8, session: 1)
        _ = small.append(2, size: 8, session: 1)
        peak = small.peakBytes
        #expect(peak == 8)
    }

    @Test("default limits are the documented ones")
    func defaults() {
        let limits = AnchorBuffer<Int>.Limits()
        #expect(limits.perSessionPackets == 4096)
        #expect(limits.perSessionBytes == 32 << 20)
        #expect(limits.totalBytes == 256 << 20)
    }
}
