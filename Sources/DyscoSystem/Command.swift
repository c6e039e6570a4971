import Foundation

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
        let argv = netns.map { ["ip", "netns", "exec", $0] + arguments } ?? arguments
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = argv
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let inPipe = Pipe()
        process.standardInput = input == nil ? FileHandle.nullDevice : inPipe
        try process.run()
        if let input {
            inPipe.fileHandleForWriting.write(Data(input.utf8))
            try? inPipe.fileHandleForWriting.close()
        }
        // Read both pipes concurrently so neither can fill up and block the child.
        let errBox = DataBox()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { errBox.data = err.fileHandleForReading.readDataToEndOfFile() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        let errData = errBox.data
        process.waitUntilExit()
        let result = CommandResult(arguments: argv, status: process.terminationStatus,
                                   stdout: String(decoding: outData, as: UTF8.self),
                                   stderr: String(decoding: errData, as: UTF8.self))
        if check && !result.succeeded { throw CommandError(result: result) }
        return result
    }

    /// Starts a long-running child (an agent, a server) with its output sent to `logPath` (or discarded).
    ///
    /// Foundation's `Process` on Linux hands the child the calling thread's signal mask, and Swift
    /// concurrency and Dispatch worker threads block nearly every signal, SIGTERM included: a child started
    /// from one would ignore `kill`. So the child is started from a fresh thread with an empty mask.
    public static func spawn(_ arguments: [String], netns: String? = nil, logPath: String? = nil) throws -> Process {
        let box = SpawnBox()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            var empty = sigset_t()
            sigemptyset(&empty)
            pthread_sigmask(SIG_SETMASK, &empty, nil)
            box.result = Result { try spawnFromCurrentThread(arguments, netns: netns, logPath: logPath) }
            done.signal()
        }
        thread.start()
        done.wait()
        return try box.result!.get()
    }

    private static func spawnFromCurrentThread(_ arguments: [String], netns: String? = nil, logPath: String? = nil) throws -> Process {
        let argv = netns.map { ["ip", "netns", "exec", $0] + arguments } ?? arguments
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = argv
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
        try process.run()
        return process
    }
}

/// Written by one reader thread, read after `DispatchGroup.wait()`; the group orders the accesses.
private final class DataBox: @unchecked Sendable {
    var data = Data()
}

/// Written by the spawn thread before it signals the semaphore, read after `wait()`: the semaphore orders them.
private final class SpawnBox: @unchecked Sendable {
    var result: Result<Process, any Error>?
}
