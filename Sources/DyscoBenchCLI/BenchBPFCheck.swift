import ArgumentParser
import DyscoBench
import DyscoLab

/// The check of the benchmarks that build labs with agents (dataplane, replace, drain, soak, flood): the agents' BPF
/// programs (dysco.bpf.o) are where the agent looks for them.
struct BenchBPFCheck: ParsableArguments {
    func validate() throws {
        // Only when the agent binary can be found here; else the lab says so when it starts.
        if let agent = try? Lab.defaultAgentBinary(), BenchDatapath.bpfObject(agentBinary: agent) == nil {
            throw ValidationError("no dysco.bpf.o where \(agent) looks for it (build it with `make bpf`, or set $DYSCO_BPF_OBJECT)")
        }
    }
}
