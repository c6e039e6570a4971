/// Hands out local TCP ports for subsessions from a fixed range, never the same one twice while in use.
/// Keep the range outside `net.ipv4.ip_local_port_range` (default 32768–60999) so that subsession ports
/// never collide with the host's own ephemeral ports; the agent's default is 10000–29999.
///
/// Allocation is random within the range (an off-path host cannot predict a subsession's port, which it needs
/// to aim a forged segment at it; docs/ARCHITECTURE.md "Failure and attack model"): a few random probes, then
/// a scan of the 64-port words from a random one, so the cost stays small even when the range is nearly full.
public struct PortAllocator: Sendable {
    public let range: ClosedRange<UInt16>
    private var used: [UInt64]
    public private(set) var inUse = 0
    /// Random probes before the word scan: with the range at most 7/8 full, the scan is rarely needed.
    static let probes = 4

    public init(range: ClosedRange<UInt16>) {
        self.range = range
        used = Array(repeating: 0, count: (range.count + 63) / 64)
    }

    public var capacity: Int { range.count }

    /// A free port chosen at random, or nil when every port of the range is taken.
    public mutating func allocate() -> UInt16? {
        var random = SystemRandomNumberGenerator()
        return allocate(using: &random)
    }

    /// ``allocate()`` with a given generator (tests use a seeded one).
    public mutating func allocate<R: RandomNumberGenerator>(using random: inout R) -> UInt16? {
        guard inUse < capacity else { return nil }
        for _ in 0..<Self.probes {
            let index = Int.random(in: 0..<capacity, using: &random)
            if !isSet(index) { return take(index) }
        }
        // Scan the words from a random one; the first word with a free bit gives a random free bit of it.
        let words = used.count
        let start = Int.random(in: 0..<words, using: &random)
        for step in 0..<words {
            let w = (start + step) % words
            var free = ~used[w]
            let valid = min(64, capacity - w * 64)
            if valid < 64 { free &= (UInt64(1) << UInt64(valid)) - 1 }
            guard free != 0 else { continue }
            // A random free bit of this word: skip a random number of the free bits before it.
            var skip = Int.random(in: 0..<free.nonzeroBitCount, using: &random)
            while skip > 0 {
                free &= free - 1
                skip -= 1
            }
            return take(w * 64 + free.trailingZeroBitCount)
        }
        return nil
    }

    private func isSet(_ index: Int) -> Bool { used[index >> 6] & (1 << UInt64(index & 63)) != 0 }

    private mutating func take(_ index: Int) -> UInt16 {
        used[index >> 6] |= 1 << UInt64(index & 63)
        inUse += 1
        return UInt16(Int(range.lowerBound) + index)
    }

    /// Marks a specific port as taken (false if it is outside the range or already taken).
    public mutating func reserve(_ port: UInt16) -> Bool {
        guard range.contains(port) else { return false }
        let index = Int(port - range.lowerBound)
        guard !isSet(index) else { return false }
        _ = take(index)
        return true
    }

    public func isInUse(_ port: UInt16) -> Bool {
        guard range.contains(port) else { return false }
        return isSet(Int(port - range.lowerBound))
    }

    public mutating func release(_ port: UInt16) {
        guard range.contains(port) else { return }
        let index = Int(port - range.lowerBound)
        if isSet(index) {
            used[index >> 6] &= ~(1 << UInt64(index & 63))
            inUse -= 1
        }
    }
}
