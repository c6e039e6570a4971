import DyscoCore
import DyscoSystem
import Foundation
import Glibc

/// The agent's state file (``SessionStateFile``): an append-only journal of record changes written with write(2)
/// (a crash of the process loses nothing already written; no fsync: the file lives in /run, which a reboot
/// clears together with the kernel tables), compacted into a snapshot (temp file + rename) when the journal has
/// grown well past the table. Used under the processor's lock (the order of the lines is the order of the
/// changes).
final class StateJournal {
    let path: String
    private var fd: Int32 = -1
    /// Lines in the file (header excluded).
    private var lines = 0
    /// Write errors (the agent keeps running; the next compaction starts a new file).
    private(set) var writeErrors = 0
    /// The ids whose last line in the file is a `put` (only those get a `del`).
    private var written = Set<SessionTable.SessionID>()

    /// Starts the file anew with a snapshot of `table` (a restart compacts what it read).
    init(path: String, table: SessionTable) throws {
        self.path = path
        try compact(table)
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Reads the file at `path`; nil when there is none.
    static func read(path: String) throws -> SessionStateFile.Contents? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ControlError(message: "cannot read state file \(path): \(error)")
        }
        do throws(SessionStateFile.ReadError) { return try SessionStateFile.decode(data) } catch {
            throw ControlError(message: "state file \(path): \(error) (start with --fresh to discard it)")
        }
    }

    /// Appends the changes of `ids` and compacts when the journal is more than 4× the table (and 4,096 lines).
    func record(_ ids: Set<SessionTable.SessionID>, table: SessionTable) {
        let entries = SessionStateFile.entries(for: ids, in: table, written: &written)
        guard !entries.isEmpty else { return }
        var bytes: [UInt8] = []
        for entry in entries { bytes += SessionStateFile.encode(entry) }
        lines += entries.count
        if lines > max(4096, 4 * table.count) {
            do { try compact(table) } catch { writeErrors += 1 }
            return
        }
        if !write(bytes) { writeErrors += 1 }
    }

    /// Writes the header and one line per record to a temp file, renames it over the state file, and appends
    /// from then on to the new file.
    func compact(_ table: SessionTable) throws {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty { try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        let temp = path + ".tmp"
        let newFD = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard newFD >= 0 else { throw SystemCallError(operation: "open(\(temp))", errno: errno) }
        var ids = Set<SessionTable.SessionID>()
        let bytes = SessionStateFile.snapshot(table, written: &ids)
        let count = bytes.withUnsafeBytes { Glibc.write(newFD, $0.baseAddress, $0.count) }
        guard count == bytes.count else {
            let code = errno
            close(newFD)
            unlink(temp)
            throw SystemCallError(operation: "write(\(temp))", errno: code)
        }
        guard rename(temp, path) == 0 else {
            let code = errno
            close(newFD)
            unlink(temp)
            throw SystemCallError(operation: "rename(\(temp), \(path))", errno: code)
        }
        // The descriptor stays valid after the rename; appends go to the new file (O_APPEND semantics by offset:
        // this process is the only writer).
        if fd >= 0 { close(fd) }
        fd = newFD
        lines = 0
        written = ids
    }

    private func write(_ bytes: [UInt8]) -> Bool {
        guard fd >= 0 else { return false }
        return bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count
    }

    /// Removes the file (a planned stop with nothing left to keep, or `--purge`).
    func remove() {
        if fd >= 0 { close(fd) }
        fd = -1
        unlink(path)
    }
}
