import DyscoCore
import Foundation

/// Parses the `--match` arguments of `dysco-migrate state export`:
///
/// - `src=A,dst=B,sport=N,dport=M[,proto=tcp][,zone=Z]` — one session, given in either direction;
///   ICMP sessions: `proto=icmp,src=A,dst=B,type=8,code=0,id=N` (repeat `--match` for a list);
/// - `mark=V[/MASK]` — every entry whose mark matches (decimal or 0x hex);
/// - `all` — the whole table (also the default when no `--match` is given).
///
/// Fields may be separated by commas or spaces.
public struct MatchSpecError: Error, Hashable, Sendable, CustomStringConvertible {
    public var spec: String
    public var reason: String
    public var description: String { "--match \"\(spec)\": \(reason)" }
}

extension ExportSelector {
    public static func parse(matches: [String]) throws(MatchSpecError) -> ExportSelector {
        if matches.isEmpty { return .all }
        var flows: [FlowKey] = []
        var selector: ExportSelector?
        for spec in matches {
            let trimmed = spec.trimmingCharacters(in: .whitespaces)
            if trimmed == "all" {
                guard matches.count == 1 else { throw MatchSpecError(spec: spec, reason: "\"all\" cannot be combined") }
                return .all
            }
            let fields = try fields(of: trimmed)
            if let markText = fields["mark"] {
                guard matches.count == 1, fields.count == 1 else {
                    throw MatchSpecError(spec: spec, reason: "mark=V[/MASK] cannot be combined with other matches")
                }
                let parts = markText.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
                guard parts.count <= 2, let mark = number(parts[0], as: UInt32.self),
                      let mask = parts.count == 2 ? number(parts[1], as: UInt32.self) : 0xffff_ffff
                else { throw MatchSpecError(spec: spec, reason: "mark must be V or V/MASK (decimal or 0x hex)") }
                selector = .mark(mark, mask: mask)
                continue
            }
            flows.append(try flow(fields, spec: spec))
        }
        return selector ?? .flows(flows)
    }

    private static func fields(of spec: String) throws(MatchSpecError) -> [String: String] {
        var fields: [String: String] = [:]
        let known: Set<String> = ["src", "dst", "sport", "dport", "proto", "zone", "mark", "type", "code", "id"]
        for item in spec.split(whereSeparator: { $0 == "," || $0 == " " }) {
            let pair = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, !pair[1].isEmpty else {
                throw MatchSpecError(spec: spec, reason: "\"\(item)\" is not key=value")
            }
            guard known.contains(pair[0]) else {
                throw MatchSpecError(spec: spec, reason: "unknown key \"\(pair[0])\" (known: \(known.sorted().joined(separator: ", ")))")
            }
            guard fields.updateValue(pair[1], forKey: pair[0]) == nil else {
                throw MatchSpecError(spec: spec, reason: "\"\(pair[0])\" given twice")
            }
        }
        return fields
    }

    private static func flow(_ fields: [String: String], spec: String) throws(MatchSpecError) -> FlowKey {
        guard let srcText = fields["src"], let src = IPAddress(srcText) else {
            throw MatchSpecError(spec: spec, reason: "src=ADDRESS is required (IPv4 or IPv6)")
        }
        guard let dstText = fields["dst"], let dst = IPAddress(dstText) else {
            throw MatchSpecError(spec: spec, reason: "dst=ADDRESS is required (IPv4 or IPv6)")
        }
        guard src.family == dst.family else { throw MatchSpecError(spec: spec, reason: "src and dst are of different families") }
        let proto: L4Protocol
        if let name = fields["proto"] {
            guard let parsed = L4Protocol(name: name) else { throw MatchSpecError(spec: spec, reason: "unknown proto \"\(name)\"") }
            proto = parsed
        } else {
            proto = .tcp
        }
        var tuple = ConntrackTuple(src: src, dst: dst)
        if proto.isICMP {
            guard let type = fields["type"].flatMap({ number($0, as: UInt8.self) }),
                  let code = fields["code"].flatMap({ number($0, as: UInt8.self) }),
                  let id = fields["id"].flatMap({ number($0, as: UInt16.self) })
            else { throw MatchSpecError(spec: spec, reason: "\(proto) needs type=, code= and id=") }
            tuple.type = type
            tuple.code = code
            tuple.id = id
        } else {
            guard let sport = fields["sport"].flatMap({ number($0, as: UInt16.self) }), sport != 0,
                  let dport = fields["dport"].flatMap({ number($0, as: UInt16.self) }), dport != 0
            else { throw MatchSpecError(spec: spec, reason: "sport= and dport= (1...65535) are required for \(proto)") }
            tuple.sport = sport
            tuple.dport = dport
        }
        var zone: UInt16 = 0
        if let text = fields["zone"] {
            guard let value = number(text, as: UInt16.self) else { throw MatchSpecError(spec: spec, reason: "zone must be 0...65535") }
            zone = value
        }
        return FlowKey(proto: proto, tuple: tuple, zone: zone)
    }

    private static func number<T: FixedWidthInteger>(_ text: String, as _: T.Type) -> T? {
        if text.hasPrefix("0x") || text.hasPrefix("0X") { return T(text.dropFirst(2), radix: 16) }
        return T(text)
    }
}
