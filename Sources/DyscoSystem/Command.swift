import Foundation
import Glibc

/// A child process run to completion (the lab, tests and benchmarks drive `ip`, `iptables`, `iperf3`, ...).
public struct CommandResult: Sendable {
    public var arguments: [String]
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var succeeded: Bool { status == 0 }
}

public struct CommandError: Error, CustomStringConvertible {
    public var result: CommandResult
    public var description: String {
        let err = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        return "`\(result.arguments.joined(separator: " "))` exited \(result.status)\(err.isEmpty ? "" : ": \(err)")"
    }
}

public enum Command {
    /// Runs `arguments` (argv[0] looked up in PATH), optionally inside network namespace `netns`.
    /// Throws ``CommandError`` on a non-zero exit unless `check` is false.
    @discardableResult
    public static func run(_ arguments: [String], netns: String? = nil, input: String? = nil,
                           check: Bool = true) throws -> CommandResult {
        let (process, argv) = makeProcess(arguments, netns: netns)
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let inPipe = Pipe()
        process.standardInput = input == nil ? FileHandle.nullDevice : inPipe
        try launch(process)
        if let input {
            inPipe.fileHandleForWriting.write(Data(input.utf8))
            try? inPipe.fileHandleForWriting.close()
        }
        // Read both pipes concurrently so neither can fill up and block the child.
        let errBox = Box<Data>(Data())
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { errBox.value = err.fileHandleForReading.readDataToEndOfFile() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        process.waitUntilExit()
        let result = CommandResult(arguments: argv, status: process.terminationStatus,
                                   stdout: String(decoding: outData, as: UTF8.self),
                                   stderr: String(decoding: errBox.value, as: UTF8.self))
        if check && !result.succeeded { throw CommandError(result: result) }
        return result
    }

    /// Starts a long-running child (an agent, a server) with its output sent to `logPath` (or discarded).
    public static func spawn(_ arguments: [String], netns: String? = nil, logPath: String? = nil) throws -> Process {
        let (process, _) = makeProcess(arguments, netns: netns)
        process.standardInput = FileHandle.nullDevice
        if let logPath {
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
            process.standardOutput = handle
            process.standardError = handle
        } else {
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
        }
        try launch(process)
        return process
    }

    private static func makeProcess(_ arguments: [String], netns: String?) -> (Process, [String]) {
        let argv = netns.map { ["ip", "netns", "exec", $0] + arguments } ?? arguments
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = argv
        return (process, argv)
    }

    /// Starts `process` from a fresh thread with an empty signal mask.
    ///
    /// Foundation's `Process` on Linux hands the child the calling thread's signal mask, and Swift
    /// concurrency and Dispatch worker threads block nearly every signal, SIGTERM included: a child started
    /// from one (and every grandchild) would ignore `kill`, and a script's `trap cleanup EXIT` could not stop
    /// what it started.
    private static func launch(_ process: Process) throws {
        let box = Box<Result<Void, any Error>>(.success(()))
        let unsafeProcess = UnsafeTransfer(process)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            var empty = sigset_t()
            sigemptyset(&empty)
            pthread_sigmask(SIG_SETMASK, &empty, nil)
            box.value = Result { try unsafeProcess.value.run() }
            done.signal()
        }
        thread.start()
        done.wait()
        try box.value.get()
    }
}

/// Written by one thread before it signals a semaphore or group, read after the wait: the wait orders them.
private final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}

/// Hands a non-Sendable value to a thread that uses it while the sender waits.
private struct UnsafeTransfer<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
