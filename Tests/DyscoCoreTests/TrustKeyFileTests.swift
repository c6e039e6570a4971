import DyscoCore
import Foundation
import Testing

/// Key files (`dysco-migrate key`): modes, refusals, rotation, fingerprints. Files in a fresh temporary directory;
/// no root needed. Each test has its own directory, removed after it (deinit).
@Suite final class TrustKeyFileTests {
    let directory: String

    init() throws {
        directory = NSTemporaryDirectory() + "trust-key-file-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    func mode(_ path: String) -> UInt32 {
        var info = stat()
        return stat(path, &info) == 0 ? UInt32(info.st_mode) & 0o7777 : 0
    }

    @Test func privateModes() {
        #expect(TrustKey.isPrivate(mode: 0o100600))
        #expect(TrustKey.isPrivate(mode: 0o100400))
        #expect(!TrustKey.isPrivate(mode: 0o100640))
        #expect(!TrustKey.isPrivate(mode: 0o100604))
        #expect(!TrustKey.isPrivate(mode: 0o100620))
        #expect(!TrustKey.isPrivate(mode: 0o100644))
    }

    @Test func fingerprintIsStableAndHidesTheKey() {
        let key = TrustKey(hex: String(repeating: "ab", count: 32))!
        #expect(key.fingerprint == TrustKey(hex: String(repeating: "AB", count: 32))!.fingerprint)
        #expect(key.fingerprint.hasPrefix("sha256:") && key.fingerprint.count == 7 + 32)
        #expect(!key.fingerprint.contains(key.hex.prefix(8)))
        #expect(key.fingerprint != TrustKey(hex: String(repeating: "ac", count: 32))!.fingerprint)
        // SHA-256 of 32 bytes 0xab, first 16 bytes (checked with: python3 -c 'import hashlib; print(hashlib.sha256(b"\xab"*32).hexdigest()[:32])').
        #expect(key.fingerprint == "sha256:" + Self.referenceFingerprintHex)
    }

    static let referenceFingerprintHex = "9a2db2e23f1504cd056606553ac049c5"

    @Test func generateWritesPrivateLoadableKeyAndRefusesOverwrite() throws {
        let path = "\(directory)/sub/trust.key"
        let key = try TrustKeyFile.generate(path: path, force: false)
        #expect(mode(path) == 0o600)
        #expect(try TrustKey.load(path: path) == key)
        #expect(key.bytes.count == 32)
        #expect(throws: TrustKeyFile.WriteError.exists(path: path)) { try TrustKeyFile.generate(path: path, force: false) }
        #expect(try TrustKey.load(path: path) == key, "a refused generate leaves the key")
        let forced = try TrustKeyFile.generate(path: path, force: true)
        let reloaded = try TrustKey.load(path: path)
        #expect(forced != key && mode(path) == 0o600 && reloaded == forced)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: "\(directory)/sub")
        #expect(leftovers == ["trust.key"], "no temporary file stays: \(leftovers)")
    }

    @Test func generateRefusesADanglingSymlink() throws {
        let path = "\(directory)/link.key"
        symlink("\(directory)/nowhere", path)
        #expect(throws: TrustKeyFile.WriteError.exists(path: path)) { try TrustKeyFile.generate(path: path, force: false) }
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/nowhere"))
    }

    @Test func loadRefusesGroupOrWorldAccess() throws {
        let path = "\(directory)/open.key"
        try TrustKeyFile.generate(path: path, force: false)
        for bad: mode_t in [0o644, 0o640, 0o604, 0o660] {
            chmod(path, bad)
            #expect(throws: TrustKey.LoadError.tooOpen(path: path, mode: UInt32(S_IFREG | bad))) { try TrustKey.load(path: path) }
        }
        chmod(path, 0o644)
        do { _ = try TrustKey.load(path: path) } catch {
            #expect("\(error)".contains("mode 0644") && "\(error)".contains("chmod 600 \(path)"), "\(error)")
        }
        chmod(path, 0o400)
        #expect((try? TrustKey.load(path: path)) != nil)
    }

    @Test func parseErrors() {
        #expect(throws: TrustKey.LoadError.notHex(path: "p")) { try TrustKey.parse(text: "xyz", path: "p") }
        #expect(throws: TrustKey.LoadError.tooShort(path: "p", bytes: 4)) { try TrustKey.parse(text: "00112233\n", path: "p") }
        #expect((try? TrustKey.parse(text: " " + String(repeating: "0f", count: 16) + "\n", path: "p"))?.bytes.count == 16)
    }

    @Test func rotateKeepsTheOldKeyAsPrevious() throws {
        let path = "\(directory)/trust.key", previous = "\(directory)/trust-previous.key"
        let old = try TrustKeyFile.generate(path: path, force: false)
        let rotated = try TrustKeyFile.rotate(path: path, previousPath: previous)
        #expect(rotated.previous == old && rotated.current != old)
        let (onDisk, previousOnDisk) = (try TrustKey.load(path: path), try TrustKey.load(path: previous))
        #expect(previousOnDisk == old && onDisk == rotated.current)
        #expect(mode(path) == 0o600 && mode(previous) == 0o600)
        // A second rotation replaces the previous key.
        let again = try TrustKeyFile.rotate(path: path, previousPath: previous)
        let secondPrevious = try TrustKey.load(path: previous)
        #expect(again.previous == rotated.current && secondPrevious == rotated.current)
    }

    @Test func rotateRefusesAnOpenOrMissingKeyAndTheSamePath() throws {
        let path = "\(directory)/trust.key", previous = "\(directory)/trust-previous.key"
        #expect(throws: TrustKeyFile.RotateError.self) { try TrustKeyFile.rotate(path: path, previousPath: previous) }
        try TrustKeyFile.generate(path: path, force: false)
        #expect(throws: TrustKeyFile.RotateError.self) { try TrustKeyFile.rotate(path: path, previousPath: path) }
        chmod(path, 0o644)
        #expect(throws: TrustKeyFile.RotateError.self) { try TrustKeyFile.rotate(path: path, previousPath: previous) }
        #expect(!FileManager.default.fileExists(atPath: previous), "nothing moved")
    }

    @Test func rotationStepsNameBothFilesInOrder() {
        let steps = TrustKeyFile.rotationSteps(path: "/k/new", previousPath: "/k/old")
        let first = steps.range(of: "--trust-key /k/old --trust-key-previous /k/new")
        let second = steps.range(of: "--trust-key /k/new --trust-key-previous /k/old")
        #expect(first != nil && second != nil && first!.lowerBound < second!.lowerBound, "\(steps)")
        #expect(steps.contains("DYSCO_TRUST_ARGS") && steps.contains("systemctl restart dysco-migrate-agent"))
    }
}
