import ArgumentParser
import DyscoAgent
import DyscoCore
import Foundation

/// `dysco-migrate delta`: a middlebox that changes a session's byte stream tells its agent by how much (paper §3.4).
struct DeltaCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delta",
        abstract: "Tell this host's agent how the local middlebox changes a session's byte streams.",
        discussion: """
            A middlebox that inserts or deletes bytes in a session (paper §3.4: a proxy, a rewriter) changes \
            the sequence numbers the two ends see. When a reconfiguration later takes the box out of the session \
            (`remove`, or a `replace` of it), the anchors must go on translating by the same amount: the agent adds \
            what the box reported here to the lock messages' sums, and the anchors apply the sums to sequence \
            numbers, acknowledgments and SACK blocks for the rest of the session (in the kernel too: the BPF \
            datapath shifts them). Report the delta once the box has made its change, and before the box is taken out.

            SESSION is the tuple as the box sees it, `SRC:PORT->DST:PORT` (either direction); --forward is what \
            the box added to the bytes from SRC to DST, --reverse to the bytes from DST to SRC (negative: removed). \
            Later reports replace earlier ones.
            """
    )

    @Argument(help: ArgumentHelp("The session as the box sees it.", valueName: "SRC:PORT->DST:PORT"))
    var session: String
    @Option(parsing: .unconditional, help: "Bytes the box added to the stream from SRC to DST (negative: removed).")
    var forward: Int32 = 0
    @Option(parsing: .unconditional, help: "Bytes the box added to the stream from DST to SRC (negative: removed).")
    var reverse: Int32 = 0
    @OptionGroup var agent: AgentAddressOptions
    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Plain>

    func validate() throws {
        guard FiveTuple(parsing: session) != nil else {
            throw ValidationError("'\(session)' is not SRC:PORT->DST:PORT (e.g. 10.0.0.1:40000->10.0.0.9:80)")
        }
    }

    func run() async throws {
        let tuple = FiveTuple(parsing: session)!
        let request = DeltaRequest(session: tuple, forward: forward, reverse: reverse)
        let data = try await ControlClient.request(ControlRequest(.delta, delta: request), path: agent.socketPath)
        let reply = try JSONDecoder().decode(DeltaReply.self, from: data)
        if jsonOutput.json {
            FileHandle.standardOutput.write(data)
        } else if let id = reply.session {
            print("session \(id): forward \(forward), reverse \(reverse)")
        }
        if let error = reply.error { throw ValidationError(error) }
    }
}
