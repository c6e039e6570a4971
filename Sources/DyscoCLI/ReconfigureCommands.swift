import ArgumentParser
import DyscoAgent
import DyscoCore
import DyscoLab
import Foundation

/// `insert` and `remove` (issue 17; paper §3: an old path of zero middleboxes is an insertion, a new path of zero
/// middleboxes a deletion), and what they share with `replace`: the request goes to one agent, the controller,
/// which triggers each session's left anchor and reports per session.
enum Reconfiguration {
    /// A comma-separated list of addresses or lab host names, each named once.
    /// The boxes `text` names (comma-separated addresses, or lab host names with --lab), in order. `bothFamilies` (the
    /// new boxes of replace and insert): a lab host of a dual-stack lab is named in both families, its IPv4 addresses
    /// first, then its IPv6 ones; each session takes the boxes of its own family (``ReplaceRequest/forFamily(ipv4:)``).
    static func addresses(_ text: String, placement: MiddleboxPlacementOptions, lab: Lab?,
                          bothFamilies: Bool = false) throws -> [IPAddress] {
        let names = text.split(separator: ",").map(String.init)
        let list = try names.map { try placement.address($0, lab: lab) }
        guard !list.isEmpty else { throw ValidationError("name at least one box") }
        guard Set(list).count == list.count else { throw ValidationError("'\(text)' names a box twice") }
        guard bothFamilies else { return list }
        return list + ipv6Addresses(text, lab: lab)
    }

    /// The IPv6 addresses of the lab hosts `text` names (comma-separated), in order: none unless every one has one (a
    /// dual-stack lab), or without --lab.
    static func ipv6Addresses(_ text: String, lab: Lab?) -> [IPAddress] {
        guard let lab else { return [] }
        let names = text.split(separator: ",").map(String.init)
        let ipv6 = names.compactMap { lab.findHost($0).flatMap(lab.state.ipv6Address(of:)) }
        return ipv6.count == names.count ? ipv6 : []
    }

    static func list(_ boxes: [IPAddress]) -> String {
        boxes.isEmpty ? "(none)" : boxes.map(\.description).joined(separator: ",")
    }

    /// Several old boxes (k → m): each session's right anchor is the last old box's right neighbour, read from that
    /// box's agent, for the sessions whose left neighbour there is the previous old box (the old boxes are consecutive).
    /// `oldBoxesIPv6`: the same boxes' IPv6 addresses (a dual-stack lab; empty otherwise), for the IPv6 sessions.
    static func rightAnchors(oldBoxes: [IPAddress], oldBoxesIPv6: [IPAddress] = [], names: [String],
                             placement: MiddleboxPlacementOptions, lab: Lab?) async throws -> [String: IPAddress]? {
        guard oldBoxes.count > 1, let lastName = names.last else { return nil }
        guard lab != nil, placement.socket == nil else {
            throw ValidationError("several old boxes need --lab (without --socket): the last box's agent names each session's right anchor")
        }
        let path = try placement.socketPath(old: lastName, lab: lab)
        let snapshot = try await ControlClient.snapshot(path: path)
        // (previous, last) old box in each family the boxes are named in.
        let pairs = [oldBoxes, oldBoxesIPv6].filter { $0.count > 1 }.map { ($0[$0.count - 2], $0[$0.count - 1]) }
        var anchors: [String: IPAddress] = [:]
        for s in snapshot.sessions where pairs.contains(where: { s.left?.srcAddr == $0.0 && s.left?.dstAddr == $0.1 }) {
            if let chain = s.chainID, let right = s.right?.dstAddr { anchors[chain] = right }
        }
        return anchors
    }

    /// Sends `request` to the agent of `host` (checked to be that host), prints the report, exits 1 unless every
    /// matched session moved.
    static func run(_ request: ReplaceRequest, at host: IPAddress, name: String, placement: MiddleboxPlacementOptions,
                    lab: Lab?, json: Bool, title: String) async throws {
        if let problem = request.problem { throw ValidationError(problem) }
        let path = try placement.socketPath(old: name, lab: lab)
        // The agent at that socket must be `host` (one page is enough to see which host answers).
        let snapshot = try await ControlClient.snapshot(path: path, limit: 200)
        // (A dual-stack host has an address of each family: sessions of the other family name its other one.)
        if let other = snapshot.sessions.compactMap({ $0.left?.dstAddr ?? $0.right?.srcAddr })
            .first(where: { $0.isIPv4 == host.isIPv4 && $0 != host }) {
            throw ValidationError("the agent at \(path) is \(other), not \(host)")
        }
        let data = try await ControlClient.request(ControlRequest(.replace, replace: request), path: path)
        guard let report = try? JSONDecoder().decode(ReplaceReport.self, from: data) else {
            throw ValidationError("the agent answered: \(String(decoding: data, as: UTF8.self))")
        }
        if json {
            FileHandle.standardOutput.write(data)
        } else {
            print(ReplaceCommand.render(report, title: title))
        }
        if !report.allMoved { throw ExitCode(1) }
    }
}

struct InsertCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "insert",
        abstract: "Insert middleboxes into live sessions, after a host of their path (paper §3).",
        discussion: """
            Asks the agent of the --after host (a client or a middlebox of the sessions' path) to insert --box \
            between it and its right neighbour in every session matching --match. Per session the --after host, \
            as left anchor, locks the one subsession to its right neighbour (the right anchor), opens the new path \
            through --box, holds new data at both ends while the old subsession drains, then releases it on the \
            new path: no byte on two paths at once, so no reordering.

            A box that needs per-session state it cannot have (a strict conntrack firewall inserted mid-session \
            drops the session's packets as INVALID) gets it from a donor with --state-from: one of the two anchors \
            (the --after host or its right neighbour), whose conntrack entry is copied (the donor keeps its own). \
            With --stateless new data takes the new path at once (the two-path rules of §3.5).

            Run it on the --after host, or name its agent with --netns, --lab (host names allowed) or --socket.
            A strict firewall inserted without --state-from drops the release probes: each session is then \
            cancelled at the release step when --deadline passes and stays on its old path.

            Exit status: 0 when every matched session took the new box (also when none matched); 1 when any did \
            not (it stays as it was).
            Examples:
              dysco-migrate insert --lab demo --after fw1 --box fw2 --state-from fw1
              dysco-migrate insert --lab demo --after client1 --box fw2 --state-from fw1 --match dport=80 --json
            """
    )

    @Option(help: ArgumentHelp("The host after which the boxes go (a client or a middlebox of the path).", valueName: "addr|host"))
    var after: String

    @Option(help: ArgumentHelp("The middlebox(es) to insert, in path order, comma-separated.", valueName: "addr|host[,...]"))
    var box: String

    @Option(help: ArgumentHelp("Copy the session's firewall state to the first inserted box from this anchor (the --after host or its right neighbour).",
                               valueName: "addr|host"))
    var stateFrom: String?

    @Flag(help: "No holding: new data takes the new path at once (boxes that keep no per-session state).")
    var stateless = false

    @OptionGroup var reconfiguration: ReconfigurationOptions

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

    @OptionGroup var placement: MiddleboxPlacementOptions

    func validate() throws {
        if stateless && stateFrom != nil { throw ValidationError("--state-from moves state: not with --stateless") }
    }

    func run() async throws {
        let lab = try placement.openLab(component: "insert")
        let host = try placement.address(after, lab: lab)
        let boxes = try Reconfiguration.addresses(box, placement: placement, lab: lab, bothFamilies: true)
        guard !boxes.contains(host) else { throw ValidationError("--box must not contain the --after host \(host)") }
        let donor = try stateFrom.map { try placement.address($0, lab: lab) }
        let mode: TransferMode = donor != nil ? .stateful : stateless ? .stateless : .held
        let request = ReplaceRequest(predicate: try reconfiguration.predicate(), newBoxes: boxes, mode: mode,
                                     deadlineMilliseconds: reconfiguration.deadline, insertHere: true, donor: donor,
                                     alsoDonor: stateFrom.flatMap { Reconfiguration.ipv6Addresses($0, lab: lab).first })
        try await Reconfiguration.run(request, at: host, name: after, placement: placement, lab: lab, json: jsonOutput.json,
                                      title: "insert \(Reconfiguration.list(boxes)) after \(host) (\(mode))")
    }
}

struct RemoveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove",
        abstract: "Remove middleboxes from live sessions: their neighbours then talk directly (paper §3).",
        discussion: """
            Asks the agent of --box (the first box, with several: consecutive boxes of each session's path) to \
            take itself out of every session matching --match: it triggers each session's left anchor (its left \
            neighbour), which locks the segment up to the box's right neighbour (with several boxes: the last \
            one's, read from that box's agent, so several boxes need --lab), the right anchor, opens a \
            subsession straight to it, holds new data at both ends while the old path drains, releases it on the \
            new path and tears the old path down. Nothing else is needed of the boxes that stay: each already \
            carries the session. This is the paper's self-removal: the trigger goes from the box to its left \
            neighbour. With --stateless new data takes the new path at once (the two-path rules of §3.5).

            Run it on the box's host, or name its agent with --netns, --lab (host names allowed) or --socket.
            Exit status: 0 when every matched session left the box (also when none matched); 1 when any did not \
            (it stays on it).
            Examples:
              dysco-migrate remove --lab demo --box fw1
              dysco-migrate remove --lab demo --box fw1,fw3 --match dport=5201 --json
            """
    )

    @Option(help: ArgumentHelp("The middlebox(es) to remove, in path order, comma-separated.", valueName: "addr|host[,...]"))
    var box: String

    @Flag(help: "No holding: new data takes the new path at once; the old path carries what it must until drained.")
    var stateless = false

    @OptionGroup var reconfiguration: ReconfigurationOptions

    @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Report>

    @OptionGroup var placement: MiddleboxPlacementOptions


    func run() async throws {
        let lab = try placement.openLab(component: "remove")
        let boxes = try Reconfiguration.addresses(box, placement: placement, lab: lab)
        let mode: TransferMode = stateless ? .stateless : .held
        let names = box.split(separator: ",").map(String.init)
        // A dual-stack lab's boxes are named in both families: each session takes those of its own.
        let boxes6 = Reconfiguration.ipv6Addresses(box, lab: lab)
        let request = ReplaceRequest(predicate: try reconfiguration.predicate(), newBoxes: [], mode: mode,
                                     deadlineMilliseconds: reconfiguration.deadline,
                                     alsoOld: Array(boxes.dropFirst()) + Array(boxes6.dropFirst()),
                                     rightAnchors: try await Reconfiguration.rightAnchors(oldBoxes: boxes, oldBoxesIPv6: boxes6,
                                                                                          names: names, placement: placement, lab: lab))
        try await Reconfiguration.run(
            request, at: boxes[0], name: names[0], placement: placement,
            lab: lab, json: jsonOutput.json, title: "remove \(Reconfiguration.list(boxes)) (\(mode))")
    }
}
