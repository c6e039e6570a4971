/// The packets an anchor holds for a migrating session, from "stop using the old path" to "state installed"
/// (paper §3.5, last paragraph: "the anchors must buffer incoming data"), released in order.
///
/// Bounds (docs/ARCHITECTURE.md, "Anchor buffering"): per session at most `perSessionPackets` packets and
/// `perSessionBytes` bytes, per agent at most `totalBytes`. A packet that does not fit is **not** taken:
/// `append` returns false, the agent sends it on the old path instead (it is then a byte the old path carries:
/// the packet is never dropped) and the reconfiguration is cancelled (`Event.bufferFull`), because new data on
/// the old path after the cutoff would make the drain never end.
///
/// The NFQUEUE packets themselves stay in the kernel (no verdict yet); this buffer keeps the packet ids and a
/// copy of the bytes, which are rewritten for the new (or, on cancel, the old) path at release.
public struct AnchorBuffer<Packet>: ~Copyable {
    public struct Limits: Sendable {
        public var perSessionPackets: Int
        public var perSessionBytes: Int
        public var totalBytes: Int
        public init(perSessionPackets: Int = 4096, perSessionBytes: Int = 32 << 20, totalBytes: Int = 256 << 20) {
            self.perSessionPackets = perSessionPackets
            self.perSessionBytes = perSessionBytes
            self.totalBytes = totalBytes
        }
    }

    private struct Queue {
        var packets: [Packet] = []
        var bytes = 0
    }

    public let limits: Limits
    private var queues: [UInt64: Queue] = [:]
    public private(set) var totalBytes = 0
    public private(set) var totalPackets = 0
    /// Packets refused for lack of room (counted; see the type's documentation for what happens to them).
    public private(set) var refused: UInt64 = 0
    public private(set) var peakBytes = 0

    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Takes a packet of `session` of `size` bytes; false if it does not fit (nothing is taken).
    public mutating func append(_ packet: Packet, size: Int, session: UInt64) -> Bool {
        let queue = queues[session] ?? Queue()
        guard queue.packets.count < limits.perSessionPackets, queue.bytes + size <= limits.perSessionBytes,
              totalBytes + size <= limits.totalBytes else {
            refused &+= 1
            return false
        }
        queues[session, default: Queue()].packets.append(packet)
        queues[session]!.bytes += size
        totalBytes += size
        totalPackets += 1
        peakBytes = max(peakBytes, totalBytes)
        return true
    }

    /// Removes and returns a session's packets in the order they came.
    public mutating func take(session: UInt64) -> [Packet] {
        guard let queue = queues.removeValue(forKey: session) else { return [] }
        totalBytes -= queue.bytes
        totalPackets -= queue.packets.count
        return queue.packets
    }

    public func count(session: UInt64) -> Int { queues[session]?.packets.count ?? 0 }
    public func bytes(session: UInt64) -> Int { queues[session]?.bytes ?? 0 }
    public var sessions: [UInt64] { Array(queues.keys) }
}
