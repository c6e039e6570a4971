import DyscoBench
import DyscoLab
import Foundation
import Testing

/// The short soak of CI (issue 19, item 5; `dysco-bench soak` is the long one, the same code): live sessions moved
/// back and forth fw1 ⇄ fw2 while every host drops 30 % of the control datagrams it sends. Its own lab (`sk1`,
/// 10.78.140.0/24), removed also on failure.
@Suite(.serialized) struct SoakTests {
    static func record(_ line: String) {
        FileHandle.standardError.write(Data("[soak-tests] \(line)\n".utf8))
    }

    /// Asserted: the loss rule bites; no session is lost (after each move its client still lists it and sends it where
    /// the move's result says: the new box if it moved, the old one if not); every wave is carried in full and every
    /// download is byte-exact; most sessions of the moves move. Fixed in issue 19 and asserted since: a teardown that
    /// arrives after the session closed on the new path is answered, and a retransmitted one passes a hop that had
    /// already left; a session that begins to close before anything of it went on the new path is not moved; an
    /// endpoint's pure ACK goes on the new path once a segment came in on it. Before, the old box kept an established
    /// record of a session that left it (which refused the session's next move there and black-holed a new session
    /// with the same tuple), and dropped as INVALID an ACK of the new path's FIN. So: no firewall drops anything as
    /// INVALID, and every agent's table drains once the downloads ended. Recorded, not asserted (so that each run
    /// shows them): moves not complete (a cancel under this loss is legitimate; its reason is printed; `the session is
    /// closing` is one) and the endpoints' TCP retransmissions (the report's line; a lost data packet of the paced
    /// downloads is retransmitted whether or not a move was under way).
    @Test("(a) 6 live sessions moved fw1 ⇄ fw2 36 times (stateful, both strict) while every host drops 30 % of its control datagrams: no session lost or misplaced, every wave carried in full and byte-exact, most sessions moved; no INVALID drop, tables drained (lab sk1, 10.78.140.0/24)")
    func shortSoak() async throws {
        var options = SoakBenchmark.Options()
        options.moves = 36
        options.sessions = 6
        options.sampleEvery = 12
        options.megabytes = 4
        options.rateMiBps = 0.5
        options.lossProbability = 0.3
        options.deadlineMilliseconds = 10_000
        options.drainTimeoutSeconds = 30
        options.labName = "sk1"
        options.subnet = "10.78.140.0/24"
        let soak = SoakBenchmark(options: options, logger: TestSupport.logger)
        try await TestSupport.withLab(soak.spec(binary: nil)) { lab in
            let report = try await soak.run(in: lab)
            Self.record(report.text)
            // Plain values, so that a failed expectation prints them and not the whole report.
            let (moves, dropped) = (report.moves.count, report.controlDropped.values.reduce(0, +))
            let (downloads, intact) = (report.downloads, report.downloadsIntact)
            let problems = zip(report.downloadProblemWaves, report.downloadProblems).map { (wave: $0, problem: $1) }
            let (partial, waveProblems) = (Set(report.partialWaves), report.waveProblems)
            let lost = report.vanished + report.misplaced
            let (matched, moved) = (report.matched, report.moved)
            #expect(moves == options.moves)
            #expect(dropped > 0, "the loss rule dropped nothing: the test would not bite")
            #expect(downloads >= options.sessions, "\(downloads) downloads")
            #expect(problems.filter { !partial.contains($0.wave) }.isEmpty, "in waves carried in full: \(problems)")
            #expect(lost.isEmpty, "\(lost)")
            #expect(matched > 0 && moved * 2 > matched, "most sessions move: \(moved) of \(matched)")
            // Fixed in issue 19 (a teardown after the session closed is answered, and passes a hop that already left):
            // no box keeps a record of a session that left it, so every wave is carried in full and the tables drain.
            #expect(partial.isEmpty && intact == downloads, "waves not carried in full \(waveProblems); downloads \(intact)/\(downloads): \(problems)")

            let invalid = report.invalidDropped.filter { $0.value > 0 }
            #expect(invalid.isEmpty, "INVALID drops at a firewall: \(invalid)")
            #expect(report.drained, "tables not drained after \(report.drainSeconds) s: \(report.leftovers.prefix(10))")

            let incomplete = report.moves.filter { $0.moved != $0.matched || $0.matched != $0.asked }.map { m in
                "move \(m.index) \(m.from)→\(m.to) \(m.moved)/\(m.matched)/\(m.asked): "
                    + m.failures.map { "\($0.session) \($0.result) at \($0.failedStep): \($0.reason)" }.joined(separator: "; ")
            }
            if !incomplete.isEmpty { Self.record("moves not complete: \(incomplete)") }
        }
    }
}
