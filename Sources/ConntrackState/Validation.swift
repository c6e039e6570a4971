import DyscoCore

/// One problem found in a document before anything is written to the kernel.
public struct ValidationIssue: Hashable, Sendable, CustomStringConvertible {
    /// Index of the entry in the document's `entries` (nil: the document as a whole).
    public var index: Int?
    /// The entry as `ConntrackEntry.description` prints it (empty when it did not decode).
    public var entry: String
    /// Where: a JSON path, e.g. `$.entries[17].orig.sport`.
    public var path: String
    /// The rule broken, e.g. `70000 is out of range (0–65535)`.
    public var reason: String

    public init(index: Int?, entry: String, path: String? = nil, reason: String) {
        self.index = index
        self.entry = entry
        self.path = path ?? index.map { "$.entries[\($0)]" } ?? "$"
        self.reason = reason
    }

    public var description: String {
        "\(path): \(reason)" + (index.map { " — entry #\($0)" + (entry.isEmpty ? "" : " (\(entry))") } ?? "")
    }
}

/// The document was refused as a whole: nothing was imported.
public struct StateValidationError: Error, Hashable, Sendable, CustomStringConvertible {
    public var issues: [ValidationIssue]
    /// Problems found beyond the cap (``StateDocumentLimits/maxIssues``), counted but not listed.
    public var moreIssues: Int

    public init(issues: [ValidationIssue], moreIssues: Int = 0) {
        self.issues = issues
        self.moreIssues = moreIssues
    }

    public var count: Int { issues.count + moreIssues }

    public var description: String {
        "state document refused, nothing imported (\(count) problem\(count == 1 ? "" : "s")):\n"
            + issues.map { "  \($0)" }.joined(separator: "\n")
            + (moreIssues > 0 ? "\n  … and \(moreIssues) more" : "")
    }
}

extension ConntrackEntry {
    /// Everything that makes this entry impossible to import; empty when it is fine.
    public func validationProblems() -> [String] { validationFindings().map(\.message) }

    /// The problems with the field each is about (a path relative to the entry, "" for the entry as a whole).
    public func validationFindings() -> [(field: String, message: String)] {
        var problems = FindingList()
        let addresses: [(String, IPAddress)] = [
            ("orig.src", orig.src), ("orig.dst", orig.dst), ("reply.src", reply.src), ("reply.dst", reply.dst),
        ] + [("nat.snat.ip", nat?.snat?.ip), ("nat.dnat.ip", nat?.dnat?.ip)].compactMap { name, ip in ip.map { (name, $0) } }
        for (name, address) in addresses where address.family != family {
            problems.append("\(name) \(address) is not an \(family) address", field: name)
        }

        if proto.hasPorts {
            for (name, tuple) in [("orig", orig), ("reply", reply)] {
                if tuple.sport == nil { problems.append("\(name).sport missing for \(proto)", field: "\(name).sport") }
                if tuple.dport == nil { problems.append("\(name).dport missing for \(proto)", field: "\(name).dport") }
                if tuple.sport == 0 { problems.append("\(name).sport is 0", field: "\(name).sport") }
                if tuple.dport == 0 { problems.append("\(name).dport is 0", field: "\(name).dport") }
                if tuple.type != nil || tuple.code != nil || tuple.id != nil {
                    problems.append("\(name) has ICMP fields (type/code/id) but the protocol is \(proto)", field: name)
                }
            }
        }
        if proto.isICMP {
            if (proto == .icmp) != (family == .ipv4) {
                problems.append("protocol \(proto) does not go with \(family)", field: "proto")
            }
            if orig.type == nil || orig.code == nil || orig.id == nil {
                problems.append("orig.type, orig.code and orig.id are required for \(proto)", field: "orig")
            }
            if orig.sport != nil || orig.dport != nil || reply.sport != nil || reply.dport != nil {
                problems.append("\(proto) tuples have no ports")
            }
        }

        if proto == .tcp {
            if tcp == nil { problems.append("tcp section missing for a tcp entry", field: "tcp") }
            for (name, address) in [("orig.src", orig.src), ("orig.dst", orig.dst)] where address.isUnusableTCPEndpoint {
                problems.append("\(name) \(address) cannot be a TCP endpoint", field: name)
            }
        } else if tcp != nil {
            problems.append("tcp section present but the protocol is \(proto)", field: "tcp")
        }
        if let tcp {
            for (name, direction) in [("orig", tcp.orig), ("reply", tcp.reply)] {
                if let wscale = direction.wscale, wscale > 14 {
                    problems.append("tcp.\(name).wscale \(wscale) is larger than 14", field: "tcp.\(name).wscale")
                }
            }
        }

        // Without NAT the reply tuple is the inverted original; with NAT, the NAT bindings say how it differs.
        let expectedSrc = nat?.dnat?.ip ?? orig.dst
        let expectedDst = nat?.snat?.ip ?? orig.src
        if reply.src != expectedSrc || reply.dst != expectedDst {
            problems.append("reply tuple src=\(reply.src) dst=\(reply.dst) does not match the original tuple"
                + (nat == nil ? " inverted" : " with its NAT") + " (expected src=\(expectedSrc) dst=\(expectedDst))", field: "reply")
        }
        if proto.hasPorts {
            let expectedSport = nat?.dnat?.port ?? orig.dport
            let expectedDport = nat?.snat?.port ?? orig.sport
            if reply.sport != expectedSport || reply.dport != expectedDport {
                problems.append("reply ports sport=\(reply.sport.map(String.init) ?? "-") dport=\(reply.dport.map(String.init) ?? "-") "
                    + "do not match the original tuple (expected sport=\(expectedSport.map(String.init) ?? "-") "
                    + "dport=\(expectedDport.map(String.init) ?? "-"))", field: "reply")
            }
        } else if nat?.snat?.port != nil || nat?.dnat?.port != nil {
            problems.append("NAT ports given for \(proto), which has no ports", field: "nat")
        }

        if timeout == 0 { problems.append("timeout is 0 (the entry would expire at once)", field: "timeout") }
        if let labels {
            for (position, label) in labels.enumerated() where label < 0 || label >= 128 {
                problems.append("label \(label) out of range 0...127", field: "labels[\(position)]")
            }
        }
        return problems.items
    }
}

/// Collects findings; `append` takes the field first (the default field is the entry itself).
struct FindingList {
    var items: [(field: String, message: String)] = []
    mutating func append(_ message: String, field: String = "") { items.append((field, message)) }
}

extension StateDocument {
    /// Checks every entry (and duplicates across entries). Import calls this before its first write.
    public func validate() throws(StateValidationError) {
        var issues: [ValidationIssue] = []
        var seen: [FlowKey: Int] = [:]
        for (index, entry) in entries.enumerated() {
            for finding in entry.validationFindings() {
                issues.append(ValidationIssue(index: index, entry: entry.description,
                                              path: "$.entries[\(index)]" + (finding.field.isEmpty ? "" : ".\(finding.field)"),
                                              reason: finding.message))
            }
            if let first = seen[entry.key] {
                issues.append(ValidationIssue(index: index, entry: entry.description,
                                              reason: "duplicate of entry #\(first)"))
            } else {
                seen[entry.key] = index
            }
        }
        if !issues.isEmpty { throw StateValidationError(issues: issues) }
    }
}
