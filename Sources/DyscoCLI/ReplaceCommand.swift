import ArgumentParser
import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging

struct ReplaceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replace",
        abstract: "Move live sessions from one middlebox to another, with the firewall's state (paper §3).",
        discussion: """
            Asks the old box's agent for its sessions (matching --match), which triggers each session's left \
            anchor (the old box's left neighbour). Per session the agents lock the segment, set up the new path \
            through --new, drain the old path (the anchors hold new data meanwhile), move the firewall's \
            conntrack entry from the old box to the new one, release the held data on the new path and tear the \
            old path down. A step that fails or runs past --deadline cancels that session's migration: it \
            stays on the old box, unharmed, and the report says which step failed and why.

            Several old boxes (--old fw1,fw3: consecutive boxes of each session's path) are replaced together \
            (k → m): the segment then ends at the last old box's right neighbour, read from that box's agent (so \
            several old boxes need --lab); the first old box's state moves (or --state-from's).

            With --stateless no state moves and no data is held: new data takes the new path at once and the \
            old path carries retransmissions until it is drained (the two-path rules of §3.5); only for boxes \
            that keep no per-session state.

            Run it on the old box's host, or name its agent with --netns, --lab (host names allowed) or --socket.
            Exit status: 0 when every matched session moved (also when none matched); 1 when any did not (they stay \
            on the old box).
            Examples:
              dysco-migrate replace --lab demo --old fw1 --new fw2
              dysco-migrate replace --lab demo --old fw1,fw3 --new fw2
              dysco-migrate replace --netns demo-fw1 --old 10.77.0.101 --new 10.77.0.102 --match dport=80 --json
            """
    )

    @Option(help: ArgumentHelp("The middlebox(es) to replace, in path order, comma-separated (k → m: consecutive boxes of each session's path).",
                               valueName: "addr|host[,...]"))
    var old: String

    @Option(help: ArgumentHelp("The new middlebox(es), in path order, comma-separated.", valueName: "addr|host[,...]"))
    var new: String

    @Flag(help: "No state transfer, no buffering: the two-path rules only (boxes without per-session state).")
    var stateless = false

    @Option(help: ArgumentHelp("With several old boxes: the one whose state moves to the first new box (default: the first).",
                               valueName: "addr|host"))
    var stateFrom: String?

    @OptionGroup var reconfiguration: ReconfigurationOptions

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

    @OptionGroup var placement: MiddleboxPlacementOptions

    func validate() throws {
        guard !new.isEmpty else { throw ValidationError("--new names at least one middlebox") }
        guard !old.isEmpty else { throw ValidationError("--old names at least one middlebox") }
        if stateless && stateFrom != nil { throw ValidationError("--state-from moves state: not with --stateless") }
    }

    func run() async throws {
        let lab = try placement.openLab(component: "replace")
        let oldBoxes = try Reconfiguration.addresses(old, placement: placement, lab: lab)
        let newBoxes = try Reconfiguration.addresses(new, placement: placement, lab: lab, bothFamilies: true)
        if let clash = newBoxes.first(where: oldBoxes.contains) { throw ValidationError("--new must not contain an old box (\(clash))") }
        let donor = try stateFrom.map { try placement.address($0, lab: lab) }
        if let donor, !oldBoxes.contains(donor) { throw ValidationError("--state-from \(donor) is not one of --old") }
        let names = old.split(separator: ",").map(String.init)
        // A dual-stack lab's old boxes (and donor) are named in both families: each session takes those of its own.
        let oldBoxes6 = Reconfiguration.ipv6Addresses(old, lab: lab)
        let request = ReplaceRequest(predicate: try reconfiguration.predicate(), newBoxes: newBoxes,
                                     mode: stateless ? .stateless : .stateful, deadlineMilliseconds: reconfiguration.deadline,
                                     alsoOld: Array(oldBoxes.dropFirst()) + Array(oldBoxes6.dropFirst()), donor: donor,
                                     alsoDonor: stateFrom.flatMap { Reconfiguration.ipv6Addresses($0, lab: lab).first },
                                     rightAnchors: try await Reconfiguration.rightAnchors(oldBoxes: oldBoxes, oldBoxesIPv6: oldBoxes6,
                                                                                          names: names, placement: placement, lab: lab))
        try await Reconfiguration.run(
            request, at: oldBoxes[0], name: names[0], placement: placement,
            lab: lab, json: jsonOutput.json,
            title: "replace \(Reconfiguration.list(oldBoxes)) → \(Reconfiguration.list(newBoxes)) (\(request.mode))")
    }

    static func render(_ report: ReplaceReport, title: String) -> String {
        var lines = ["\(title): \(report.matched) session(s) matched"]
        guard !report.sessions.isEmpty else { return (lines + ["no session of this box matched; nothing to do"]).joined(separator: "\n") }
        let header = ["session", "result", "lock", "new-path", "drain", "export", "transfer", "import", "release", "teardown", "total", "paper"]
        var rows = [header]
        for s in report.sessions {
            if let p = s.phases, s.result == "moved" {
                rows.append([s.session.description, s.result] + [p.lock, p.newPath, p.drain, p.export, p.transfer, p.import,
                                                                 p.release, p.teardown, p.total, p.paper].map(Self.micros))
            } else {
                rows.append([s.session.description, "\(s.result) at \(s.failedStep): \(s.reason)"])
            }
        }
        let widths = (0..<header.count).map { i in rows.filter { $0.count == header.count }.map { $0[i].count }.max() ?? 0 }
        for row in rows {
            lines.append(row.count == header.count
                ? zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
                : row.joined(separator: "  "))
        }
        // Moved, with a note: the old path never acknowledged the teardown (issue 19; the reason starts with
        // "teardown unanswered"): the session is on the new path, the old one expires by idleness.
        for s in report.sessions where s.result == "moved" && !s.reason.isEmpty {
            lines.append("\(s.session): moved, \(s.reason)")
        }
        let moved = report.sessions.filter { $0.result == "moved" }
        let totals = moved.compactMap { $0.phases?.total }.sorted()
        var summary = "\(moved.count)/\(report.sessions.count) moved in \(micros(UInt32(clamping: report.elapsedMicroseconds)))"
        if !totals.isEmpty {
            summary += "; per session p50 \(micros(totals[totals.count / 2])), max \(micros(totals.last!))"
        }
        lines.append(summary)
        return lines.joined(separator: "\n")
    }

    static func micros(_ value: UInt32) -> String {
        value >= 10_000 ? String(format: "%.1fms", Double(value) / 1000) : "\(value)µs"
    }
}
