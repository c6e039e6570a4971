import ArgumentParser
import DyscoAgent
import DyscoCore
import Foundation

struct PolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Show or change an agent's service-chaining policy at run time.",
        discussion: """
            show: the policies in force (from --config) and the cordons. reload: read the agent's --config file \
            again (as SIGHUP does); new sessions follow it, existing ones keep their chains; a file that does \
            not load changes nothing. cordon ADDR --to ADDR[,...]: new sessions avoid ADDR, taking the \
            replacements in turn (`drain` does this first); uncordon ADDR ends it. Cordons survive a reload, \
            not an agent restart.
            """,
        subcommands: [Show.self, Reload.self, Cordon.self, Uncordon.self]
    )

    /// Sends `request` to the agent of `agent` and prints its reply (JSON with --json), exit 1 if it refused.
    static func send(_ request: PolicyRequest, agent: AgentAddressOptions, output: JSONOutput<JSONHelp.AgentAnswer>) async throws {
        let data = try await ControlClient.request(ControlRequest(.policy, policy: request), path: agent.socketPath)
        guard let reply = try? JSONDecoder().decode(PolicyReply.self, from: data) else {
            throw ValidationError("the agent answered: \(String(decoding: data.prefix(300), as: UTF8.self))")
        }
        if output.json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            FileHandle.standardOutput.write(try encoder.encode(reply) + Data("\n".utf8))
        } else {
            print(PolicyCommand.render(reply))
        }
        if let error = reply.error {
            FileHandle.standardError.write(Data("policy: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the policies in force and the cordons.")
        @OptionGroup var agent: AgentAddressOptions
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.AgentAnswer>
        func run() async throws { try await PolicyCommand.send(PolicyRequest(.show), agent: agent, output: jsonOutput) }
    }

    struct Reload: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Read the agent's --config file again (as SIGHUP does).")
        @OptionGroup var agent: AgentAddressOptions
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.AgentAnswer>
        func run() async throws { try await PolicyCommand.send(PolicyRequest(.reload), agent: agent, output: jsonOutput) }
    }

    struct Cordon: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "New sessions avoid a middlebox, taking the replacements in turn.")
        @Argument(help: "The middlebox's address.") var address: String
        @Option(help: ArgumentHelp("Where new sessions go instead, comma-separated.", valueName: "addr[,...]"))
        var to: String
        @OptionGroup var agent: AgentAddressOptions
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.AgentAnswer>

        func validate() throws {
            guard let box = IPAddress(address) else { throw ValidationError("'\(address)' is not an IP address") }
            for item in to.split(separator: ",") {
                guard let replacement = IPAddress(String(item)) else { throw ValidationError("--to: '\(item)' is not an IP address") }
                guard replacement.isIPv4 == box.isIPv4 else {
                    throw ValidationError("--to: '\(item)' is not of \(address)'s family (cordon each family of a dual-stack box on its own)")
                }
            }
        }

        func run() async throws {
            try await PolicyCommand.send(PolicyRequest(.cordon, address: IPAddress(address),
                                                       replacements: to.split(separator: ",").compactMap { IPAddress(String($0)) }),
                                         agent: agent, output: jsonOutput)
        }
    }

    struct Uncordon: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "End a cordon: new sessions may choose the box again.")
        @Argument(help: "The middlebox's address.") var address: String
        @OptionGroup var agent: AgentAddressOptions
        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.AgentAnswer>
        func validate() throws {
            guard IPAddress(address) != nil else { throw ValidationError("'\(address)' is not an IP address") }
        }
        func run() async throws {
            try await PolicyCommand.send(PolicyRequest(.uncordon, address: IPAddress(address)), agent: agent, output: jsonOutput)
        }
    }

    static func render(_ reply: PolicyReply) -> String {
        var lines = ["config: \(reply.configPath ?? "(none: this agent starts no chains)") (loaded \(reply.loads)×)"]
        if reply.config.policies.isEmpty { lines.append("  no policies") }
        for p in reply.config.policies {
            var match: [String] = []
            if let src = p.match.src { match.append("src=\(src)") }
            if let dst = p.match.dst { match.append("dst=\(dst)") }
            if let sport = p.match.sport { match.append("sport=\(sport.map(\.description).joined(separator: "|"))") }
            if let dport = p.match.dport { match.append("dport=\(dport.map(\.description).joined(separator: "|"))") }
            lines.append("  \(p.name): \(match.isEmpty ? "all" : match.joined(separator: ",")) → \(p.chain.map(\.description).joined(separator: " → "))")
        }
        if reply.cordons.isEmpty {
            lines.append("cordons: none")
        } else {
            lines.append("cordons:")
            for c in reply.cordons { lines.append("  \(c.address) → new sessions use \(c.replacements.map(\.description).joined(separator: ", "))") }
        }
        return lines.joined(separator: "\n")
    }
}
