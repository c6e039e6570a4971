import ArgumentParser
import DyscoCore

/// What `replace`, `insert` and `remove` share: which sessions (`--match`) and how long each may take (`--deadline`).
struct ReconfigurationOptions: ParsableArguments {
    @Option(help: "Only sessions matching this filter: src=, dst= (address or prefix), sport=, dport= (port or range).")
    var match: String = ""

    @Option(help: "Milliseconds a session's reconfiguration may take before it is cancelled (it then stays as it was).")
    var deadline: UInt32 = 3000

    func validate() throws {
        guard (1...600_000).contains(deadline) else { throw ValidationError("--deadline must be 1...600000 ms") }
        do { _ = try SessionPredicate(filter: match) } catch { throw ValidationError("\(error)") }
    }

    func predicate() throws -> SessionPredicate { try SessionPredicate(filter: match) }
}
