import ArgumentParser
import DyscoAgent
import DyscoBench
import DyscoCLI
import DyscoLab

/// `--datapath nftables|bpf` of the benchmarks that build labs with agents (dataplane, replace, drain, flood):
/// the kernel fast path of every agent of the lab, as `agent --datapath`. The reports say which one ran.
struct BenchDatapathOptions: ParsableArguments {
    @Option(help: ArgumentHelp("""
        The lab agents' kernel fast path, as `agent --datapath` (the default is the agent's). bpf: tc \
        programs and BPF maps (docs/BPF.md); needs dysco.bpf.o (`make bpf`) where the agent finds it; each agent \
        mounts a bpffs of its own (no agent restarts in a benchmark).
        """, valueName: "nftables|bpf"))
    var datapath: DatapathKind = BenchDatapath.agentDefault

    func validate() throws {
        guard datapath == .bpf else { return }
        // Only when the agent binary can be found here; else the lab says so when it starts.
        if let agent = try? Lab.defaultAgentBinary(), BenchDatapath.bpfObject(agentBinary: agent) == nil {
            throw ValidationError("--datapath bpf: no dysco.bpf.o where \(agent) looks for it (build it with `make bpf`, or set $DYSCO_BPF_OBJECT)")
        }
    }

    /// For the command's own validate(): its --agent-arg values must not choose a datapath too.
    func check(agentArguments: [String]) throws {
        if BenchDatapath.choosesDatapath(agentArguments) {
            throw ValidationError("give the datapath with --datapath, not --agent-arg --datapath")
        }
    }

    /// The arguments every agent of the lab gets for this choice.
    var agentArguments: [String] { BenchDatapath.agentArguments(datapath) }
}
