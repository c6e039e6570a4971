import ArgumentParser
import ConntrackState
import Foundation

extension EndpointPolicy.Rule: ExpressibleByArgument {}

/// How `import` and `validate` read a document: the size limit and the endpoint rule.
struct StateReadOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("""
        Refuse documents larger than this many bytes, before parsing (default 128 MiB, about 400,000 compact \
        entries). 0: no limit.
        """, valueName: "bytes"))
    var maxBytes: Int = StateDocumentLimits.defaultMaxBytes

    @Option(name: .long, help: ArgumentHelp("""
        basic: refuse entries naming a loopback, multicast, broadcast, unspecified or link-local address. \
        routes: also require one endpoint of each entry to be an address of this host or on one of its routes \
        (not the default route), read in the namespace of --netns. off (default): the format's checks only.
        """, valueName: "off|basic|routes"))
    var onlyLocal: EndpointPolicy.Rule = .off

    func validate() throws {
        guard maxBytes >= 0 else { throw ValidationError("--max-bytes must be 0 (no limit) or positive") }
    }

    func reader(namespace: NamespaceSelection) throws -> StateDocumentReader {
        var policy = EndpointPolicy(rule: onlyLocal, option: "--only-local")
        if onlyLocal == .routes {
            do { policy.local = try LocalAddresses.read(in: namespace) } catch {
                throw ValidationError("--only-local routes: cannot read the addresses and routes of the \(namespace): \(error)")
            }
        }
        return StateDocumentReader(limits: StateDocumentLimits(maxBytes: maxBytes == 0 ? Int.max : maxBytes), endpoints: policy)
    }

    static func source(_ file: String) -> StateDocumentReader.Source {
        file == "-" ? .handle(FileHandle.standardInput) : .file(file)
    }
}
