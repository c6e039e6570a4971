import DyscoCore
import CConntrack
import Glibc
import DyscoSystem

/// A libnetfilter_conntrack call (or the kernel behind it) refused: which operation, on which entry, with `errno`.
public struct ConntrackError: Error, Hashable, Sendable, CustomStringConvertible {
    public var operation: String
    public var errno: Int32
    /// The entry concerned (its description), when the call was about one.
    public var entry: String?

    public init(operation: String, errno: Int32, entry: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.entry = entry
    }

    init(_ error: SystemCallError, entry: String? = nil) {
        self.init(operation: error.operation, errno: error.errno, entry: entry)
    }

    public var errnoName: String { String(cString: strerror(errno)) }

    /// What the errno usually means for this kind of operation.
    public var hint: String? {
        switch errno {
        case EEXIST: return "an entry with this tuple already exists (import with --replace to overwrite it)"
        case ENOENT: return "no such entry in the table"
        case EINVAL: return "the kernel rejected the entry's attributes (impossible tuple, state or NAT range)"
        case EBUSY: return "the kernel refused the status bits or the entry is being destroyed"
        case ENOSPC: return "no room for an extension (labels need connlabel in use, e.g. an iptables -m connlabel rule)"
        case EOPNOTSUPP, EAGAIN:
            return "NAT not available in the importing namespace (it needs a nat table and the nf_nat module)"
        case EPERM, EACCES: return "needs CAP_NET_ADMIN in the namespace (run as root)"
        case ENOMEM: return "conntrack table full or out of memory (see net.netfilter.nf_conntrack_max)"
        case EPROTONOSUPPORT, EAFNOSUPPORT: return "conntrack (nf_conntrack_netlink) is not available"
        default: return nil
        }
    }

    public var description: String {
        var text = operation
        if let entry { text += " [\(entry)]" }
        text += " failed: \(errnoName) (errno \(errno))"
        if let hint { text += " — \(hint)" }
        return text
    }
}

/// Runs a C call that reports failure by a negative return and errno, turning it into a ``ConntrackError``.
@inline(__always)
@discardableResult
func ctCall<T: SignedInteger>(_ operation: @autoclosure () -> String, entry: @autoclosure () -> String? = nil,
                              _ body: () -> T) throws(ConntrackError) -> T {
    do {
        return try sysCall(operation(), body)
    } catch {
        throw ConntrackError(error, entry: entry())
    }
}

/// Runs a C call that reports failure by returning NULL and setting errno.
@inline(__always)
func ctCall<T>(_ operation: @autoclosure () -> String, entry: @autoclosure () -> String? = nil,
               _ body: () -> T?) throws(ConntrackError) -> T {
    do {
        return try sysCall(operation(), body)
    } catch {
        throw ConntrackError(error, entry: entry())
    }
}
