import DyscoAgent
import DyscoCore
import DyscoSystem
import Foundation
import Logging
import Synchronization

/// A sender-paced HTTP file server (Python, threaded, listen backlog 1024): each response is written in 32 KiB
/// chunks no faster than `bytesPerSecond`, so a download stays mid-transfer for size ÷ rate seconds and the
/// receiver never overruns (a clean baseline of zero retransmissions). Used by `measure`, `dysco-bench replace`,
/// `dysco-migrate lab paced-server` and the `replace` integration tests.
public enum PacedHTTPServer {
    /// The server: `python3 paced-http-server.py ROOT ADDRESS PORT BYTES_PER_SECOND` (Resources/ of this module);
    /// serves the files of ROOT.
    public static func script() throws -> String { try LabResources.path("paced-http-server.py") }

    /// Starts the server on `host` (serving the lab's HTTP root on `port`) and returns once `probeFrom` can
    /// fetch `index.html` from it (at most 10 s).
    @discardableResult
    /// `ipv6`: on the host's IPv6 address (a dual-stack lab).
    public static func start(_ lab: Lab, on host: String = "server1", port: UInt16, bytesPerSecond: Double,
                             probeFrom: String = "client1", ipv6: Bool = false) throws -> Process {
        let v6 = ipv6 ? lab.ipv6Address(of: host) : nil
        if ipv6, v6 == nil { throw LabError.setupFailed("lab \(lab.name) has no IPv6 addresses") }
        let address = v6 ?? lab.address(of: host)
        let url = address.urlHost
        let process = try lab.spawn(host, [python, try script(), lab.httpRoot, "\(address)", "\(port)", "\(bytesPerSecond)"],
                                    logPath: "\(lab.directory)/paced-\(host)-\(port)\(ipv6 ? "-v6" : "").log")
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? lab.exec(probeFrom, ["curl", "-sS", "-g", "-o", "/dev/null", "--max-time", "2",
                                          "http://\(url):\(port)/index.html"], check: true)) != nil { return process }
            if !process.isRunning { break }
            usleep(100_000)
        }
        throw LabError.serviceFailed(host: host, service: "paced HTTP server", reason: "did not answer on port \(port)",
                                     logTail: ProcessInspector.tail(of: "\(lab.directory)/paced-\(host)-\(port)\(ipv6 ? "-v6" : "").log"))
    }

    /// Debian's python3 (the one the setup installs), else whatever `python3` is on PATH.
    public static var python: String {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "python3"
    }
}

/// The Python programs this module runs on lab hosts, shipped as resource files (Resources/, copied into the
/// `dysco-migrate_DyscoLab.resources` directory beside the binary).
public enum LabResources {
    /// The path of resource `name` of this module.
    public static func path(_ name: String) throws -> String { try path(name, in: .module) }

    /// The path of resource `name` in `bundle`, or a clear error when the binary was copied without its resources.
    public static func path(_ name: String, in bundle: Bundle) throws -> String {
        guard let url = bundle.url(forResource: name, withExtension: nil) else {
            throw LabError.setupFailed("\(name) is missing from \(bundle.bundlePath): keep the binary's .resources "
                                       + "directories beside it")
        }
        return url.path
    }
}

/// N downloads spread over the lab's clients (session i on client i mod K): per session one `curl` piped into
/// `sha256sum`, so every byte is checked without storing the files; or, with `toFiles`, written to `sI.out` (whose
/// growing size shows the session's progress: `measure`'s goodput) and hashed when complete. Session i writes
/// `sI.sha` and then `sI.rc` (curl's exit status) into the download directory when it ends.
public final class PacedDownloads: @unchecked Sendable {
    public let directory: String
    public let count: Int
    private let processes: [Process]
    private let labDirectory: String

    static let script = """
        url=$1; dir=$2; timeout=$3; shift 3
        for i in "$@"; do
          ( curl -sS -g --fail -m "$timeout" "$url" | sha256sum | cut -d' ' -f1 > "$dir/s$i.sha"
            echo "${PIPESTATUS[0]}" > "$dir/s$i.rc.tmp" && mv "$dir/s$i.rc.tmp" "$dir/s$i.rc" ) &
        done
        wait
        """

    static let fileScript = """
        url=$1; dir=$2; timeout=$3; shift 3
        for i in "$@"; do
          ( curl -sS -g --fail -m "$timeout" -o "$dir/s$i.out" "$url"; rc=$?
            sha256sum "$dir/s$i.out" | cut -d' ' -f1 > "$dir/s$i.sha"
            echo "$rc" > "$dir/s$i.rc.tmp" && mv "$dir/s$i.rc.tmp" "$dir/s$i.rc" ) &
        done
        wait
        """

    /// Where session `i` writes what it receives (with `toFiles`).
    public func outputPath(_ i: Int) -> String { "\(directory)/s\(i).out" }

    /// `host`: where the downloads go (default server1; a proxy in front of it).
    public init(_ lab: Lab, clients: [String], port: UInt16, file: String, count: Int, timeout: Int, toFiles: Bool = false,
                host: IPAddress? = nil) throws {
        labDirectory = lab.directory
        directory = "\(lab.directory)/downloads"
        self.count = count
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let target = host ?? lab.address(of: "server1")
        let url = "http://\(target.urlHost):\(port)/\(file)"
        var processes: [Process] = []
        for (k, client) in clients.enumerated() {
            let mine = stride(from: k, to: count, by: clients.count).map(String.init)
            guard !mine.isEmpty else { continue }
            processes.append(try lab.spawn(client, ["bash", "-c", toFiles ? Self.fileScript : Self.script, "bash", url, directory, "\(timeout)"] + mine,
                                           logPath: "\(lab.directory)/curl-\(client).log"))
        }
        self.processes = processes
    }

    public func logPath(_ client: String) -> String { "\(labDirectory)/curl-\(client).log" }

    public func finishedCount() -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".rc") }.count
    }

    /// Waits (polling) until every client's batch has exited; false on timeout.
    public func wait(timeout: TimeInterval) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while processes.contains(where: \.isRunning) {
            if Date() > deadline { return false }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return true
    }

    /// Downloads that ended with curl status 0 and the `expected` sha256, and what went wrong with the others
    /// ("sN: curl status X" / "sN: sha256 mismatch" / "sN: not finished").
    public func check(expected: String, finished: Bool) -> (intact: Int, problems: [String]) {
        var problems: [String] = []
        if !finished { problems.append("the downloads did not all finish in time (\(finishedCount())/\(count))") }
        var intact = 0
        for (index, result) in results().enumerated() {
            switch result {
            case (nil, _): problems.append("s\(index): not finished")
            case (let status?, _) where status != 0: problems.append("s\(index): curl status \(status)")
            case (_, let digest) where digest != expected: problems.append("s\(index): sha256 mismatch")
            default: intact += 1
            }
        }
        return (intact, problems)
    }

    /// The report's line for download problems (none when there are none).
    public static func problemLines(_ problems: [String]) -> [String] {
        problems.isEmpty ? [] : ["  download problems: " + problems.prefix(10).joined(separator: "; ") + (problems.count > 10 ? "; …" : "")]
    }

    /// Per session: curl's exit status and the sha256 of what it received (nil: not finished).
    public func results() -> [(Int?, String?)] {
        (0..<count).map { i in
            let rc = (try? String(contentsOfFile: "\(directory)/s\(i).rc", encoding: .utf8))
                .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            let sha = (try? String(contentsOfFile: "\(directory)/s\(i).sha", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
            return (rc, sha)
        }
    }
}

/// On SIGINT/SIGTERM while a benchmark lab is up: remove that lab, then exit 130 (the lab's processes and
/// namespaces would otherwise outlive the benchmark).
public enum SignalTeardown {
    private static let current = Mutex<(token: Int, lab: String, logger: Logger)?>(nil)
    private static let counter = Atomic<Int>(0)
    /// The signal sources, kept alive for the process's lifetime.
    private static let sources = Mutex<[KeptSource]>([])
    /// A dispatch source (thread-safe), kept only so that it lives as long as the process.
    private struct KeptSource: @unchecked Sendable { let source: any DispatchSourceSignal }
    private static let installed = Mutex(false)
    /// Set when a signal arrived: the handler owns the teardown from then on.
    private static let interrupted = Atomic<Bool>(false)

    /// After a signal, parks the calling thread until the handler has removed the lab and exited, so that the
    /// benchmark's own error path does not remove the same lab at the same time.
    public static func standAsideIfInterrupted() {
        while interrupted.load(ordering: .acquiring) { sleep(1) }
    }

    public static func arm(lab: String, logger: Logger) -> Int {
        let token = counter.add(1, ordering: .relaxed).newValue
        current.withLock { $0 = (token, lab, logger) }
        let first = installed.withLock { done in defer { done = true }; return !done }
        if first {
            let queue = DispatchQueue(label: "dysco-bench-signals")
            queue.sync {
                for number in [SIGINT, SIGTERM] {
                    signal(number, SIG_IGN)
                    let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                    source.setEventHandler {
                        interrupted.store(true, ordering: .releasing)
                        if let (_, lab, logger) = current.withLock({ $0 }) {
                            logger.warning("interrupted: removing the benchmark lab", metadata: ["bench.lab": "\(lab)"])
                            _ = try? Lab.down(name: lab, force: true, logger: logger)
                        }
                        exit(130)
                    }
                    source.resume()
                    sources.withLock { $0.append(KeptSource(source: source)) }
                }
            }
        }
        return token
    }

    public static func disarm(_ token: Int) {
        current.withLock { if $0?.token == token { $0 = nil } }
    }
}

