import Foundation

/// Where a benchmark's lab agents find their BPF programs (the kernel datapath, docs/BPF.md): checked before a
/// benchmark builds a lab, so that a missing `make bpf` is one clear error instead of agents failing to start.
public enum BenchDatapath {
    /// Where an agent at `agentBinary` finds dysco.bpf.o without --bpf-object (the places `agent`
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
