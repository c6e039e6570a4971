import ArgumentParser
import DyscoAgent
import Foundation

/// The agent's kernel datapath (docs/BPF.md): where its compiled programs are, where it pins its maps, the size of
/// its event ring. It needs Linux ≥ 5.12 and the programs built by `make bpf`; its programs and pinned maps
/// outlive the agent, and a restarted agent takes their sessions over (see "Restart") when --bpf-fs is a bpffs
/// that outlives it and --max-sessions is unchanged (else refused; --fresh replaces the map).
struct DatapathOptions: ParsableArguments {
    @Option(help: ArgumentHelp("""
        The kernel datapath's compiled tc programs (also loaded with --no-fastpath, for its owned keys; default: \
        $DYSCO_BPF_OBJECT, else dysco.bpf.o beside the executable, in ../bpf or ../../bpf of it, or \
        /usr/lib/dysco-migrate; `make bpf` builds it). Needs Linux ≥ 5.12 (docs/BPF.md); a restarted agent takes the pinned sessions over only with an unchanged \
        --max-sessions (else refused; --fresh replaces the map).
        """, valueName: "path"))
    var bpfObject: String?

    @Option(help: ArgumentHelp("""
        A bpffs under which the agent pins its maps (in dysco-<netns>-q<queue>); mounted \
        there if it is not one (and unmounted at exit). `ip netns exec` hides /sys/fs/bpf: for pins that survive \
        a restart (and that others can see), mount one on the host (e.g. under /run) and give it here; give it to \
        --purge too.
        """, valueName: "dir"))
    var bpfFs: String = "/sys/fs/bpf"

    @Option(help: ArgumentHelp("""
        Size of the BPF event ring (FIN/RST reports, 64 bytes each) in bytes, a power of two of \
        at least 4096 (default 1 MiB). A full ring loses events: counted, recovered from the map (docs/BPF.md).
        """, valueName: "bytes"))
    var bpfRingBytes: UInt32?

    func validate() throws {
        if bpfObject != nil, resolvedObject() == nil {
            throw ValidationError("--bpf-object \(bpfObject!): no such readable file")
        }
        if let bpfRingBytes, bpfRingBytes < 4096 || bpfRingBytes & (bpfRingBytes - 1) != 0 {
            throw ValidationError("--bpf-ring-bytes must be a power of two of at least 4096")
        }
        guard bpfFs.hasPrefix("/") else { throw ValidationError("--bpf-fs must be an absolute path") }
    }

    /// The object file: --bpf-object, or the first existing default place.
    func resolvedObject() -> String? {
        if let bpfObject { return FileManager.default.isReadableFile(atPath: bpfObject) ? bpfObject : nil }
        var candidates: [String] = []
        if let env = ProcessInfo.processInfo.environment["DYSCO_BPF_OBJECT"] { candidates.append(env) }
        let path = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let executable = URL(fileURLWithPath: path).resolvingSymlinksInPath().deletingLastPathComponent()
        for relative in ["dysco.bpf.o", "../bpf/dysco.bpf.o", "../../bpf/dysco.bpf.o"] {
            candidates.append(executable.appendingPathComponent(relative).standardizedFileURL.path)
        }
        candidates.append("/usr/lib/dysco-migrate/dysco.bpf.o")
        return candidates.first { FileManager.default.isReadableFile(atPath: $0) }
    }
}
