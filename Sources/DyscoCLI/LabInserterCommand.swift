import ArgumentParser
import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Glibc
import Synchronization

extension LabCommand {
    /// The lab's byte-changing middlebox (``HeaderInserter``) over NFQUEUE, reporting its deltas to the host's agent.
    struct Inserter: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "inserter",
            abstract: "Run a middlebox that inserts a line into each HTTP response (a byte-changing box, paper §3.4).",
            discussion: """
                Runs in the current network namespace (start it with `ip netns exec`), on a lab middlebox: \
                forwarded TCP packets to or from --port go through NFQUEUE --queue (mangle FORWARD, rules added \
                now and removed at exit), and the line --text is inserted after the first line of each response, \
                the sequence numbers of both ends translated from then on. Each session's delta is reported to the \
                host's agent (`dysco-migrate delta`) when the line goes in, so that removing this box from the \
                session (`dysco-migrate remove`) leaves the anchors translating. Prints `ready` once the rules are in, \
                one `inserted SESSION` line per session. Stops at SIGINT/SIGTERM. Give the box an open firewall \
                (`lab up --firewall fwN=open`): a conntrack firewall on the same host sees the two ends' numbers \
                disagree. A test and demo helper, hidden from `lab --help`.
                """,
            shouldDisplay: false
        )

        @Option(help: "The servers' TCP port.") var port: UInt16 = 8090
        @Option(help: "NFQUEUE number (not the agent's).") var queue: UInt16 = 77
        @Option(help: "The line to insert (CRLF is appended).") var text = "X-Dysco-Inserted: yes"
        @OptionGroup var agent: AgentAddressOptions

        func validate() throws {
            guard !text.isEmpty, text.utf8.count < 200, !text.contains("\r"), !text.contains("\n") else {
                throw ValidationError("--text must be one line of 1 to 199 bytes")
            }
        }

        private var rules: [[String]] {
            [["--dport", "\(port)"], ["--sport", "\(port)"]].map {
                ["-t", "mangle", "FORWARD", "-p", "tcp"] + $0 + ["-j", "NFQUEUE", "--queue-num", "\(queue)"]
            }
        }

        private func iptables(_ op: String, _ rule: [String]) throws {
            try Command.run(["iptables", "-w"] + [rule[0], rule[1], op] + Array(rule.dropFirst(2)))
        }

        func run() async throws {
            let socket = try NetfilterQueueSocket(queue: queue)
            for rule in rules { try iptables("-I", rule) }
            defer { for rule in rules { try? iptables("-D", rule) } }
            let loop = InserterLoop(socket: socket, box: HeaderInserter(text: Array((text + "\r\n").utf8), port: port),
                                    agentSocket: agent.socketPath)
            let thread = Thread { loop.run() }
            thread.start()
            say("ready")
            _ = await Signals.waitForTermination()
            loop.stop.store(true, ordering: .relaxed)
            while !loop.done.load(ordering: .acquiring) { try await Task.sleep(for: .milliseconds(5)) }
            say("stopped: \(loop.modified.load(ordering: .relaxed)) packets modified")
        }
    }
}

/// The inserter's packet thread: poll, rewrite, verdict; each new session's delta goes to the agent.
private final class InserterLoop: Sendable {
    private struct State: @unchecked Sendable {
        let socket: NetfilterQueueSocket
        var box: HeaderInserter
    }
    private let state: Mutex<State>
    let agentSocket: String
    let stop = Atomic<Bool>(false)
    let done = Atomic<Bool>(false)
    let modified = Atomic<Int>(0)

    init(socket: NetfilterQueueSocket, box: HeaderInserter, agentSocket: String) {
        state = Mutex(State(socket: socket, box: box))
        self.agentSocket = agentSocket
    }

    func run() {
        defer { done.store(true, ordering: .releasing) }
        let output = UnsafeMutableRawPointer.allocate(byteCount: 70_000, alignment: 16)
        defer { output.deallocate() }
        while !stop.load(ordering: .relaxed) {
            state.withLock { s in
                var pfd = pollfd(fd: s.socket.fileDescriptor, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 50) > 0 else { return }
                _ = try? s.socket.receive { packet in
                    guard let payload = packet.payload, packet.length + s.box.text.count <= 65_535 else {
                        try s.socket.verdict(id: packet.id, accept: true)
                        return
                    }
                    switch s.box.process(UnsafeRawBufferPointer(start: payload, count: packet.length), into: output) {
                    case .unchanged:
                        try s.socket.verdict(id: packet.id, accept: true)
                    case .drop:
                        try s.socket.verdict(id: packet.id, accept: false)
                    case .modified(let length, let inserted):
                        try s.socket.verdict(id: packet.id, accept: true,
                                             packet: UnsafeRawBufferPointer(start: output, count: length))
                        modified.add(1, ordering: .relaxed)
                        if let inserted { report(inserted, delta: s.box.delta) }
                    }
                }
            }
        }
    }

    /// The session's delta to the agent: the server's stream (reverse, as the client→server tuple sees it) grew.
    private func report(_ session: FiveTuple, delta: Int32) {
        let path = agentSocket
        Task.detached {
            let request = ControlRequest(.delta, delta: DeltaRequest(session: session, forward: 0, reverse: delta))
            let answer = (try? await ControlClient.request(request, path: path)).flatMap {
                try? JSONDecoder().decode(DeltaReply.self, from: $0)
            }
            say("inserted \(session) delta \(delta): agent session \(answer?.session.map(String.init) ?? "none") \(answer?.error ?? "")")
        }
    }
}

/// One line on stdout at once (unbuffered: a test waits for it).
private func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }
