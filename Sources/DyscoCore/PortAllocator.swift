/// Hands out local TCP ports for subsessions from a fixed range, never the same one twice while in use.
/// Keep the range outside `net.ipv4.ip_local_port_range` (default 32768–60999) so that subsession ports
/// never collide with the host's own ephemeral ports; the agent's default is 10000–29999.
public struct PortAllocator: Sendable {
    public let range: ClosedRange<UInt16>
    private var used: [UInt64]
    private var cursor: Int
    public private(set) var inUse = 0

    public init(range: ClosedRange<UInt16>) {
        self.range = range
        used = Array(repeating: 0, count: (range.count + 63) / 64)
        cursor = 0
    }

    public var capacity: Int { range.count }

    /// The next free port after the last one handed out (round robin, so a port just released is reused
    /// last), or nil when every port of the range is taken.
    public mutating func allocate() -> UInt16? {
        guard inUse < capacity else { return nil }
        for step in 0..<capacity {
            let index = (cursor + step) % capacity
            if used[index >> 6] & (1 << UInt64(index & 63)) == 0 {
                used[index >> 6] |= 1 << UInt64(index & 63)
                inUse += 1
                cursor = (index + 1) % capacity
                return UInt16(Int(range.lowerBound) + index)
            }
        }
        return nil
    }

    /// Marks a specific port as taken (false if it is outside the range or already taken).
    public mutating func reserve(_ port: UInt16) -> Bool {
        guard range.contains(port) else { return false }
        let index = Int(port - range.lowerBound)
        guard used[index >> 6] & (1 << UInt64(index & 63)) == 0 else { return false }
        used[index >> 6] |= 1 << UInt64(index & 63)
        inUse += 1
        return true
    }

    public func isInUse(_ port: UInt16) -> Bool {
        guard range.contains(port) else { return false }
        let index = Int(port - range.lowerBound)
        return used[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    public mutating func release(_ port: UInt16) {
        guard range.contains(port) else { return }
        let index = Int(port - range.lowerBound)
        if used[index >> 6] & (1 << UInt64(index & 63)) != 0 {
            used[index >> 6] &= ~(1 << UInt64(index & 63))
            inUse -= 1
        }
    }
}
