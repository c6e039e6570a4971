import Dispatch
import Glibc
import Synchronization

enum Signals {
    /// Suspends until SIGINT or SIGTERM arrives; returns its number.
    static func waitForTermination() async -> Int32 {
        await withCheckedContinuation { continuation in
            let queue = DispatchQueue(label: "dysco-signals")
            let once = OnceFlag()
            for number in [SIGINT, SIGTERM] {
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler {
                    if once.take() { continuation.resume(returning: number) }
                }
                source.resume()
                Retained.keep(source)
            }
        }
    }

    /// Calls `handler` on each SIGHUP (the agent's config reload), for the process lifetime.
    static func onHangup(_ handler: @escaping @Sendable () -> Void) {
        signal(SIGHUP, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "dysco-sighup"))
        source.setEventHandler(handler: handler)
        source.resume()
        Retained.keep(source)
    }

    /// Keeps signal sources alive for the process lifetime.
    private enum Retained {
        /// A dispatch source (thread-safe), held only so that it is not released.
        private struct Kept: @unchecked Sendable { let source: any DispatchSourceSignal }
        private static let sources = Mutex<[Kept]>([])

        static func keep(_ source: any DispatchSourceSignal) {
            sources.withLock { $0.append(Kept(source: source)) }
        }
    }

    private final class OnceFlag: @unchecked Sendable {
        private var taken = false
        // Only touched on the serial "dysco-signals" queue.
        func take() -> Bool {
            defer { taken = true }
            return !taken
        }
    }
}
