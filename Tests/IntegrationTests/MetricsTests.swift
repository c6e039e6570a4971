import DyscoAgent
import DyscoCore
import DyscoLab
import DyscoSystem
import Foundation
import Testing

/// A checker of the Prometheus text exposition format (0.0.4), strict enough to catch what a scraper would
/// reject or misread: every non-comment line is `name{labels} value [timestamp]`, every family has HELP and
/// TYPE lines before its samples (at most one each), counters are not negative, and each histogram series has
/// cumulative buckets ending at `+Inf` equal to its `_count`, and a `_sum`.
struct PrometheusText {
    struct FormatError: Error, CustomStringConvertible {
        var line: Int
        var message: String
        var description: String { "line \(line): \(message)" }
    }

    struct Sample {
        var name: String
        var labels: [String: String]
        var value: Double
    }

    var help: [String: String] = [:]
    var types: [String: String] = [:]
    var samples: [Sample] = []

    static let validTypes: Set<String> = ["counter", "gauge", "histogram", "summary", "untyped"]

    static func isMetricName(_ s: Substring) -> Bool {
        guard let first = s.first, first.isASCII, first.isLetter || first == "_" || first == ":" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == ":") }
    }

    static func isLabelName(_ s: Substring) -> Bool {
        guard let first = s.first, first.isASCII, first.isLetter || first == "_" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    static func parseValue(_ s: Substring) -> Double? {
        switch s {
        case "+Inf", "Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        default: return Double(s)
        }
    }

    /// The family a sample belongs to: a histogram's `_bucket`, `_sum` and `_count` series are its family's.
    func family(of name: String) -> String {
        for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) {
            let base = String(name.dropLast(suffix.count))
            if types[base] == "histogram" || types[base] == "summary" { return base }
        }
        return name
    }

    static func parse(_ text: String) throws -> PrometheusText {
        var result = PrometheusText()
        guard text.hasSuffix("\n") else { throw FormatError(line: 0, message: "the exposition does not end with a line feed") }
        var sampled: Set<String> = []
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().enumerated() {
            let number = index + 1
            let line = rawLine
            if line.isEmpty { continue }
            if line.hasPrefix("#") {
                let parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
                guard parts.count >= 3, parts[0] == "#", parts[1] == "HELP" || parts[1] == "TYPE" else { continue }
                let name = String(parts[2])
                guard isMetricName(parts[2]) else { throw FormatError(line: number, message: "bad metric name '\(name)'") }
                guard !sampled.contains(name) else {
                    throw FormatError(line: number, message: "\(parts[1]) of \(name) after its samples")
                }
                if parts[1] == "HELP" {
                    guard result.help[name] == nil else { throw FormatError(line: number, message: "second HELP of \(name)") }
                    result.help[name] = parts.count > 3 ? String(parts[3]) : ""
                } else {
                    guard parts.count == 4, validTypes.contains(String(parts[3])) else {
                        throw FormatError(line: number, message: "bad TYPE line '\(line)'")
                    }
                    guard result.types[name] == nil else { throw FormatError(line: number, message: "second TYPE of \(name)") }
                    result.types[name] = String(parts[3])
                }
                continue
            }
            // name{labels} value [timestamp]
            var rest = line[...]
            let nameEnd = rest.firstIndex { $0 == "{" || $0 == " " } ?? rest.endIndex
            let name = rest[..<nameEnd]
            guard isMetricName(name) else { throw FormatError(line: number, message: "bad metric name in '\(line)'") }
            rest = rest[nameEnd...]
            var labels: [String: String] = [:]
            if rest.first == "{" {
                rest = rest.dropFirst()
                while rest.first != "}" {
                    guard let equals = rest.firstIndex(of: "=") else { throw FormatError(line: number, message: "label without '=' in '\(line)'") }
                    let labelName = rest[..<equals]
                    guard isLabelName(labelName) else { throw FormatError(line: number, message: "bad label name '\(labelName)'") }
                    rest = rest[rest.index(after: equals)...]
                    guard rest.first == "\"" else { throw FormatError(line: number, message: "unquoted label value in '\(line)'") }
                    rest = rest.dropFirst()
                    var value = ""
                    var closed = false
                    while let c = rest.first {
                        rest = rest.dropFirst()
                        if c == "\\" {
                            guard let escaped = rest.first else { break }
                            rest = rest.dropFirst()
                            switch escaped {
                            case "\\": value.append("\\")
                            case "\"": value.append("\"")
                            case "n": value.append("\n")
                            default: throw FormatError(line: number, message: "bad escape \\\(escaped) in '\(line)'")
                            }
                        } else if c == "\"" {
                            closed = true
                            break
                        } else {
                            value.append(c)
                        }
                    }
                    guard closed else { throw FormatError(line: number, message: "unterminated label value in '\(line)'") }
                    guard labels.updateValue(value, forKey: String(labelName)) == nil else {
                        throw FormatError(line: number, message: "label \(labelName) twice in '\(line)'")
                    }
                    if rest.first == "," { rest = rest.dropFirst() } else if rest.first != "}" {
                        throw FormatError(line: number, message: "expected ',' or '}' in '\(line)'")
                    }
                }
                rest = rest.dropFirst()
            }
            guard rest.first == " " else { throw FormatError(line: number, message: "no space before the value in '\(line)'") }
            let fields = rest.dropFirst().split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count == 1 || fields.count == 2, let value = parseValue(fields[0]) else {
                throw FormatError(line: number, message: "bad value in '\(line)'")
            }
            if fields.count == 2, Int64(fields[1]) == nil { throw FormatError(line: number, message: "bad timestamp in '\(line)'") }
            let sample = Sample(name: String(name), labels: labels, value: value)
            let family = result.family(of: sample.name)
            guard let type = result.types[family] else { throw FormatError(line: number, message: "\(sample.name): no TYPE line before it") }
            guard result.help[family] != nil else { throw FormatError(line: number, message: "\(sample.name): no HELP line before it") }
            if type == "counter" || type == "histogram", !(value >= 0) {
                throw FormatError(line: number, message: "\(sample.name): negative \(type) value \(value)")
            }
            if type == "histogram", family == sample.name {
                throw FormatError(line: number, message: "histogram \(family) has a bare sample")
            }
            sampled.insert(family)
            result.samples.append(sample)
        }
        try result.checkHistograms()
        return result
    }

    private func checkHistograms() throws {
        for (family, type) in types where type == "histogram" {
            var buckets: [[String: String]: [(le: Double, count: Double)]] = [:]
            for s in samples where s.name == family + "_bucket" {
                guard let leText = s.labels["le"], let le = Self.parseValue(leText[...]) else {
                    throw FormatError(line: 0, message: "\(family)_bucket without a valid le label")
                }
                var key = s.labels
                key["le"] = nil
                buckets[key, default: []].append((le, s.value))
            }
            for (labels, series) in buckets {
                let sorted = series.sorted { $0.le < $1.le }
                for (a, b) in zip(sorted, sorted.dropFirst()) where b.count < a.count {
                    throw FormatError(line: 0, message: "\(family)\(labels): buckets not cumulative (le=\(a.le): \(a.count), le=\(b.le): \(b.count))")
                }
                guard let last = sorted.last, last.le == .infinity else {
                    throw FormatError(line: 0, message: "\(family)\(labels): no +Inf bucket")
                }
                let count = samples.first { $0.name == family + "_count" && $0.labels == labels }
                guard let count, count.value == last.count else {
                    throw FormatError(line: 0, message: "\(family)\(labels): _count \(count.map { "\($0.value)" } ?? "missing") ≠ +Inf bucket \(last.count)")
                }
                guard samples.contains(where: { $0.name == family + "_sum" && $0.labels == labels }) else {
                    throw FormatError(line: 0, message: "\(family)\(labels): no _sum")
                }
            }
        }
    }

    /// The value of the one series `name` with exactly `labels` (nil if absent).
    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }
}

/// Test (e) of issue 8: `agent --metrics` serves the Prometheus text format in its namespace, and a `replace`
/// moves the migration counters and the phase-latency histograms (a cancelled one counts as cancelled). Labs
/// `mxN`, 10.79.N.0/24.
@Suite(.serialized) struct MetricsTests {
    static let port = 9464

    @Test("the format checker accepts a valid exposition and rejects what a scraper would not take")
    func checkerBites() throws {
        let valid = """
            # HELP a_total A counter.
            # TYPE a_total counter
            a_total{x="1",y="q\\"uote\\\\"} 3
            a_total{x="2"} 0 1700000000000
            # HELP h Seconds.
            # TYPE h histogram
            h_bucket{p="l",le="0.1"} 1
            h_bucket{p="l",le="1.0"} 2
            h_bucket{p="l",le="+Inf"} 2
            h_sum{p="l"} 0.6
            h_count{p="l"} 2

            """
        let parsed = try PrometheusText.parse(valid)
        #expect(parsed.value("a_total", ["x": "1", "y": "q\"uote\\"]) == 3)
        #expect(parsed.value("h_count", ["p": "l"]) == 2)
        let invalid = [
            "# HELP a A.\na 1\n",                                        // no TYPE
            "# TYPE a counter\na 1\n",                                   // no HELP
            "# HELP a A.\n# TYPE a counter\na{x=\"1\" 1\n",              // unterminated labels
            "# HELP a A.\n# TYPE a counter\na one\n",                    // bad value
            "# HELP a A.\n# TYPE a counter\na -1\n",                     // negative counter
            "# HELP a A.\n# TYPE a counter\n1a 1\n",                     // bad name
            "# HELP a A.\n# TYPE a counter\na 1",                        // no final line feed
            "# HELP a A.\n# TYPE a counter\na 1\n# TYPE a counter\n",    // TYPE after samples
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",  // not cumulative
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n",  // no +Inf
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",  // count ≠ +Inf
        ]
        for text in invalid {
            #expect(throws: PrometheusText.FormatError.self, "accepted: \(text.debugDescription)") { try PrometheusText.parse(text) }
        }
    }

    /// GET /metrics inside `host`'s namespace (curl, as a scraper there would): the parsed exposition and the
    /// response headers.
    static func scrape(_ lab: Lab, _ host: String, path: String = "/metrics") throws -> (text: String, headers: String, status: Int32) {
        let headers = "\(lab.directory)/\(host).metrics-headers"
        let result = try lab.exec(host, ["curl", "-sS", "-m", "5", "-D", headers, "http://127.0.0.1:\(port)\(path)"], check: false)
        return (result.stdout, (try? String(contentsOfFile: headers, encoding: .utf8)) ?? "", result.status)
    }

    static func metrics(_ lab: Lab, _ host: String) throws -> PrometheusText {
        let (text, headers, status) = try scrape(lab, host)
        #expect(status == 0, "curl on \(host) exited \(status)")
        #expect(headers.hasPrefix("HTTP/1.1 200"), "\(host): \(headers)")
        #expect(headers.lowercased().contains("content-type: text/plain; version=0.0.4"), "\(host): \(headers)")
        do { return try PrometheusText.parse(text) } catch {
            Issue.record("\(host)'s /metrics is not the Prometheus text format: \(error)\n\(text.prefix(4000))")
            throw error
        }
    }

    @Test("(e) /metrics answers the Prometheus text format in each agent's namespace; replace fw1 → fw2 moves the migration counters and phase histograms")
    func metricsAcrossReplace() async throws {
        let spec = MigrationLab.spec("mx1", subnet: "10.79.1.0/24", agentArguments: ["--metrics", "127.0.0.1:\(Self.port)"])
        try await TestSupport.withLab(spec) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            let sessions = 4
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            var before: [String: PrometheusText] = [:]
            for host in ["client1", "fw1", "fw2", "server1"] {
                let m = try Self.metrics(lab, host)
                before[host] = m
                for family in AgentMetricCatalog.families {
                    #expect(m.types[family.name] == family.kind.rawValue, "\(host): TYPE of \(family.name)")
                    #expect(m.help[family.name] == family.help, "\(host): HELP of \(family.name)")
                }
            }
            let fw1 = try #require(before["fw1"])
            #expect(fw1.value("dysco_sessions") ?? 0 >= Double(sessions), "fw1 sessions: \(fw1.value("dysco_sessions") ?? -1)")
            #expect(fw1.value("dysco_packets_total", ["path": "slow", "verdict": "accept_modified"]) ?? 0 > 0)
            #expect(fw1.value("dysco_sessions_created_total") ?? 0 >= Double(sessions))
            #expect(fw1.value("dysco_migrations_total", ["role": "controller", "result": "success"]) == 0)
            #expect(fw1.value("dysco_migration_phase_duration_seconds_count", ["phase": "total"]) == 0)
            // Other paths and methods are refused.
            let missing = try Self.scrape(lab, "fw1", path: "/other")
            #expect(missing.headers.hasPrefix("HTTP/1.1 404"), "\(missing.headers)")

            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let report = try #require(run.report, "replace printed no report: \(run.stdout) \(run.stderr)")
            #expect(run.status == 0 && report.sessions.count == sessions && report.allMoved, "\(run.stdout) \(run.stderr)")
            let moved = Double(report.sessions.filter { $0.result == "moved" }.count)

            let fw1After = try Self.metrics(lab, "fw1")
            #expect(fw1After.value("dysco_migrations_total", ["role": "controller", "result": "success"]) == moved)
            #expect(fw1After.value("dysco_migrations_total", ["role": "controller", "result": "failed"]) == 0)
            for phase in AgentMetricCatalog.phases {
                #expect(fw1After.value("dysco_migration_phase_duration_seconds_count", ["phase": phase]) == moved, "phase \(phase)")
            }
            // The histogram's sum is the report's total latency (µs → s; the report's figures are whole µs).
            let reportTotal = report.sessions.compactMap(\.phases).map { Double($0.total) / 1e6 }.reduce(0, +)
            let sum = fw1After.value("dysco_migration_phase_duration_seconds_sum", ["phase": "total"]) ?? -1
            #expect(abs(sum - reportTotal) < 1e-3, "histogram sum \(sum) s, report total \(reportTotal) s")
            #expect(fw1After.value("dysco_control_messages_total", ["direction": "sent", "type": "trigger"]) ?? 0 >= moved)
            #expect(fw1After.value("dysco_control_messages_total", ["direction": "received", "type": "trigger_result"]) ?? 0 >= moved)

            // The left anchor (client1) counts what it carried out; it controlled nothing.
            let client = try Self.metrics(lab, "client1")
            #expect(client.value("dysco_migrations_total", ["role": "left_anchor", "result": "success"]) == moved)
            #expect(client.value("dysco_migrations_total", ["role": "controller", "result": "success"]) == 0)
            let clientBefore = try #require(before["client1"])
            let locksBefore = clientBefore.value("dysco_control_messages_total", ["direction": "sent", "type": "request_lock"]) ?? 0
            #expect(client.value("dysco_control_messages_total", ["direction": "sent", "type": "request_lock"]) ?? 0 >= locksBefore + moved)
            // The stateful migration held packets at the anchors; the buffers are empty again afterwards.
            let server = try Self.metrics(lab, "server1")
            #expect(client.value("dysco_anchor_buffer_packets") == 0 && server.value("dysco_anchor_buffer_packets") == 0)
            // fw2 carries the sessions now.
            let fw2 = try Self.metrics(lab, "fw2")
            #expect(fw2.value("dysco_sessions") ?? 0 >= moved)
            #expect((fw2.value("dysco_sessions_created_total") ?? 0) - (before["fw2"]?.value("dysco_sessions_created_total") ?? 0) >= moved)

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }

    @Test("a cancelled migration counts as cancelled at the controller and the left anchor and adds no phase latency; a bad control datagram counts as dropped")
    func cancelledMigrationAndDrops() async throws {
        let spec = MigrationLab.spec("mx3", subnet: "10.79.3.0/24", agentArguments: ["--metrics", "127.0.0.1:\(Self.port)"])
        try await TestSupport.withLab(spec) { lab in
            try TestSupport.makeRandomFile("\(lab.httpRoot)/blob", megabytes: 8)
            try MigrationLab.startPacedServer(lab, megabytesPerSecond: 2)
            // fw2 refuses migrated state: the stateful migrations are cancelled at the state step.
            try lab.restartAgent("fw2", extraArguments: ["--accept-state", "no"])
            let sessions = 3
            let downloads = try MigrationLab.Downloads(lab, file: "blob", count: sessions)
            try await MigrationLab.waitForSessions(lab, on: "fw1", count: sessions)

            // A datagram too short to be a control message, from client1 to fw1's control port.
            let truncatedBefore = try Self.metrics(lab, "fw1").value("dysco_control_dropped_total", ["reason": "truncated"])
            #expect(truncatedBefore == 0)
            _ = try lab.exec("client1", ["python3", "-c", """
                import socket
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b"hello", ("\(lab.address(of: "fw1"))", \(ControlMessage.port)))
                """])
            var truncated = 0.0
            for _ in 0..<20 where truncated == 0 {
                try await Task.sleep(for: .milliseconds(100))
                truncated = try Self.metrics(lab, "fw1").value("dysco_control_dropped_total", ["reason": "truncated"]) ?? 0
            }
            #expect(truncated == 1)

            let run = try MigrationLab.replace(lab, old: "fw1", new: "fw2")
            let report = try #require(run.report, "\(run.stdout) \(run.stderr)")
            #expect(run.status != 0)
            #expect(report.sessions.count == sessions && report.sessions.allSatisfy { $0.result == "cancelled" },
                    "\(report.sessions.map { "\($0.result) \($0.failedStep)" })")
            let cancelled = Double(report.sessions.filter { $0.result == "cancelled" }.count)
            let fw1 = try Self.metrics(lab, "fw1")
            #expect(fw1.value("dysco_migrations_total", ["role": "controller", "result": "cancelled"]) == cancelled)
            #expect(fw1.value("dysco_migrations_total", ["role": "controller", "result": "success"]) == 0)
            for phase in AgentMetricCatalog.phases {
                #expect(fw1.value("dysco_migration_phase_duration_seconds_count", ["phase": phase]) == 0, "phase \(phase)")
            }
            let client = try Self.metrics(lab, "client1")
            #expect(client.value("dysco_migrations_total", ["role": "left_anchor", "result": "cancelled"]) == cancelled)
            #expect(client.value("dysco_anchor_buffer_packets") == 0)
            #expect(try Self.metrics(lab, "fw2").value("dysco_migrations_total", ["role": "controller", "result": "cancelled"]) == 0)

            #expect(downloads.wait(), "curl failed")
            #expect(try MigrationLab.allIntact(downloads.outputs, original: "\(lab.httpRoot)/blob").isEmpty)
        }
    }

    @Test("--metrics on a port in use: the agent exits with a clear error before it is ready; a bad value is a usage error")
    func portInUseAndBadValue() async throws {
        let spec = LabSpec(name: "mx2", middleboxes: ["fw1"], subnet: "10.79.2.0/24",
                           agentArguments: ["--metrics", "127.0.0.1:\(Self.port)"])
        try await TestSupport.withLab(spec) { lab in
            _ = try Self.metrics(lab, "fw1")
            try lab.killAgent("fw1", signal: SIGTERM)
            let holder = try lab.spawn("fw1", ["python3", "-c", """
                import socket, time
                s = socket.socket(); s.bind(("127.0.0.1", \(Self.port))); s.listen(); time.sleep(30)
                """])
            defer { holder.terminate() }
            var listening = false
            for _ in 0..<50 where !listening {
                listening = ProcessInspector.listeningTCPPorts(pid: holder.processIdentifier).contains(UInt16(Self.port))
                if !listening { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(listening, "the port holder did not listen")
            let error = #expect(throws: LabError.self) { try lab.restartAgent("fw1") }
            let text = "\(error.map { "\($0)" } ?? "")"
            #expect(text.contains("cannot serve metrics on 127.0.0.1:\(Self.port)") && text.contains("address in use"), "\(text)")
            // The failed agent left no rules behind.
            let rules = try lab.exec("fw1", ["iptables-save", "-t", "raw"]).stdout
            #expect(!rules.contains("DYSCO"), "\(rules)")
        }
        for bad in ["9464", "127.0.0.1:70000", "fw1:9464"] {
            let result = try Command.run([try TestSupport.dyscoBinary(), "agent", "--metrics", bad, "--trust-key", "/nonexistent"],
                                         check: false)
            #expect(result.status != 0)
            #expect(result.stderr.contains("--metrics:"), "\(bad): \(result.stderr)")
        }
    }
}
