@testable import DyscoBench
import Testing

/// `dysco-bench drain` and where the benchmarks' agents find their BPF programs: the pure parts (no root).
@Suite struct DrainBenchmarkTests {
    @Test func clientsAndTheirSessions() {
        #expect(DrainBenchmark.clientCount(sessions: 1000, perClient: 5000) == 1)
        #expect(DrainBenchmark.clientCount(sessions: 10_000, perClient: 5000) == 2)
        #expect(DrainBenchmark.clientCount(sessions: 10_001, perClient: 5000) == 3)
        #expect(DrainBenchmark.clientCount(sessions: 100_000, perClient: 5000) == 20)
        #expect(DrainBenchmark.clientCount(sessions: 100_000, perClient: 1000) == 20, "at most 20 client hosts")
        #expect(DrainBenchmark.sessionsPerClient(sessions: 10_001, clients: 3) == [3334, 3334, 3333])
        #expect(DrainBenchmark.sessionsPerClient(sessions: 100_000, clients: 20).allSatisfy { $0 == 5000 })
        #expect(DrainBenchmark.sessionsPerClient(sessions: 7, clients: 3).reduce(0, +) == 7)
        #expect(DrainBenchmark.sessionsPerClient(sessions: 100_000, clients: 20).max()! <= DrainBenchmark.maxSessionsPerClient)
    }

    @Test func portRangeBoundsTheSessions() {
        #expect(DrainBenchmark.maxSessions == 50_000)
        #expect(DrainBenchmark.portRange.upperBound < 60_000)
    }

    @Test func agentSizingOnlyBeyondTheDefaults() {
        #expect(DrainBenchmark.sizingArguments(sessions: 10_000, perClient: 5000) == [])
        #expect(DrainBenchmark.sizingArguments(sessions: 100_000, perClient: 5000) == [], "125,000 fit the default 131,072")
        #expect(DrainBenchmark.sizingArguments(sessions: 200_000, perClient: 10_000)
                == ["--max-sessions", "250000", "--max-sessions-per-source", "12500"])
        #expect(DrainBenchmark.sizingArguments(sessions: 20_000, perClient: 7000) == ["--max-sessions-per-source", "8750"])
    }

    @Test func fileLimitAndTrickleInterval() {
        #expect(DrainBenchmark.fileLimit(sessions: 100_000) == 104_096)
        #expect(DrainBenchmark.serverProcesses(sessions: 100_000, fileLimit: 1_048_576) == 1)
        #expect(DrainBenchmark.serverProcesses(sessions: 10_000, fileLimit: 20_000) == 1)
        #expect(DrainBenchmark.serverProcesses(sessions: 16_000, fileLimit: 20_000) == 2)
        #expect(DrainBenchmark.serverProcesses(sessions: 100_000, fileLimit: 20_000) == 8, "12,500 each on average, room for 19,744")
        #expect(DrainBenchmark.serverProcesses(sessions: 100_000, fileLimit: 1_256) == 150)
        #expect(DrainBenchmark.serverProcesses(sessions: 10, fileLimit: 100) == 15, "a limit below the reserve never divides by zero")
        #expect(TrickleTraffic.interval(sessions: 1000) == 1)
        #expect(TrickleTraffic.interval(sessions: 10_000) == 4)
        #expect(TrickleTraffic.interval(sessions: 100_000) == 40)
    }

    @Test func bpfObjectPlaces() {
        let candidates = BenchDatapath.objectCandidates(agentBinary: "/repo/.build/x86_64-unknown-linux-gnu/release/dysco-migrate",
                                                        environment: [:])
        #expect(candidates == ["/repo/.build/x86_64-unknown-linux-gnu/release/dysco.bpf.o",
                               "/repo/.build/x86_64-unknown-linux-gnu/bpf/dysco.bpf.o",
                               "/repo/.build/bpf/dysco.bpf.o", "/usr/lib/dysco-migrate/dysco.bpf.o"])
        #expect(BenchDatapath.objectCandidates(agentBinary: "/x/dysco-migrate", environment: ["DYSCO_BPF_OBJECT": "/o.o"]).first == "/o.o")
        #expect(BenchDatapath.bpfObject(agentBinary: "/repo/.build/release/dysco-migrate", environment: [:],
                                        exists: { $0 == "/repo/.build/bpf/dysco.bpf.o" }) == "/repo/.build/bpf/dysco.bpf.o")
        #expect(BenchDatapath.bpfObject(agentBinary: "/x/dysco-migrate", environment: [:], exists: { _ in false }) == nil)
    }

    @Test func controlMessagesDuringTheDrain() {
        let before: [String: [String: UInt64]] = ["fw1": ["sent.requestLock": 5, "sent.statePut": 0], "fw2": ["sent.stateInstalled": 2]]
        let after: [String: [String: UInt64]] = ["fw1": ["sent.requestLock": 15, "sent.statePut": 10, "sent.trigger": 1],
                     "fw2": ["sent.stateInstalled": 12], "client1": ["sent.ackLock": 10]]
        let delta = DrainBenchmark.controlDelta(before, after)
        #expect(delta.byHost == ["fw1": 21, "fw2": 10, "client1": 10])
        #expect(delta.byType == ["requestLock": 10, "statePut": 10, "trigger": 1, "stateInstalled": 10, "ackLock": 10])
        #expect(DrainBenchmark.controlDelta(after, before).byHost.isEmpty, "a counter that went back (agent restarted) counts 0")
    }
}
