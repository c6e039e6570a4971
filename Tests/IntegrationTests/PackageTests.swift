import DyscoCore
import DyscoSystem
import Foundation
import Testing

/// The Debian package (`make deb`, scripts/build-deb.sh) installed into a fresh Debian 12 root: today's cached
/// `debootstrap --variant=minbase bookworm` (scripts/deb-root.sh; the first run of a day builds it, about a
/// minute or two), copied to a private directory, where `apt-get install ./dysco-migrate_….deb` must pull in
/// every runtime library through the package's Depends. Then the installed command runs there. Needs root, the
/// network (the Debian mirror) and the package: $DYSCO_DEB, else the newest .build/deb/dysco-migrate_*.deb
/// (`make test` runs `make deb` first).
@Suite(.serialized) struct PackageTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let script = "\(repository)/scripts/deb-root.sh"

    static func package() throws -> String {
        if let path = ProcessInfo.processInfo.environment["DYSCO_DEB"] { return path }
        let directory = "\(repository)/.build/deb"
        let version = DyscoVersion.string
        let candidates = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .filter { $0.hasPrefix("dysco-migrate_\(version)_") && $0.hasSuffix(".deb") }
        guard let name = candidates.sorted().last else {
            throw PackageTestError("no dysco-migrate_\(version)_*.deb in \(directory): run `make deb` (or set DYSCO_DEB)")
        }
        return "\(directory)/\(name)"
    }

    struct PackageTestError: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// Runs `arguments` inside `root` (chroot, /proc in a private mount namespace).
    @discardableResult
    static func inRoot(_ root: String, _ arguments: [String], check: Bool = true) throws -> CommandResult {
        try Command.run(["bash", script, "run", root] + arguments, check: check)
    }

    /// No mount of this process's namespace lies under `root` (so removing it removes only its files).
    static func mounts(under root: String) -> [String] {
        let table = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        return table.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { return nil }
            let point = String(fields[4])
            return point == root || point.hasPrefix(root + "/") ? point : nil
        }
    }

    @Test("the .deb installs into a fresh Debian 12 root with its dependencies, and dysco-migrate runs there")
    func installsIntoFreshRoot() throws {
        let deb = try Self.package()
        let started = Date()
        let root = "/var/tmp/dysco-deb-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        defer {
            let left = Self.mounts(under: root)
            if left.isEmpty {
                try? FileManager.default.removeItem(atPath: root)
            } else {
                Issue.record("mounts left under \(root), not removed: \(left)")
            }
        }
        try Command.run(["bash", Self.script, "copy", root])
        let ready = Date()
        try FileManager.default.copyItem(atPath: deb, toPath: "\(root)/tmp/dysco-migrate.deb")

        // apt-get resolves the package's Depends from the mirror: the runtime libraries must come with it.
        let before = try Self.inRoot(root, ["dpkg-query", "-W", "-f", "${Package}\\n"]).stdout
        #expect(!before.contains("libnetfilter-queue1"), "the base root already has the libraries")
        let install = try Command.run(["bash", Self.script, "apt", root, "install", "-y", "--no-install-recommends",
                                       "/tmp/dysco-migrate.deb"], check: false)
        try #require(install.succeeded, "apt-get install: \(install.stdout.suffix(3000)) \(install.stderr.suffix(3000))")
        let installed = Date()
        let after = try Self.inRoot(root, ["dpkg-query", "-W", "-f", "${Package} ${Status}\\n"]).stdout
        for library in ["libnetfilter-queue1", "libnetfilter-conntrack3", "libbpf1", "libmnl0", "iptables", "iproute2"] {
            #expect(after.contains("\(library) install ok installed"), "\(library) not pulled in: \(after)")
        }
        #expect(after.contains("dysco-migrate install ok installed"))

        // The command, its libraries and its resource bundle beside the real binary.
        let version = try Self.inRoot(root, ["dysco-migrate", "--version"])
        #expect(version.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == DyscoVersion.string)
        let ldd = try Self.inRoot(root, ["ldd", "/usr/lib/dysco-migrate/dysco-migrate"], check: false)
        #expect(!ldd.stdout.contains("not found") && !ldd.stdout.contains("libswift"), "\(ldd.stdout)")
        #expect(FileManager.default.fileExists(atPath: "\(root)/usr/lib/dysco-migrate/dysco-migrate_DyscoLab.resources/http-server.py"))
        #expect(try Self.inRoot(root, ["dysco-migrate", "agent", "--help"]).stdout.contains("--trust-key"))
        // The BPF datapath's programs beside the binary, where `agent --datapath bpf` finds them by default (the
        // next check in its validation, a relative --bpf-fs, is reached only once the object was found).
        #expect(FileManager.default.fileExists(atPath: "\(root)/usr/lib/dysco-migrate/dysco.bpf.o"))
        let bpf = try Self.inRoot(root, ["dysco-migrate", "agent", "--datapath", "bpf", "--bpf-fs", "relative"], check: false)
        #expect(bpf.stderr.contains("--bpf-fs must be an absolute path"), "\(bpf.stdout) \(bpf.stderr)")

        // Units, configuration (a conffile), runtime directories, man pages, completions.
        for path in ["/lib/systemd/system/dysco-migrate-agent.service", "/lib/systemd/system/dysco-migrate-agent@.service",
                     "/usr/lib/tmpfiles.d/dysco-migrate.conf", "/etc/dysco-migrate/agent.conf",
                     "/usr/share/man/man1/dysco-migrate.1.gz", "/usr/share/man/man1/dysco-migrate-agent.1.gz",
                     "/usr/share/man/man1/dysco-migrate-key-rotate.1.gz",
                     "/usr/share/bash-completion/completions/dysco-migrate",
                     "/usr/share/zsh/vendor-completions/_dysco-migrate",
                     "/usr/share/fish/vendor_completions.d/dysco-migrate.fish"] {
            #expect(FileManager.default.fileExists(atPath: root + path), "\(path) not installed")
        }
        // The units as installed, against the installed system (the template through an instance), and the pages.
        let verify = try Self.inRoot(root, ["sh", "-c", "cp /lib/systemd/system/dysco-migrate-agent@.service "
                                            + "/tmp/dysco-migrate-agent@blue.service && systemd-analyze verify "
                                            + "/lib/systemd/system/dysco-migrate-agent.service /tmp/dysco-migrate-agent@blue.service"],
                                     check: false)
        #expect(verify.succeeded && verify.stderr.isEmpty, "systemd-analyze verify: \(verify.stdout) \(verify.stderr)")
        let pages = try Self.inRoot(root, ["man", "-w", "dysco-migrate", "dysco-migrate-agent", "dysco-migrate-key"], check: false)
        #expect(pages.succeeded && pages.stdout.split(separator: "\n").count == 3, "man -w: \(pages)")
        let conffiles = try Self.inRoot(root, ["dpkg-query", "-W", "-f", "${Conffiles}", "dysco-migrate"]).stdout
        #expect(conffiles.contains("/etc/dysco-migrate/agent.conf"), "\(conffiles)")

        // Keys there: generate (0600, root), refuse to overwrite, show by fingerprint, refuse an open file.
        let generated = try Self.inRoot(root, ["dysco-migrate", "key", "generate", "--json"])
        let info = try JSONSerialization.jsonObject(with: Data(generated.stdout.utf8)) as? [String: Any]
        #expect(info?["path"] as? String == TrustKeyFile.defaultPath && info?["key"] == nil, "\(generated.stdout)")
        let attributes = try FileManager.default.attributesOfItem(atPath: root + TrustKeyFile.defaultPath)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        #expect((attributes[.ownerAccountID] as? NSNumber)?.intValue == 0)
        let again = try Self.inRoot(root, ["dysco-migrate", "key", "generate"], check: false)
        #expect(again.status == 1 && again.stderr.contains("refusing to overwrite"), "\(again)")
        let shown = try Self.inRoot(root, ["dysco-migrate", "key", "show"]).stdout
        #expect(shown.contains(info?["fingerprint"] as? String ?? "-"), "\(shown)")
        chmod(root + TrustKeyFile.defaultPath, 0o644)
        let open = try Self.inRoot(root, ["dysco-migrate", "key", "show"], check: false)
        #expect(open.status == 1 && open.stderr.contains("chmod 600"), "\(open)")

        // Removal and purge leave nothing of the package behind.
        try Command.run(["bash", Self.script, "apt", root, "purge", "-y", "dysco-migrate"])
        #expect(!FileManager.default.fileExists(atPath: "\(root)/usr/lib/dysco-migrate"))
        #expect(!FileManager.default.fileExists(atPath: "\(root)/etc/dysco-migrate"))
        FileHandle.standardError.write(Data(String(
            format: "[package-tests] fresh root %.1f s (cached base copied or debootstrapped), install %.1f s, total %.1f s\n",
            ready.timeIntervalSince(started), installed.timeIntervalSince(ready), Date().timeIntervalSince(started)).utf8))
    }
}
