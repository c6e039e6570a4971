import DyscoCore
import Testing

@Suite("Agent metrics: names, labels, the mapping of the agent's counters, --metrics ADDR:PORT")
struct AgentMetricCatalogTests {
    @Test("label values are lower snake case", arguments: [
        ("newPathSyn", "new_path_syn"), ("triggerResult", "trigger_result"), ("bad-mac", "bad_mac"),
        ("window-updates", "window_updates"), ("unknown-numbers", "unknown_numbers"), ("trigger", "trigger"),
        ("oldPathFinAck", "old_path_fin_ack"), ("too-long", "too_long"), ("a--b-", "a_b"),
    ])
    func snakeCase(input: String, expected: String) {
        #expect(AgentMetricCatalog.snakeCase(input) == expected)
    }

    @Test("every family's name is a valid Prometheus name with the dysco_ prefix, counters end in _total, names are unique")
    func familyNames() {
        let names = AgentMetricCatalog.families.map(\.name)
        #expect(Set(names).count == names.count)
        for family in AgentMetricCatalog.families {
            #expect(family.name.hasPrefix("dysco_"))
            #expect(family.name.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "_") }, "\(family.name)")
            #expect((family.kind == .counter) == family.name.hasSuffix("_total"), "\(family.name)")
            #expect(!family.help.isEmpty && !family.help.contains("\n"))
        }
        #expect(AgentMetricCatalog.phaseBuckets == AgentMetricCatalog.phaseBuckets.sorted())
    }

    @Test("samples carry the counters under their families' label names, one series per label set")
    func samplesMapCounters() throws {
        var counters = DataplaneCounters()
        counters.count(.accept)
        counters.count(.acceptModified(length: 60))
        counters.count(.acceptModified(length: 60))
        counters.count(.drop)
        counters.count(.hold(chainID: 7))
        counters.trailerBadMAC = 3
        counters.fastPathInstalls = 5
        counters.sessionsCreated = 9
        let readings = AgentMetricCatalog.Readings(
            counters: counters, sessions: 4, anchoring: 1,
            control: ["sent.newPathSyn": 2, "received.ackLock": 6, "dropped.bad-mac": 11, "migrations.moved": 1,
                      "pokes.sent": 8, "something.else": 1],
            fastPathPackets: 1000, bufferPackets: 12, bufferBytes: 18000, bufferRefused: 2, uptimeSeconds: 3.5)
        let samples = AgentMetricCatalog.samples(readings)
        func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
            let found = samples.filter { $0.name == name && Dictionary(uniqueKeysWithValues: $0.labels.map { ($0.name, $0.value) }) == labels }
            return found.count == 1 ? found[0].value : nil
        }
        #expect(value("dysco_packets_total", ["path": "slow", "verdict": "accept"]) == 1)
        #expect(value("dysco_packets_total", ["path": "slow", "verdict": "accept_modified"]) == 2)
        #expect(value("dysco_packets_total", ["path": "slow", "verdict": "drop"]) == 1)
        #expect(value("dysco_packets_total", ["path": "slow", "verdict": "hold"]) == 1)
        #expect(value("dysco_packets_total", ["path": "fast", "verdict": "accept_modified"]) == 1000)
        #expect(value("dysco_syn_dropped_total", ["reason": "trailer_bad_mac"]) == 3)
        #expect(value("dysco_sessions") == 4)
        #expect(value("dysco_sessions_anchoring") == 1)
        #expect(value("dysco_sessions_created_total") == 9)
        #expect(value("dysco_fastpath_installs_total") == 5)
        #expect(value("dysco_control_messages_total", ["direction": "sent", "type": "new_path_syn"]) == 2)
        #expect(value("dysco_control_messages_total", ["direction": "received", "type": "ack_lock"]) == 6)
        // Known series are there at zero before they move.
        #expect(value("dysco_control_messages_total", ["direction": "received", "type": "trigger"]) == 0)
        #expect(value("dysco_control_dropped_total", ["reason": "bad_mac"]) == 11)
        #expect(value("dysco_control_dropped_total", ["reason": "wrong_nonce"]) == 0)
        #expect(value("dysco_anchor_packets_total", ["kind": "pokes", "result": "sent"]) == 8)
        #expect(value("dysco_anchor_buffer_packets") == 12)
        #expect(value("dysco_anchor_buffer_bytes") == 18000)
        #expect(value("dysco_anchor_buffer_refused_total") == 2)
        #expect(value("dysco_agent_uptime_seconds") == 3.5)
        // migrations.* has its own event-time metric; unknown names are left out.
        #expect(!samples.contains { $0.labels.contains { $0.value.contains("migrations") || $0.value.contains("else") } })

        for sample in samples {
            let family = try #require(AgentMetricCatalog.family(sample.name), "\(sample.name) has no family")
            #expect(sample.labels.map(\.name) == family.labelNames, "\(sample.name) \(sample.labels)")
        }
        let keys = samples.map { "\($0.name)\($0.labels)" }
        #expect(Set(keys).count == keys.count, "a series appears twice")
    }

    @Test("control counter names: sent/received/dropped/anchor packets map, the rest is nil")
    func controlSample() {
        #expect(AgentMetricCatalog.controlSample(key: "received.triggerResult", value: 1)
                == .init("dysco_control_messages_total", [.init("direction", "received"), .init("type", "trigger_result")], 1))
        #expect(AgentMetricCatalog.controlSample(key: "window-updates.unknown-numbers", value: 4)
                == .init("dysco_anchor_packets_total", [.init("kind", "window_updates"), .init("result", "unknown_numbers")], 4))
        for key in ["migrations.moved", "sent", "sent.", ".x", "reopened", ""] {
            #expect(AgentMetricCatalog.controlSample(key: key, value: 1) == nil, "\(key)")
        }
    }

    @Test("migration outcomes map to success / cancelled / failed")
    func migrationResults() {
        #expect(AgentMetricCatalog.migrationResult(.moved) == "success")
        #expect(AgentMetricCatalog.migrationResult(.cancelled) == "cancelled")
        #expect(AgentMetricCatalog.migrationResult(.refused) == "failed")
        #expect(AgentMetricCatalog.phases.count == Set(AgentMetricCatalog.phases).count)
    }

    @Test("--metrics ADDR:PORT parses", arguments: [
        ("127.0.0.1:9464", "127.0.0.1:9464"), ("0.0.0.0:1", "0.0.0.0:1"), ("localhost:65535", "127.0.0.1:65535"),
        ("10.79.1.101:9100", "10.79.1.101:9100"),
    ])
    func endpointParses(text: String, expected: String) throws {
        #expect(try MetricsEndpoint.parse(text).description == expected)
    }

    @Test("--metrics rejects what is not ADDR:PORT, with the reason", arguments: [
        ("9464", MetricsEndpoint.ParseError.missingPort("9464")), ("127.0.0.1:", .missingPort("127.0.0.1:")),
        ("127.0.0.1:0", .badPort("0")), ("127.0.0.1:65536", .badPort("65536")), ("127.0.0.1:-1", .badPort("-1")),
        ("127.0.0.1:94a", .badPort("94a")), ("127.0.0.1:+80", .badPort("+80")), ("1.2.3:80", .badAddress("1.2.3")),
        ("256.1.1.1:80", .badAddress("256.1.1.1")), ("example.org:80", .badAddress("example.org")),
        (":9464", .badAddress("")), ("[::1]:9464", .badAddress("[::1]")),
    ])
    func endpointRejects(text: String, expected: MetricsEndpoint.ParseError) {
        #expect(throws: expected) { try MetricsEndpoint.parse(text) }
        #expect(!expected.description.isEmpty)
    }
}
