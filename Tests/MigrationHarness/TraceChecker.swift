import Foundation

// The transition relation of model/transitions.tsv, the TR(...) transitions of the Promela model, and a checker
// that replays abstract event traces against the relation (docs/VERIFICATION.md, "Conformance"). Pure: strings in,
// verdicts out; ConformanceTests turns harness runs into abstract steps.

/// One row of model/transitions.tsv.
package struct TransitionRow: Sendable, Equatable, CustomStringConvertible {
    package var role: String
    package var from: Set<String>
    /// Event names; "*" matches any event.
    package var events: Set<String>
    /// The state after; "=" keeps the state.
    package var to: String
    package var actions: [String]
    /// The model has this row as TR(from, event, to).
    package var inModel: Bool
    package var line: Int

    package var description: String {
        "line \(line): \(role) \(from.sorted().joined(separator: "|")) \(events.sorted().joined(separator: "|")) -> \(to) [\(actions.joined(separator: ","))]"
    }

    package func target(from state: String) -> String { to == "=" ? state : to }
}

package struct TransitionTable: Sendable {
    package var rows: [TransitionRow]

    package struct ParseError: Error, CustomStringConvertible { package var description: String }

    package static func parse(_ text: String) throws -> TransitionTable {
        var rows: [TransitionRow] = []
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let fields = raw.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            guard fields.count >= 6 else {
                throw ParseError(description: "line \(index + 1): \(fields.count) fields, expected role, from, event, to, actions, model")
            }
            guard fields[5] == "tr" || fields[5] == "-" else {
                throw ParseError(description: "line \(index + 1): model column is \(fields[5]), expected tr or -")
            }
            rows.append(TransitionRow(role: fields[0], from: Set(fields[1].split(separator: "|").map(String.init)),
                                      events: Set(fields[2].split(separator: "|").map(String.init)), to: fields[3],
                                      actions: fields[4] == "-" ? [] : fields[4].split(separator: ",").map(String.init),
                                      inModel: fields[5] == "tr", line: index + 1))
        }
        return TransitionTable(rows: rows)
    }

    /// (role, from, event, to) of every row marked tr, expanded over its state and event lists.
    package var modelEdges: Set<Edge> {
        var edges: Set<Edge> = []
        for row in rows where row.inModel {
            for from in row.from { for event in row.events { edges.insert(Edge(role: row.role, from: from, event: event, to: row.target(from: from))) } }
        }
        return edges
    }

    /// The rows that say what `role` does in `state` on `event`, most specific (named event) first.
    package func candidates(role: String, state: String, event: String) -> [TransitionRow] {
        let matching = rows.filter { $0.role == role && $0.from.contains(state) && ($0.events.contains(event) || $0.events.contains("*")) }
        return matching.filter { $0.events.contains(event) } + matching.filter { !$0.events.contains(event) }
    }
}

package struct Edge: Hashable, Sendable, Comparable, CustomStringConvertible {
    package var role: String, from: String, event: String, to: String
    package init(role: String, from: String, event: String, to: String) {
        self.role = role
        self.from = from
        self.event = event
        self.to = to
    }
    package var description: String { "\(role) \(from) --\(event)--> \(to)" }
    package static func < (a: Edge, b: Edge) -> Bool { a.description < b.description }
}

/// The TR(ROLE_FROM, event, ROLE_TO) transitions of a Promela file, as Spin verifies it: code under
/// `#ifdef MUT_…` / `#ifdef IMPL_…` (mutants, known divergences) is left out, `#ifndef MUT_…` code (the real
/// model) kept, both branches of other `#if`s (STATEFUL, configurations) kept; `CANCEL_FROM(ev)` is expanded.
package enum PromelaTransitions {
    package static func extract(_ source: String) -> Set<Edge> {
        let lines = source.components(separatedBy: "\n")
        let tr = try! NSRegularExpression(pattern: #"TR\(\s*([A-Z]+)_([A-Z_]+)\s*,\s*([A-Za-z.]+)\s*,\s*[A-Z]+_([A-Z_]+)\s*\)"#)
        let use = try! NSRegularExpression(pattern: #"CANCEL_FROM\(\s*([A-Za-z.]+)\s*\)"#)
        // The body of the CANCEL_FROM macro (a #define with continuation lines).
        var macroBody: [String] = []
        var inMacro = false
        var macroLines: Set<Int> = []
        for (i, line) in lines.enumerated() {
            if line.hasPrefix("#define CANCEL_FROM") { inMacro = true; macroLines.insert(i); continue }
            if inMacro {
                macroBody.append(line)
                macroLines.insert(i)
                if !line.trimmingCharacters(in: .whitespaces).hasSuffix("\\") { inMacro = false }
            }
        }
        func matches(_ regex: NSRegularExpression, _ s: String) -> [[String]] {
            regex.matches(in: s, range: NSRange(s.startIndex..., in: s)).map { m in
                (1..<m.numberOfRanges).map { String(s[Range(m.range(at: $0), in: s)!]) }
            }
        }
        // Conditional compilation: each open #if is one of these.
        enum Kind { case mutantThen, mutantElse, keep }
        var stack: [Kind] = []
        var edges: Set<Edge> = []
        for (i, line) in lines.enumerated() {
            let t = line.trimmingCharacters(in: .whitespaces)
            if t.hasPrefix("#ifdef MUT_") || t.hasPrefix("#ifdef IMPL_") { stack.append(.mutantThen); continue }
            if t.hasPrefix("#ifndef MUT_") || t.hasPrefix("#ifndef IMPL_") { stack.append(.mutantElse); continue }
            if t.hasPrefix("#if") { stack.append(.keep); continue }
            if t.hasPrefix("#else") {
                // the #else of a mutant's #ifdef is the real model; the #else of a mutant's #ifndef is the mutant
                if let top = stack.last { stack[stack.count - 1] = top == .mutantThen ? .keep : top == .mutantElse ? .mutantThen : .keep }
                continue
            }
            if t.hasPrefix("#endif") { _ = stack.popLast(); continue }
            if stack.contains(where: { $0 == .mutantThen }) || macroLines.contains(i) || t.hasPrefix("#define") { continue }
            for m in matches(tr, line) { edges.insert(Edge(role: m[0], from: m[1], event: m[2], to: m[3])) }
            for m in matches(use, line) {
                for body in macroBody {
                    let ev = try! NSRegularExpression(pattern: #"TR\(\s*([A-Z]+)_([A-Z_]+)\s*,\s*ev\s*,\s*[A-Z]+_([A-Z_]+)\s*\)"#)
                    for b in matches(ev, body) { edges.insert(Edge(role: b[0], from: b[1], event: m[0], to: b[2])) }
                }
            }
        }
        return edges
    }
}

/// One step of an implementation run, abstracted: which role of which agent handled which event, and what it did.
package struct AbstractStep: Sendable, Equatable, CustomStringConvertible {
    package var agent: String
    package var role: String
    /// The request a control message names; nil for timers and data-plane events (the checker gives those to the
    /// role's request that is under way at the agent).
    package var request: UInt32? = nil
    package var event: String
    package var actions: [String]
    /// The implementation's own view of the left anchor's step after the event (MigrationCoordinator.leftAnchorStep),
    /// "none" if it leads no reconfiguration; nil: not known (not a left-anchor step).
    package var reportedStep: String?

    package init(agent: String, role: String, request: UInt32? = nil, event: String, actions: [String],
                 reportedStep: String? = nil) {
        self.agent = agent
        self.role = role
        self.request = request
        self.event = event
        self.actions = actions
        self.reportedStep = reportedStep
    }

    package var description: String {
        "\(agent)/\(role)\(request.map { "#\($0)" } ?? ""): \(event) -> [\(actions.joined(separator: ","))]" + (reportedStep.map { " (step \($0))" } ?? "")
    }
}

/// Where a trace leaves the model's transition relation.
package struct Divergence: Error, Sendable, Equatable, CustomStringConvertible {
    package var index: Int
    package var step: AbstractStep
    package var state: String
    package var reason: String
    package var description: String { "step \(index): \(step) in state \(state): \(reason)" }
}

/// Replays abstract steps against the table, one state per (agent, role).
package struct TraceChecker: Sendable {
    package let table: TransitionTable
    /// DO, the donor of a stateful insertion (the old-box role at the right anchor's agent), begins locked: the
    /// right anchor's lock stands for its own (model/replace.pml Donor).
    package static let initial = ["LA": "IDLE", "OB": "UNLOCKED", "NB": "IDLE", "RA": "IDLE", "DO": "LOCKED"]
    /// The left anchor's states and the step MigrationCoordinator reports in them (CANCEL: any, the step it
    /// cancelled at).
    package static let reportedSteps: [String: String] = [
        "IDLE": "none", "LOCK": "lock", "NEWPATH": "new-path", "DRAIN": "drain", "DRAIN_SELF": "drain", "DRAIN_PEER": "drain",
        "STATE": "state", "RELEASE": "release", "TEARDOWN": "teardown", "MOVED": "none", "REFUSED": "none", "CANCELLED": "none",
    ]
    /// States per agent/role#request.
    package private(set) var states: [String: String] = [:]
    /// The requests seen per agent/role, in order.
    private var requests: [String: [UInt32]] = [:]
    package static let terminal: Set<String> = ["MOVED", "REFUSED", "CANCELLED", "GONE", "DONE", "LINGERED"]
    /// Rows used so far (by line).
    package private(set) var used: Set<Int> = []

    package init(table: TransitionTable) { self.table = table }

    /// The state of `role` at `agent` for `request` (nil: the request under way there, else the last one seen).
    package func state(agent: String, role: String, request: UInt32? = nil) -> String {
        states[key(agent, role, request ?? resolve(agent, role))] ?? Self.initial[role] ?? "?"
    }

    private func key(_ agent: String, _ role: String, _ request: UInt32?) -> String { "\(agent)/\(role)#\(request.map(String.init) ?? "-")" }

    private func resolve(_ agent: String, _ role: String) -> UInt32? {
        let seen = requests["\(agent)/\(role)"] ?? []
        let active = seen.last { r in
            let st = states[key(agent, role, r)] ?? Self.initial[role] ?? "?"
            return st != Self.initial[role] && !Self.terminal.contains(st)
        }
        return active ?? seen.last
    }

    package mutating func step(_ s: AbstractStep, index: Int) -> Divergence? {
        let request = s.request ?? resolve(s.agent, s.role)
        if let r = s.request, !(requests["\(s.agent)/\(s.role)"] ?? []).contains(r) { requests["\(s.agent)/\(s.role)", default: []].append(r) }
        let key = key(s.agent, s.role, request)
        let current = states[key] ?? Self.initial[s.role] ?? "?"
        let candidates = table.candidates(role: s.role, state: current, event: s.event)
        guard !candidates.isEmpty else {
            return Divergence(index: index, step: s, state: current, reason: "no transition of \(s.role) in \(current) on \(s.event)")
        }
        guard let row = candidates.first(where: { $0.actions == s.actions }) else {
            return Divergence(index: index, step: s, state: current, reason: "actions differ from every row: "
                              + candidates.map(\.description).joined(separator: "; "))
        }
        let next = row.target(from: current)
        if s.role == "LA", let reported = s.reportedStep, let expected = Self.reportedSteps[next], expected != reported {
            return Divergence(index: index, step: s, state: current,
                              reason: "\(row) leads to \(next) (step \(expected)), the coordinator reports step \(reported)")
        }
        states[key] = next
        used.insert(row.line)
        return nil
    }

    /// Replays `steps`; the first divergence, or nil.
    package mutating func check(_ steps: [AbstractStep]) -> Divergence? {
        for (i, s) in steps.enumerated() { if let d = step(s, index: i) { return d } }
        return nil
    }

    /// A change of an agent's right-subsession lock (SegmentLock) on `event`: it must be an OP row.
    package func lockChangeAllowed(from: String, event: String, to: String) -> TransitionRow? {
        table.rows.first { $0.role == "OP" && $0.from.contains(from) && $0.events.contains(event) && $0.target(from: from) == to }
    }
}
