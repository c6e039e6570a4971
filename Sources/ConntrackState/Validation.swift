/// One problem found in a document entry before anything is written to the kernel.
public struct ValidationIssue: Hashable, Sendable, CustomStringConvertible {
    /// Index of the entry in the document's `entries`.
    public var index: Int
    /// The entry as `ConntrackEntry.description` prints it.
    public var entry: String
    public var reason: String

    public var description: String { "entry #\(index) (\(entry)): \(reason)" }
}

/// The document was refused as a whole: nothing was imported.
public struct StateValidationError: Error, Hashable, Sendable, CustomStringConvertible {
    public var issues: [ValidationIssue]
    public var description: String {
        "state document refused, nothing imported (\(issues.count) problem\(issues.count == 1 ? "" : "s")):\n"
            + issues.map { "  \($0)" }.joined(separator: "\n")
    }
}

extension ConntrackEntry {
    /// Everything that makes this entry impossible to import; empty when it is fine.
    public func validationProblems() -> [String] {
        var problems: [String] = []
        let addresses: [(String, IPAddress)] = [
            ("orig.src", orig.src), ("orig.dst", orig.dst), ("reply.src", reply.src), ("reply.dst", reply.dst),
        ] + [("nat.snat.ip", nat?.snat?.ip), ("nat.dnat.ip", nat?.dnat?.ip)].compactMap { name, ip in ip.map { (name, $0) } }
        for (name, address) in addresses where address.family != family {
            problems.append("\(name) \(address) is not an \(family) address")
        }

        if proto.hasPorts {
            for (name, tuple) in [("orig", orig), ("reply", reply)] {
                if tuple.sport == nil { problems.append("\(name).sport missing for \(proto)") }
                if tuple.dport == nil { problems.append("\(name).dport missing for \(proto)") }
                if tuple.sport == 0 { problems.append("\(name).sport is 0") }
                if tuple.dport == 0 { problems.append("\(name).dport is 0") }
                if tuple.type != nil || tuple.code != nil || tuple.id != nil {
                    problems.append("\(name) has ICMP fields (type/code/id) but the protocol is \(proto)")
                }
            }
        }
        if proto.isICMP {
            if (proto == .icmp) != (family == .ipv4) {
                problems.append("protocol \(proto) does not go with \(family)")
            }
            if orig.type == nil || orig.code == nil || orig.id == nil {
                problems.append("orig.type, orig.code and orig.id are required for \(proto)")
            }
            if orig.sport != nil || orig.dport != nil || reply.sport != nil || reply.dport != nil {
                problems.append("\(proto) tuples have no ports")
            }
        }

        if proto == .tcp {
            if tcp == nil { problems.append("tcp section missing for a tcp entry") }
            for (name, address) in [("orig.src", orig.src), ("orig.dst", orig.dst)] where address.isUnusableTCPEndpoint {
                problems.append("\(name) \(address) cannot be a TCP endpoint")
            }
        } else if tcp != nil {
            problems.append("tcp section present but the protocol is \(proto)")
        }
        if let tcp {
            for (name, direction) in [("orig", tcp.orig), ("reply", tcp.reply)] {
                if let wscale = direction.wscale, wscale > 14 {
                    problems.append("tcp.\(name).wscale \(wscale) is larger than 14")
                }
            }
        }

        // Without NAT the reply tuple is the inverted original; with NAT, the NAT bindings say how it differs.
        let expectedSrc = nat?.dnat?.ip ?? orig.dst
        let expectedDst = nat?.snat?.ip ?? orig.src
        if reply.src != expectedSrc || reply.dst != expectedDst {
            problems.append("reply tuple src=\(reply.src) dst=\(reply.dst) does not match the original tuple"
                + (nat == nil ? " inverted" : " with its NAT") + " (expected src=\(expectedSrc) dst=\(expectedDst))")
        }
        if proto.hasPorts {
            let expectedSport = nat?.dnat?.port ?? orig.dport
            let expectedDport = nat?.snat?.port ?? orig.sport
            if reply.sport != expectedSport || reply.dport != expectedDport {
                problems.append("reply ports sport=\(reply.sport.map(String.init) ?? "-") dport=\(reply.dport.map(String.init) ?? "-") "
                    + "do not match the original tuple (expected sport=\(expectedSport.map(String.init) ?? "-") "
                    + "dport=\(expectedDport.map(String.init) ?? "-"))")
            }
        } else if nat?.snat?.port != nil || nat?.dnat?.port != nil {
            problems.append("NAT ports given for \(proto), which has no ports")
        }

        if timeout == 0 { problems.append("timeout is 0 (the entry would expire at once)") }
        if let labels {
            for label in labels where label < 0 || label >= 128 {
                problems.append("label \(label) out of range 0...127")
            }
        }
        return problems
    }
}

extension StateDocument {
    /// Checks every entry (and duplicates across entries). Import calls this before its first write.
    public func validate() throws(StateValidationError) {
        var issues: [ValidationIssue] = []
        var seen: [FlowKey: Int] = [:]
        for (index, entry) in entries.enumerated() {
            for reason in entry.validationProblems() {
                issues.append(ValidationIssue(index: index, entry: entry.description, reason: reason))
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
