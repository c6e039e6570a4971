import ArgumentParser
import DyscoLab
import Foundation
import Logging

/// `dysco-migrate lab up|down|status` (and the demo's hidden `lab paced-server`): a test lab of network namespaces (see `DyscoLab.Lab`).
struct LabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Build, inspect and tear down a test lab of network namespaces.",
        discussion: """
            A lab NAME is a set of network namespaces on one L2 segment (a bridge in NAME-sw):

              NAME-client<i>   10.A.B.(10+i)    i = 1...20
              NAME-attacker<i> 10.A.B.(50+i)    i = 1...20 (--attackers; no agent, no firewall)
              NAME-<mb>        10.A.B.(100+i)   the middleboxes, in the order given (fw1 = .101, fw2 = .102)
              NAME-server<i>   10.A.B.(200+i)   i = 1...20

            (default subnet 10.77.0.0/24; every address is on-link). Each host but the attackers runs a Dysco \
            agent, all with the lab's own trust key (NAME/trust.key); each middlebox runs an unmodified iptables \
            firewall, by default the strict profile (FORWARD policy DROP; INVALID dropped; ESTABLISHED,RELATED \
            accepted; NEW TCP SYNs inside the subnet accepted), or the open one (a stateless box: policy ACCEPT, \
            one counting rule, no conntrack), or the snat one (strict, and it masquerades what it forwards: \
            the server sees the box's address; its agent runs with --nat), or the dnat one (strict, and it \
            publishes the first server on the box's own address for the policy ports; --nat too), or the \
            snat-shared one (strict, and it translates sources to the lab's shared service address, .254: \
            boxes of this profile are an HA pair whose replace keeps the server's view; --nat too); each server runs iperf3 \
            (5201) and HTTP servers on 80 and 8080. Clients steer sessions to the servers' policy ports \
            (default 80,5201) through the chain (default: the first middlebox). Files, logs and lab.json live \
            in /run/dysco-migrate/labs/NAME/. Nothing outside the lab's own namespaces is touched.
            """,
        subcommands: [Up.self, Down.self, Status.self, PacedServer.self, Inserter.self]
    )
}

extension LabCommand {
    struct PacedServer: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "paced-server",
            abstract: "Start the sender-paced HTTP server (the one `measure` and `dysco-bench replace` use) on a lab host.",
            discussion: """
                Serves the lab's HTTP root on --port, each response written no faster than --rate MiB/s, so a \
                download stays mid-transfer for size ÷ rate seconds (the demo swaps the firewall under one). \
                Returns once the server answers; `lab down` stops it. The port must be one of the lab's policy \
                ports for the chain to carry it (lab up --policy-ports 80,5201,8090). A helper of the demo \
                (scripts/demo.sh), hidden from `lab --help`.
                """,
            shouldDisplay: false
        )

        @Option(help: "The lab.") var lab: String
        @Option(help: "The lab host to run it on.") var host = "server1"
        @Option(help: "TCP port.") var port: UInt16 = 8090
        @Option(help: "Pace of each response, MiB/s.") var rate = 5.0

        func validate() throws {
            guard rate > 0 else { throw ValidationError("--rate must be positive") }
        }

        func run() async throws {
            let lab = try Lab.attach(name: lab, logger: DyscoLog.logger("lab", level: .warning))
            let process = try PacedHTTPServer.start(lab, on: host, port: port, bytesPerSecond: rate * 1_048_576,
                                                    probeFrom: lab.hosts(.client).first?.name ?? "client1")
            print("paced HTTP server on \(host) (\(lab.address(of: host)):\(port)), \(rate) MiB/s per response, pid \(process.processIdentifier)")
        }
    }
}

private func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

private func commaList(_ text: String) -> [String] {
    text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
}

extension LabCommand {
    struct Up: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "up",
            abstract: "Build a lab and start its agents, firewalls and servers.",
            discussion: """
                Refuses if a lab of that name exists (remove it with `lab down`). If a step fails, whatever \
                was made is removed again and the error is reported. The agents and servers keep running \
                after this command returns.

                Examples:
                  dysco-migrate lab up --name demo
                  dysco-migrate lab up --name t1 --clients 2 --middleboxes fw1,fw2 --chain fw1,fw2
                  dysco-migrate lab up --name t2 --middleboxes fw1,fw2,fw3 --chain fw1,fw3 --firewall fw3=open
                  dysco-migrate lab up --name t3 --attackers 1      (attacker1 at .51: no agent, no firewall)
                  dysco-migrate lab up --name base --no-agents --route-via fw1     (kernel-forwarding baseline)
                """
        )

        @Option(help: "Lab name: prefix of every namespace (letters, digits, '-'; at most 12 characters).")
        var name: String

        @Option(help: "Number of client hosts (1...20), addresses .11, .12, ...")
        var clients = 1

        @Option(help: "Number of server hosts (1...20), addresses .201, .202, ...")
        var servers = 1

        @Option(help: "Middlebox host names, comma-separated ([a-z][a-z0-9]{0,7}), addresses .101, .102, ... in this order.")
        var middleboxes = LabSpec.defaultMiddleboxes.joined(separator: ",")

        @Option(help: "Middleboxes of the client→server policy chain, in order, or 'none'. Default: the first middlebox.")
        var chain: String?

        @Option(name: .customLong("firewall"),
                help: "Firewall profiles, MIDDLEBOX=PROFILE comma-separated, e.g. fw2=strict,fw3=open (strict: stateful, the default; open: stateless, no conntrack; snat: strict and masquerading; dnat: strict and publishing the first server on the box's address; snat-shared: strict and translating sources to the lab's shared address .254, an HA pair; these three run the agent with --nat).")
        var firewall: String?

        @Option(help: "Number of attacker hosts (0...20), addresses .51, .52, ...: no agent, no firewall.")
        var attackers = 0

        @Option(help: "The lab's subnet: a 10.A.B.0/24 prefix.")
        var subnet = LabSpec.defaultSubnet

        @Option(help: "Destination ports the policy steers through the chain, comma-separated.")
        var policyPorts = LabSpec.defaultPolicyPorts.map(String.init).joined(separator: ",")

        @Flag(help: "Start no agents (a plain kernel-forwarding baseline).")
        var noAgents = false

        @Option(name: .customLong("agent-arg"), parsing: .unconditionalSingleValue,
                help: "An argument passed to every agent (repeatable), e.g. --agent-arg=--no-fastpath.")
        var agentArguments: [String] = []

        @Option(help: "The dysco-migrate executable the agents run (default: this one).")
        var agentBinary: String?

        @Option(help: "Directory the HTTP servers serve (default: /run/dysco-migrate/labs/NAME/www).")
        var httpRoot: String?

        @Option(name: .customLong("route-via"),
                help: "Only with --no-agents: route client↔server traffic through this middlebox (static /32 routes).")
        var routeVia: String?

        @Flag(help: "Start no iperf3/HTTP servers.")
        var noServices = false

        @Flag(help: ArgumentHelp("""
            Dual stack: every host also gets fd00:0:A:B::C for 10.A.B.C, the boxes forward and filter IPv6 with the same \
            profile (ip6tables), the agents run with --ipv6 and the clients' policies get an IPv6 chain; servers also \
            serve HTTP on their IPv6 address. The NAT profiles translate IPv6 too (ip6tables NAT).
            """))
        var ipv6 = false

        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.LabState>

        @OptionGroup var logging: LabLoggingOptions

        var spec: LabSpec {
            get throws {
                var ports: [UInt16] = []
                for text in commaList(policyPorts) {
                    guard let port = UInt16(text), port > 0 else {
                        throw ValidationError("--policy-ports: '\(text)' is not a port number (1...65535)")
                    }
                    ports.append(port)
                }
                let chainList: [String]? = chain.map { $0 == "none" ? [] : commaList($0) }
                let profiles: [String: FirewallProfile]
                do { profiles = try FirewallProfile.parseAssignments(firewall ?? "") } catch {
                    throw ValidationError(error.description)
                }
                return LabSpec(name: name, clients: clients, servers: servers, middleboxes: commaList(middleboxes),
                               chain: chainList, subnet: subnet, policyPorts: ports, agents: !noAgents,
                               agentArguments: agentArguments, agentBinary: agentBinary, httpRoot: httpRoot,
                               routeViaMiddlebox: routeVia, services: !noServices, firewallProfiles: profiles,
                               attackers: attackers, ipv6: ipv6)
            }
        }

        func validate() throws {
            do { try spec.validate() } catch let error as LabError { throw ValidationError(error.description) }
        }

        func run() async throws {
            let lab = try Lab.up(try spec, logger: logging.logger())
            if jsonOutput.json {
                try printJSON(lab.state)
                return
            }
            print("lab \(lab.name) is up (\(lab.subnet)); chain: \(lab.chain.isEmpty ? "none" : lab.chain.joined(separator: " → "))")
            for h in lab.hosts {
                let note = h.role == .middlebox ? "   firewall \(lab.firewallProfile(of: h.name))"
                    : h.role == .attacker ? "   attacker (no agent)" : ""
                print("  \(h.name.padding(toLength: 10, withPad: " ", startingAt: 0))\(h.address.description.padding(toLength: 16, withPad: " ", startingAt: 0))ip netns exec \(h.namespace) ...\(note)"
                      + (lab.state.ipv6Address(of: h).map { "   \($0)" } ?? ""))
            }
            if let key = lab.state.trustKeyPath { print("trust key: \(key)") }
            print("files: \(lab.directory)   remove with: dysco-migrate lab down --name \(lab.name)")
        }
    }

    struct Down: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "down",
            abstract: "Remove a lab: stop its processes, delete its namespaces and files.",
            discussion: """
                Works after a crash too, from lab.json. If lab.json is lost, NAME-sw, NAME-client<N> and \
                NAME-server<N> are removed, and other NAME-<x> namespaces (middleboxes) only with --force. \
                Removing a lab that does not exist is not an error.
                """
        )

        @Option(help: "The lab to remove.")
        var name: String

        @Flag(help: "Without lab.json, also remove NAME-<x> namespaces that may be the lab's middleboxes.")
        var force = false

        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.LabRemoved>

        @OptionGroup var logging: LabLoggingOptions

        func validate() throws {
            guard LabSpec.isValidLabName(name) else { throw ValidationError("'\(name)' is not a valid lab name") }
        }

        func run() async throws {
            let report = try Lab.down(name: name, force: force, logger: logging.logger())
            if jsonOutput.json { try printJSON(report); return }
            if !report.existed {
                print("lab \(name): nothing to remove")
            } else {
                print("lab \(name) removed: \(report.removedNamespaces.count) namespaces, "
                      + "\(report.stoppedProcesses) processes stopped")
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status",
            abstract: "Show labs: hosts, addresses, agents alive, firewall counters."
        )

        @Option(help: "Only this lab (default: every lab under /run/dysco-migrate/labs).")
        var name: String?

        @OptionGroup var jsonOutput: JSONOutput<JSONHelp.Labs>

        func validate() throws {
            if let name, !LabSpec.isValidLabName(name) { throw ValidationError("'\(name)' is not a valid lab name") }
        }

        func run() async throws {
            let labs = LabStatus.collect(name: name)
            if jsonOutput.json { try printJSON(labs); return }
            if labs.isEmpty {
                print(name.map { "no lab '\($0)'" } ?? "no labs")
                if name != nil { throw ExitCode(1) }
                return
            }
            print(labs.map(\.text).joined(separator: "\n\n"))
        }
    }
}
