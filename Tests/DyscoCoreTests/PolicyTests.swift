import DyscoCore
import Foundation
import Testing

@Suite("Agent configuration and policies (paper §2.2: predicate → middlebox list)")
struct PolicyTests {
    func decode(_ json: String) throws -> AgentConfig {
        try JSONDecoder().decode(AgentConfig.self, from: Data(json.utf8))
    }

    @Test("a config round-trips and its first matching policy decides the chain")
    func matching() throws {
        let config = try decode("""
            {"version": 1, "policies": [
              {"name": "web", "match": {"src": "10.77.0.0/24", "dst": "10.77.0.201/32", "dport": [80, "8000-8080"]},
               "chain": ["10.77.0.101", "10.77.0.102"]},
              {"name": "any", "match": {}, "chain": ["10.77.0.103"]}]}
            """)
        try config.validate()
        let web = FiveTuple.t("10.77.0.10", 40000, "10.77.0.201", 8042)
        #expect(config.policy(for: web)?.name == "web")
        #expect(config.policy(for: web)?.chain == [IPAddress("10.77.0.101")!, IPAddress("10.77.0.102")!])
        #expect(config.policy(for: .t("10.77.0.10", 40000, "10.77.0.201", 22))?.name == "any")
        #expect(config.policy(for: .t("10.9.0.10", 40000, "10.77.0.201", 80))?.name == "any")
        let again = try JSONDecoder().decode(AgentConfig.self, from: JSONEncoder().encode(config))
        #expect(again == config)
    }

    @Test("an empty chain is a session the agents carry straight to its right end (a proxy there can splice itself out, §4)")
    func emptyChain() throws {
        let config = try JSONDecoder().decode(AgentConfig.self, from: Data(#"{"version": 1, "policies": [{"name": "p", "match": {}, "chain": []}]}"#.utf8))
        try config.validate()
        var p = PacketProcessor(config: config, portRange: 20000...20010, trust: TestKeys.group)
        let session = FiveTuple.t("10.0.0.1", 40000, "10.0.0.9", 8080)
        let id = try p.table.insertLeftEnd(session: session, hops: [session.dstAddr], now: 0)
        #expect(p.table.records[id]?.right?.dstAddr == session.dstAddr && p.table.records[id]?.remaining == [])
    }

    @Test("bad configs are refused with the reason", arguments: [
        (#"{"version": 2, "policies": []}"#, "version 2"),
        (#"{"version": 1, "policies": [{"name": "p", "match": {}, "chain": ["10.0.0.1", "10.0.0.1"]}]}"#, "appears twice"),
        (#"{"version": 1, "policies": [{"name": "p", "match": {}, "chain": ["10.0.0.1", "127.0.0.1"]}]}"#, "127.0.0.1 cannot be a middlebox"),
        (#"{"version": 1, "policies": [{"name": "p", "match": {}, "chain": ["224.0.0.1"]}]}"#, "224.0.0.1 cannot be a middlebox"),
        (#"{"version": 1, "policies": [{"name": "p", "match": {}, "chain": ["255.255.255.255"]}]}"#, "cannot be a middlebox"),
    ])
    func invalid(json: String, reason: String) throws {
        let config = try decode(json)
        #expect(throws: AgentConfig.ValidationError.self) { try config.validate() }
        do { try config.validate() } catch { #expect("\(error)".contains(reason)) }
    }

    @Test("a cordon naming loopback, multicast, broadcast or unspecified addresses is refused (issue 9)",
          arguments: ["127.0.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0"])
    func forbiddenCordon(text: String) throws {
        let bad = try #require(IPAddress(text))
        let box = try #require(IPAddress("10.77.0.101"))
        var cordons = Cordons()
        #expect(throws: Cordons.CordonError.forbiddenAddress(bad)) { try cordons.cordon(box, replacements: [bad]) }
        #expect(throws: Cordons.CordonError.forbiddenAddress(bad)) { try cordons.cordon(bad, replacements: [box]) }
        #expect(cordons.cordons.isEmpty)
    }

    @Test("malformed addresses, prefixes and port ranges fail to decode, naming the value")
    func malformed() {
        for json in [#"{"version":1,"policies":[{"name":"p","match":{"dst":"10.0.0.300/32"},"chain":["10.0.0.1"]}]}"#,
                     #"{"version":1,"policies":[{"name":"p","match":{"dport":["90-80"]},"chain":["10.0.0.1"]}]}"#,
                     #"{"version":1,"policies":[{"name":"p","match":{},"chain":["fw1"]}]}"#] {
            #expect(throws: DecodingError.self) { try decode(json) }
        }
        #expect(IPPrefix("10.1.2.3/24")?.description == "10.1.2.0/24")
        #expect(IPAddress("1.2.3") == nil && IPAddress("01.2.3.4444") == nil)
        #expect(PortRange("any") == .any && PortRange("5-4") == nil)
    }
}
