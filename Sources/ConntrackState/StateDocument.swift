import DyscoCore
import Foundation

/// The exported state of one firewall: a versioned list of conntrack entries.
public struct StateDocument: Hashable, Sendable, Codable {
    public static let schemaName = "dysco-conntrack-state"
    public static let currentVersion = 1
    public static let supportedVersions: ClosedRange<Int> = 1...1

    public var schema: String
    public var version: Int
    /// The exporting host (hostname, plus the namespace when known: "host/netns").
    public var host: String
    public var exportedAt: Date
    public var entries: [ConntrackEntry]

    public init(host: String, exportedAt: Date = Date(), entries: [ConntrackEntry]) {
        self.schema = Self.schemaName
        self.version = Self.currentVersion
        self.host = host
        self.exportedAt = exportedAt
        self.entries = entries
    }

    enum CodingKeys: String, CodingKey {
        case schema, version, host, exportedAt = "exported_at", entries
    }

    /// Only the header, decoded first so that a newer schema is reported as such and not as a key error.
    private struct Header: Decodable {
        var schema: String?
        var version: Int?
    }

    /// Pretty, stable JSON (sorted keys, ISO 8601 time with fractional seconds).
    public func encoded(pretty: Bool = true) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            try container.encode(Self.formatDate(date))
        }
        return try encoder.encode(self)
    }

    /// Decodes and checks schema name and version; throws ``StateDocumentError``.
    public static func decode(_ data: Data) throws(StateDocumentError) -> StateDocument {
        let decoder = JSONDecoder()
        let header: Header
        do {
            header = try decoder.decode(Header.self, from: data)
        } catch {
            throw .malformed(Self.describe(error))
        }
        guard let schema = header.schema else { throw .malformed("missing \"schema\" (expected \"\(schemaName)\")") }
        guard schema == schemaName else { throw .wrongSchema(schema) }
        guard let version = header.version else { throw .malformed("missing \"version\"") }
        guard supportedVersions.contains(version) else {
            throw .unsupportedVersion(found: version, supported: supportedVersions)
        }
        decoder.dateDecodingStrategy = .custom { decoder in
            let container = try decoder.singleValueContainer()
            let text = try container.decode(String.self)
            guard let date = Self.parseDate(text) else {
                throw DecodingError.dataCorruptedError(in: container, debugDescription: "not an ISO 8601 time: \(text)")
            }
            return date
        }
        do {
            return try decoder.decode(StateDocument.self, from: data)
        } catch {
            throw .malformed(Self.describe(error))
        }
    }

    static func formatDate(_ date: Date) -> String {
        date.formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true))
    }

    static func parseDate(_ text: String) -> Date? {
        if let date = try? Date.ISO8601FormatStyle(includingFractionalSeconds: true).parse(text) { return date }
        return try? Date.ISO8601FormatStyle().parse(text)
    }

    /// A decoding error as a one-line message with its JSON path ("entries[3].orig.sport: ...").
    static func describe(_ error: any Error) -> String {
        func path(_ keys: [any CodingKey]) -> String {
            var text = ""
            for key in keys {
                if let index = key.intValue { text += "[\(index)]" } else { text += (text.isEmpty ? "" : ".") + key.stringValue }
            }
            return text.isEmpty ? "document" : text
        }
        switch error {
        case let DecodingError.dataCorrupted(context):
            let underlying = (context.underlyingError as NSError?)?.userInfo[NSDebugDescriptionErrorKey] as? String
            return "\(path(context.codingPath)): \(context.debugDescription)"
                + (underlying.map { " (\($0))" } ?? "")
        case let DecodingError.keyNotFound(key, context):
            return "\(path(context.codingPath + [key])): missing"
        case let DecodingError.typeMismatch(type, context):
            return "\(path(context.codingPath)): expected \(type) (\(context.debugDescription))"
        case let DecodingError.valueNotFound(type, context):
            return "\(path(context.codingPath)): null where \(type) is required"
        default:
            return String(describing: error)
        }
    }
}

/// A document that cannot be used at all (nothing was written to the kernel).
public enum StateDocumentError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String)
    case wrongSchema(String)
    case unsupportedVersion(found: Int, supported: ClosedRange<Int>)

    public var description: String {
        switch self {
        case let .malformed(reason): "malformed state document: \(reason)"
        case let .wrongSchema(name): "not a conntrack state document: schema \"\(name)\", expected \"\(StateDocument.schemaName)\""
        case let .unsupportedVersion(found, supported):
            "unsupported state document version \(found) (this build reads \(supported.lowerBound)...\(supported.upperBound))"
        }
    }
}
