import Crypto
import Foundation

/// The key every agent of one deployment shares (paper §2.3: service chains extend only to trusted hosts).
/// A Dysco SYN trailer (version 2) and every control message carry an HMAC-SHA256 under this key, truncated
/// to ``TrustGroup/macLength`` bytes.
///
/// Key file format: the key as hexadecimal text (at least 32 hex digits = 16 bytes; whitespace and a trailing
/// newline ignored), as `dysco-migrate key generate` and `dysco-migrate lab up` write it and as
/// `openssl rand -hex 32` prints it. The file must be accessible by its owner only (mode 0600 or 0400):
/// ``load(path:)`` refuses one that its group or others may read or write.
public struct TrustKey: Sendable, Equatable {
    public let bytes: [UInt8]

    public static let minimumBytes = 16

    public enum LoadError: Error, CustomStringConvertible, Equatable {
        case unreadable(path: String, reason: String)
        case notHex(path: String)
        case tooShort(path: String, bytes: Int)
        /// The file's permission bits give its group or others access (`mode`: the permission bits).
        case tooOpen(path: String, mode: UInt32)

        public var description: String {
            switch self {
            case .unreadable(let p, let r): "cannot read trust key \(p): \(r)"
            case .notHex(let p): "trust key \(p) is not hexadecimal text (expected e.g. the output of `openssl rand -hex 32`)"
            case .tooShort(let p, let n):
                "trust key \(p) has \(n) bytes; at least \(TrustKey.minimumBytes) (\(2 * TrustKey.minimumBytes) hex digits) are needed"
            case .tooOpen(let p, let mode):
                "trust key \(p) is accessible by its group or others (mode \(String(mode & 0o7777, radix: 8, uppercase: false).leftPadded(4))); "
                    + "it must be readable by its owner only: chmod 600 \(p) (and make a new key if others may have read it)"
            }
        }
    }

    public init(bytes: [UInt8]) {
        precondition(bytes.count >= Self.minimumBytes, "a trust key has at least \(Self.minimumBytes) bytes")
        self.bytes = bytes
    }

    /// Parses hex text (see the type's documentation); nil if it is not hex or too short.
    public init?(hex text: String) {
        let digits = text.filter { !$0.isWhitespace }
        guard digits.count % 2 == 0, digits.count >= 2 * Self.minimumBytes else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var index = digits.startIndex
        while index < digits.endIndex {
            let next = digits.index(index, offsetBy: 2)
            guard let byte = UInt8(digits[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        self.bytes = bytes
    }

    /// Whether a key file with these permission bits (`st_mode`) is acceptable: no bit for group or others.
    public static func isPrivate(mode: UInt32) -> Bool { mode & 0o077 == 0 }

    /// Reads and parses a key file; refuses a file its group or others may access (``isPrivate(mode:)``).
    public static func load(path: String) throws(LoadError) -> TrustKey {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .unreadable(path: path, reason: String(cString: strerror(errno)))
        }
        guard isPrivate(mode: UInt32(info.st_mode)) else { throw .tooOpen(path: path, mode: UInt32(info.st_mode)) }
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw .unreadable(path: path, reason: "\(error.localizedDescription)")
        }
        return try parse(text: text, path: path)
    }

    /// Parses a key file's text (no permission check): hex digits, whitespace ignored.
    public static func parse(text: String, path: String) throws(LoadError) -> TrustKey {
        let digits = text.filter { !$0.isWhitespace }
        guard !digits.isEmpty, digits.allSatisfy(\.isHexDigit), digits.count % 2 == 0 else { throw .notHex(path: path) }
        guard let key = TrustKey(hex: digits) else { throw .tooShort(path: path, bytes: digits.count / 2) }
        return key
    }

    /// A fresh random 32-byte key as hex text (what `lab up` writes).
    public static func generateHex() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in String(format: "%02x", UInt8.random(in: .min ... .max, using: &generator)) }.joined()
    }

    public var hex: String { bytes.map { String(format: "%02x", $0) }.joined() }

    /// What `dysco-migrate key show` prints instead of the key: `sha256:` and the first 16 bytes of SHA-256 over
    /// the key's bytes, in hex (one-way; equal fingerprints mean equal keys, for comparing hosts).
    public var fingerprint: String {
        "sha256:" + SHA256.hash(data: bytes).prefix(16).map { String(format: "%02x", $0) }.joined()
    }
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// The keys an agent accepts: the current one (used to sign) and, during a rotation, the previous one
/// (accepted, never used to sign). Rotation: start every agent with `--trust-key NEW --trust-key-previous OLD`,
/// then, once all run the new key, drop the previous one.
public struct TrustGroup: Sendable {
    public static let macLength = 16

    // Each key's HMAC with the key already absorbed (its inner and outer pads hashed once): a MAC copies it and
    // hashes only the message. A SYN costs each agent a verify and a sign; issue 21 measured key setup as half of it.
    private let current: KeyedMAC
    private let previous: KeyedMAC?

    public init(current: TrustKey, previous: TrustKey? = nil) {
        self.current = KeyedMAC(current.bytes)
        self.previous = previous.map { KeyedMAC($0.bytes) }
    }

    /// An HMAC-SHA256 keyed once and never mutated (copies are values: each MAC works on its own copy), so sharing
    /// it between threads is safe although swift-crypto does not declare it Sendable.
    private final class KeyedMAC: @unchecked Sendable {
        let keyed: HMAC<SHA256>
        init(_ key: [UInt8]) { keyed = HMAC<SHA256>(key: SymmetricKey(data: key)) }
    }

    /// HMAC-SHA256 under the current key over the concatenation of `parts`, truncated to ``macLength``.
    public func mac(_ parts: UnsafeRawBufferPointer...) -> [UInt8] {
        Self.mac(key: current, parts)
    }

    /// Whether `tag` (``macLength`` bytes) is the MAC of `parts` under the current or the previous key.
    /// Constant time per key.
    public func verify(_ tag: UnsafeRawBufferPointer, _ parts: UnsafeRawBufferPointer...) -> Bool {
        guard tag.count == Self.macLength else { return false }
        if Self.equal(Self.mac(key: current, parts), tag) { return true }
        if let previous, Self.equal(Self.mac(key: previous, parts), tag) { return true }
        return false
    }

    private static func mac(key: KeyedMAC, _ parts: [UnsafeRawBufferPointer]) -> [UInt8] {
        var hmac = key.keyed
        for part in parts { hmac.update(data: part) }
        return Array(hmac.finalize().prefix(macLength))
    }

    private static func equal(_ a: [UInt8], _ b: UnsafeRawBufferPointer) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }
}

/// Addresses a session, a trailer or a control message may never name as a hop (paper §2.3; DESIGN §9):
/// IPv4 unspecified (0.0.0.0/8), loopback (127/8), link-local (169.254/16), multicast (224/4), reserved and the
/// limited broadcast (240/4, 255.255.255.255); IPv6 unspecified and loopback (::, ::1), link-local (fe80::/10),
/// multicast (ff00::/8) and every other address of the reserved ::/8 (IPv4-compatible and the rest).
extension IPAddress {
    public var isForbiddenHop: Bool {
        guard isIPv4 else {
            let first16 = high >> 48
            return high >> 56 == 0 || first16 & 0xffc0 == 0xfe80 || first16 >> 8 == 0xff
        }
        let first = value >> 24
        if first == 0 || first == 127 || first >= 224 { return true }
        if value >> 16 == 0xA9FE { return true }
        return false
    }
}

/// The chain-wide identity of a session (paper §2.3: "an initial exchange of nonces, with nonces included in
/// all control packets"): fixed by the left end when it sends the first SYN, carried in trailer v2 to every
/// agent of the chain, and in every control message about the session.
public struct SessionIdentity: Hashable, Sendable, Codable, CustomStringConvertible {
    /// Names the session in control messages (random, 64 bits).
    public var chainID: UInt64
    /// A second random 64-bit value that a control message must repeat to be accepted.
    public var nonce: UInt64

    public init(chainID: UInt64, nonce: UInt64) {
        self.chainID = chainID
        self.nonce = nonce
    }

    public static func random() -> SessionIdentity {
        var generator = SystemRandomNumberGenerator()
        return SessionIdentity(chainID: generator.next() | 1, nonce: generator.next())
    }

    public var description: String { String(chainID, radix: 16) }
}
