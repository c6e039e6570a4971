import DyscoCore
import DyscoAgent
@testable import DyscoLab
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The lab's pure parts: address plan, spec validation, iptables counter parsing (no root needed).
@Suite struct LabUnitTests {
    @Test func addressPlan() throws {
        let spec = LabSpec(name: "u1", clients: 2, servers: 3, middleboxes: ["fw1", "ids", "fw2"],
                           subnet: "10.9.8.0/24")
        let plan = try spec.plan()
        #expect(plan.switchNamespace == "u1-sw")
        #expect(plan.hosts.map(\.name) == ["client1", "client2", "fw1", "ids", "fw2", "server1", "server2", "server3"])
        #expect(plan.hosts.map(\.address.description) == [
            "10.9.8.11", "10.9.8.12", "10.9.8.101", "10.9.8.102", "10.9.8.103", "10.9.8.201", "10.9.8.202", "10.9.8.203",
        ])
        #expect(plan.host("ids")?.namespace == "u1-ids")
        #expect(plan.host("ids")?.role == .middlebox)
        #expect(plan.host("client2")?.switchPort == "client2")
        #expect(plan.host("server3")?.interface == "eth0")
        #expect(plan.chain == ["fw1"])
        #expect(plan.namespaces.first == "u1-sw")
        #expect(plan.namespaces.count == 9)
        // Limits: 20 clients → .30, 20 servers → .220.
        let big = try LabSpec(name: "u2", clients: 20, servers: 20).plan()
        #expect(big.host("client20")?.address.description == "10.77.0.30")
        #expect(big.host("server20")?.address.description == "10.77.0.220")
    }

    @Test func chainChoices() throws {
        #expect(try LabSpec(name: "u", chain: ["fw2", "fw1"]).plan().chain == ["fw2", "fw1"])
        #expect(try LabSpec(name: "u", chain: []).plan().chain == [])
        #expect(try LabSpec(name: "u", middleboxes: []).plan().chain == [])
    }

    @Test(arguments: ["10.77.0.0/24", "10.0.0.0/24", "10.255.1.0/24"])
    func acceptedSubnets(_ text: String) throws {
        let prefix = try LabSpec.parseSubnet(text)
        #expect(prefix.description == text)
    }

    @Test(arguments: ["192.168.1.0/24", "172.16.0.0/24", "10.1.0.0/16", "10.1.2.5/24", "10.1.2.0", "garbage", "10.1.2.0/25"])
    func rejectedSubnets(_ text: String) {
        #expect(throws: LabError.self) { try LabSpec.parseSubnet(text) }
        #expect(throws: LabError.self) { try LabSpec(name: "u", subnet: text).validate() }
    }

    @Test func nameValidation() {
        for good in ["demo", "lt1", "a", "abc-def", "A1-b2", "twelve-chars"] {
            #expect(LabSpec.isValidLabName(good), "\(good)")
        }
        for bad in ["", "thirteenchars", "-a", "a-", "a--b", "a_b", "a.b", "a b", "ü"] {
            #expect(!LabSpec.isValidLabName(bad), "\(bad)")
        }
        for good in ["fw1", "ids", "nat", "a", "fw12345z"] { #expect(LabSpec.isValidMiddleboxName(good), "\(good)") }
        for bad in ["", "1fw", "Fw1", "fw-1", "toolongxx", "sw", "client1", "server12", "client", "server"] {
            #expect(!LabSpec.isValidMiddleboxName(bad), "\(bad)")
        }
        // Names that merely start like the reserved ones are fine.
        #expect(LabSpec.isValidMiddleboxName("clientx"))
    }

    @Test func specValidation() throws {
        try LabSpec(name: "ok").validate()
        try LabSpec(name: "ok", agents: false, routeViaMiddlebox: "fw1").validate()
        let bad: [LabSpec] = [
            LabSpec(name: "bad_name"),
            LabSpec(name: "x", clients: 0),
            LabSpec(name: "x", clients: 21),
            LabSpec(name: "x", servers: 0),
            LabSpec(name: "x", servers: 21),
            LabSpec(name: "x", middleboxes: ["fw1", "fw1"]),
            LabSpec(name: "x", middleboxes: ["FW1"]),
            LabSpec(name: "x", middleboxes: ["fw1"], chain: ["fw2"]),
            LabSpec(name: "x", middleboxes: ["fw1", "fw2"], chain: ["fw1", "fw1"]),
            LabSpec(name: "x", policyPorts: []),
            LabSpec(name: "x", policyPorts: [0]),
            LabSpec(name: "x", agents: true, routeViaMiddlebox: "fw1"),
            LabSpec(name: "x", agents: false, routeViaMiddlebox: "fw9"),
            LabSpec(name: "x", middleboxes: (1...21).map { "m\($0)" }),
        ]
        for spec in bad {
            #expect(throws: LabError.self, "\(spec)") { try spec.validate() }
        }
        // No policy needs no ports.
        try LabSpec(name: "x", chain: [], policyPorts: []).validate()
    }

    @Test func agentConfigs() throws {
        let spec = LabSpec(name: "u3", clients: 1, servers: 2, middleboxes: ["fw1", "fw2"], chain: ["fw1", "fw2"],
                           subnet: "10.5.5.0/24", policyPorts: [80, 443])
        let plan = try spec.plan()
        let state = LabState(version: 1, name: "u3", phase: .ready, createdAt: Date(), subnet: plan.subnet,
                             switchNamespace: plan.switchNamespace, hosts: plan.hosts, chain: plan.chain,
                             policyPorts: spec.policyPorts, agents: true, agentBinary: "/bin/true",
                             agentArguments: [], routeViaMiddlebox: nil, httpRoot: "/tmp", processes: [])
        let client = Lab.agentConfig(for: plan.host("client1")!, in: state)
        try client.validate()
        #expect(client.policies.count == 2)
        #expect(client.policies[0].chain.map(\.description) == ["10.5.5.101", "10.5.5.102"])
        #expect(client.policies[0].match.dst?.description == "10.5.5.201/32")
        #expect(client.policies[1].match.dst?.description == "10.5.5.202/32")
        #expect(client.policies[0].match.src?.description == "10.5.5.0/24")
        #expect(client.policies[0].match.dport == [PortRange(lower: 80, upper: 80), PortRange(lower: 443, upper: 443)])
        let tuple = FiveTuple(srcAddr: IPAddress("10.5.5.11")!, srcPort: 40000,
                              dstAddr: IPAddress("10.5.5.202")!, dstPort: 443)
        #expect(client.policy(for: tuple)?.name == "lab-default-server2")
        #expect(client.policy(for: FiveTuple(srcAddr: tuple.srcAddr, srcPort: 1, dstAddr: tuple.dstAddr, dstPort: 8080)) == nil)
        #expect(Lab.agentConfig(for: plan.host("fw1")!, in: state).policies.isEmpty)
        #expect(Lab.agentConfig(for: plan.host("server1")!, in: state).policies.isEmpty)
        // A box of the chain that publishes a server (dnat): sessions to its own address take the chain too.
        var published = state
        published.firewallProfiles = ["fw1": .dnat]
        let toBox = Lab.agentConfig(for: plan.host("client1")!, in: published)
        #expect(toBox.policies.count == 3)
        #expect(toBox.policies[2].match.dst?.description == "10.5.5.101/32")
        #expect(toBox.policies[2].chain == client.policies[0].chain)
        var noChain = state
        noChain.chain = []
        #expect(Lab.agentConfig(for: plan.host("client1")!, in: noChain).policies.isEmpty)
        // The JSON round-trips through the agent's own loader format.
        let data = try JSONEncoder().encode(client)
        #expect(try JSONDecoder().decode(AgentConfig.self, from: data) == client)
    }

    /// Real output of iptables 1.8.9 (nf_tables) for the lab's rules, without comments.
    static let plainOutput = """
        Chain FORWARD (policy DROP 7 packets, 420 bytes)
            pkts      bytes target     prot opt in     out     source               destination
               3      156 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate INVALID
           57049 2717394034 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate RELATED,ESTABLISHED
               4      240 ACCEPT     6    --  *      *       10.77.0.0/24         10.77.0.0/24         tcp flags:0x17/0x02 ctstate NEW
        """

    @Test func parsesPlainCounters() throws {
        let c = try FirewallCounters.parse(Self.plainOutput)
        #expect(c.policy == "DROP")
        #expect(c.policyDropped == PacketCounter(packets: 7, bytes: 420))
        #expect(c.invalidDropped == PacketCounter(packets: 3, bytes: 156))
        #expect(c.establishedAccepted == PacketCounter(packets: 57049, bytes: 2_717_394_034))
        #expect(c.newAccepted == PacketCounter(packets: 4, bytes: 240))
        #expect(c.rules.count == 3)
        #expect(c.totalDropped == 10)
    }

    @Test func parsesCommentedCountersInAnyOrder() throws {
        let output = """
            Chain FORWARD (policy ACCEPT 1 packets, 60 bytes)
                pkts      bytes target     prot opt in     out     source               destination
                   9      900 ACCEPT     6    --  *      *       10.1.0.0/24          10.1.0.0/24          tcp flags:0x17/0x02 ctstate NEW /* dysco-lab:new-syn */
                   2      100 LOG        0    --  *      *       0.0.0.0/0            0.0.0.0/0            LOG flags 0 level 4
                   5      500 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate RELATED,ESTABLISHED /* dysco-lab:established */
                   1       52 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate INVALID /* dysco-lab:invalid */
            """
        let c = try FirewallCounters.parse(output)
        #expect(c.policy == "ACCEPT")
        #expect(c.policyDropped.packets == 1)
        #expect(c.newAccepted == PacketCounter(packets: 9, bytes: 900))
        #expect(c.establishedAccepted == PacketCounter(packets: 5, bytes: 500))
        #expect(c.invalidDropped == PacketCounter(packets: 1, bytes: 52))
        #expect(c.rules.count == 4)
        #expect(c.rules[1].target == "LOG")
        #expect(c.totalDropped == 1) // policy ACCEPT: its counter is not drops
    }

    @Test func rejectsOutputWithoutChainHeader() {
        #expect(throws: FirewallCounters.ParseError.self) { try FirewallCounters.parse("iptables: No chain/target/match by that name.") }
    }

    @Test func installCommandsMatchTheDesign() {
        let cmds = FirewallCounters.installCommands(subnet: "10.7.0.0/24")
        #expect(cmds.count == 4)
        #expect(cmds[0] == ["-t", "filter", "-P", "FORWARD", "DROP"])
        #expect(cmds[1].contains("INVALID") && cmds[1].last == "DROP")
        #expect(cmds[2].contains("ESTABLISHED,RELATED") && cmds[2].last == "ACCEPT")
        #expect(cmds[3].contains("--syn") && cmds[3].contains("NEW") && cmds[3].filter { $0 == "10.7.0.0/24" }.count == 2)
    }

    @Test func fallbackNamespaceSelection() {
        let existing = ["lab-sw", "lab-client1", "lab-client12", "lab-server3", "lab-fw1", "lab-ids",
                        "lab-clientx", "lab-other-thing", "lab2-client1", "lab-sw2", "lab-client", "lab-Fw1", "lab-fw2"]
        let (certain, uncertain) = LabDownReport.fallbackNamespaces(
            lab: "lab", existing: existing, claimedByOtherLabs: ["lab-fw2"])
        #expect(certain == ["lab-sw", "lab-client1", "lab-client12", "lab-server3"])
        #expect(uncertain == ["lab-fw1", "lab-ids", "lab-clientx", "lab-sw2"])
    }

    @Test func listeningPortsFromProcNet() {
        let text = """
              sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
               0: C9004D0A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
               1: C9004D0A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
               2: C9004D0A:1451 0B004D0A:A0F2 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
            """
        #expect(ProcessInspector.parseListeningPorts(text) == [80, 8080])
    }

    @Test func stateRoundTrips() throws {
        let plan = try LabSpec(name: "u4").plan()
        let state = LabState(version: 1, name: "u4", phase: .creating, createdAt: Date(timeIntervalSince1970: 1_800_000_000),
                             subnet: plan.subnet, switchNamespace: plan.switchNamespace, hosts: plan.hosts,
                             chain: plan.chain, policyPorts: [80], agents: false, agentBinary: nil, agentArguments: ["-v"],
                             routeViaMiddlebox: "fw1", httpRoot: "/x",
                             processes: [LabProcessRecord(host: "server1", kind: .httpAlt, pid: 42, command: ["a"], log: nil)])
        let data = try LabState.encoder.encode(state)
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("\"http-alt\""))
        #expect(text.contains("\"10.77.0.0/24\""))
        let back = try LabState.decoder.decode(LabState.self, from: data)
        #expect(back.hosts == state.hosts)
        #expect(back.processes == state.processes)
        #expect(back.createdAt == state.createdAt)
        #expect(back.namespaces == plan.namespaces)
    }

    // MARK: - Firewall profiles, attackers, trust key, nstat

    @Test func firewallProfileAssignments() throws {
        #expect(try FirewallProfile.parseAssignments("fw2=strict,fw3=open") == ["fw2": .strict, "fw3": .open])
        #expect(try FirewallProfile.parseAssignments(" fw1 = open , ") == ["fw1": .open])
        #expect(try FirewallProfile.parseAssignments("").isEmpty)
        for bad in ["fw1", "fw1=", "=open", "fw1=stateless", "fw1=open,fw1=strict", "fw1=OPEN"] {
            #expect(throws: LabError.self, "\(bad)") { try FirewallProfile.parseAssignments(bad) }
        }
        // Codable as the raw string.
        let json = String(decoding: try JSONEncoder().encode(["fw3": FirewallProfile.open]), as: UTF8.self)
        #expect(json == #"{"fw3":"open"}"#)
        #expect(try JSONDecoder().decode(FirewallProfile.self, from: Data(#""strict""#.utf8)) == .strict)
        #expect(FirewallProfile.allCases.map(\.rawValue) == ["strict", "open", "snat", "dnat", "snat-shared"])
        #expect(try FirewallProfile.parseAssignments("fw1=snat,fw2=snat-shared") == ["fw1": .snat, "fw2": .snatShared])
        #expect(FirewallProfile.allCases.filter(\.translates) == [.snat, .dnat, .snatShared], "only the NAT'ing boxes run their agent with --nat")
        // The publishing box: the strict rules, then one DNAT per policy port from its address to the server's.
        let dnat = FirewallCounters.installCommands(subnet: "10.77.0.0/24", profile: .dnat,
                                                    published: (IPAddress("10.77.0.101")!, IPAddress("10.77.0.201")!, [80, 5201]))
        #expect(dnat.count == 6)
        #expect(dnat[4].joined(separator: " ").contains("-d 10.77.0.101 --dport 80") && dnat[4].last == "10.77.0.201:80")
        #expect(dnat[5].last == "10.77.0.201:5201")
        // The masquerading box: the strict rules, then MASQUERADE for what it forwards (not what it sends itself).
        let snat = FirewallCounters.installCommands(subnet: "10.77.0.0/24", profile: .snat)
        #expect(Array(snat.prefix(4)) == FirewallCounters.installCommands(subnet: "10.77.0.0/24"))
        #expect(snat.last?.contains("MASQUERADE") == true && snat.last?.contains("--src-type") == true)
        // The HA pair's box: the strict rules, then SNAT of what it forwards to the shared service address.
        let shared = FirewallCounters.installCommands(subnet: "10.77.0.0/24", profile: .snatShared, shared: IPAddress("10.77.0.254")!)
        #expect(Array(shared.prefix(4)) == FirewallCounters.installCommands(subnet: "10.77.0.0/24"))
        #expect(shared.count == 5 && shared.last?.suffix(3) == ["SNAT", "--to-source", "10.77.0.254"])
        #expect(shared.last?.contains("--src-type") == true)
    }

    @Test func firewallProfilesInTheSpec() throws {
        let spec = LabSpec(name: "u5", middleboxes: ["fw1", "fw2", "fw3"], chain: ["fw1", "fw3"],
                           firewallProfiles: ["fw3": .open])
        try spec.validate()
        #expect(spec.firewallProfile(of: "fw1") == .strict)
        #expect(spec.firewallProfile(of: "fw3") == .open)
        #expect(spec.effectiveFirewallProfiles == ["fw1": .strict, "fw2": .strict, "fw3": .open])
        #expect(try spec.plan().chain == ["fw1", "fw3"])
        #expect(LabSpec(name: "u5").effectiveFirewallProfiles == ["fw1": .strict, "fw2": .strict])
        // A profile for a host that is not a middlebox.
        #expect(throws: LabError.self) { try LabSpec(name: "u5", firewallProfiles: ["fw9": .open]).validate() }
        #expect(throws: LabError.self) { try LabSpec(name: "u5", firewallProfiles: ["client1": .open]).validate() }
    }

    @Test func openProfileCommands() {
        let open = FirewallCounters.installCommands(subnet: "10.7.0.0/24", profile: .open)
        #expect(open.count == 2)
        #expect(open[0] == ["-t", "filter", "-P", "FORWARD", "ACCEPT"])
        #expect(open[1].last == "ACCEPT" && open[1].contains("-A"))
        #expect(!open.joined().contains { $0.contains("conntrack") || $0.contains("ctstate") }, "no conntrack on an open box")
        #expect(FirewallCounters.installCommands(subnet: "10.7.0.0/24", profile: .strict)
                == FirewallCounters.installCommands(subnet: "10.7.0.0/24"))
    }

    /// Real output of iptables 1.8.9 (nf_tables) for the open profile's rule, with and without its comment.
    @Test func parsesOpenCounters() throws {
        let output = """
            Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)
                pkts      bytes target     prot opt in     out     source               destination
                1234  5678901 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0            /* dysco-lab:open */
            """
        let c = try FirewallCounters.parse(output)
        #expect(c.policy == "ACCEPT")
        #expect(c.openAccepted == PacketCounter(packets: 1234, bytes: 5_678_901))
        #expect(c.establishedAccepted.packets == 0 && c.newAccepted.packets == 0 && c.invalidDropped.packets == 0)
        #expect(c.totalDropped == 0)
        #expect(c.profile == .open)
        let plain = try FirewallCounters.parse("""
            Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)
                pkts      bytes target     prot opt in     out     source               destination
                   7      700 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0
            """)
        #expect(plain.openAccepted.packets == 7)
        #expect(plain.profile == .open)
        // The strict output is recognized as strict and has no open counter.
        let strict = try FirewallCounters.parse(Self.plainOutput)
        #expect(strict.profile == .strict)
        #expect(strict.openAccepted.packets == 0)
        // JSON without openAccepted (an older `lab status --json`) still decodes.
        var json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(strict)) as! [String: Any]
        json["openAccepted"] = nil
        let back = try JSONDecoder().decode(FirewallCounters.self, from: JSONSerialization.data(withJSONObject: json))
        #expect(back == strict)
    }

    @Test func attackerHosts() throws {
        let spec = LabSpec(name: "u6", clients: 2, servers: 1, middleboxes: ["fw1"], subnet: "10.9.7.0/24", attackers: 2)
        let plan = try spec.plan()
        #expect(plan.hosts.map(\.name) == ["client1", "client2", "attacker1", "attacker2", "fw1", "server1"])
        #expect(plan.host("attacker1")?.address.description == "10.9.7.51")
        #expect(plan.host("attacker2")?.address.description == "10.9.7.52")
        #expect(plan.host("attacker2")?.role == .attacker)
        #expect(plan.host("attacker1")?.namespace == "u6-attacker1")
        #expect(plan.hosts(.attacker).map(\.name) == ["attacker1", "attacker2"])
        #expect(plan.namespaces.count == 7)
        #expect(try LabSpec(name: "u6").plan().hosts(.attacker).isEmpty)
        // 20 attackers end at .70, below the middleboxes.
        #expect(try LabSpec(name: "u6", attackers: 20).plan().host("attacker20")?.address.description == "10.77.0.70")
        for bad in [LabSpec(name: "u6", attackers: -1), LabSpec(name: "u6", attackers: 21)] {
            #expect(throws: LabError.self) { try bad.validate() }
        }
        // "attacker" and "attackerN" are the lab's own names.
        #expect(!LabSpec.isValidMiddleboxName("attacker"))
        #expect(LabSpec.isValidMiddleboxName("attackx"))
        // Attackers get no policy (and run no agent).
        let state = LabState(version: 1, name: "u6", phase: .ready, createdAt: Date(), subnet: plan.subnet,
                             switchNamespace: plan.switchNamespace, hosts: plan.hosts, chain: plan.chain,
                             policyPorts: [80], agents: true, agentBinary: "/bin/true", agentArguments: [],
                             routeViaMiddlebox: nil, httpRoot: "/tmp", processes: [])
        #expect(Lab.agentConfig(for: plan.host("attacker1")!, in: state).policies.isEmpty)
        #expect(Lab.agentConfig(for: plan.host("client1")!, in: state).policies.count == 1)
        // Without lab.json, attacker namespaces are surely the lab's.
        let (certain, uncertain) = LabDownReport.fallbackNamespaces(
            lab: "u6", existing: ["u6-attacker1", "u6-attacker12", "u6-attacker", "u6-attackerx"], claimedByOtherLabs: [])
        #expect(certain == ["u6-attacker1", "u6-attacker12"])
        #expect(uncertain.isEmpty)
    }

    @Test func trustKeyArguments() {
        #expect(Lab.trustKeyArguments("/run/k", overriddenBy: []) == ["--trust-key", "/run/k"])
        #expect(Lab.trustKeyArguments("/run/k", overriddenBy: ["--no-fastpath"]) == ["--trust-key", "/run/k"])
        #expect(Lab.trustKeyArguments(nil, overriddenBy: []) == [])
        #expect(Lab.trustKeyArguments("/run/k", overriddenBy: ["--trust-key", "/x"]) == [])
        #expect(Lab.trustKeyArguments("/run/k", overriddenBy: ["--trust-key=/x"]) == [])
        #expect(LabPaths.trustKey("demo") == LabPaths.directory("demo") + "/trust.key")
        #expect(LabSpec(name: "u7").passTrustKey && !LabSpec(name: "u7", passTrustKey: false).passTrustKey)
    }

    @Test func writesTrustKeys() throws {
        let path = NSTemporaryDirectory() + "lab-unit-trust-\(getpid()).key"
        unlink(path)
        defer { unlink(path) }
        try Lab.writeTrustKey(path)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        let key = try TrustKey.load(path: path)
        #expect(key.bytes.count == 32)
        // Never overwrites.
        #expect(throws: LabError.self) { try Lab.writeTrustKey(path) }
        #expect(try TrustKey.load(path: path) == key)
    }

    @Test func parsesNstat() {
        let output = """
            #kernel
            TcpRetransSegs                  17                 0.0
            TcpActiveOpens                  0                  0.0
            """
        #expect(Lab.parseNstat(output) == ["TcpRetransSegs": 17, "TcpActiveOpens": 0])
        #expect(Lab.parseNstat("#kernel\n").isEmpty)
    }

    @Test func stateWithProfilesAndOlderStateFiles() throws {
        let plan = try LabSpec(name: "u7", attackers: 1).plan()
        let state = LabState(version: 1, name: "u7", phase: .ready, createdAt: Date(timeIntervalSince1970: 1_800_000_000),
                             subnet: plan.subnet, switchNamespace: plan.switchNamespace, hosts: plan.hosts,
                             chain: plan.chain, policyPorts: [80], agents: true, agentBinary: "/bin/true",
                             agentArguments: [], routeViaMiddlebox: nil, httpRoot: "/x", processes: [],
                             firewallProfiles: ["fw1": .strict, "fw2": .open], trustKeyPath: "/run/k")
        let data = try LabState.encoder.encode(state)
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains(#""fw2" : "open""#))
        #expect(text.contains(#""role" : "attacker""#))
        let back = try LabState.decoder.decode(LabState.self, from: data)
        #expect(back.firewallProfiles == state.firewallProfiles)
        #expect(back.firewallProfile(of: "fw2") == .open)
        #expect(back.trustKeyPath == "/run/k")
        #expect(back.hosts == state.hosts)
        // A lab.json written before profiles and trust keys existed.
        var json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        json["firewallProfiles"] = nil
        json["trustKeyPath"] = nil
        let old = try LabState.decoder.decode(LabState.self, from: JSONSerialization.data(withJSONObject: json))
        #expect(old.firewallProfiles.isEmpty && old.firewallProfile(of: "fw2") == .strict)
        #expect(old.trustKeyPath == nil)
    }
}

@Suite("dual-stack lab (--ipv6, issue 18)") struct DualStackLabTests {
    @Test("IPv6 addresses follow the IPv4 plan (fd00:0:A:B::C for 10.A.B.C); the client's config gets an IPv6 policy per server through the chain's IPv6 addresses; the NAT profiles translate IPv6 (ip6tables)")
    func plan() throws {
        let spec = LabSpec(name: "ds", middleboxes: ["fw1", "fw2"], chain: ["fw1", "fw2"], subnet: "10.78.151.0/24", ipv6: true)
        let plan = try spec.plan()
        var state = LabState(version: 1, name: "ds", phase: .ready, createdAt: Date(), subnet: plan.subnet,
                             switchNamespace: plan.switchNamespace, hosts: plan.hosts, chain: plan.chain, policyPorts: [80],
                             agents: true, agentBinary: nil, agentArguments: [], routeViaMiddlebox: nil, httpRoot: "/x",
                             processes: [], ipv6: true)
        #expect(state.ipv6Address(of: plan.host("server1")!) == IPAddress("fd00:0:4e:97::c9"))
        #expect(state.ipv6Address(of: plan.host("fw2")!)?.description == "fd00:0:4e:97::66")
        let config = Lab.agentConfig(for: plan.host("client1")!, in: state)
        let v6 = try #require(config.policies.first { $0.name == "lab-default-server1-ipv6" })
        #expect(v6.chain == [IPAddress("fd00:0:4e:97::65")!, IPAddress("fd00:0:4e:97::66")!])
        try config.validate()
        let session6 = FiveTuple(parsing: "[fd00:0:4e:97::b]:40000->[fd00:0:4e:97::c9]:80")!
        #expect(config.policy(for: session6)?.name == "lab-default-server1-ipv6")
        // Only to the server: an IPv6 session to another lab host's port 80 (a box's address) takes no policy, as in IPv4.
        #expect(config.policy(for: FiveTuple(parsing: "[fd00:0:4e:97::b]:40000->[fd00:0:4e:97::65]:80")!) == nil)
        #expect(config.policy(for: FiveTuple(parsing: "10.78.151.11:40000->10.78.151.101:80")!) == nil)
        #expect(config.policy(for: FiveTuple(parsing: "10.78.151.11:40000->10.78.151.201:80")!)?.name == "lab-default-server1")
        // lab.json of an older version (no "ipv6"): IPv4 only.
        let data = try JSONEncoder().encode(state)
        var object = try #require(JSONSerialization.jsonObject(with: data) as? [String: Any])
        object["ipv6"] = nil
        state = try JSONDecoder().decode(LabState.self, from: JSONSerialization.data(withJSONObject: object))
        #expect(!state.ipv6 && state.ipv6Address(of: plan.host("server1")!) == nil)
        // The NAT profiles translate IPv6 too: ip6tables NAT with the IPv6 addresses (a DNAT target in brackets), and a
        // box that publishes the server gets an IPv6 client policy to its address.
        try LabSpec(name: "ds", middleboxes: ["fw1"], firewallProfiles: ["fw1": .snat], ipv6: true).validate()
        let dnat6 = FirewallCounters.installCommands(subnet: "fd00:0:4e:97::/64", profile: .dnat,
                                                     published: (box: IPAddress("fd00:0:4e:97::65")!, server: IPAddress("fd00:0:4e:97::c9")!, ports: [80]))
        #expect(dnat6.contains { $0.contains("[fd00:0:4e:97::c9]:80") && $0.contains("fd00:0:4e:97::65") }, "\(dnat6)")
        state.ipv6 = true
        state.firewallProfiles = ["fw1": .dnat]
        let published = Lab.agentConfig(for: plan.host("client1")!, in: state)
        #expect(published.policy(for: FiveTuple(parsing: "[fd00:0:4e:97::b]:40000->[fd00:0:4e:97::65]:80")!)?.name == "lab-published-fw1-ipv6")
        #expect(state.sharedServiceAddressIPv6 == IPAddress("fd00:0:4e:97::fe"))
    }

    @Test("a policy chain mixing families is refused with the reason")
    func mixedChain() {
        let config = AgentConfig(policies: [Policy(name: "p", match: SessionPredicate(), chain: [IPAddress("fd00::1")!, IPAddress(10, 0, 0, 1)])])
        let error = #expect(throws: AgentConfig.ValidationError.self) { try config.validate() }
        #expect(error.map { "\($0)" }?.contains("10.0.0.1 is not of the chain's first hop's family") == true)
    }

    @Test("a request naming the boxes in both families: each session takes its own family's boxes; one naming none of a session's family refuses it rather than delete its old box")
    func requestPerFamily() throws {
        let fw2 = IPAddress(10, 0, 0, 102), fw26 = IPAddress("fd00::66")!
        let both = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [fw2, fw26], mode: .stateful, deadlineMilliseconds: 3000)
        #expect(both.forFamily(ipv4: true)?.newBoxes == [fw2] && both.forFamily(ipv4: false)?.newBoxes == [fw26])
        let v4only = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [fw2], mode: .stateful, deadlineMilliseconds: 3000)
        #expect(v4only.forFamily(ipv4: true)?.newBoxes == [fw2])
        #expect(v4only.forFamily(ipv4: false) == nil, "an IPv6 session would lose its box with no replacement")
        let removal = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [], mode: .held, deadlineMilliseconds: 3000)
        #expect(removal.forFamily(ipv4: false)?.newBoxes == [], "a removal applies to both")
        let donor = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [fw2, fw26], mode: .stateful, deadlineMilliseconds: 3000,
                                   donor: IPAddress(10, 0, 0, 101))
        #expect(donor.forFamily(ipv4: false) == nil && donor.forFamily(ipv4: true)?.donor == IPAddress(10, 0, 0, 101))
        // A dual-stack donor and old boxes named in both families (insert --state-from, k → m, with --lab).
        let fw1 = IPAddress(10, 0, 0, 101), fw16 = IPAddress("fd00::65")!, fw3 = IPAddress(10, 0, 0, 103), fw36 = IPAddress("fd00::67")!
        let dual = ReplaceRequest(predicate: SessionPredicate(), newBoxes: [fw2, fw26], mode: .stateful, deadlineMilliseconds: 3000,
                                  alsoOld: [fw3, fw36], donor: fw1, alsoDonor: fw16)
        let v4 = try #require(dual.forFamily(ipv4: true)), v6 = try #require(dual.forFamily(ipv4: false))
        #expect(v4.donor == fw1 && v4.alsoOld == [fw3] && v4.newBoxes == [fw2] && v4.alsoDonor == nil)
        #expect(v6.donor == fw16 && v6.alsoOld == [fw36] && v6.newBoxes == [fw26] && v6.alsoDonor == nil)
    }
}
