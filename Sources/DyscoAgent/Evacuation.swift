import DyscoCore
import Foundation
import Logging
import Synchronization

/// The evacuation of a box (what the `drain` command does; not the old-path drain of §3.5): cordon a middlebox
/// at the left ends, then move every session through it to the targets, in batches (``EvacuationPlan``), at most
/// `concurrency` sessions at once, through the old box's agent (`replace` requests naming their sessions by chain
/// id). Running it again is safe: it only looks at what is still on
/// the old box.
public struct Evacuation: Sendable {
    public struct Options: Sendable {
        public var old: IPAddress
        public var targets: [IPAddress]
        /// Control socket of the old box's agent.
        public var oldSocket: String
        /// Control sockets of the agents that start chains (left ends) where the old box is cordoned first.
        public var cordonSockets: [String]
        public var concurrency: Int = 256
        public var deadlineMilliseconds: UInt32 = 3000
        public var stateful = true
        public var dryRun = false
        /// Passes over the old box: a session still opening at the first look is taken at a later one.
        public var passes = 3
        /// Dual-stack boxes (issue 18): the old box's IPv6 address, and each target's (by its IPv4 address). A batch
        /// names its target in both families and each session takes its own (``ReplaceRequest/forFamily(ipv4:)``);
        /// the left ends cordon the old box's IPv6 address too. Empty: IPv4 only (an IPv6 session is then refused
        /// with the reason).
        public var oldIPv6: IPAddress?
        public var targetsIPv6: [IPAddress: IPAddress] = [:]

        public init(old: IPAddress, targets: [IPAddress], oldSocket: String, cordonSockets: [String]) {
            self.old = old
            self.targets = targets
            self.oldSocket = oldSocket
            self.cordonSockets = cordonSockets
        }
    }

    public struct Progress: Sendable {
        public var total: Int
        public var done: Int
        public var failed: Int
        public var elapsedSeconds: Double
        public var rate: Double { elapsedSeconds > 0 ? Double(done) / elapsedSeconds : 0 }
    }

    public struct Summary: Codable, Sendable {
        public struct Failure: Codable, Sendable {
            public var session: FiveTuple
            public var chainID: String
            public var target: String
            public var result: String
            public var failedStep: String
            public var reason: String
        }
        public struct Planned: Codable, Sendable {
            public var session: FiveTuple
            public var chainID: String
            public var target: String
            public var batch: Int
        }
        public struct Cordon: Codable, Sendable {
            public var socket: String
            public var error: String?
        }

        public var old: String
        public var targets: [String]
        public var dryRun: Bool
        public var stateful: Bool
        public var concurrency: Int
        public var cordons: [Cordon]
        /// Sessions found on the old box that could be moved.
        public var total: Int
        public var moved: Int
        /// Moved sessions by the target address they went to (a dual-stack target: its address of the session's family).
        public var movedByTarget: [String: Int]
        public var batches: Int
        public var failures: [Failure]
        /// Ctrl-C: no new batch was started after it.
        public var interrupted: Bool
        /// Live sessions on the old box at the end (closing ones not counted; they end by themselves).
        public var remaining: Int
        /// Sessions on the old box that were never movable (still opening at every pass, no complete path).
        public var unmovable: [FiveTuple]
        public var elapsedMicroseconds: UInt64
        public var sessionsPerSecond: Double
        /// --dry-run: what would move where.
        public var plan: [Planned]?

        /// The box is empty and nothing failed.
        public var succeeded: Bool { !dryRun && failures.isEmpty && !interrupted && remaining == 0 }
    }

    public let options: Options
    private let logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// One batch's answer, for whoever wants the per-session phases (`dysco-bench drain`): the old box's report
    /// (nil: no usable answer) and the request's round trip, microseconds.
    public struct BatchOutcome: Sendable {
        public var sessions: Int
        public var report: ReplaceReport?
        public var roundTripMicroseconds: UInt64
    }

    /// Runs the drain; `progress` after each batch; `stop()` true: start no further batch; `batchDone` (if
    /// given) with each batch's answer.
    public func run(progress: @escaping @Sendable (Progress) -> Void, stop: @escaping @Sendable () -> Bool,
                    batchDone: (@Sendable (BatchOutcome) -> Void)? = nil) async throws -> Summary {
        let started = ContinuousClock.now
        let elapsed: @Sendable () -> Double = {
            let d = ContinuousClock.now - started
            return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        }
        var cordons: [Summary.Cordon] = []
        if !options.dryRun {
            for socket in options.cordonSockets {
                cordons.append(Summary.Cordon(socket: socket, error: await cordon(socket)))
            }
        }

        var tried = Set<UInt64>()
        var failures: [Summary.Failure] = []
        var movedByTarget: [String: Int] = [:]
        var total = 0
        var batchCount = 0
        var interrupted = false
        var plan: [Summary.Planned] = []
        for _ in 0..<max(1, options.passes) {
            let (candidates, _) = try await look()
            let fresh = candidates.filter { !tried.contains($0.chainID) }
            guard !fresh.isEmpty else { break }
            fresh.forEach { tried.insert($0.chainID) }
            total += fresh.count
            let evacuationPlan = EvacuationPlan(fresh, targets: options.targets, batchSize: max(1, options.concurrency))
            if options.dryRun {
                for (i, batch) in evacuationPlan.batches.enumerated() {
                    for s in batch.sessions {
                        plan.append(.init(session: s.session, chainID: String(s.chainID, radix: 16),
                                          target: "\(batch.target)", batch: batchCount + i + 1))
                    }
                }
                batchCount += evacuationPlan.batches.count
                break
            }
            let outcome = await execute(evacuationPlan, alreadyDone: total - fresh.count, total: total, failures: failures.count,
                                        elapsed: elapsed, progress: progress, stop: stop, batchDone: batchDone)
            batchCount += outcome.batches
            failures += outcome.failures
            for (target, n) in outcome.moved { movedByTarget[target, default: 0] += n }
            if outcome.interrupted { interrupted = true; break }
        }
        // Sessions still finishing their migration (teardown) leave the old box within moments: wait for them.
        var (left, unmovable) = try await look()
        let settle = ContinuousClock.now + .seconds(10)
        while !options.dryRun, !unmovable.isEmpty, ContinuousClock.now < settle {
            try await Task.sleep(for: .milliseconds(200))
            (left, unmovable) = try await look()
        }
        let remaining = left.count + unmovable.count
        let moved = movedByTarget.values.reduce(0, +)
        let seconds = elapsed()
        return Summary(old: "\(options.old)", targets: options.targets.map(\.description), dryRun: options.dryRun,
                       stateful: options.stateful, concurrency: options.concurrency, cordons: cordons, total: total,
                       moved: moved, movedByTarget: movedByTarget, batches: batchCount, failures: failures,
                       interrupted: interrupted, remaining: options.dryRun ? total : remaining,
                       unmovable: unmovable, elapsedMicroseconds: UInt64(seconds * 1e6),
                       sessionsPerSecond: seconds > 0 ? Double(moved) / seconds : 0,
                       plan: options.dryRun ? plan : nil)
    }

    private func cordon(_ socket: String) async -> String? {
        var cordons = [PolicyRequest(.cordon, address: options.old, replacements: options.targets)]
        let targets6 = options.targets.compactMap { options.targetsIPv6[$0] }
        if let old6 = options.oldIPv6, !targets6.isEmpty {
            cordons.append(PolicyRequest(.cordon, address: old6, replacements: targets6))
        }
        do {
            for cordon in cordons {
                let data = try await ControlClient.request(ControlRequest(.policy, policy: cordon), path: socket)
                if let error = try JSONDecoder().decode(PolicyReply.self, from: data).error { return error }
            }
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// The old box's sessions: those that can move now, and the live ones that cannot (no complete path yet).
    private func look() async throws -> ([EvacuationPlan.Candidate], [FiveTuple]) {
        let snapshot = try await ControlClient.snapshot(path: options.oldSocket)
        var movable: [EvacuationPlan.Candidate] = []
        var stuck: [FiveTuple] = []
        for s in snapshot.sessions where s.role == .middlebox && s.state != "closing" {
            if s.state == "established", s.migration == nil, let left = s.left, let right = s.right,
               let chain = s.chainID.flatMap({ UInt64($0, radix: 16) }) {
                movable.append(.init(chainID: chain, session: s.session, leftAnchor: left.srcAddr, rightAnchor: right.dstAddr))
            } else {
                stuck.append(s.session)
            }
        }
        return (movable, stuck)
    }

    private struct Outcome {
        var batches = 0
        var moved: [String: Int] = [:]
        var failures: [Summary.Failure] = []
        var interrupted = false
    }

    /// Runs the batches with at most `concurrency` sessions in flight.
    private func execute(_ plan: EvacuationPlan, alreadyDone: Int, total: Int, failures previousFailures: Int,
                         elapsed: @escaping @Sendable () -> Double,
                         progress: @escaping @Sendable (Progress) -> Void, stop: @escaping @Sendable () -> Bool,
                         batchDone: (@Sendable (BatchOutcome) -> Void)?) async -> Outcome {
        var outcome = Outcome()
        var done = alreadyDone
        var inFlight = 0
        var pending = plan.batches[...]
        await withTaskGroup(of: (EvacuationPlan.Batch, ReplaceReport?, String?, UInt64).self) { group in
            func startWhatFits() {
                while let next = pending.first, inFlight == 0 || inFlight + next.sessions.count <= options.concurrency {
                    if stop() { outcome.interrupted = true; pending.removeAll(); return }
                    pending.removeFirst()
                    inFlight += next.sessions.count
                    outcome.batches += 1
                    group.addTask { await self.move(next) }
                }
            }
            startWhatFits()
            while let (batch, report, error, roundTrip) = await group.next() {
                batchDone?(BatchOutcome(sessions: batch.sessions.count, report: report, roundTripMicroseconds: roundTrip))
                inFlight -= batch.sessions.count
                done += batch.sessions.count
                // Each session under the target's address of its own family (the batch names both; issue 18).
                func target(_ session: FiveTuple) -> String {
                    "\(session.srcAddr.isIPv4 ? batch.target : options.targetsIPv6[batch.target] ?? batch.target)"
                }
                var reported = Set<String>()
                for s in report?.sessions ?? [] {
                    reported.insert(s.chainID)
                    let target = target(s.session)
                    if s.result == "moved" {
                        outcome.moved[target, default: 0] += 1
                    } else {
                        outcome.failures.append(.init(session: s.session, chainID: s.chainID, target: target, result: s.result,
                                                      failedStep: s.failedStep, reason: s.reason))
                    }
                }
                for s in batch.sessions where !reported.contains(String(s.chainID, radix: 16)) {
                    outcome.failures.append(.init(session: s.session, chainID: String(s.chainID, radix: 16), target: target(s.session),
                                                  result: "not-moved", failedStep: "",
                                                  reason: error ?? "no longer on the old box, or already migrating"))
                }
                progress(Progress(total: total, done: done, failed: previousFailures + outcome.failures.count,
                                  elapsedSeconds: elapsed()))
                startWhatFits()
            }
        }
        return outcome
    }

    private func move(_ batch: EvacuationPlan.Batch) async -> (EvacuationPlan.Batch, ReplaceReport?, String?, UInt64) {
        let started = ContinuousClock.now
        let (report, error) = await request(batch)
        let d = ContinuousClock.now - started
        return (batch, report, error, UInt64(d.components.seconds) * 1_000_000 + UInt64(d.components.attoseconds / 1_000_000_000_000))
    }

    private func request(_ batch: EvacuationPlan.Batch) async -> (ReplaceReport?, String?) {
        let request = ReplaceRequest(predicate: SessionPredicate(),
                                     newBoxes: [batch.target] + (options.targetsIPv6[batch.target].map { [$0] } ?? []),
                                     stateful: options.stateful,
                                     deadlineMilliseconds: options.deadlineMilliseconds,
                                     chains: Set(batch.sessions.map(\.chainID)))
        do {
            let data = try await ControlClient.request(ControlRequest(.replace, replace: request), path: options.oldSocket)
            guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
                return (nil, "the old box's agent answered: \(String(decoding: data.prefix(300), as: UTF8.self))")
            }
            return (report, nil)
        } catch {
            return (nil, "\(error)")
        }
    }
}
