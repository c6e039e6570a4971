import Dispatch
import Glibc

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
                Retained.sources.append(source)
            }
        }
    }

    /// Calls `handler` on each SIGHUP (the agent's config reload), for the process lifetime.
    static func onHangup(_ handler: @escaping @Sendable () -> Void) {
        signal(SIGHUP, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "dysco-sighup"))
        source.setEventHandler(handler: handler)
        source.resume()
        Retained.sources.append(source)
    }

    /// Keeps signal sources alive for the process lifetime; touched only on the signal queue's setup path.
    private enum Retained {
        nonisolated(unsafe) static var sources: [any DispatchSourceSignal] = []
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
