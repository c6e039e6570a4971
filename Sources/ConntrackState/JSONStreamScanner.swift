import DyscoCore
import Foundation

// A small strict JSON scanner for state documents (docs/STATE-FORMAT.md, "Hostile documents"). It walks the bytes
// once, in chunks, keeping only the current path and, while asked to, the bytes of the value being read (one
// entry): memory is proportional to one entry, never to the document. It enforces RFC 8259 strictly (no BOM, no
// trailing garbage, no leading zeros, UTF-8 only, no lone surrogates, control characters escaped) plus limits on
// depth, string length, keys per object and duplicate keys.

/// One step of a JSON path: an object key or an array index.
public enum JSONPathComponent: Hashable, Sendable {
    case key(String)
    case index(Int)
}

/// A JSON path as printed in refusals: `$.entries[17].orig.sport`.
public struct JSONPath: Hashable, Sendable, CustomStringConvertible {
    public var components: [JSONPathComponent]
    public init(_ components: [JSONPathComponent] = []) { self.components = components }

    public var description: String {
        var text = "$"
        for component in components {
            switch component {
            case let .index(index): text += "[\(index)]"
            case let .key(key):
                let plain = !key.isEmpty && key.utf8.allSatisfy { $0 == 0x5f || (0x30...0x39).contains($0)
                    || (0x41...0x5a).contains($0) || (0x61...0x7a).contains($0) }
                if plain { text += ".\(key)" } else {
                    text += "[\"" + key.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\"]"
                }
            }
        }
        return text
    }

    func appending(_ component: JSONPathComponent) -> JSONPath { JSONPath(components + [component]) }
    func appending(_ other: [JSONPathComponent]) -> JSONPath { JSONPath(components + other) }
}

/// Limits a document must keep (``StateDocumentReader``). Every one is a refusal naming the path and the limit.
public struct StateDocumentLimits: Hashable, Sendable {
    /// Largest document in bytes; checked before parsing when the size is known (a file), else while reading.
    public var maxBytes: Int
    /// Largest entry (its JSON text) in bytes: what the reader holds at once.
    public var maxEntryBytes: Int = 65_536
    /// Longest string (raw bytes between the quotes).
    public var maxStringBytes: Int = 1024
    /// Deepest nesting of objects and arrays (the document object is level 1; a valid entry needs 5).
    public var maxDepth: Int = 16
    /// Most keys in one object (the largest object of the format has 14).
    public var maxKeysPerObject: Int = 64
    /// Problems listed in a refusal; the others are counted.
    public var maxIssues: Int = 100
    /// The option that sets `maxBytes`, named in refusals (`--max-bytes`, the agent's `--state-max-bytes`).
    public var maxBytesOption = "--max-bytes"

    /// 128 MiB: about 400,000 compact or 160,000 pretty-printed entries.
    public static let defaultMaxBytes = 128 * 1024 * 1024

    public init(maxBytes: Int = Self.defaultMaxBytes) { self.maxBytes = maxBytes }
}

/// A fatal problem of the byte stream (syntax, encoding, a limit): reading stops here.
struct JSONScanError: Error {
    var path: JSONPath
    var offset: Int
    var message: String
    /// A limit of the stream: reported at the document ("$") or at the entry, not at the innermost value.
    enum Scope { case value, document, entry }
    var scope: Scope = .value
}

/// Where the bytes come from: a closure returning the next chunk (empty at the end).
struct JSONByteStream {
    private var chunk: [UInt8] = []
    private var index = 0
    /// Bytes consumed so far (the offset of the next byte).
    private(set) var offset = 0
    private var ended = false
    private let pull: () throws -> [UInt8]
    let maxBytes: Int
    let maxCaptureBytes: Int
    let maxBytesOption: String
    /// While true, every consumed byte is appended to `captured`.
    var capturing = false
    var captured: [UInt8] = []

    init(maxBytes: Int, maxCaptureBytes: Int, maxBytesOption: String, pull: @escaping () throws -> [UInt8]) {
        self.maxBytesOption = maxBytesOption
        self.maxBytes = maxBytes
        self.maxCaptureBytes = maxCaptureBytes
        self.pull = pull
    }

    /// The next byte without consuming it; nil at the end.
    @inline(__always)
    mutating func peek() throws -> UInt8? {
        if index < chunk.count { return chunk[index] }
        return try refill()
    }

    private mutating func refill() throws -> UInt8? {
        guard !ended else { return nil }
        chunk = try pull()
        index = 0
        if chunk.isEmpty {
            ended = true
            return nil
        }
        return chunk[0]
    }

    /// Consumes the byte `peek` returned.
    @inline(__always)
    mutating func advance() throws {
        if capturing {
            captured.append(chunk[index])
            if captured.count > maxCaptureBytes {
                throw JSONScanError(path: JSONPath(), offset: offset,
                                    message: "entry larger than the limit of \(maxCaptureBytes) bytes", scope: .entry)
            }
        }
        index += 1
        offset += 1
        if offset > maxBytes {
            throw JSONScanError(path: JSONPath(), offset: offset, message:
                "document larger than the limit of \(maxBytes) bytes (\(maxBytesOption)): refused at byte \(offset), nothing imported",
                scope: .document)
        }
    }

    /// Consumes and returns the next byte; nil at the end.
    @inline(__always)
    mutating func next() throws -> UInt8? {
        guard let byte = try peek() else { return nil }
        try advance()
        return byte
    }
}

/// What a scalar turned out to be (for type errors at the top level).
enum JSONKind: String {
    case object = "an object", array = "an array", string = "a string", number = "a number"
    case bool = "a boolean", null = "null"
}

/// The integer range a known field of the format allows; numbers outside are refused with the path.
struct IntegerRange {
    var lower: Int64
    var upper: UInt64
    static let u8 = IntegerRange(lower: 0, upper: UInt64(UInt8.max))
    static let u16 = IntegerRange(lower: 0, upper: UInt64(UInt16.max))
    static let u32 = IntegerRange(lower: 0, upper: UInt64(UInt32.max))
    static let u64 = IntegerRange(lower: 0, upper: UInt64.max)
    static let int = IntegerRange(lower: Int64.min, upper: UInt64(Int64.max))

    var text: String { "\(lower)–\(upper)" }
}

/// The strict scanner over a ``JSONByteStream``.
struct JSONStreamScanner {
    var stream: JSONByteStream
    let limits: StateDocumentLimits
    /// The path of the value being read.
    var path: [JSONPathComponent] = []
    /// Problems that do not stop the scan (numbers out of range in known fields), with their paths.
    var valueProblems: [(path: [JSONPathComponent], message: String)] = []
    /// Decides the allowed range of an integer at a path (nil: any JSON number).
    let integerRule: ([JSONPathComponent]) -> IntegerRange?

    init(stream: JSONByteStream, limits: StateDocumentLimits, integerRule: @escaping ([JSONPathComponent]) -> IntegerRange?) {
        self.stream = stream
        self.limits = limits
        self.integerRule = integerRule
    }

    func fail(_ message: String, at offset: Int? = nil) -> JSONScanError {
        JSONScanError(path: JSONPath(path), offset: offset ?? stream.offset, message: message)
    }

    /// A grammar or encoding error (as opposed to a limit): "malformed JSON: …".
    func malformed(_ message: String, at offset: Int? = nil) -> JSONScanError {
        fail("malformed JSON: " + message, at: offset)
    }

    /// "unexpected end of document at byte N (truncated?)" or "unexpected 'x' at byte N".
    mutating func unexpected(_ byte: UInt8?, expecting: String) -> JSONScanError {
        guard let byte else {
            return malformed("unexpected end of document at byte \(stream.offset), expected \(expecting) (truncated?)")
        }
        let shown = (0x21...0x7e).contains(byte) ? "'\(Character(Unicode.Scalar(byte)))'" : String(format: "byte 0x%02x", byte)
        return malformed("unexpected \(shown) at byte \(stream.offset), expected \(expecting)")
    }

    mutating func skipWhitespace() throws {
        while let byte = try stream.peek(), byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09 {
            try stream.advance()
        }
    }

    /// Skips whitespace and returns the next byte (not consumed).
    mutating func peekToken() throws -> UInt8? {
        try skipWhitespace()
        return try stream.peek()
    }

    mutating func expect(_ wanted: UInt8, _ what: String) throws {
        let byte = try peekToken()
        guard byte == wanted else { throw unexpected(byte, expecting: what) }
        try stream.advance()
    }

    /// The start of the document: refuses a byte order mark with its own message.
    mutating func begin() throws {
        if try stream.peek() == 0xef {
            throw malformed("the document starts with a UTF-8 byte order mark (not allowed in JSON, RFC 8259 §8.1)", at: 0)
        }
    }

    /// After the top-level value: only whitespace may follow.
    mutating func end() throws {
        let byte = try peekToken()
        if byte != nil { throw malformed("trailing data after the document at byte \(stream.offset)") }
    }

    var depth = 0

    mutating func enter() throws {
        depth += 1
        if depth > limits.maxDepth { throw fail("nested deeper than \(limits.maxDepth) levels") }
    }

    /// Reads any value, checking it fully; `kind` says what it was.
    @discardableResult
    mutating func skipValue() throws -> JSONKind {
        let byte = try peekToken()
        switch byte {
        case UInt8(ascii: "{"):
            try object { scanner, _ in try scanner.skipValue() }
            return .object
        case UInt8(ascii: "["):
            try array { scanner, _ in try scanner.skipValue() }
            return .array
        case UInt8(ascii: "\""):
            _ = try string(keep: false)
            return .string
        case UInt8(ascii: "t"): try literal("true"); return .bool
        case UInt8(ascii: "f"): try literal("false"); return .bool
        case UInt8(ascii: "n"): try literal("null"); return .null
        case let byte? where byte == UInt8(ascii: "-") || (0x30...0x39).contains(byte):
            try number()
            return .number
        default:
            throw unexpected(byte, expecting: "a value")
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let start = stream.offset
        for expected in UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount) {
            let byte = try stream.peek()
            guard byte == expected else {
                if byte == nil { throw unexpected(nil, expecting: "\"\(word)\"") }
                throw malformed("invalid literal at byte \(start), expected \(word)")
            }
            try stream.advance()
        }
    }

    /// An object: calls `member` with the scanner positioned at each value (path extended by its key).
    mutating func object(_ member: (inout JSONStreamScanner, String) throws -> Void) throws {
        try expect(UInt8(ascii: "{"), "'{'")
        try enter()
        var keys: [String] = []
        if try peekToken() == UInt8(ascii: "}") {
            try stream.advance()
            depth -= 1
            return
        }
        while true {
            let byte = try peekToken()
            guard byte == UInt8(ascii: "\"") else { throw unexpected(byte, expecting: "a key (string)") }
            let keyOffset = stream.offset
            let key = try string(keep: true)!
            if keys.contains(key) {
                path.append(.key(key))
                throw fail("duplicate key \"\(key)\" at byte \(keyOffset)")
            }
            keys.append(key)
            if keys.count > limits.maxKeysPerObject { throw fail("more than \(limits.maxKeysPerObject) keys in one object") }
            try expect(UInt8(ascii: ":"), "':'")
            path.append(.key(key))
            try member(&self, key)
            path.removeLast()
            let after = try peekToken()
            if after == UInt8(ascii: ",") { try stream.advance(); continue }
            if after == UInt8(ascii: "}") { try stream.advance(); break }
            throw unexpected(after, expecting: "',' or '}'")
        }
        depth -= 1
    }

    /// An array: calls `element` with the scanner positioned at each element (path extended by its index).
    mutating func array(_ element: (inout JSONStreamScanner, Int) throws -> Void) throws {
        try expect(UInt8(ascii: "["), "'['")
        try enter()
        if try peekToken() == UInt8(ascii: "]") {
            try stream.advance()
            depth -= 1
            return
        }
        var index = 0
        while true {
            path.append(.index(index))
            try element(&self, index)
            path.removeLast()
            index += 1
            let after = try peekToken()
            if after == UInt8(ascii: ",") { try stream.advance(); continue }
            if after == UInt8(ascii: "]") { try stream.advance(); break }
            throw unexpected(after, expecting: "',' or ']'")
        }
        depth -= 1
    }

    /// A string, checked (escapes, UTF-8, no raw control characters, length limit); its value when `keep`.
    mutating func string(keep: Bool) throws -> String? {
        try expect(UInt8(ascii: "\""), "a string")
        let start = stream.offset
        var bytes: [UInt8] = []
        var pendingHighSurrogate = false
        var high: UInt32 = 0
        func tooLong(_ scanner: JSONStreamScanner) -> JSONScanError {
            scanner.fail("string longer than \(scanner.limits.maxStringBytes) bytes (starts at byte \(start))")
        }
        while true {
            guard let byte = try stream.next() else { throw unexpected(nil, expecting: "the end of the string") }
            if byte != UInt8(ascii: "\""), stream.offset - start > limits.maxStringBytes { throw tooLong(self) }
            switch byte {
            case UInt8(ascii: "\""):
                if pendingHighSurrogate { throw malformed("lone UTF-16 surrogate escape in string at byte \(start)") }
                return keep ? String(decoding: bytes, as: UTF8.self) : nil
            case UInt8(ascii: "\\"):
                guard let escape = try stream.next() else { throw unexpected(nil, expecting: "an escape") }
                if escape == UInt8(ascii: "u") {
                    var value: UInt16 = 0
                    for _ in 0..<4 {
                        guard let hex = try stream.next(), let digit = Self.hexValue(hex) else {
                            throw malformed("bad \\u escape at byte \(stream.offset - 1)")
                        }
                        value = value << 4 | UInt16(digit)
                    }
                    let isHigh = (0xd800...0xdbff).contains(value), isLow = (0xdc00...0xdfff).contains(value)
                    if pendingHighSurrogate != isLow { throw malformed("lone UTF-16 surrogate escape in string at byte \(start)") }
                    pendingHighSurrogate = isHigh
                    if isHigh { high = UInt32(value) - 0xd800; continue }
                    let code = isLow ? 0x10000 + high << 10 + (UInt32(value) - 0xdc00) : UInt32(value)
                    if keep, let scalar = Unicode.Scalar(code) { bytes.append(contentsOf: Array(String(scalar).utf8)) }
                    continue
                }
                if pendingHighSurrogate { throw malformed("lone UTF-16 surrogate escape in string at byte \(start)") }
                let mapped: UInt8
                switch escape {
                case UInt8(ascii: "\""): mapped = 0x22
                case UInt8(ascii: "\\"): mapped = 0x5c
                case UInt8(ascii: "/"): mapped = 0x2f
                case UInt8(ascii: "b"): mapped = 0x08
                case UInt8(ascii: "f"): mapped = 0x0c
                case UInt8(ascii: "n"): mapped = 0x0a
                case UInt8(ascii: "r"): mapped = 0x0d
                case UInt8(ascii: "t"): mapped = 0x09
                default: throw malformed("bad escape at byte \(stream.offset - 1)")
                }
                if keep { bytes.append(mapped) }
            case 0x00..<0x20:
                throw malformed(String(format: "unescaped control character 0x%02x in string at byte %d", byte, stream.offset - 1))
            case 0x80...:
                if pendingHighSurrogate { throw malformed("lone UTF-16 surrogate escape in string at byte \(start)") }
                try utf8Sequence(first: byte, keep: keep, into: &bytes)
            default:
                if pendingHighSurrogate { throw malformed("lone UTF-16 surrogate escape in string at byte \(start)") }
                if keep { bytes.append(byte) }
            }
        }
    }

    /// Checks one multi-byte UTF-8 sequence (no overlong forms, no surrogates, at most U+10FFFF).
    mutating func utf8Sequence(first: UInt8, keep: Bool, into bytes: inout [UInt8]) throws {
        let at = stream.offset - 1
        let count: Int
        var low: UInt8 = 0x80, high: UInt8 = 0xbf  // allowed range of the second byte
        switch first {
        case 0xc2...0xdf: count = 1
        case 0xe0: count = 2; low = 0xa0
        case 0xe1...0xec, 0xee...0xef: count = 2
        case 0xed: count = 2; high = 0x9f
        case 0xf0: count = 3; low = 0x90
        case 0xf1...0xf3: count = 3
        case 0xf4: count = 3; high = 0x8f
        default: throw malformed("invalid UTF-8 at byte \(at)")
        }
        if keep { bytes.append(first) }
        for position in 0..<count {
            guard let byte = try stream.next() else { throw unexpected(nil, expecting: "the rest of a UTF-8 sequence") }
            let range = position == 0 ? low...high : 0x80...0xbf
            guard range.contains(byte) else { throw malformed("invalid UTF-8 at byte \(at)") }
            if keep { bytes.append(byte) }
        }
    }

    static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case 0x30...0x39: byte - 0x30
        case 0x41...0x46: byte - 0x41 + 10
        case 0x61...0x66: byte - 0x61 + 10
        default: nil
        }
    }

    /// A number (RFC 8259 grammar). When the path is a known integer field, its range is checked too: a
    /// problem there is recorded in `valueProblems` (the scan goes on). Returns the value if it is an integer.
    @discardableResult
    mutating func number() throws -> Int64? {
        let start = stream.offset
        var text: [UInt8] = []
        func take(_ scanner: inout JSONStreamScanner) throws -> UInt8? {
            let byte = try scanner.stream.peek()
            if let byte {
                try scanner.stream.advance()
                text.append(byte)
                if text.count > 64 { throw scanner.fail("number longer than 64 characters at byte \(start)") }
            }
            return byte
        }
        func digits(_ scanner: inout JSONStreamScanner) throws -> Int {
            var count = 0
            while let byte = try scanner.stream.peek(), (0x30...0x39).contains(byte) {
                _ = try take(&scanner)
                count += 1
            }
            return count
        }
        var integral = true
        if try stream.peek() == UInt8(ascii: "-") { _ = try take(&self) }
        let first = try stream.peek()
        guard let first, (0x30...0x39).contains(first) else { throw unexpected(first, expecting: "a digit") }
        if first == 0x30 {
            _ = try take(&self)
            if let next = try stream.peek(), (0x30...0x39).contains(next) {
                throw malformed("number with a leading zero at byte \(start)")
            }
        } else {
            _ = try digits(&self)
        }
        if try stream.peek() == UInt8(ascii: ".") {
            integral = false
            _ = try take(&self)
            guard try digits(&self) > 0 else { throw unexpected(try stream.peek(), expecting: "a digit after '.'") }
        }
        if let e = try stream.peek(), e == UInt8(ascii: "e") || e == UInt8(ascii: "E") {
            integral = false
            _ = try take(&self)
            if let sign = try stream.peek(), sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-") { _ = try take(&self) }
            guard try digits(&self) > 0 else { throw unexpected(try stream.peek(), expecting: "a digit in the exponent") }
        }
        let literal = String(decoding: text, as: UTF8.self)
        let range = integerRule(path)
        guard integral else {
            if range != nil { valueProblems.append((path, "\(literal) is not an integer")) }
            return nil
        }
        let negative = text.first == UInt8(ascii: "-")
        let magnitude = UInt64(negative ? String(literal.dropFirst()) : literal)
        let value: Int64? = magnitude.flatMap { m in negative ? (m <= UInt64(Int64.max) + 1 ? Int64(truncatingIfNeeded: 0 &- m) : nil) : Int64(exactly: m) }
        if let range {
            let inRange: Bool
            if let magnitude {
                inRange = negative ? (range.lower < 0 && magnitude <= UInt64(-(range.lower + 1)) + 1) : magnitude <= range.upper
            } else {
                inRange = false
            }
            if !inRange { valueProblems.append((path, "\(literal) is out of range (\(range.text))")) }
        }
        return value
    }
}
