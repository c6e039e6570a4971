import DyscoCore
import DyscoSystem
import Foundation
import Glibc

/// Which addresses a document's entries may name (`--only-local` on the CLI, `--state-only-local` on the agent).
public struct EndpointPolicy: Sendable, Hashable {
    public enum Rule: String, Sendable, Hashable, CaseIterable {
        /// Only the format's own checks.
        case off
        /// No address of an entry is loopback, multicast, broadcast, unspecified (0/8, ::) or link-local.
        case basic
        /// `basic`, and one endpoint of every entry is an address of this host or on one of its routes.
        case routes
    }

    public var rule: Rule
    /// The option named in refusals, e.g. `--only-local`.
    public var option: String
    /// This host's addresses and routes (used by `.routes`).
    public var local: LocalAddresses?

    public init(rule: Rule, option: String = "--only-local", local: LocalAddresses? = nil) {
        self.rule = rule
        self.option = option
        self.local = local
    }

    public static let off = EndpointPolicy(rule: .off)

    /// The rule's problems with `entry`, by field.
    func findings(_ entry: ConntrackEntry) -> [(field: String, message: String)] {
        guard rule != .off else { return [] }
        var found: [(field: String, message: String)] = []
        let addresses: [(String, IPAddress)] = [
            ("orig.src", entry.orig.src), ("orig.dst", entry.orig.dst), ("reply.src", entry.reply.src),
            ("reply.dst", entry.reply.dst),
        ] + [("nat.snat.ip", entry.nat?.snat?.ip), ("nat.dnat.ip", entry.nat?.dnat?.ip)].compactMap { name, ip in
            ip.map { (name, $0) }
        }
        for (field, address) in addresses {
            if let kind = address.specialUse { found.append((field, "\(address) is \(kind) (\(option))")) }
        }
        if rule == .routes, found.isEmpty {
            let local = local ?? LocalAddresses(prefixes: [])
            let endpoints = [entry.orig.src, entry.orig.dst, entry.reply.src, entry.reply.dst]
            if !endpoints.contains(where: local.contains) {
                found.append(("orig", "neither \(entry.orig.src) nor \(entry.orig.dst) (nor the reply's addresses) is an "
                    + "address of this host or on one of its routes (\(option)=routes)"))
            }
        }
        return found
    }
}

extension IPAddress {
    /// Why this address can never be an endpoint of a migrated session: "loopback", "multicast", "broadcast",
    /// "unspecified", "link-local", "in 0.0.0.0/8"; nil for an ordinary address. IPv4-mapped IPv6 addresses are
    /// judged by their IPv4 address.
    public var specialUse: String? {
        if isIPv4 {
            let a = value >> 24, b = value >> 16 & 0xff
            if value == 0 { return "unspecified" }
            if a == 0 { return "in 0.0.0.0/8 (this network)" }
            if a == 127 { return "loopback" }
            if a >= 224 && a <= 239 { return "multicast" }
            if value == 0xffff_ffff { return "broadcast" }
            if a == 169 && b == 254 { return "link-local" }
            return nil
        }
        if high == 0 && low == 0 { return "unspecified" }
        if high == 0 && low == 1 { return "loopback" }
        if high >> 56 == 0xff { return "multicast" }
        if high >> 54 == 0xfe80 >> 6 { return "link-local" }
        return nil
    }
}

/// A host's own addresses and the networks its routes reach, for `--only-local=routes`. The default route
/// (prefix length 0), routes through `lo` and reject/blackhole routes do not count: every address "routes" by a
/// default route, so only the networks a host knows specifically do.
public struct LocalAddresses: Sendable, Hashable {
    public struct Prefix: Sendable, Hashable, CustomStringConvertible {
        public var network: [UInt8]
        public var length: Int
        public init(network: [UInt8], length: Int) {
            self.network = network
            self.length = length
        }
        public func contains(_ address: IPAddress) -> Bool {
            let bytes = address.bytes
            guard bytes.count == network.count, length <= bytes.count * 8 else { return false }
            var bits = length
            for position in 0..<bytes.count where bits > 0 {
                let mask: UInt8 = bits >= 8 ? 0xff : ~(0xff >> UInt8(bits))
                if bytes[position] & mask != network[position] & mask { return false }
                bits -= 8
            }
            return true
        }
        public var description: String { "\(IPAddress(bytes: network)?.description ?? "?")/\(length)" }
    }

    public var prefixes: [Prefix]
    public init(prefixes: [Prefix]) { self.prefixes = prefixes }

    public func contains(_ address: IPAddress) -> Bool { prefixes.contains { $0.contains(address) } }

    /// Reads the addresses (getifaddrs) and the main routing tables (/proc/thread-self/net/route, ipv6_route) of
    /// a namespace, on a thread that entered it.
    public static func read(in namespace: NamespaceSelection = .current) throws -> LocalAddresses {
        try NamespaceThread.run(in: namespace) { try readHere() }
    }

    static func readHere() throws -> LocalAddresses {
        var prefixes: [Prefix] = []
        var list: UnsafeMutablePointer<ifaddrs>?
        try sysCall("getifaddrs") { getifaddrs(&list) }
        defer { freeifaddrs(list) }
        var cursor = list
        while let item = cursor {
            defer { cursor = item.pointee.ifa_next }
            guard let address = item.pointee.ifa_addr else { continue }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let value = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                prefixes.append(Prefix(network: withUnsafeBytes(of: value) { Array($0) }, length: 32))
            case AF_INET6:
                let value = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                prefixes.append(Prefix(network: withUnsafeBytes(of: value) { Array($0) }, length: 128))
            default:
                break
            }
        }
        if let text = try? String(contentsOfFile: "/proc/thread-self/net/route", encoding: .utf8) {
            prefixes += parseRoutes4(text)
        }
        if let text = try? String(contentsOfFile: "/proc/thread-self/net/ipv6_route", encoding: .utf8) {
            prefixes += parseRoutes6(text)
        }
        return LocalAddresses(prefixes: prefixes)
    }

    /// `/proc/net/route`: Iface Destination Gateway Flags RefCnt Use Metric Mask … (addresses in host-order hex).
    static func parseRoutes4(_ text: String) -> [Prefix] {
        let rtfReject = 0x0200
        return text.split(separator: "\n").dropFirst().compactMap { line -> Prefix? in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 8, fields[0] != "lo", let destination = UInt32(fields[1], radix: 16),
                  let flags = Int(fields[3], radix: 16), let mask = UInt32(fields[7], radix: 16),
                  flags & rtfReject == 0 else { return nil }
            let length = mask.nonzeroBitCount
            guard length > 0 else { return nil }
            // The file prints the in-memory (network order) value as a little-endian number.
            return Prefix(network: withUnsafeBytes(of: destination.littleEndian) { Array($0) }, length: length)
        }
    }

    /// `/proc/net/ipv6_route`: dest(32 hex) plen src splen nexthop metric refcnt use flags iface.
    static func parseRoutes6(_ text: String) -> [Prefix] {
        let rtfReject = 0x0200
        return text.split(separator: "\n").compactMap { line -> Prefix? in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 10, fields[9] != "lo", fields[0].count == 32, let length = Int(fields[1], radix: 16),
                  length > 0, let flags = Int(fields[8], radix: 16), flags & rtfReject == 0 else { return nil }
            let hex = Array(fields[0].utf8)
            var network: [UInt8] = []
            for position in stride(from: 0, to: 32, by: 2) {
                guard let high = JSONStreamScanner.hexValue(hex[position]), let low = JSONStreamScanner.hexValue(hex[position + 1])
                else { return nil }
                network.append(high << 4 | low)
            }
            return Prefix(network: network, length: length)
        }
    }
}
