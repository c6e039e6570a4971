import ArgumentParser
import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Logging
import Synchronization

struct DrainCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain",
        abstract: "Move every session off a middlebox (maintenance), in batches, then leave it cordoned.",
        discussion: """
            1. Cordon: the left ends stop choosing the old box for new sessions (each cordoned hop of a new \
            chain is replaced by one of --to, in turn). With --lab every agent of the lab is told; on a real \
            deployment name the left ends' agents with --cordon (namespaces or socket paths), or run \
            `dysco-migrate policy cordon OLD --to NEW` on each left-end host. The cordon stays after the drain \
            (`policy uncordon` ends it).
            2. Every live session through the old box is migrated (as `replace` does, stateful unless \
            --stateless), spread over the targets in turn. Sessions that share the left anchor, the right \
            anchor and the target form one batch: one request, its control messages bundled hop by hop, so the \
            cost grows with the batches. At most --concurrency sessions migrate at once.
            3. The summary: moved (by target), the sessions that could not move and why (they stay on the old \
            box, unharmed), what is left on it.

            Exit status: 0 when the box carries no live session afterwards; 1 otherwise (run it again once the \
            cause is fixed: it only looks at what is still on the box). Ctrl-C starts no new batch; running ones \
            finish or cancel by --deadline. --dry-run lists what would move where and changes nothing.
            Examples:
              dysco-migrate drain --lab demo --old fw1 --to fw2
              dysco-migrate drain --netns demo-fw1 --old 10.77.0.101 --to 10.77.0.102,10.77.0.103 --concurrency 64 --json
            """
    )

    @Option(help: "The middlebox to drain (its address, or a lab host name with --lab).")
    var old: String

    @Option(help: ArgumentHelp("Where its sessions go, comma-separated (spread in turn).", valueName: "addr|host[,...]"))
    var to: String

    @Option(help: "At most this many sessions migrating at once (also the largest batch).")
    var concurrency: Int = 256

    @Option(help: "Milliseconds one session's migration may take before it is cancelled (it then stays on the old box).")
    var deadline: UInt32 = 3000

    @Flag(help: "No state transfer (boxes that keep no per-session state).")
    var stateless = false

    @Option(help: ArgumentHelp("Left ends to cordon at: network namespaces or control socket paths (default with --lab: every agent of the lab).",
                               valueName: "netns|path[,...]"))
    var cordon: String?

    @Flag(help: "List what would move where; change nothing (no cordon either).")
    var dryRun = false

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.DrainSummary>

    @OptionGroup var placement: MiddleboxPlacementOptions

    func validate() throws {
        guard (1...100_000).contains(concurrency) else { throw ValidationError("--concurrency must be 1...100000") }
        guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        guard !to.isEmpty else { throw ValidationError("--to names at least one middlebox") }
    }

    func run() async throws {
        let json = jsonOutput.json
        let lab = try placement.openLab(component: "drain")
        let oldAddress = try placement.address(old, lab: lab)
        let targets = try to.split(separator: ",").map { try placement.address(String($0), lab: lab) }
        guard !targets.contains(oldAddress) else { throw ValidationError("--to must not contain the old box \(oldAddress)") }
        guard Set(targets).count == targets.count else { throw ValidationError("--to names a box twice") }
        var options = Evacuation.Options(old: oldAddress, targets: targets, oldSocket: try placement.socketPath(old: old, lab: lab),
                                    cordonSockets: try cordonSockets(lab: lab))
        // A dual-stack lab: the boxes' IPv6 addresses, so that IPv6 sessions move and are cordoned too.
        if let lab, let old6 = lab.findHost(old).flatMap(lab.state.ipv6Address(of:)) {
            options.oldIPv6 = old6
            for (name, address) in zip(to.split(separator: ",").map(String.init), targets) {
                if let v6 = lab.findHost(name).flatMap(lab.state.ipv6Address(of:)) { options.targetsIPv6[address] = v6 }
            }
        }
        options.concurrency = concurrency
        options.deadlineMilliseconds = deadline
        options.stateful = !stateless
        options.dryRun = dryRun
        if options.cordonSockets.isEmpty, !dryRun {
            FileHandle.standardError.write(Data("""
                drain: no left end to cordon (no --cordon, no --lab): new sessions may still choose \(oldAddress); \
                run `dysco-migrate policy cordon \(oldAddress) --to \(to)` on each left-end host.\n
                """.utf8))
        }
        let interrupted = Atomic<Bool>(false)
        let source = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        signal(SIGINT, SIG_IGN)
        source.setEventHandler {
            if interrupted.exchange(true, ordering: .relaxed) { Glibc.exit(130) }
            FileHandle.standardError.write(Data("\ndrain: interrupted: no new batch starts; waiting for the running ones (Ctrl-C again to quit at once)\n".utf8))
        }
        source.resume()
        defer { source.cancel() }

        let bar = ProgressLine(terminal: isatty(json ? STDERR_FILENO : STDOUT_FILENO) == 1, toStderr: json)
        let summary = try await Evacuation(options: options, logger: DyscoLog.logger("drain", level: .info))
            .run(progress: { bar.show($0) }, stop: { interrupted.load(ordering: .relaxed) })
        bar.finish()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            FileHandle.standardOutput.write(try encoder.encode(summary) + Data("\n".utf8))
        } else {
            print(Self.render(summary))
        }
        if !summary.succeeded && !summary.dryRun { throw ExitCode(1) }
    }

    /// --cordon, or with --lab every agent of the lab but the middleboxes' (they start no chains).
    private func cordonSockets(lab: Lab?) throws -> [String] {
        if let cordon {
            return cordon.split(separator: ",").map(String.init).map { item in
                item.contains("/") ? item : AgentControlPaths.socketPath(netns: item)
            }
        }
        guard let lab else { return [] }
        return lab.hosts.filter { $0.role == .client || $0.role == .server }.map { AgentControlPaths.socketPath(netns: $0.namespace) }
    }

    static func render(_ s: Evacuation.Summary) -> String {
        var lines: [String] = []
        let mode = s.stateful ? "stateful" : "stateless"
        if s.dryRun {
            lines.append("drain \(s.old) → \(s.targets.joined(separator: ",")) (\(mode), dry run): \(s.total) session(s) would move in \(s.batches) batch(es)")
            for p in s.plan ?? [] { lines.append("  \(p.session)  → \(p.target)  (batch \(p.batch), chain \(p.chainID))") }
            if !s.unmovable.isEmpty { lines.append("  not movable now (opening or no complete path): \(s.unmovable.count)") }
            lines.append("nothing was changed")
            return lines.joined(separator: "\n")
        }
        for c in s.cordons where c.error != nil { lines.append("cordon at \(c.socket) failed: \(c.error!)") }
        let cordoned = s.cordons.filter { $0.error == nil }.count
        lines.append("drain \(s.old) → \(s.targets.joined(separator: ",")) (\(mode)): cordoned at \(cordoned)/\(s.cordons.count) left end(s)")
        let byTarget = s.movedByTarget.sorted { $0.key < $1.key }.map { "\($0.value) → \($0.key)" }.joined(separator: ", ")
        lines.append(String(format: "moved %d/%d session(s) in %d batch(es), %.2f s (%.0f sessions/s)%@", s.moved, s.total, s.batches,
                            Double(s.elapsedMicroseconds) / 1e6, s.sessionsPerSecond, byTarget.isEmpty ? "" : ": \(byTarget)"))
        for f in s.failures {
            lines.append("  not moved: \(f.session) → \(f.target): \(f.result)\(f.failedStep.isEmpty ? "" : " at \(f.failedStep)"): \(f.reason)")
        }
        if s.interrupted { lines.append("interrupted: sessions not tried stay on \(s.old)") }
        lines.append(s.remaining == 0 ? "\(s.old) carries no session" : "\(s.old) still carries \(s.remaining) session(s)")
        return lines.joined(separator: "\n")
    }
}

/// The drain's progress: a redrawn bar on a terminal, a plain line per step otherwise.
final class ProgressLine: Sendable {
    let terminal: Bool
    let toStderr: Bool
    private let lastLine = Mutex<Double>(0)

    init(terminal: Bool, toStderr: Bool) {
        self.terminal = terminal
        self.toStderr = toStderr
    }

    func show(_ p: Evacuation.Progress) {
        let text = Self.format(p, width: 30)
        if terminal {
            write("\r\u{1B}[K" + text)
        } else {
            // Not a terminal: at most a line per half second, and the last one.
            let due = lastLine.withLock { last in
                guard p.done == p.total || p.elapsedSeconds - last >= 0.5 else { return false }
                last = p.elapsedSeconds
                return true
            }
            if due { write(text + "\n") }
        }
    }

    func finish() { if terminal { write("\n") } }

    private func write(_ s: String) {
        (toStderr ? FileHandle.standardError : FileHandle.standardOutput).write(Data(s.utf8))
    }

    static func format(_ p: Evacuation.Progress, width: Int) -> String {
        let fraction = p.total > 0 ? Double(p.done) / Double(p.total) : 1
        let filled = Int((fraction * Double(width)).rounded(.down))
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        return String(format: "%@ %d/%d sessions  %.0f/s  %d failed", bar, p.done, p.total, p.rate, p.failed)
    }
}
