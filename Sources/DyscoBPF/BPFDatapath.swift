import CLibbpf
import DyscoCore
import DyscoSystem
import Foundation

/// The BPF datapath's user-space side: loads `dysco.bpf.o` (built by `make bpf` from bpf/dysco.bpf.c), pins its
/// maps, attaches its two tc programs to devices, and reads and writes the session map and the event ring buffer.
///
/// Programs attached to a device and pinned maps outlive this object and its process: closing it (deinit) only
/// closes file descriptors; kernel-carried sessions keep flowing. A new instance opened with the same pin
/// directory reuses the pinned maps (the same entries) and re-attaches programs with `replace`.
///
/// Every C call goes through ``DyscoSystem/sysCall(_:_:)``: libbpf 1.x returns a negative errno and sets `errno`
/// (NULL and `errno` for pointers), read at once into a ``DyscoSystem/SystemCallError``.
///
/// Not thread-safe: one owner (the agent's data-plane thread, later) calls it.
public final class BPFDatapath {
    /// The filter's handle and priority on the clsact hooks (replaced on re-attach).
    public static let tcHandle: UInt32 = 0xD15C
    public static let tcPriority: UInt32 = 1

    private let object: OpaquePointer
    private let ingressFD: Int32
    private let egressFD: Int32
    public let sessionsFD: Int32
    /// Per family: the sessions, the hand-over counts (`dysco_passed`: the program's; `dysco_seen`: the agent's),
    /// keyed like the sessions, and the owned keys (`dysco_owned`: fail closed while no agent runs), written by
    /// the agent only. IPv6's (`dysco_sessions6`, … `dysco_owned6`) are keyed by `struct dysco_key6`.
    private let maps4: FamilyMaps
    private let maps6: FamilyMaps
    private let statsFD: Int32
    private let configFD: Int32
    private let eventsFD: Int32
    private let ringBuffer: OpaquePointer
    private let sink = EventSink()
    /// Possible CPUs (per-CPU map values have one slot each).
    private let cpus: Int

    /// Opens and loads the object file.
    /// - Parameters:
    ///   - objectPath: the compiled `dysco.bpf.o`.
    ///   - pinDirectory: a directory on a bpffs where the maps are pinned by name (and found again after a
    ///     restart); nil pins nothing. (`ip netns exec` gives a process a fresh /sys without /sys/fs/bpf: the
    ///     caller provides a bpffs reachable from its mount namespace, see docs/BPF.md.)
    ///   - maxEntries: capacity of `dysco_sessions` in translations (four per two-sided session); nil keeps the
    ///     object's default (``BPFLayout/defaultMaxEntries``). Must match an already pinned map.
    ///   - ringBytes: size of `dysco_events` in bytes (a power of two, at least a page); nil keeps 1 MiB.
    public init(objectPath: String, pinDirectory: String? = nil, maxEntries: UInt32? = nil,
                ringBytes: UInt32? = nil) throws(SystemCallError) {
        let object: OpaquePointer = try sysCall("bpf_object__open_file(\(objectPath))") {
            dysco_bpf_open(objectPath, pinDirectory)
        }
        do {
            // The hand-over counts hold at most one entry per translation, the owned keys at most four a session:
            // sized with the sessions.
            for name in FamilyMaps.names(ipv6: false) + FamilyMaps.names(ipv6: true) {
                guard let maxEntries else { break }
                let map = try sysCall("bpf_object__find_map_by_name(\(name))") {
                    bpf_object__find_map_by_name(object, name)
                }
                try sysCall("bpf_map__set_max_entries(\(name), \(maxEntries))") {
                    bpf_map__set_max_entries(map, maxEntries)
                }
            }
            if let ringBytes {
                let map = try sysCall("bpf_object__find_map_by_name(dysco_events)") {
                    bpf_object__find_map_by_name(object, "dysco_events")
                }
                try sysCall("bpf_map__set_max_entries(dysco_events, \(ringBytes))") {
                    bpf_map__set_max_entries(map, ringBytes)
                }
            }
            try sysCall("bpf_object__load(\(objectPath))") { bpf_object__load(object) }
            func programFD(_ name: String) throws(SystemCallError) -> Int32 {
                let program = try sysCall("bpf_object__find_program_by_name(\(name))") {
                    bpf_object__find_program_by_name(object, name)
                }
                return try sysCall("bpf_program__fd(\(name))") { bpf_program__fd(program) }
            }
            func mapFD(_ name: String) throws(SystemCallError) -> Int32 {
                try sysCall("bpf_object__find_map_fd_by_name(\(name))") { bpf_object__find_map_fd_by_name(object, name) }
            }
            ingressFD = try programFD("dysco_ingress")
            egressFD = try programFD("dysco_egress")
            sessionsFD = try mapFD("dysco_sessions")
            statsFD = try mapFD("dysco_stats")
            configFD = try mapFD("dysco_config")
            eventsFD = try mapFD("dysco_events")
            maps4 = FamilyMaps(sessions: sessionsFD, passed: try mapFD("dysco_passed"), seen: try mapFD("dysco_seen"),
                               owned: try mapFD("dysco_owned"))
            var maps6 = FamilyMaps(sessions: try mapFD("dysco_sessions6"), passed: try mapFD("dysco_passed6"),
                                   seen: try mapFD("dysco_seen6"), owned: try mapFD("dysco_owned6"))
            maps6.ipv6 = true
            self.maps6 = maps6
            cpus = Int(try sysCall("libbpf_num_possible_cpus") { libbpf_num_possible_cpus() })
            let context = Unmanaged.passUnretained(sink).toOpaque()
            ringBuffer = try sysCall("ring_buffer__new(dysco_events)") { [eventsFD] in
                ring_buffer__new(eventsFD, { context, data, size in
                    guard let context, let data else { return 0 }
                    let sink = Unmanaged<EventSink>.fromOpaque(context).takeUnretainedValue()
                    if let event = BPFEvent(bytes: UnsafeRawBufferPointer(start: data, count: size)) {
                        sink.events.append(event)
                    }
                    return 0
                }, context, nil)
            }
        } catch {
            bpf_object__close(object)
            throw error
        }
        self.object = object
    }

    deinit {
        ring_buffer__free(ringBuffer)
        bpf_object__close(object)
    }

    // MARK: - Devices

    /// Creates the clsact qdisc on `interface` (if missing) and attaches ingress and egress programs, replacing
    /// whatever this datapath attached there before. Runs in network namespace `namespace` (`ip netns` name) when
    /// given, else in the calling thread's. Returns the attached programs' ids.
    @discardableResult
    public func attach(interface: String, namespace: String? = nil) throws -> (ingress: UInt32, egress: UInt32) {
        let ingressFD = ingressFD, egressFD = egressFD
        return try Self.inNamespace(namespace) { () throws(SystemCallError) -> (UInt32, UInt32) in
            let index = try sysCall("if_nametoindex(\(interface))") { dysco_ifindex(interface) }
            do throws(SystemCallError) {
                try sysCall("bpf_tc_hook_create(\(interface))") { dysco_tc_hook_create(index) }
            } catch where error.errno == EEXIST {}
            var ingress: UInt32 = 0, egress: UInt32 = 0
            try sysCall("bpf_tc_attach(\(interface), ingress)") {
                dysco_tc_attach(index, dysco_tc_ingress(), ingressFD, Self.tcHandle, Self.tcPriority, &ingress)
            }
            try sysCall("bpf_tc_attach(\(interface), egress)") {
                dysco_tc_attach(index, dysco_tc_egress(), egressFD, Self.tcHandle, Self.tcPriority, &egress)
            }
            return (ingress, egress)
        }
    }

    /// Detaches this datapath's programs from `interface` (the clsact qdisc stays: other filters may use it).
    /// A program that is not attached is no error.
    public static func detach(interface: String, namespace: String? = nil) throws {
        try inNamespace(namespace) { () throws(SystemCallError) in
            let index = try sysCall("if_nametoindex(\(interface))") { dysco_ifindex(interface) }
            for (point, name) in [(dysco_tc_ingress(), "ingress"), (dysco_tc_egress(), "egress")] {
                do throws(SystemCallError) {
                    try sysCall("bpf_tc_detach(\(interface), \(name))") {
                        dysco_tc_detach(index, point, tcHandle, tcPriority)
                    }
                } catch where error.errno == ENOENT || error.errno == EINVAL {}
            }
        }
    }

    /// The ids of the programs attached at this datapath's handle on `interface` (nil where none is).
    public static func attached(interface: String, namespace: String? = nil) throws -> (ingress: UInt32?, egress: UInt32?) {
        try inNamespace(namespace) { () throws(SystemCallError) -> (UInt32?, UInt32?) in
            let index = try sysCall("if_nametoindex(\(interface))") { dysco_ifindex(interface) }
            func query(_ point: Int32, _ name: String) throws(SystemCallError) -> UInt32? {
                var id: UInt32 = 0
                do throws(SystemCallError) {
                    try sysCall("bpf_tc_query(\(interface), \(name))") {
                        dysco_tc_query(index, point, tcHandle, tcPriority, &id)
                    }
                } catch where error.errno == ENOENT || error.errno == EINVAL { return nil }
                return id
            }
            return (try query(dysco_tc_ingress(), "ingress"), try query(dysco_tc_egress(), "egress"))
        }
    }

    /// Unpins the maps from the pin directory (they live on while programs or descriptors hold them).
    public func unpinMaps() throws(SystemCallError) {
        try sysCall("bpf_object__unpin_maps") { bpf_object__unpin_maps(object, nil) }
    }

    // MARK: - Sessions

    public enum UpdateMode: Sendable {
        /// Only if absent (EEXIST otherwise).
        case insert
        /// Only if present (ENOENT otherwise).
        case replace
        /// Either.
        case upsert

        var flags: UInt64 {
            switch self {
            case .insert: dysco_bpf_noexist()
            case .replace: dysco_bpf_exist()
            case .upsert: dysco_bpf_any()
            }
        }
    }

    /// Writes one translation (one `bpf_map_update_elem`: atomic for the programs, which see old or new value).
    public func write(_ key: BPFSessionKey, _ entry: BPFSessionEntry, mode: UpdateMode = .upsert) throws(SystemCallError) {
        let fd = maps(key).sessions
        try sysCall("bpf_map_update_elem(\(maps(key).name("dysco_sessions")), \(key))") {
            key.withRawKey { rawKey in entry.withRawValue { bpf_map_update_elem(fd, rawKey, $0, mode.flags) } }
        }
    }

    /// The maps of `key`'s family.
    private func maps(_ key: BPFSessionKey) -> FamilyMaps { key.isIPv6 ? maps6 : maps4 }

    public func insert(_ key: BPFSessionKey, _ entry: BPFSessionEntry) throws(SystemCallError) {
        try write(key, entry, mode: .insert)
    }

    public func update(_ key: BPFSessionKey, _ entry: BPFSessionEntry) throws(SystemCallError) {
        try write(key, entry, mode: .replace)
    }

    /// Writes (inserts or replaces) many translations in one `bpf_map_update_batch` (a drain's installs or holds).
    /// Each element is atomic for the programs, the batch is not. The kernel takes no insert/replace mode per
    /// element in a batch (only BPF_F_LOCK): always an upsert.
    public func writeBatch(_ entries: [(BPFSessionKey, BPFSessionEntry)]) throws(SystemCallError) {
        let (entries4, entries6) = (entries.filter { !$0.0.isIPv6 }, entries.filter { $0.0.isIPv6 })
        try Self.updateBatch(maps4.sessions, "dysco_sessions", entries4.map { $0.0.raw }, entries4.map { $0.1.raw })
        try Self.updateBatch(maps6.sessions, "dysco_sessions6", entries6.map { $0.0.raw6 }, entries6.map { $0.1.raw6 })
    }

    /// One `bpf_map_update_batch` (nothing for no keys).
    private static func updateBatch<K, V>(_ fd: Int32, _ name: String, _ keys: [K], _ values: [V]) throws(SystemCallError) {
        guard !keys.isEmpty else { return }
        var count = UInt32(keys.count)
        try sysCall("bpf_map_update_batch(\(name), \(keys.count))") {
            keys.withUnsafeBytes { k in
                values.withUnsafeBytes { v in dysco_map_update_batch(fd, k.baseAddress, v.baseAddress, &count, 0) }
            }
        }
    }

    /// One `bpf_map_delete_batch` (nothing for no keys); the kernel's result (-1 and errno) unchecked.
    private static func deleteBatch<K>(_ fd: Int32, _ keys: [K]) -> Int32 {
        guard !keys.isEmpty else { return 0 }
        var count = UInt32(keys.count)
        return keys.withUnsafeBytes { dysco_map_delete_batch(fd, $0.baseAddress, &count) }
    }

    /// Removes many translations in one `bpf_map_delete_batch`; every key must be present (ENOENT otherwise, with
    /// the keys before it removed).
    public func deleteBatch(_ keys: [BPFSessionKey]) throws(SystemCallError) {
        let (keys4, keys6) = (keys.filter { !$0.isIPv6 }, keys.filter(\.isIPv6))
        try sysCall("bpf_map_delete_batch(dysco_sessions, \(keys4.count))") { Self.deleteBatch(maps4.sessions, keys4.map(\.raw)) }
        try sysCall("bpf_map_delete_batch(dysco_sessions6, \(keys6.count))") { Self.deleteBatch(maps6.sessions, keys6.map(\.raw6)) }
    }

    /// The kernel's accounting of the session map's memory (the `memlock` line of its fdinfo: for this
    /// non-preallocated hash, grows with the entries); nil if unreadable.
    public var sessionMapMemoryBytes: UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/self/fdinfo/\(sessionsFD)", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("memlock:") {
            return UInt64(line.dropFirst("memlock:".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// Removes one translation; false if it was not there.
    @discardableResult
    public func delete(_ key: BPFSessionKey) throws(SystemCallError) -> Bool {
        let fd = maps(key).sessions
        do throws(SystemCallError) {
            try sysCall("bpf_map_delete_elem(\(maps(key).name("dysco_sessions")), \(key))") {
                key.withRawKey { bpf_map_delete_elem(fd, $0) }
            }
        } catch where error.errno == ENOENT {
            return false
        }
        return true
    }

    public func lookup(_ key: BPFSessionKey) throws(SystemCallError) -> BPFSessionEntry? {
        let fd = maps(key).sessions
        do {
            if key.isIPv6 {
                var value = dysco_value6()
                try sysCall("bpf_map_lookup_elem(dysco_sessions6, \(key))") {
                    key.withRawKey { bpf_map_lookup_elem(fd, $0, &value) }
                }
                return BPFSessionEntry(raw6: value)
            }
            var value = dysco_value()
            try sysCall("bpf_map_lookup_elem(dysco_sessions, \(key))") { key.withRawKey { bpf_map_lookup_elem(fd, $0, &value) } }
            return BPFSessionEntry(raw: value)
        } catch where error.errno == ENOENT {
            return nil
        }
    }

    /// Sets and clears flags of a present translation (a migration's hold: `setFlags(key, set: .held)`), keeping
    /// what the program recorded. A lookup and an update: counters the program adds between the two are lost (a
    /// few packets' worth; spin-locked values would close that gap). Returns the entry as written.
    @discardableResult
    public func setFlags(_ key: BPFSessionKey, set: BPFSessionFlags = [], clear: BPFSessionFlags = []) throws(SystemCallError) -> BPFSessionEntry {
        guard var entry = try lookup(key) else {
            throw SystemCallError(operation: "setFlags(\(key)): no such translation", errno: ENOENT)
        }
        entry.flags.subtract(clear)
        entry.flags.formUnion(set)
        try write(key, entry, mode: .replace)
        return entry
    }

    // MARK: - Hand-over counts (docs/BPF.md "Hand-over without reordering")

    /// Writes the agent's count of `key`'s verdicted packets (`dysco_seen`).
    public func writeSeen(_ key: BPFSessionKey, _ count: UInt64) throws(SystemCallError) {
        var value = count
        let fd = maps(key).seen
        try sysCall("bpf_map_update_elem(\(maps(key).name("dysco_seen")), \(key))") {
            key.withRawKey { bpf_map_update_elem(fd, $0, &value, dysco_bpf_any()) }
        }
    }

    /// Deletes both counts of `key` (absent counts read as 0).
    public func clearHandOverCounts(_ key: BPFSessionKey) {
        let maps = maps(key)
        key.withRawKey { rawKey in
            _ = bpf_map_delete_elem(maps.passed, rawKey)
            _ = bpf_map_delete_elem(maps.seen, rawKey)
        }
    }

    /// The program's count of `key`'s packets passed to the queue while held (0 if absent).
    public func passed(_ key: BPFSessionKey) -> UInt64 {
        var value: UInt64 = 0
        let fd = maps(key).passed
        return key.withRawKey { bpf_map_lookup_elem(fd, $0, &value) } == 0 ? value : 0
    }

    // MARK: - Owned keys (docs/BPF.md "Owned keys")

    /// Adds owned keys (one `bpf_map_update_batch`; present ones stay).
    public func addOwned(_ keys: [BPFSessionKey]) throws(SystemCallError) {
        let (keys4, keys6) = (keys.filter { !$0.isIPv6 }, keys.filter(\.isIPv6))
        func owned(_ count: Int) -> [UInt8] { [UInt8](repeating: UInt8(DYSCO_OWNED), count: count) }
        try Self.updateBatch(maps4.owned, "dysco_owned", keys4.map(\.raw), owned(keys4.count))
        try Self.updateBatch(maps6.owned, "dysco_owned6", keys6.map(\.raw6), owned(keys6.count))
    }

    /// Removes owned keys: one `bpf_map_delete_batch`; if a key is absent (the batch stops there), one delete each
    /// (absent keys are no error).
    public func removeOwned(_ keys: [BPFSessionKey]) throws(SystemCallError) {
        for (ipv6, maps) in [(false, maps4), (true, maps6)] {
            let family = keys.filter { $0.isIPv6 == ipv6 }
            let batch = ipv6 ? Self.deleteBatch(maps.owned, family.map(\.raw6)) : Self.deleteBatch(maps.owned, family.map(\.raw))
            guard batch != 0 else { continue }
            for key in family {
                do throws(SystemCallError) {
                    try sysCall("bpf_map_delete_elem(\(maps.name("dysco_owned")))") {
                        key.withRawKey { bpf_map_delete_elem(maps.owned, $0) }
                    }
                } catch where error.errno == ENOENT {}
            }
        }
    }

    /// Every owned key of both families (a walk: restarts and tests).
    public func ownedKeys() throws(SystemCallError) -> [BPFSessionKey] {
        try Self.keys(fd: maps4.owned, name: "dysco_owned", ipv6: false)
            + Self.keys(fd: maps6.owned, name: "dysco_owned6", ipv6: true)
    }

    /// The keys of a pinned `dysco_owned` map (`PIN_DIRECTORY/dysco_owned`) and of its IPv6 sibling
    /// (`dysco_owned6`, if pinned), without loading the object (tests).
    public static func pinnedOwnedKeys(mapPath: String) throws(SystemCallError) -> [BPFSessionKey] {
        try pinned(mapPath) { fd, ipv6 throws(SystemCallError) in try keys(fd: fd, name: mapPath, ipv6: ipv6) }
    }

    /// `body` on the pinned map at `mapPath` (IPv4's) and on its IPv6 sibling (the same path with "6" appended)
    /// when one is pinned; the results concatenated.
    private static func pinned<T>(_ mapPath: String,
                                  _ body: (Int32, Bool) throws(SystemCallError) -> [T]) throws(SystemCallError) -> [T] {
        var result: [T] = []
        for (path, ipv6) in [(mapPath, false), (mapPath + "6", true)] {
            if ipv6, !FileManager.default.fileExists(atPath: path) { continue }
            let fd = try sysCall("bpf_obj_get(\(path))") { bpf_obj_get(path) }
            defer { close(fd) }
            result += try body(fd, ipv6)
        }
        return result
    }

    /// Walks a map's keys with `bpf_map_get_next_key` (O(entries)); `body` sees each raw key (`dysco_key`, or
    /// `dysco_key6` with `ipv6`).
    private static func walk(fd: Int32, name: String, ipv6: Bool,
                             _ body: (UnsafeMutableRawPointer) throws(SystemCallError) -> Void) throws(SystemCallError) {
        let size = ipv6 ? BPFLayout.key6Size : BPFLayout.keySize
        let current = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        let next = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer {
            current.deallocate()
            next.deallocate()
        }
        var first = true
        while true {
            do {
                try sysCall("bpf_map_get_next_key(\(name))") {
                    bpf_map_get_next_key(fd, first ? nil : current, next)
                }
            } catch where error.errno == ENOENT {
                return
            }
            first = false
            current.copyMemory(from: next, byteCount: size)
            try body(current)
        }
    }

    /// The key at `raw` in its family's layout.
    private static func key(_ raw: UnsafeMutableRawPointer, ipv6: Bool) -> BPFSessionKey? {
        ipv6 ? BPFSessionKey(raw6: raw.loadUnaligned(as: dysco_key6.self))
            : BPFSessionKey(raw: raw.loadUnaligned(as: dysco_key.self))
    }

    private static func keys(fd: Int32, name: String, ipv6: Bool) throws(SystemCallError) -> [BPFSessionKey] {
        var result: [BPFSessionKey] = []
        try walk(fd: fd, name: name, ipv6: ipv6) { raw throws(SystemCallError) in
            if let key = key(raw, ipv6: ipv6) { result.append(key) }
        }
        return result
    }

    /// Every translation in both families' maps (a walk with `bpf_map_get_next_key`: O(entries), for restarts
    /// and tests).
    public func entries() throws(SystemCallError) -> [(BPFSessionKey, BPFSessionEntry)] {
        try Self.entries(fd: maps4.sessions, ipv6: false) + Self.entries(fd: maps6.sessions, ipv6: true)
    }

    private static func entries(fd sessionsFD: Int32, ipv6: Bool) throws(SystemCallError) -> [(BPFSessionKey, BPFSessionEntry)] {
        var result: [(BPFSessionKey, BPFSessionEntry)] = []
        let name = ipv6 ? "dysco_sessions6" : "dysco_sessions"
        try walk(fd: sessionsFD, name: name, ipv6: ipv6) { raw throws(SystemCallError) in
            let entry: BPFSessionEntry
            do throws(SystemCallError) {
                if ipv6 {
                    var value = dysco_value6()
                    try sysCall("bpf_map_lookup_elem(\(name))") { bpf_map_lookup_elem(sessionsFD, raw, &value) }
                    entry = BPFSessionEntry(raw6: value)
                } else {
                    var value = dysco_value()
                    try sysCall("bpf_map_lookup_elem(\(name))") { bpf_map_lookup_elem(sessionsFD, raw, &value) }
                    entry = BPFSessionEntry(raw: value)
                }
            } catch where error.errno == ENOENT {
                return // deleted meanwhile
            }
            if let key = key(raw, ipv6: ipv6) { result.append((key, entry)) }
        }
        return result
    }

    // MARK: - Configuration, counters, events

    /// OR-ed into `skb->mark` of every packet rewritten at ingress (so a queue rule can skip it); 0 for none.
    public func setIngressMark(_ mark: UInt32) throws(SystemCallError) {
        try setMarks(ingress: mark, observe: 0)
    }

    /// `ingress` is OR-ed into `skb->mark` of every packet rewritten at ingress, `observe` too when it is a FIN or
    /// an RST (the agent's queue rules: skip the rewritten packets, queue the rewritten FIN/RST for bookkeeping
    /// only), `owned` into a packet not rewritten at ingress whose key is owned (the fail-closed queue rule); 0 for
    /// none.
    public func setMarks(ingress: UInt32, observe: UInt32, owned: UInt32 = 0) throws(SystemCallError) {
        var key: UInt32 = 0
        var config = dysco_config()
        config.ingress_mark = ingress
        config.observe_mark = observe
        config.owned_mark = owned
        try sysCall("bpf_map_update_elem(dysco_config)") { bpf_map_update_elem(configFD, &key, &config, dysco_bpf_any()) }
    }

    /// The socket-filter program the egress queue rules ask (`iptables -m bpf --object-pinned PATH`): 1 when
    /// `dysco_egress` will rewrite the packet (docs/BPF.md, "Queue rules").
    public static let egressCarriedProgram = "dysco_egress_carried"

    /// The socket-filter program the fail-closed egress queue rule asks: 1 when the packet's egress key is owned
    /// (docs/BPF.md, "Owned keys").
    public static let egressOwnedProgram = "dysco_egress_owned"

    /// Pins program `name` of the loaded object at `path` (on a bpffs), replacing what was pinned there.
    public func pinProgram(_ name: String, path: String) throws(SystemCallError) {
        let program = try sysCall("bpf_object__find_program_by_name(\(name))") {
            bpf_object__find_program_by_name(object, name)
        }
        unlink(path)
        try sysCall("bpf_program__pin(\(name), \(path))") { bpf_program__pin(program, path) }
    }

    /// The entries of a pinned `dysco_sessions` map (`PIN_DIRECTORY/dysco_sessions`) and of its IPv6 sibling
    /// (`dysco_sessions6`, if pinned), without loading the object
    /// (tests, inspection).
    public static func pinnedEntries(mapPath: String) throws(SystemCallError) -> [(BPFSessionKey, BPFSessionEntry)] {
        try pinned(mapPath) { fd, ipv6 throws(SystemCallError) in try entries(fd: fd, ipv6: ipv6) }
    }

    /// A pinned map's key and value sizes and capacity (`max_entries`): a restarted agent compares them with the
    /// map it would load, since libbpf refuses to reuse a pinned map whose parameters differ.
    public struct MapLayout: Hashable, Sendable {
        public var keySize: UInt32
        public var valueSize: UInt32
        public var maxEntries: UInt32

        public init(keySize: UInt32, valueSize: UInt32, maxEntries: UInt32) {
            self.keySize = keySize
            self.valueSize = valueSize
            self.maxEntries = maxEntries
        }
    }

    /// The layout of a pinned map (e.g. `PIN_DIRECTORY/dysco_sessions`).
    public static func pinnedLayout(mapPath: String) throws(SystemCallError) -> MapLayout {
        let fd = try sysCall("bpf_obj_get(\(mapPath))") { bpf_obj_get(mapPath) }
        defer { close(fd) }
        var layout = MapLayout(keySize: 0, valueSize: 0, maxEntries: 0)
        try sysCall("bpf_obj_get_info_by_fd(\(mapPath))") {
            dysco_map_layout(fd, &layout.keySize, &layout.valueSize, &layout.maxEntries)
        }
        return layout
    }

    /// The programs' global counters, summed over CPUs.
    public func statistics() throws(SystemCallError) -> BPFStatistics {
        try Self.statistics(statsFD: statsFD, cpus: cpus)
    }

    /// The global counters of a pinned `dysco_stats` map (`PIN_DIRECTORY/dysco_stats`), without loading the object
    /// (tests, inspection).
    public static func pinnedStatistics(mapPath: String) throws(SystemCallError) -> BPFStatistics {
        let fd = try sysCall("bpf_obj_get(\(mapPath))") { bpf_obj_get(mapPath) }
        defer { close(fd) }
        let cpus = try sysCall("libbpf_num_possible_cpus") { libbpf_num_possible_cpus() }
        return try statistics(statsFD: fd, cpus: Int(cpus))
    }

    private static func statistics(statsFD: Int32, cpus: Int) throws(SystemCallError) -> BPFStatistics {
        var totals = [UInt64](repeating: 0, count: Int(DYSCO_STAT_COUNT))
        var slots = [UInt64](repeating: 0, count: cpus)
        for index in 0..<UInt32(DYSCO_STAT_COUNT) {
            var key = index
            try sysCall("bpf_map_lookup_elem(dysco_stats, \(index))") {
                slots.withUnsafeMutableBytes { bpf_map_lookup_elem(statsFD, &key, $0.baseAddress) }
            }
            totals[Int(index)] = slots.reduce(0, &+)
        }
        return BPFStatistics(totals)
    }

    /// Waits up to `timeoutMilliseconds` (0: not at all) for events and returns those the ring buffer held.
    public func pollEvents(timeoutMilliseconds: Int32 = 0) throws(SystemCallError) -> [BPFEvent] {
        do throws(SystemCallError) {
            try sysCall("ring_buffer__poll(dysco_events)") { ring_buffer__poll(ringBuffer, timeoutMilliseconds) }
        } catch where error.errno == EINTR {}
        defer { sink.events.removeAll(keepingCapacity: true) }
        return sink.events
    }

    /// A descriptor that becomes readable when events wait (for an event loop: then ``pollEvents(timeoutMilliseconds:)`` with 0).
    public var eventsPollFD: Int32 { ring_buffer__epoll_fd(ringBuffer) }

    // MARK: - Namespaces

    /// Runs `body` on a fresh thread that first enters network namespace `name` (setns changes only the calling
    /// thread; libbpf's tc calls open their netlink socket on it). nil: on the calling thread.
    static func inNamespace<T>(_ name: String?, _ body: @escaping () throws(SystemCallError) -> T) throws -> T {
        guard let name else { return try body() }
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        let work = UncheckedSendable(body)
        let thread = Thread {
            defer { done.signal() }
            do {
                try NetworkNamespace.enter(name)
                box.result = .success(try work.value())
            } catch {
                box.result = .failure(error)
            }
        }
        thread.name = "bpf netns \(name)"
        thread.start()
        done.wait()
        return try box.result!.get()
    }
}

/// One family's session, hand-over and owned maps (descriptors of the loaded object).
private struct FamilyMaps {
    var sessions: Int32
    var passed: Int32
    var seen: Int32
    var owned: Int32

    var ipv6: Bool = false

    init(sessions: Int32, passed: Int32, seen: Int32, owned: Int32) {
        self.sessions = sessions
        self.passed = passed
        self.seen = seen
        self.owned = owned
    }

    /// The maps sized with the sessions (`--max-sessions`), by family.
    static func names(ipv6: Bool) -> [String] {
        ["dysco_sessions", "dysco_passed", "dysco_seen", "dysco_owned"].map { ipv6 ? $0 + "6" : $0 }
    }

    /// An IPv4 map's name as this family's (for messages).
    func name(_ ipv4: String) -> String { ipv6 ? ipv4 + "6" : ipv4 }
}

/// The programs' global counters (`dysco_stats`, DYSCO_STAT_*).
public struct BPFStatistics: Hashable, Sendable {
    public var rewritten: UInt64
    public var held: UInt64
    public var synPassed: UInt64
    public var fibRedirected: UInt64
    public var neighbourRedirected: UInt64
    public var fibFailed: UInt64
    public var eventsLost: UInt64
    /// Ingress SYN-ACKs and RSTs on an opening translation that the opposite direction's facts refute (dropped).
    public var openingRefused: UInt64
    /// Held translations the program took over at a release (the hand-over counts met).
    public var releasedInOrder: UInt64
    /// Packets of held translations the program passed to the queue and counted.
    public var heldPassed: UInt64
    /// Tagged SYNs the egress program dropped and reported after the box's NAT (`agent --nat`).
    public var natSyns: UInt64

    init(_ totals: [UInt64]) {
        natSyns = totals[Int(DYSCO_STAT_NAT_SYN)]
        releasedInOrder = totals[Int(DYSCO_STAT_RELEASED_IN_ORDER)]
        heldPassed = totals[Int(DYSCO_STAT_HELD_PASSED)]
        rewritten = totals[Int(DYSCO_STAT_REWRITTEN)]
        held = totals[Int(DYSCO_STAT_HELD)]
        synPassed = totals[Int(DYSCO_STAT_SYN_PASSED)]
        fibRedirected = totals[Int(DYSCO_STAT_FIB_REDIRECT)]
        neighbourRedirected = totals[Int(DYSCO_STAT_FIB_NEIGH)]
        fibFailed = totals[Int(DYSCO_STAT_FIB_FAILED)]
        eventsLost = totals[Int(DYSCO_STAT_EVENT_LOST)]
        openingRefused = totals[Int(DYSCO_STAT_OPENING_REFUSED)]
    }
}

/// Events the ring-buffer callback collected during one poll (same thread as the poll).
private final class EventSink {
    var events: [BPFEvent] = []
}

/// Written by the namespace thread before it signals, read after the wait: the semaphore orders the accesses.
private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, any Error>?
}

/// The caller waits for the thread that runs the closure: no concurrent use.
private struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
