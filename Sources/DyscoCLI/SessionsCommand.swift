import ArgumentParser
import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation

struct SessionsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sessions",
        abstract: "List the sessions of the agent in this (or another) network namespace.",
        discussion: """
            Shows each session's tuple as applications see it, its left and right subsession tuples as they \
            travel on the wire, its state and which data path carries it, then the agent's packet counters.
            """
    )

    @OptionGroup var agent: AgentAddressOptions

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Snapshot>

    @Option(help: "Show at most this many sessions (the first, by id).")
    var limit: Int?

    @Option(help: "Start after this session id (with --limit: page through a large table).")
    var after: UInt64?

    func validate() throws {
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
    }

    func run() async throws {
        // The agent answers in pages (AgentSnapshot.pageLimit sessions each); this fetches them in turn.
        let snapshot = try await ControlClient.snapshot(path: agent.socketPath, after: after, limit: limit ?? .max)
        if jsonOutput.json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            FileHandle.standardOutput.write(try encoder.encode(snapshot))
            FileHandle.standardOutput.write(Data("\n".utf8))
            return
        }
        print(Self.render(snapshot))
    }

    static func render(_ snapshot: AgentSnapshot) -> String {
        // An agent older than 0.20 does not say its release (read all the same: rolling upgrade).
        let release = snapshot.agentVersion.map { " \($0)" } ?? ""
        let wire = snapshot.wireVersions.map { ", control protocol " + $0.map(String.init).joined(separator: "+") } ?? ""
        var lines = ["agent\(release)\(wire), pid \(snapshot.pid) netns \(snapshot.netns ?? "host") queue \(snapshot.queue), "
            + "fast path \(snapshot.fastPath ? "on" : "off"), "
            + "up \(Int(snapshot.uptimeSeconds)) s, \(snapshot.sessions.count) session(s)"
            + (snapshot.total.map { $0 != snapshot.sessions.count ? " shown of \($0)" : "" } ?? "")
            + (snapshot.next.map { " (more: --after \($0))" } ?? "")]
        if !snapshot.sessions.isEmpty {
            let header = ["ID", "ROLE", "SESSION", "LEFT SUBSESSION", "RIGHT SUBSESSION", "STATE", "PATH", "MIGRATION",
                          "PACKETS"]
            let rows = snapshot.sessions.map { s -> [String] in
                let left: String = s.left.map { "\($0)" } ?? "-"
                let right: String = s.right.map { "\($0)" } ?? "-"
                let migration: String = s.migration.map { "\($0) (\(s.paths ?? "old"))" } ?? "-"
                // A box that translates: the session as it came in, then as its NAT sent it on.
                let session = s.translated.map { "\(s.session) ⇒ \($0)" } ?? "\(s.session)"
                return ["\(s.id)", s.role.rawValue, session, left, right, s.state, s.carrier.rawValue, migration,
                        "\(s.packets)"]
            }
            let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
            for row in [header] + rows {
                lines.append(zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }
                    .joined(separator: "  "))
            }
        }
        let c = snapshot.counters
        lines.append("packets \(c.packets): ingress translated \(c.translatedIngress), egress translated "
            + "\(c.translatedEgress), passed \(c.passedThrough), malformed \(c.malformedPackets), malformed Dysco "
            + "SYN \(c.malformedDyscoSyn), collisions \(c.collisions); sessions created \(c.sessionsCreated), "
            + "removed \(c.sessionsRemoved)")
        lines.append("trust: trailer v1 refused \(c.trailerVersionOneRefused), bad MAC \(c.trailerBadMAC), forbidden address "
            + "\(c.trailerForbiddenAddress); anchors: held \(c.anchorHeld), probes received \(c.probesReceived), "
            + "late after leaving \(c.droppedAfterLeaving)")
        if !snapshot.control.isEmpty {
            let dropped = snapshot.control.filter { $0.key.hasPrefix("dropped.") }.sorted { $0.key < $1.key }
            let migrations = snapshot.control.filter { $0.key.hasPrefix("migrations.") }.sorted { $0.key < $1.key }
            lines.append("control: " + (migrations + dropped).map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        }
        return lines.joined(separator: "\n")
    }
}
