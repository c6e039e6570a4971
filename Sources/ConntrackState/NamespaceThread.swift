import DyscoCore
import CConntrack
import DyscoSystem
import Foundation

/// Where a conntrack handle lives.
public enum NamespaceSelection: Sendable, Hashable, CustomStringConvertible {
    /// The namespace of the calling thread.
    case current
    /// A namespace `ip netns` manages (`/run/netns/NAME`).
    case named(String)
    /// A new, private namespace that lives as long as the handle (benchmarks; it never touches the host's table).
    case fresh

    public var description: String {
        switch self {
        case .current: "current namespace"
        case let .named(name): "netns \(name)"
        case .fresh: "private namespace"
        }
    }
}

/// Runs a closure on a dedicated thread that first moves into a network namespace.
///
/// `setns(2)` and `unshare(2)` change only the calling thread. A netlink socket opened on that thread stays bound
/// to the namespace it was created in, whatever thread uses it later: so the thread only has to *open* handles.
public enum NamespaceThread {
    public static func run<T: Sendable>(in selection: NamespaceSelection,
                                        _ body: @escaping @Sendable () throws -> T) throws -> T {
        if case .current = selection { return try body() }
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            defer { done.signal() }
            do {
                switch selection {
                case .current:
                    break
                case let .named(name):
                    try NetworkNamespace.enter(name)
                case .fresh:
                    try ctCall("unshare(CLONE_NEWNET)") { dysco_ct_unshare_net() }
                }
                box.result = .success(try body())
            } catch {
                box.result = .failure(error)
            }
        }
        thread.name = "netns \(selection)"
        thread.start()
        done.wait()
        return try box.result!.get()
    }
}

/// Written by the namespace thread before it signals, read after the wait: the semaphore orders the accesses.
private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, any Error>?
}
