import CLinux
import DyscoCore
import Foundation
import Logging
import Synchronization

/// The agent's 1 s timer: reads the kernel's per-session counters every `counterPollSeconds` (idle expiry of
/// kernel-carried sessions), expires sessions, reports suppressed log lines, and gives freed heap back to the OS
/// after the table was compacted.
final class ExpiryTimer: @unchecked Sendable {
    private let source: DispatchSourceTimer

    init(dataplane: AgentDataplane, pollKernelCounters: Bool, counterPollSeconds: Int, logger: Logger) {
        source = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "dysco-expiry"))
        source.schedule(deadline: .now() + 1, repeating: 1)
        var ticks = 0
        var trim = MemoryTrim()
        source.setEventHandler {
            ticks += 1
            let now = dysco_monotonic_coarse_ns()
            if let fastPath = dataplane.fastPath, pollKernelCounters, ticks % max(counterPollSeconds, 1) == 0 {
                let active = fastPath.activeSessions()
                dataplane.processor.withLock { $0.kernelActivity(active, now: now) }
            }
            dataplane.probeResets(now: now)
            dataplane.expire(now: now)
            dataplane.reportSuppressedLogs()
            trim.tick(ticks, compacted: dataplane.takeCompacted(), logger: logger)
        }
        source.resume()
    }

    func cancel() { source.cancel() }
}

/// Giving freed heap back to the OS after a flood (docs/ARCHITECTURE.md, "Floods and table bounds"): glibc keeps it
/// otherwise. At most every 10 s (malloc_trim walks every arena), outside the packet lock; a compaction within
/// 10 s of the last trim waits for the next allowed tick.
struct MemoryTrim {
    private var lastTrimTick = -10
    private var pending = false

    mutating func tick(_ ticks: Int, compacted: Bool, logger: Logger) {
        guard compacted || (ticks - lastTrimTick >= 10 && pending) else { return }
        guard ticks - lastTrimTick >= 10 else {
            pending = true
            return
        }
        let released = dysco_malloc_trim()
        logger.info("session table compacted, freed memory returned to the OS",
                    metadata: ["memory.released": "\(released != 0)"])
        lastTrimTick = ticks
        pending = false
    }
}

/// The drain's quiet rule needs a finer clock than the expiry timer: every 5 ms, but only while a session is
/// anchored here — an idle agent has no timer waking it 200 times a second (issue 21). It starts with the first
/// anchor (``claimStart()`` under the packet lock, then ``start()``) and stops on its first tick with none.
final class QuietTimer: @unchecked Sendable {
    static let interval: DispatchTimeInterval = .milliseconds(5)
    private let queue = DispatchQueue(label: "dysco-quiet")
    private let source: DispatchSourceTimer
    /// Set under the processor's lock.
    private let ticking = Atomic<Bool>(false)

    init(tick: @escaping @Sendable () -> Void) {
        source = DispatchSource.makeTimerSource(queue: queue)
        source.schedule(deadline: .distantFuture)
        source.setEventHandler(handler: tick)
        source.resume()
    }

    /// Under the packet lock, with a session anchored: whether the caller must ``start()`` the timer.
    func claimStart() -> Bool { !ticking.exchange(true, ordering: .relaxed) }

    func start() {
        queue.async { [self] in source.schedule(deadline: .now() + Self.interval, repeating: Self.interval) }
    }

    /// Under the packet lock, on a tick with no session anchored.
    func endTicking() { ticking.store(false, ordering: .relaxed) }

    /// After such a tick (on the timer's queue): stops it, unless an anchor started since.
    func pauseUnlessTicking() {
        if !ticking.load(ordering: .relaxed) { source.schedule(deadline: .distantFuture) }
    }

    func cancel() { source.cancel() }
}
