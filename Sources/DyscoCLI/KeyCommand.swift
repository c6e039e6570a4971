import ArgumentParser
import DyscoCore
import Foundation

/// `dysco-migrate key generate|show|rotate`: the deployment's trust key on a host (TrustKeyFile in DyscoCore).
struct KeyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key",
        abstract: "Generate, show (by fingerprint) or rotate the trust key the agents share.",
        discussion: """
            The key file is hex text (as the agent's --trust-key reads it), mode 0600, owned by whoever runs the \
            command (root). Every agent of a deployment needs the same key: generate it once, copy the file to \
            every host. The agent and these commands refuse a key file its group or others may read or write.

            generate: a new random 32-byte key; refuses an existing file without --force. show: its fingerprint \
            (sha256: and 16 bytes of SHA-256 over the key; equal fingerprints, equal keys), never the key unless \
            --reveal. rotate: moves the current key to --previous-path and generates a new one at --path, then \
            prints the steps that roll it out without refusing a session (see `dysco-migrate agent --help`, \
            "Key rotation").
            """,
        subcommands: [Generate.self, Show.self, Rotate.self]
    )

    /// The fields `show`, `generate` and `rotate` print for a key (JSON: one object per key).
    struct KeyInfo: Encodable {
        var path: String
        var fingerprint: String
        var bytes: Int
        var key: String?

        init(path: String, key: TrustKey, reveal: Bool = false) {
            self.path = path
            fingerprint = key.fingerprint
            bytes = key.bytes.count
            self.key = reveal ? key.hex : nil
        }

        var text: String { "\(path): \(fingerprint) (\(bytes) bytes)" + (key.map { "\nkey: \($0)" } ?? "") }
    }

    static func printJSON(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        FileHandle.standardOutput.write(try encoder.encode(value) + Data("\n".utf8))
    }

    static func fail(_ message: String) -> ExitCode {
        FileHandle.standardError.write(Data("key: \(message)\n".utf8))
        return ExitCode(1)
    }

    struct Generate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a new random trust key (mode 0600); refuses to overwrite one without --force.")
        @Option(help: ArgumentHelp("The key file.", valueName: "file")) var path = TrustKeyFile.defaultPath
        @Flag(help: "Replace an existing key file (its key is lost; `key rotate` keeps it as the previous key).")
        var force = false
        @OptionGroup var output: JSONOutput<JSONHelp.Key>

        func run() async throws {
            let key: TrustKey
            do throws(TrustKeyFile.WriteError) { key = try TrustKeyFile.generate(path: path, force: force) } catch {
                throw KeyCommand.fail("\(error)")
            }
            let info = KeyInfo(path: path, key: key)
            if output.json { try KeyCommand.printJSON(info) } else { print("wrote \(info.text)") }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a trust key's fingerprint (the key itself only with --reveal).")
        @Option(help: ArgumentHelp("The key file.", valueName: "file")) var path = TrustKeyFile.defaultPath
        @Flag(help: "Print the key itself too (hex), e.g. to copy it to another host.") var reveal = false
        @OptionGroup var output: JSONOutput<JSONHelp.Key>

        func run() async throws {
            let key: TrustKey
            do throws(TrustKey.LoadError) { key = try TrustKey.load(path: path) } catch { throw KeyCommand.fail("\(error)") }
            let info = KeyInfo(path: path, key: key, reveal: reveal)
            if output.json { try KeyCommand.printJSON(info) } else { print(info.text) }
        }
    }

    struct Rotate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move the current key to the previous-key path, generate a new one, print the roll-out steps.")
        @Option(help: ArgumentHelp("The key file (the agents' --trust-key).", valueName: "file"))
        var path = TrustKeyFile.defaultPath
        @Option(help: ArgumentHelp("Where the current key goes (the agents' --trust-key-previous during the rotation).",
                                   valueName: "file"))
        var previousPath = TrustKeyFile.defaultPreviousPath
        @OptionGroup var output: JSONOutput<JSONHelp.Key>

        struct Rotated: Encodable {
            var current: KeyInfo
            var previous: KeyInfo
            var steps: [String]
        }

        func run() async throws {
            let keys: (current: TrustKey, previous: TrustKey)
            do throws(TrustKeyFile.RotateError) { keys = try TrustKeyFile.rotate(path: path, previousPath: previousPath) } catch {
                throw KeyCommand.fail("\(error)")
            }
            let current = KeyInfo(path: path, key: keys.current), previous = KeyInfo(path: previousPath, key: keys.previous)
            let steps = TrustKeyFile.rotationSteps(path: path, previousPath: previousPath)
            if output.json {
                try KeyCommand.printJSON(Rotated(current: current, previous: previous,
                                                 steps: steps.split(separator: "\n").map(String.init)))
            } else {
                print("new key: \(current.text)\nold key: \(previous.text)\n\n\(steps)")
            }
        }
    }
}
