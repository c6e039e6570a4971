import Foundation

/// The agent's state file (docs/ARCHITECTURE.md, "Agent crash and restart"): what must survive a crash or an
/// upgrade of the agent, as a journal of record changes. Pure: the agent's shell writes the lines
/// (`StateJournal`), this file encodes and folds them, unit-tested without root.
///
/// Format: JSON lines. The first is a header, `{"dyscoState":1}`; each further line is one change:
/// `{"put":{…record…}}` (the record's persisted fields as they are now) or `{"del":ID}`. Replaying the lines in
/// order gives the table: the last `put` of an id wins, a `del` forgets it. A compacted file holds the header and
/// one `put` per live record.
public enum SessionStateFile {
    public static let version = 1
    public static let header = #"{"dyscoState":1}"#

    /// One change of the journal.
    public enum Entry: Equatable, Sendable {
        case put(PersistedRecord)
        case del(SessionTable.SessionID)
    }

    private struct Line: Codable {
        var dyscoState: Int?
        var put: PersistedRecord?
        var del: SessionTable.SessionID?
    }

    /// One line (with its newline) for `entry`: JSON with sorted keys, as `JSONEncoder` would write it
    /// (`.sortedKeys`; the unit tests hold the two to the same bytes), written straight into bytes because it
    /// runs under the packet lock before a verdict (JSONEncoder cost about 100 µs a line, a third of a middlebox
    /// agent's CPU in a connection benchmark: issue 21).
    public static func encode(_ entry: Entry) -> [UInt8] {
        var line = JournalLine()
        switch entry {
        case .put(let record):
            line.append("{\"put\":")
            line.append(record)
            line.append("}\n")
        case .del(let id):
            line.append("{\"del\":")
            line.append(id)
            line.append("}\n")
        }
        return line.bytes
    }

    /// Whether a record belongs in the state file: once its handshake is done (``SessionTable/Record/established``,
    /// the rule owned keys follow too). A session still in its handshake is not kept: after a crash the endpoints'
    /// retransmitted SYN builds it again, and its SYN costs no write (issue 21).
    public static func persists(_ record: SessionTable.Record) -> Bool { record.established }

    /// The journal's changes for the ids in `changed`: a `put` of each one still in the table that ``persists(_:)``,
    /// a `del` of every other one the journal holds (`written`, updated: the ids with a `put` in the file).
    public static func entries(for changed: Set<SessionTable.SessionID>, in table: SessionTable,
                               written: inout Set<SessionTable.SessionID>) -> [Entry] {
        changed.sorted().compactMap { id in
            if let record = table.records[id], persists(record) {
                written.insert(id)
                return .put(PersistedRecord(record))
            }
            return written.remove(id) != nil ? .del(id) : nil
        }
    }

    /// What reading a state file found.
    public struct Contents: Sendable, Equatable {
        /// The live records, by id (the journal folded).
        public var records: [SessionTable.SessionID: PersistedRecord] = [:]
        /// Lines read (the header included).
        public var lines = 0
        /// Lines that did not decode (a torn last line, a foreign or damaged file): skipped, counted.
        public var badLines = 0
        /// The first bad line's number (1-based) and why, for the log.
        public var firstError: String?
        public init() {}
    }

    public enum ReadError: Error, Equatable, CustomStringConvertible {
        /// The first line is not our header (not a state file, or another version).
        case notAStateFile(String)
        public var description: String {
            switch self {
            case .notAStateFile(let why): "not a dysco-migrate state file (version \(SessionStateFile.version)): \(why)"
            }
        }
    }

    /// Folds a state file's bytes. A file that does not start with the header is refused; a bad later line is
    /// skipped and counted (a torn last line after a crash in the middle of a write, in the worst case).
    public static func decode(_ data: Data) throws(ReadError) -> Contents {
        var contents = Contents()
        let decoder = JSONDecoder()
        var lineNumber = 0
        var start = data.startIndex
        while start < data.endIndex {
            let end = data[start...].firstIndex(of: 0x0A) ?? data.endIndex
            let slice = data[start..<end]
            start = end < data.endIndex ? data.index(after: end) : end
            if slice.isEmpty { continue }
            lineNumber += 1
            contents.lines += 1
            guard let line = try? decoder.decode(Line.self, from: slice) else {
                if lineNumber == 1 { throw .notAStateFile("line 1 is not JSON") }
                contents.badLines += 1
                if contents.firstError == nil { contents.firstError = "line \(lineNumber): not a journal entry" }
                continue
            }
            if lineNumber == 1 {
                guard line.dyscoState == version else {
                    throw .notAStateFile("line 1 is not {\"dyscoState\":\(version)}")
                }
                continue
            }
            if let record = line.put, line.del == nil {
                if let problem = record.problem {
                    contents.badLines += 1
                    if contents.firstError == nil { contents.firstError = "line \(lineNumber): \(problem)" }
                    continue
                }
                contents.records[record.id] = record
            } else if let id = line.del, line.put == nil {
                contents.records.removeValue(forKey: id)
            } else {
                contents.badLines += 1
                if contents.firstError == nil { contents.firstError = "line \(lineNumber): neither put nor del" }
            }
        }
        if lineNumber == 0 { throw .notAStateFile("empty") }
        return contents
    }

    /// A compacted file: the header and one `put` per record that ``persists(_:)``, in id order; `written` gets
    /// their ids.
    public static func snapshot(_ table: SessionTable, written: inout Set<SessionTable.SessionID>) -> [UInt8] {
        var bytes = Array((header + "\n").utf8)
        written = []
        for id in table.records.keys.sorted() where persists(table.records[id]!) {
            bytes += encode(.put(PersistedRecord(table.records[id]!)))
            written.insert(id)
        }
        return bytes
    }

    /// The kernel side of a restart: a restored session whose chains the kernel still has goes back to the kernel
    /// (path `kernel`, its translations in the current rule format, returned for the rebuilt table) unless it is
    /// closing or the fast path is off or refused it; every other one stays on the slow path (the usual hand-over
    /// may take it again). Chains of sessions without a record are not returned: the rebuild drops them.
    /// `keepClosing` (``PacketProcessor/Settings/installAtSyn``, the BPF datapath): a session closed by FINs stays in
    /// the kernel for its linger, as it did before the restart (one an RST crossed does not).
    public static func reconcile(_ restored: [SessionTable.SessionID], table: inout SessionTable,
                                 inKernel: Set<SessionTable.SessionID>, fastPath: Bool, keepClosing: Bool = false)
        -> [(SessionTable.SessionID, [FastPath.Translation])] {
        var carried: [(SessionTable.SessionID, [FastPath.Translation])] = []
        for id in restored {
            guard let record = table.records[id] else { continue }
            let open = record.closeDeadline == nil || (keepClosing && !record.reset && !record.resetSeen)
            if fastPath, inKernel.contains(id), open, !record.fastPathFailed {
                table.update(id) { $0.carrier = .kernel }
                carried.append((id, record.fastPathTranslations))
            } else {
                table.update(id) { $0.carrier = .slow }
            }
        }
        return carried
    }

    /// What putting a file's records back into a table did.
    public struct RestoreResult: Sendable, Equatable {
        public var restored: [SessionTable.SessionID] = []
        /// Records refused because a key, port or chain id is another record's (a damaged file): not restored.
        public var refused: [SessionTable.SessionID] = []
    }

    /// Puts `contents`' records into `table` (in id order), each with its ports reserved.
    public static func restore(_ contents: Contents, into table: inout SessionTable, now: UInt64) -> RestoreResult {
        var result = RestoreResult()
        for id in contents.records.keys.sorted() {
            do {
                try table.restore(contents.records[id]!, now: now)
                result.restored.append(id)
            } catch {
                result.refused.append(id)
            }
        }
        return result
    }
}

/// A session record's persisted fields: identity, role, the session and its subsessions (both paths, with the
/// ports this agent allocated), remaining hops and the flags teardown and the fast path depend on. Counters,
/// activity times and a reconfiguration's anchor state are not kept (docs/ARCHITECTURE.md, "Agent crash and
/// restart").
public struct PersistedRecord: Codable, Equatable, Sendable {
    public struct Sub: Codable, Equatable, Sendable {
        public var tuple: FiveTuple
        public var port: UInt16?
        public var path: UInt8
        /// ``SessionTable/Subsession/seqDelta`` (absent: 0).
        public var delta: Int32?
        /// ``SessionTable/Subsession/tsDelta`` (absent: 0).
        public var ts: Int32?
        var subsession: SessionTable.Subsession {
            .init(tuple: tuple, allocatedPort: port, pathTag: path, seqDelta: delta ?? 0, tsDelta: ts ?? 0)
        }
        init(_ s: SessionTable.Subsession) {
            tuple = s.tuple
            port = s.allocatedPort
            path = s.pathTag
            delta = s.seqDelta == 0 ? nil : s.seqDelta
            ts = s.tsDelta == 0 ? nil : s.tsDelta
        }
    }

    public struct PersistedLink: Codable, Equatable, Sendable {
        public var active: Sub
        public var other: Sub?
        init(_ link: SessionTable.Link) {
            active = Sub(link.active)
            other = link.other.map(Sub.init)
        }
    }

    public var id: SessionTable.SessionID
    public var role: SessionTable.Role
    public var session: FiveTuple
    public var chainID: UInt64
    public var nonce: UInt64
    public var left: PersistedLink?
    public var right: PersistedLink?
    public var remaining: [IPAddress]
    public var rightEstablished: Bool
    public var finForward: Bool
    public var finReverse: Bool
    public var reset: Bool
    /// CLOCK_MONOTONIC (system-wide: it survives the process, not a reboot; /run does not either).
    public var closeDeadline: UInt64?
    public var fastPathFailed: Bool
    /// The session carried its handshake (``SessionTable/Record/established``): its keys are owned in the kernel.
    public var established: Bool
    /// An RST crossed and nothing has refuted it yet (docs/ARCHITECTURE.md, "Forged resets").
    public var resetSeen: Bool?
    /// What the box on this host does to the byte streams (``SessionTable/Record/boxDelta``; absent: nothing).
    public var boxDelta: SessionTable.BoxDelta?
    /// A joined proxy's session with the server and its chain identity (``SessionTable/Record/spliced``; absent
    /// for every other record).
    public var rightSession: FiveTuple?
    public var rightChainID: UInt64?
    /// The tuple the box's NAT gave the session (``SessionTable/Record/translated``; absent when it kept it).
    public var translated: FiveTuple?
    /// ``SessionTable/Record/renamedUpstream`` (absent: false).
    public var renamedUpstream: Bool?
    public var rightNonce: UInt64?

    public var identity: SessionIdentity { SessionIdentity(chainID: chainID, nonce: nonce) }

    /// The record's ``SessionTable/Splice`` (nil unless all three fields are there).
    public var splice: SessionTable.Splice? {
        guard let rightSession, let rightChainID, let rightNonce else { return nil }
        return SessionTable.Splice(session: rightSession, identity: SessionIdentity(chainID: rightChainID, nonce: rightNonce))
    }

    public init(_ record: SessionTable.Record) {
        id = record.id
        role = record.role
        session = record.session
        chainID = record.identity.chainID
        nonce = record.identity.nonce
        left = record.leftLink.map(PersistedLink.init)
        right = record.rightLink.map(PersistedLink.init)
        remaining = record.remaining
        rightEstablished = record.rightEstablished
        finForward = record.finForward
        finReverse = record.finReverse
        reset = record.reset
        closeDeadline = record.closeDeadline
        fastPathFailed = record.fastPathFailed
        established = record.established
        resetSeen = record.resetSeen ? true : nil
        boxDelta = record.boxDelta == .zero ? nil : record.boxDelta
        rightSession = record.spliced?.session
        rightChainID = record.spliced?.identity.chainID
        rightNonce = record.spliced?.identity.nonce
        translated = record.translated
        renamedUpstream = record.renamedUpstream ? true : nil
    }

    /// The ports this agent allocated for the record's subsessions.
    var ports: [UInt16] {
        [left?.active, left?.other, right?.active, right?.other].compactMap { $0?.port }
    }

    /// Why a decoded record cannot be a session (nil: it can).
    var problem: String? {
        if id == 0 { return "session id 0" }
        if chainID == 0 { return "chain id 0" }
        switch role {
        case .leftEnd: if left != nil || right == nil { return "a left end has a right subsession only" }
        case .middlebox: if left == nil { return "a middlebox has a left subsession" }
        case .rightEnd: if left == nil || right != nil { return "a right end has a left subsession only" }
        }
        if remaining.count > 15 { return "more than 15 remaining hops" }
        return nil
    }

    func applyFlags(to record: inout SessionTable.Record) {
        record.rightEstablished = rightEstablished
        record.finForward = finForward
        record.finReverse = finReverse
        record.reset = reset
        record.closeDeadline = closeDeadline
        record.fastPathFailed = fastPathFailed
        record.established = established
        record.resetSeen = resetSeen ?? false
        record.boxDelta = boxDelta ?? .zero
        record.renamedUpstream = renamedUpstream ?? false
        // Sequence tracking starts afresh (it is stale after the gap), as after a fast-path hand-over.
    }
}

extension SessionTable.Record {
    /// The fields whose change must reach the state file (compared on each ``SessionTable/update(_:_:)`` while
    /// changes are tracked; the subsessions are tracked where the table changes them).
    public struct PersistedState: Equatable, Sendable {
        var flags: UInt8
        var remaining: Int
        var closeDeadline: UInt64?
        var boxDelta: SessionTable.BoxDelta
    }

    /// What decides whether a record's keys are owned in the kernel (``KernelOwnership/desired(_:in:)``).
    public struct OwnershipState: Equatable, Sendable {
        var established: Bool
        var closing: Bool
        var kernel: Bool
        public var owned: Bool { established && !closing && !kernel }
    }

    public var ownershipState: OwnershipState {
        OwnershipState(established: established, closing: closeDeadline != nil, kernel: carrier == .kernel)
    }

    public var persistedState: PersistedState {
        var flags: UInt8 = 0
        if rightEstablished { flags |= 1 }
        if finForward { flags |= 2 }
        if finReverse { flags |= 4 }
        if reset { flags |= 8 }
        if fastPathFailed { flags |= 16 }
        if established { flags |= 32 }
        if resetSeen { flags |= 64 }
        return PersistedState(flags: flags, remaining: remaining.count, closeDeadline: closeDeadline, boxDelta: boxDelta)
    }
}

/// The bytes of one journal line, appended field by field in sorted key order (what `JSONEncoder` with
/// `.sortedKeys` writes for ``PersistedRecord``; absent optionals are left out, as it does).
struct JournalLine {
    var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(640) }

    mutating func append(_ text: StaticString) {
        text.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    mutating func append(_ value: some UnsignedInteger) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var v = UInt64(value)
        var count = 0
        withUnsafeMutableBytes(of: &digits) { buffer in
            repeat {
                buffer[19 - count] = 0x30 + UInt8(v % 10)
                v /= 10
                count += 1
            } while v > 0
            bytes.append(contentsOf: buffer[(20 - count)...])
        }
    }

    mutating func append(_ flag: Bool) { append(flag ? "true" : "false") }

    mutating func append(signed value: Int32) {
        if value < 0 { bytes.append(0x2D) }
        append(value.magnitude)
    }

    mutating func append(_ address: IPAddress) {
        guard address.isIPv4 else {
            // IPv6 (issue 18): the address's text (RFC 5952), which the decoder's IPAddress(text) reads back.
            bytes.append(0x22)
            bytes.append(contentsOf: address.description.utf8)
            bytes.append(0x22)
            return
        }
        bytes.append(0x22)
        let v = address.value
        append(v >> 24)
        bytes.append(0x2E)
        append((v >> 16) & 0xFF)
        bytes.append(0x2E)
        append((v >> 8) & 0xFF)
        bytes.append(0x2E)
        append(v & 0xFF)
        bytes.append(0x22)
    }

    mutating func append(_ tuple: FiveTuple) {
        append("{\"dport\":")
        append(tuple.dstPort)
        append(",\"dst\":")
        append(tuple.dstAddr)
        append(",\"sport\":")
        append(tuple.srcPort)
        append(",\"src\":")
        append(tuple.srcAddr)
        append("}")
    }

    mutating func append(_ sub: PersistedRecord.Sub) {
        append("{")
        if let delta = sub.delta {
            append("\"delta\":")
            append(signed: delta)
            append(",")
        }
        append("\"path\":")
        append(sub.path)
        if let port = sub.port {
            append(",\"port\":")
            append(port)
        }
        if let ts = sub.ts {
            append(",\"ts\":")
            append(signed: ts)
        }
        append(",\"tuple\":")
        append(sub.tuple)
        append("}")
    }

    mutating func append(_ link: PersistedRecord.PersistedLink) {
        append("{\"active\":")
        append(link.active)
        if let other = link.other {
            append(",\"other\":")
            append(other)
        }
        append("}")
    }

    mutating func append(_ record: PersistedRecord) {
        append("{")
        if let box = record.boxDelta {
            append("\"boxDelta\":{\"forward\":")
            append(signed: box.forward)
            append(",\"reverse\":")
            append(signed: box.reverse)
            append("},")
        }
        append("\"chainID\":")
        append(record.chainID)
        if let deadline = record.closeDeadline {
            append(",\"closeDeadline\":")
            append(deadline)
        }
        append(",\"established\":")
        append(record.established)
        append(",\"fastPathFailed\":")
        append(record.fastPathFailed)
        append(",\"finForward\":")
        append(record.finForward)
        append(",\"finReverse\":")
        append(record.finReverse)
        append(",\"id\":")
        append(record.id)
        if let left = record.left {
            append(",\"left\":")
            append(left)
        }
        append(",\"nonce\":")
        append(record.nonce)
        append(",\"remaining\":[")
        for (i, hop) in record.remaining.enumerated() {
            if i > 0 { bytes.append(0x2C) }
            append(hop)
        }
        append("]")
        if let renamed = record.renamedUpstream {
            append(",\"renamedUpstream\":")
            append(renamed)
        }
        append(",\"reset\":")
        append(record.reset)
        if let resetSeen = record.resetSeen {
            append(",\"resetSeen\":")
            append(resetSeen)
        }
        if let right = record.right {
            append(",\"right\":")
            append(right)
        }
        if let chain = record.rightChainID {
            append(",\"rightChainID\":")
            append(chain)
        }
        append(",\"rightEstablished\":")
        append(record.rightEstablished)
        if let nonce = record.rightNonce {
            append(",\"rightNonce\":")
            append(nonce)
        }
        if let session = record.rightSession {
            append(",\"rightSession\":")
            append(session)
        }
        append(",\"role\":\"")
        bytes.append(contentsOf: record.role.rawValue.utf8)
        append("\",\"session\":")
        append(record.session)
        if let translated = record.translated {
            append(",\"translated\":")
            append(translated)
        }
        append("}")
    }
}
