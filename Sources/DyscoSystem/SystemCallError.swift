import CLinux
import Glibc

/// A failed C call: which operation, and the `errno` read right after it returned.
///
/// Every call into libc, libmnl, libnetfilter_queue or libnetfilter_conntrack goes through
/// ``sysCall(_:_:)`` (or one of its siblings), which reads `errno` at once and throws this.
public struct SystemCallError: Error, CustomStringConvertible, Equatable, Sendable {
    public var operation: String
    public var errno: Int32

    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var errnoName: String { String(cString: strerror(errno)) }

    public var description: String { "\(operation) failed: \(errnoName) (errno \(errno))" }
}

/// Calls a C function that signals failure with a negative return value and `errno`.
@discardableResult
@inline(__always)
public func sysCall<T: SignedInteger>(_ operation: @autoclosure () -> String, _ body: () -> T) throws(SystemCallError) -> T {
    dysco_set_errno(0)
    let result = body()
    if result < 0 {
        let code = dysco_errno()
        throw SystemCallError(operation: operation(), errno: code == 0 ? EIO : code)
    }
    return result
}

/// Calls a C function that signals failure by returning NULL and setting `errno`.
@inline(__always)
public func sysCall<T>(_ operation: @autoclosure () -> String, _ body: () -> T?) throws(SystemCallError) -> T {
    dysco_set_errno(0)
    guard let result = body() else {
        let code = dysco_errno()
        throw SystemCallError(operation: operation(), errno: code == 0 ? EIO : code)
    }
    return result
}
