import ArgumentParser
import DyscoCore
import DyscoAgent
import DyscoSystem
import Foundation

struct PathCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "path",
        abstract: "Move sessions between the kernel fast path and the agent's slow path.",
        discussion: """
            `path hold ID...` takes sessions back to the slow path (NFQUEUE): it returns once the kernel no \
            longer rewrites them, so every later packet reaches the agent (what a migration needs). \
            `path release ID...` returns them to the kernel. Session ids come from `dysco-migrate sessions`.
            """
    )

    enum Action: String, ExpressibleByArgument, CaseIterable { case hold, release }

    @Argument(help: "hold or release.") var action: Action
    @Argument(help: "Session ids.") var ids: [UInt64]
    @OptionGroup var agent: AgentAddressOptions
    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Plain>

    func validate() throws {
        guard !ids.isEmpty else { throw ValidationError("name at least one session id") }
    }

    func run() async throws {
        let command: ControlRequest.Command = action == .hold ? .hold : .release
        let data = try await ControlClient.request(ControlRequest(command, sessions: ids), path: agent.socketPath)
        let reply = try JSONDecoder().decode(ControlPathReply.self, from: data)
        if jsonOutput.json {
            FileHandle.standardOutput.write(data)
        } else {
            print("\(action.rawValue): \(reply.sessions.map(String.init).joined(separator: " "))")
        }
        let missing = Set(ids).subtracting(reply.sessions)
        if !missing.isEmpty {
            throw ValidationError("no such session (or not held): \(missing.sorted().map(String.init).joined(separator: " "))")
        }
    }
}
