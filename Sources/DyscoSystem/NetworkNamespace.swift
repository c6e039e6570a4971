import CLinux
import Foundation

/// Named network namespaces as `ip netns` manages them (`/run/netns/NAME`).
public enum NetworkNamespace {
    public static let directory = "/run/netns"

    /// Moves the calling thread into the named namespace. Call it before any thread that must live in the
    /// namespace is started (the whole process, if done first thing in `main`).
    public static func enter(_ name: String) throws {
        guard isValidName(name) else {
            throw SystemCallError(operation: "setns(\(name)): invalid namespace name", errno: EINVAL)
        }
        let path = "\(directory)/\(name)"
        let fd = try sysCall("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        try sysCall("setns(\(path))") { dysco_setns(fd, dysco_clone_newnet()) }
    }

    /// The name of the namespace the process is in, if it is one of `ip netns list`'s; nil for the initial one.
    public static func currentName() -> String? {
        var me = stat()
        guard stat("/proc/self/ns/net", &me) == 0 else { return nil }
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return nil }
        for name in names.sorted() {
            var other = stat()
            if stat("\(directory)/\(name)", &other) == 0, other.st_ino == me.st_ino, other.st_dev == me.st_dev {
                return name
            }
        }
        return nil
    }

    public static func exists(_ name: String) -> Bool {
        FileManager.default.fileExists(atPath: "\(directory)/\(name)")
    }

    public static func list() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    /// Namespace names are used in paths and interface names: letters, digits, '-', '_', '.'.
    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name != "." && name != ".."
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
    }
}

extension NetworkNamespace {
    /// Replaces the process with `ip netns exec NAME <this executable> arguments[1...]`, so that every thread
    /// and child of the new image lives in the namespace (setns(2) alone moves only the calling thread).
    public static func reexec(into name: String, arguments: [String]) throws -> Never {
        guard exists(name) else {
            throw SystemCallError(operation: "enter network namespace '\(name)' (no \(directory)/\(name))", errno: ENOENT)
        }
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? arguments.first ?? "dysco-migrate"
        let argv = ["ip", "netns", "exec", name, executable] + arguments.dropFirst()
        var cArgs = argv.map { strdup($0) }
        cArgs.append(nil)
        execvp("ip", cArgs)
        throw SystemCallError(operation: "execvp(ip netns exec \(name))", errno: dysco_errno())
    }
}
