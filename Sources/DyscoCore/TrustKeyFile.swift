import Foundation

/// Key files on a host (`dysco-migrate key generate|show|rotate`, the package's /etc/dysco-migrate): written
/// mode 0600 by whoever runs the command (root on a real host), never visible half-written (a temporary file beside
/// the target, then `link` — which refuses an existing file — or, to replace, `rename`).
public enum TrustKeyFile {
    /// Where the package's agent unit reads the key (/etc/dysco-migrate/agent.conf).
    public static let defaultPath = "/etc/dysco-migrate/trust.key"
    /// Where `rotate` moves the current key: the agent's `--trust-key-previous` during a rotation.
    public static let defaultPreviousPath = "/etc/dysco-migrate/trust-previous.key"

    public enum WriteError: Error, CustomStringConvertible, Equatable {
        case exists(path: String)
        case io(path: String, reason: String)

        public var description: String {
            switch self {
            case .exists(let p): "\(p) exists; refusing to overwrite a trust key (--force replaces it; `key rotate` keeps it as the previous key)"
            case .io(let p, let r): "cannot write trust key \(p): \(r)"
            }
        }
    }

    /// Writes `hex` and a newline to `path` with mode 0600; refuses an existing file unless `replace`. Creates the
    /// parent directory (0755) if it is missing.
    public static func save(hex: String, to path: String, replace: Bool) throws(WriteError) {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty, !FileManager.default.fileExists(atPath: directory) {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                        attributes: [.posixPermissions: 0o755])
            } catch { throw .io(path: path, reason: "cannot create \(directory): \(error.localizedDescription)") }
        }
        if !replace, FileManager.default.fileExists(atPath: path) || isSymlink(path) { throw .exists(path: path) }
        let temporary = "\(path).tmp-\(getpid())"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(path: path, reason: "\(temporary): \(String(cString: strerror(errno)))") }
        let bytes = Array((hex + "\n").utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let ok = written == bytes.count && fchmod(fd, 0o600) == 0 && fsync(fd) == 0
        let reason = String(cString: strerror(errno))
        close(fd)
        guard ok else {
            unlink(temporary)
            throw .io(path: path, reason: reason)
        }
        if replace {
            guard rename(temporary, path) == 0 else {
                let reason = String(cString: strerror(errno))
                unlink(temporary)
                throw .io(path: path, reason: reason)
            }
        } else {
            let linked = link(temporary, path) == 0
            let failure = errno
            unlink(temporary)
            guard linked else {
                if failure == EEXIST { throw .exists(path: path) }
                throw .io(path: path, reason: String(cString: strerror(failure)))
            }
        }
    }

    /// A new random key (32 bytes) written to `path` (``save(hex:to:replace:)``, `replace` = `force`).
    @discardableResult
    public static func generate(path: String, force: Bool) throws(WriteError) -> TrustKey {
        let hex = TrustKey.generateHex()
        try save(hex: hex, to: path, replace: force)
        return TrustKey(hex: hex)!
    }

    public enum RotateError: Error, CustomStringConvertible {
        case load(TrustKey.LoadError)
        case write(WriteError)
        case samePath(String)

        public var description: String {
            switch self {
            case .load(let e): "\(e)"
            case .write(let e): "\(e)"
            case .samePath(let p): "the key and the previous key are the same file (\(p))"
            }
        }
    }

    /// Rotation at one host: the key at `path` (which must load) is written to `previousPath` (replacing what was
    /// there), then a new key replaces it at `path`. A crash in between leaves the old key at both paths (safe).
    public static func rotate(path: String, previousPath: String) throws(RotateError) -> (current: TrustKey, previous: TrustKey) {
        guard (path as NSString).standardizingPath != (previousPath as NSString).standardizingPath else {
            throw .samePath(path)
        }
        let old: TrustKey
        do throws(TrustKey.LoadError) { old = try TrustKey.load(path: path) } catch { throw .load(error) }
        do throws(WriteError) {
            try save(hex: old.hex, to: previousPath, replace: true)
            let new = try generate(path: path, force: true)
            return (new, old)
        } catch { throw .write(error) }
    }

    /// What the operator does after `rotate` (printed by `dysco-migrate key rotate`).
    public static func rotationSteps(path: String, previousPath: String) -> String {
        """
        Next, for the whole deployment (an agent signs with --trust-key and accepts --trust-key and --trust-key-previous; \
        a restart keeps its live sessions):
          1. Copy \(path) and \(previousPath) to every host (mode 0600, owner root).
          2. Restart every agent, one at a time, with --trust-key \(previousPath) --trust-key-previous \(path): each \
        still signs with the old key and now accepts the new one.
          3. Then restart every agent with --trust-key \(path) --trust-key-previous \(previousPath): each signs with the \
        new key and still accepts the old one from agents not yet switched.
          4. Once all sign with the new key, restart each with --trust-key \(path) alone and delete \(previousPath).
        With the Debian package: set DYSCO_TRUST_ARGS in /etc/dysco-migrate/agent.conf for each step, then \
        `systemctl restart dysco-migrate-agent` (or dysco-migrate-agent@NETNS).
        """
    }

    private static func isSymlink(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFLNK
    }
}
