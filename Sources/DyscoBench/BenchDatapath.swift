import DyscoAgent
import Foundation

/// The kernel fast path a benchmark's lab agents run (`agent --datapath`), chosen by `--datapath` of
/// `dysco-bench dataplane`, `replace`, `drain` and `flood`, and stated in their reports.
public enum BenchDatapath {
    /// The agent's default (`agent` without `--datapath`).
    public static let agentDefault: DatapathKind = .bpf

    /// The agent arguments for `kind`: `--datapath KIND` (given even for the default, so the lab's command lines
    /// say it). With bpf every agent mounts a bpffs of its own at its default `--bpf-fs` (inside `ip netns exec`
    /// /sys/fs/bpf is not one): its pins live as long as the agent, which is all a benchmark needs (no restart).
    public static func agentArguments(_ kind: DatapathKind) -> [String] { ["--datapath", kind.rawValue] }

    /// Whether `arguments` (a benchmark's `--agent-arg`s) choose a datapath themselves (then `--datapath` would
    /// contradict or repeat them).
    public static func choosesDatapath(_ arguments: [String]) -> Bool {
        arguments.contains { $0 == "--datapath" || $0.hasPrefix("--datapath=") }
    }

    /// Where an agent at `agentBinary` finds dysco.bpf.o without --bpf-object (the places `agent --datapath bpf`
    /// looks: $DYSCO_BPF_OBJECT, beside the executable, ../bpf and ../../bpf of it, /usr/lib/dysco-migrate), the
    /// first that exists; nil: none (`make bpf` builds .build/bpf/dysco.bpf.o).
    public static func bpfObject(agentBinary: String, environment: [String: String] = ProcessInfo.processInfo.environment,
                                 exists: (String) -> Bool = { FileManager.default.isReadableFile(atPath: $0) }) -> String? {
        objectCandidates(agentBinary: agentBinary, environment: environment).first(where: exists)
    }

    static func objectCandidates(agentBinary: String, environment: [String: String]) -> [String] {
        var candidates: [String] = []
        if let env = environment["DYSCO_BPF_OBJECT"], !env.isEmpty { candidates.append(env) }
        let directory = URL(fileURLWithPath: agentBinary).resolvingSymlinksInPath().deletingLastPathComponent()
        for relative in ["dysco.bpf.o", "../bpf/dysco.bpf.o", "../../bpf/dysco.bpf.o"] {
            candidates.append(directory.appendingPathComponent(relative).standardizedFileURL.path)
        }
        candidates.append("/usr/lib/dysco-migrate/dysco.bpf.o")
        return candidates
    }
}
