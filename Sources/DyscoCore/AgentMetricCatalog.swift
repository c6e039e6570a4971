/// The agent's Prometheus metrics (`agent --metrics ADDR:PORT`, docs/ARCHITECTURE.md "Metrics"): their names,
/// help texts and labels, and how the counters the agent already keeps (``DataplaneCounters``, the control
/// protocol's counters of ``AgentSnapshot/control``) map onto them. Pure: DyscoAgent renders these samples with
/// swift-prometheus at scrape time, so the packet path does no metrics work of its own.
public enum AgentMetricCatalog {
    public enum Kind: String, Sendable, Equatable {
        case counter, gauge, histogram
    }

    public struct Label: Sendable, Hashable {
        public var name: String
        public var value: String
        public init(_ name: String, _ value: String) {
            self.name = name
            self.value = value
        }
    }

    /// One metric family: every series of a name shares its help text, kind and label names.
    public struct Family: Sendable, Equatable {
        public var name: String
        public var kind: Kind
        public var help: String
        public var labelNames: [String]
    }

    /// One value of one series.
    public struct Sample: Sendable, Equatable {
        public var name: String
        public var labels: [Label]
        public var value: Double
        public init(_ name: String, _ labels: [Label] = [], _ value: Double) {
            self.name = name
            self.labels = labels
            self.value = value
        }
    }

    // MARK: - Names

    public static let packets = "dysco_packets_total"
    public static let synDropped = "dysco_syn_dropped_total"
    public static let malformedPackets = "dysco_malformed_packets_total"
    public static let ipv6Passed = "dysco_ipv6_passed_total"
    public static let sessions = "dysco_sessions"
    public static let sessionsAnchoring = "dysco_sessions_anchoring"
    public static let sessionsCreated = "dysco_sessions_created_total"
    public static let sessionsRemoved = "dysco_sessions_removed_total"
    public static let fastPathInstalls = "dysco_fastpath_installs_total"
    public static let migrations = "dysco_migrations_total"
    public static let phaseDuration = "dysco_migration_phase_duration_seconds"
    public static let controlMessages = "dysco_control_messages_total"
    public static let controlDropped = "dysco_control_dropped_total"
    public static let anchorPackets = "dysco_anchor_packets_total"
    public static let anchorHeld = "dysco_anchor_held_packets_total"
    public static let bufferPackets = "dysco_anchor_buffer_packets"
    public static let bufferBytes = "dysco_anchor_buffer_bytes"
    public static let bufferRefused = "dysco_anchor_buffer_refused_total"
    public static let uptime = "dysco_agent_uptime_seconds"
    public static let resets = "dysco_resets_total"
    public static let synTimeouts = "dysco_sessions_syn_timeout_total"
    public static let kernelEvents = "dysco_kernel_events_total"
    public static let queuedTeardown = "dysco_queued_teardown_total"
    public static let queuedSyns = "dysco_queued_syn_total"
    public static let kernelOpeningRefused = "dysco_kernel_opening_refused_total"

    public static let families: [Family] = [
        Family(name: packets, kind: .counter,
               help: "Packets by path (slow: NFQUEUE, the agent's verdict; fast: rewritten by the kernel, from its per-session counters) and verdict; a forwarded packet counts at ingress and at egress.",
               labelNames: ["path", "verdict"]),
        Family(name: synDropped, kind: .counter, help: "SYNs the slow path dropped, by reason.", labelNames: ["reason"]),
        Family(name: malformedPackets, kind: .counter, help: "Queued packets whose IPv4/TCP or IPv6/TCP headers do not parse (accepted untouched).",
               labelNames: []),
        Family(name: ipv6Passed, kind: .counter,
               help: "Queued IPv6 packets that are not a session's segment by the extension-header rule (passed untouched), by reason.",
               labelNames: ["reason"]),
        Family(name: sessions, kind: .gauge, help: "Sessions in the agent's table.", labelNames: []),
        Family(name: sessionsAnchoring, kind: .gauge, help: "Sessions this agent anchors in a reconfiguration now.", labelNames: []),
        Family(name: sessionsCreated, kind: .counter, help: "Sessions created.", labelNames: []),
        Family(name: sessionsRemoved, kind: .counter, help: "Sessions removed.", labelNames: []),
        Family(name: fastPathInstalls, kind: .counter, help: "Sessions handed to the kernel fast path (each hand-over counts).",
               labelNames: []),
        Family(name: kernelEvents, kind: .counter,
               help: "FIN/RST/ESTABLISHED reports of packets the kernel carried (BPF datapath ring buffer), by outcome (taken: a session's bookkeeping; stale: no such session; lost: the ring was full).",
               labelNames: ["outcome"]),
        Family(name: queuedTeardown, kind: .counter,
               help: "FINs and RSTs of known sessions that came through NFQUEUE (the slow path, or marked to be observed).",
               labelNames: []),
        Family(name: queuedSyns, kind: .counter,
               help: "SYNs (without ACK) that came through NFQUEUE; with the BPF datapath a short connection's only queued packets.",
               labelNames: []),
        Family(name: kernelOpeningRefused, kind: .counter,
               help: "SYN-ACKs and RSTs the BPF datapath dropped on a session opening in the kernel: they did not acknowledge its SYN (forged or stale).",
               labelNames: []),
        Family(name: migrations, kind: .counter,
               help: "Migrations finished, by this agent's role (controller: where replace ran; left_anchor: where it was carried out) and result.",
               labelNames: ["role", "result"]),
        Family(name: phaseDuration, kind: .histogram,
               help: "Duration of each phase of a successful migration, observed at its controller.",
               labelNames: ["phase"]),
        Family(name: controlMessages, kind: .counter, help: "Control messages sent and received (passed every check), by type.",
               labelNames: ["direction", "type"]),
        Family(name: controlDropped, kind: .counter, help: "Control messages dropped on arrival, by reason.", labelNames: ["reason"]),
        Family(name: anchorPackets, kind: .counter,
               help: "Packets anchors built themselves (elicits, pokes, probes, window updates), by kind and result.",
               labelNames: ["kind", "result"]),
        Family(name: anchorHeld, kind: .counter, help: "Packets anchors held while a stateful migration drained the old path.",
               labelNames: []),
        Family(name: bufferPackets, kind: .gauge, help: "Packets held in the anchor buffer now.", labelNames: []),
        Family(name: bufferBytes, kind: .gauge, help: "Bytes held in the anchor buffer now.", labelNames: []),
        Family(name: bufferRefused, kind: .counter, help: "Packets the anchor buffer refused (full: the migration is cancelled).",
               labelNames: []),
        Family(name: uptime, kind: .gauge, help: "Seconds since the agent started.", labelNames: []),
        Family(name: resets, kind: .counter,
               help: "RSTs on a session's tuples, by outcome (RFC 5961 §3): out_of_window (dropped), provisional (passed, the endpoint judges), confirmed (left this host or exact: the session goes unless refuted), refuted (a later packet proved it false).",
               labelNames: ["outcome"]),
        Family(name: synTimeouts, kind: .counter, help: "SYN-only sessions (handshake never completed) removed after --syn-timeout.",
               labelNames: []),
    ]

    public static func family(_ name: String) -> Family? { families.first { $0.name == name } }

    /// `newPathSyn` → `new_path_syn`, `bad-mac` → `bad_mac`, `window-updates` → `window_updates`: Prometheus-style
    /// label values (lower snake case) from the agent's camel-case type names and kebab-case counter names.
    public static func snakeCase(_ text: String) -> String {
        var result = ""
        result.reserveCapacity(text.utf8.count + 4)
        var previousWasLower = false
        for character in text {
            if character == "-" || character == " " || character == "." || character == "_" {
                if !result.isEmpty, result.last != "_" { result.append("_") }
                previousWasLower = false
            } else if character.isUppercase {
                if previousWasLower, result.last != "_" { result.append("_") }
                result += character.lowercased()
                previousWasLower = false
            } else {
                result.append(character)
                previousWasLower = character.isLowercase || character.isNumber
            }
        }
        while result.last == "_" { result.removeLast() }
        return result
    }

    // MARK: - Migrations

    /// The roles whose migrations are counted (see ``migrations``).
    public enum MigrationRole: String, Sendable, CaseIterable {
        case controller
        case leftAnchor = "left_anchor"
    }

    /// The results of ``migrations``: moved → success; cancelled (back on the old path) → cancelled; refused
    /// (never started: lock contention, no path, a box refused) → failed.
    public static func migrationResult(_ outcome: TriggerResult.Outcome) -> String {
        switch outcome {
        case .moved: "success"
        case .cancelled: "cancelled"
        case .refused: "failed"
        }
    }

    public static let migrationResults = ["success", "cancelled", "failed"]

    /// The phases of ``phaseDuration`` (the `replace` report's: ReplaceReport.Phases), in its order.
    public static let phases = ["lock", "new_path", "drain", "state", "release", "teardown", "export", "transfer", "import",
                                "total", "paper"]

    /// Buckets of ``phaseDuration`` in seconds (100 µs … 10 s): migration phases take from tens of
    /// microseconds (a lock round on one host) to seconds (a deadline).
    public static let phaseBuckets: [Double] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                0.25, 0.5, 1, 2.5, 5, 10]

    // MARK: - Scrape-time samples

    /// Everything read at scrape time (one short hold of the packet lock for `counters` and the counts).
    public struct Readings: Sendable {
        public var counters: DataplaneCounters
        public var sessions: Int
        public var anchoring: Int
        public var control: [String: UInt64]
        /// Packets the kernel fast path rewrote (summed from the per-session map counters at each poll).
        public var fastPathPackets: UInt64
        /// The BPF datapath's refused SYN-ACKs/RSTs on opening sessions (`dysco_stats[OPENING_REFUSED]`).
        public var kernelOpeningRefused: UInt64 = 0
        public var bufferPackets: Int
        public var bufferBytes: Int
        public var bufferRefused: UInt64
        public var uptimeSeconds: Double

        public init(counters: DataplaneCounters = DataplaneCounters(), sessions: Int = 0, anchoring: Int = 0,
                    control: [String: UInt64] = [:], fastPathPackets: UInt64 = 0, bufferPackets: Int = 0,
                    bufferBytes: Int = 0, bufferRefused: UInt64 = 0, uptimeSeconds: Double = 0) {
            self.counters = counters
            self.sessions = sessions
            self.anchoring = anchoring
            self.control = control
            self.fastPathPackets = fastPathPackets
            self.bufferPackets = bufferPackets
            self.bufferBytes = bufferBytes
            self.bufferRefused = bufferRefused
            self.uptimeSeconds = uptimeSeconds
        }
    }

    /// The drop reasons the control plane counts (`dropped.<reason>`): the decoder's and the engine's own.
    public static let controlDropReasons = ControlMessageError.counterNames
        + ["replayed", "wrong-nonce", "wrong-session", "unknown-session"]
    /// The packets anchors build (`<kind>.<result>` control counters).
    public static let anchorPacketKinds = ["elicits", "window-updates", "pokes", "probes"]
    public static let anchorPacketResults = ["sent", "failed", "unknown-numbers"]

    /// The samples of a scrape. Every known series is present (zero until it moves), so that a family's
    /// HELP and TYPE lines are there from the first scrape and rates start from zero.
    public static func samples(_ r: Readings) -> [Sample] {
        let c = r.counters
        func n(_ value: UInt64) -> Double { Double(value) }
        var out: [Sample] = [
            Sample(packets, [Label("path", "slow"), Label("verdict", "accept")], n(c.verdictAccept)),
            Sample(packets, [Label("path", "slow"), Label("verdict", "accept_modified")], n(c.verdictAcceptModified)),
            Sample(packets, [Label("path", "slow"), Label("verdict", "drop")], n(c.verdictDrop)),
            Sample(packets, [Label("path", "slow"), Label("verdict", "hold")], n(c.verdictHold)),
            Sample(packets, [Label("path", "fast"), Label("verdict", "accept_modified")], n(r.fastPathPackets)),
            Sample(synDropped, [Label("reason", "malformed_trailer")], n(c.malformedDyscoSyn)),
            Sample(synDropped, [Label("reason", "trailer_version_one")], n(c.trailerVersionOneRefused)),
            Sample(synDropped, [Label("reason", "trailer_bad_mac")], n(c.trailerBadMAC)),
            Sample(synDropped, [Label("reason", "trailer_forbidden_address")], n(c.trailerForbiddenAddress)),
            Sample(synDropped, [Label("reason", "collision")], n(c.collisions)),
            Sample(synDropped, [Label("reason", "ports_exhausted")], n(c.portsExhausted)),
            Sample(synDropped, [Label("reason", "oversized")], n(c.oversizedSyn)),
            Sample(synDropped, [Label("reason", "session_cap")], n(c.sessionCapRefused)),
            Sample(synDropped, [Label("reason", "source_cap")], n(c.sourceCapRefused)),
            Sample(malformedPackets, [], n(c.malformedPackets)),
            Sample(ipv6Passed, [Label("reason", "fragment")], n(c.ipv6Fragment)),
            Sample(ipv6Passed, [Label("reason", "esp_ah")], n(c.ipv6Encrypted)),
            Sample(ipv6Passed, [Label("reason", "not_tcp")], n(c.ipv6NotTCP)),
            Sample(ipv6Passed, [Label("reason", "extension_chain")], n(c.ipv6LongChain)),
            Sample(ipv6Passed, [Label("reason", "jumbogram")], n(c.ipv6Jumbogram)),
            Sample(sessions, [], Double(r.sessions)),
            Sample(sessionsAnchoring, [], Double(r.anchoring)),
            Sample(sessionsCreated, [], n(c.sessionsCreated)),
            Sample(sessionsRemoved, [], n(c.sessionsRemoved)),
            Sample(fastPathInstalls, [], n(c.fastPathInstalls)),
            Sample(kernelEvents, [Label("outcome", "taken")], n(c.kernelEvents &- c.kernelEventsStale)),
            Sample(kernelEvents, [Label("outcome", "stale")], n(c.kernelEventsStale)),
            Sample(kernelEvents, [Label("outcome", "lost")], n(c.kernelEventsLost)),
            Sample(queuedTeardown, [], n(c.queuedTeardown)),
            Sample(queuedSyns, [], n(c.queuedSyns)),
            Sample(kernelOpeningRefused, [], n(r.kernelOpeningRefused)),
            Sample(anchorHeld, [], n(c.anchorHeld)),
            Sample(bufferPackets, [], Double(r.bufferPackets)),
            Sample(bufferBytes, [], Double(r.bufferBytes)),
            Sample(bufferRefused, [], n(r.bufferRefused)),
            Sample(uptime, [], r.uptimeSeconds),
            Sample(resets, [Label("outcome", "out_of_window")], n(c.resetsOutOfWindow)),
            Sample(resets, [Label("outcome", "provisional")], n(c.resetsProvisional)),
            Sample(resets, [Label("outcome", "confirmed")], n(c.resetsConfirmed)),
            Sample(resets, [Label("outcome", "refuted")], n(c.resetsRefuted)),
            Sample(synTimeouts, [], n(c.synTimeouts)),
        ]
        var control: [String: UInt64] = [:]
        for type in ControlMessageType.allCases {
            control["sent.\(type)"] = 0
            control["received.\(type)"] = 0
        }
        for reason in controlDropReasons { control["dropped.\(reason)"] = 0 }
        for kind in anchorPacketKinds {
            for result in anchorPacketResults { control["\(kind).\(result)"] = 0 }
        }
        control.merge(r.control) { _, new in new }
        for (key, value) in control.sorted(by: { $0.key < $1.key }) {
            if let sample = controlSample(key: key, value: value) { out.append(sample) }
        }
        return out
    }

    /// One control counter (`sent.<type>`, `received.<type>`, `dropped.<reason>`, `<kind>.<result>` of the anchors'
    /// own packets) as a sample; nil for the counters that have a metric of their own (`migrations.<outcome>`: see
    /// ``migrations``) and for names it does not know.
    public static func controlSample(key: String, value: UInt64) -> Sample? {
        guard let dot = key.firstIndex(of: "."), dot != key.startIndex, key.index(after: dot) != key.endIndex else {
            return nil
        }
        let head = String(key[..<dot])
        let tail = String(key[key.index(after: dot)...])
        switch head {
        case "sent", "received":
            return Sample(controlMessages, [Label("direction", head), Label("type", snakeCase(tail))], Double(value))
        case "dropped":
            return Sample(controlDropped, [Label("reason", snakeCase(tail))], Double(value))
        case _ where anchorPacketKinds.contains(head):
            return Sample(anchorPackets, [Label("kind", snakeCase(head)), Label("result", snakeCase(tail))], Double(value))
        default:
            return nil
        }
    }
}

/// Where `agent --metrics` serves `/metrics`: an IPv4 address of the agent's namespace (0.0.0.0: all) and a TCP port.
public struct MetricsEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16

    public init(address: IPAddress, port: UInt16) {
        self.address = address
        self.port = port
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case missingPort(String)
        case badAddress(String)
        case badPort(String)

        public var description: String {
            switch self {
            case .missingPort(let text): "'\(text)' is not ADDR:PORT (e.g. 127.0.0.1:9464, or 0.0.0.0:9464 for every address)"
            case .badAddress(let text): "'\(text)' is not an IPv4 address (ADDR:PORT, e.g. 127.0.0.1:9464)"
            case .badPort(let text): "'\(text)' is not a TCP port 1-65535 (ADDR:PORT, e.g. 127.0.0.1:9464)"
            }
        }
    }

    /// Parses `ADDR:PORT`: a dotted IPv4 address (`localhost` for 127.0.0.1) and a port 1–65535.
    public static func parse(_ text: String) throws(ParseError) -> MetricsEndpoint {
        guard let colon = text.lastIndex(of: ":") else { throw .missingPort(text) }
        let host = String(text[..<colon])
        let portText = String(text[text.index(after: colon)...])
        guard !portText.isEmpty else { throw .missingPort(text) }
        let address: IPAddress
        if host == "localhost" {
            address = IPAddress(127, 0, 0, 1)
        } else {
            guard host.split(separator: ".", omittingEmptySubsequences: false).count == 4, let parsed = IPAddress(host) else {
                throw .badAddress(host)
            }
            address = parsed
        }
        guard portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber), portText.count <= 5,
              let port = UInt16(portText), port > 0 else {
            throw .badPort(portText)
        }
        return MetricsEndpoint(address: address, port: port)
    }

    public var description: String { "\(address):\(port)" }
}
