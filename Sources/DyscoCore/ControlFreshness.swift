/// Freshness of control messages (issue 20; docs/CONTROL-PROTOCOL.md, "Freshness"). Pure: no clock, no I/O.
///
/// Before version 2 nothing in a control message was fresh: a datagram recorded on the segment during one
/// reconfiguration and sent again later (with its recorded source address) was valid for the life of the
/// session, and a replayed `trigger` started a lock round of a live session with no operator involved. The
/// paper's agents trust each other (§2.3) and say nothing about replay; a MAC alone does not stop it.
///
/// Every version-2 message carries a ``ControlStamp`` inside the MAC'd header:
/// - **sender**: a 64-bit random id the sending agent draws when it starts (a new one per boot, and again
///   should a counter run out), so a restarted agent's counters start over under a name nobody has seen;
/// - **receiver**: the address the datagram is sent to (the receiver checks it is the datagram's destination:
///   a message recorded on its way to one agent is no good at another);
/// - **counter**: per (sender, receiver), 1, 2, 3, …: the receiver keeps a sliding window of the last
///   ``FreshnessChecker/windowSize`` counters per sender and receiver address (RFC 4303 §3.4.3's anti-replay
///   window; a dual-stack receiver gets one sequence per address) and drops any counter it has seen or that is
///   below the window;
/// - **sentAt**: the sender's CLOCK_REALTIME in microseconds: a message older than ``FreshnessChecker/Settings/maxAge``,
///   more than ``FreshnessChecker/Settings/maxSkew`` in the future, or sent before the receiver itself started
///   (less the skew) is stale. That bounds what a receiver that lost its windows (a restart) can be made to
///   accept, and lets windows of silent senders be forgotten (anything they could still catch is stale by time).
public struct ControlStamp: Sendable, Equatable, Hashable {
    public var sender: UInt64
    public var receiver: IPAddress
    public var counter: UInt32
    /// Microseconds since 1970 (CLOCK_REALTIME) when the sender encoded the message.
    public var sentAt: UInt64

    public init(sender: UInt64, receiver: IPAddress, counter: UInt32, sentAt: UInt64) {
        self.sender = sender
        self.receiver = receiver
        self.counter = counter
        self.sentAt = sentAt
    }

    /// What a message carries before the sending agent stamps it (its encode refuses nothing; a receiver
    /// refuses sender 0 / counter 0 as `replayed`).
    public static let unstamped = ControlStamp(sender: 0, receiver: IPAddress(0), counter: 0, sentAt: 0)
}

/// The sending side: one random sender id per agent run and one counter per receiver.
public struct ControlStamper: Sendable {
    public private(set) var sender: UInt64
    private var counters: [IPAddress: UInt32] = [:]

    /// `sender` is drawn at random when nil (0 is never used).
    public init(sender: UInt64? = nil) {
        self.sender = sender ?? Self.randomSender()
    }

    static func randomSender() -> UInt64 { UInt64.random(in: 1 ... .max) }

    /// The stamp of the next message to `receiver`, sent now (`nowMicros`: CLOCK_REALTIME µs). When a counter
    /// would wrap, the stamper takes a new sender id and every counter starts over (receivers see a new sender).
    public mutating func stamp(to receiver: IPAddress, nowMicros: UInt64) -> ControlStamp {
        var next = (counters[receiver] ?? 0) &+ 1
        if next == 0 {
            sender = Self.randomSender()
            counters.removeAll()
            next = 1
        }
        counters[receiver] = next
        return ControlStamp(sender: sender, receiver: receiver, counter: next, sentAt: nowMicros)
    }
}

/// The receiving side: decides whether an authenticated message is fresh, and remembers it.
public struct FreshnessChecker: Sendable {
    public struct Settings: Sendable, Equatable {
        /// A message sent longer ago than this is stale (µs). It bounds a network or queueing delay, and what a
        /// receiver that restarted could be made to accept again.
        public var maxAge: UInt64 = 5_000_000
        /// How far the sender's clock may be ahead of the receiver's (µs); also the slack of the "sent before I
        /// started" rule. CLOCK_REALTIME is one clock for every namespace of a machine; across machines NTP.
        public var maxSkew: UInt64 = 500_000
        /// At most this many senders are remembered (the least recently heard goes first).
        public var maxSenders = 65_536
        public init() {}
    }

    /// Why a message was refused; every one is counted as `replayed` by the agent.
    public enum Refusal: String, Sendable, Equatable, CaseIterable {
        /// Sender id 0 or counter 0: not stamped.
        case unstamped
        /// The stamp names another receiver than the datagram's destination.
        case wrongReceiver = "wrong-receiver"
        /// sentAt is older than maxAge, or before this receiver started (less maxSkew).
        case stale
        /// sentAt is more than maxSkew ahead of this receiver's clock.
        case future
        /// The counter was seen already (a copy).
        case duplicate
        /// The counter is below the sender's window (too old to tell: refused).
        case belowWindow = "below-window"
    }

    /// Counters per sender: the highest seen and a bitmap of the `windowSize` counters up to it.
    public static let windowSize: UInt32 = 1024
    static let words = Int(windowSize / 64)

    struct Window: Sendable {
        var highest: UInt32
        /// Bit i of the bitmap (word i / 64, bit i % 64) is counter `highest - i`.
        var bits: [UInt64]
        var lastHeard: UInt64
    }

    public var settings: Settings
    /// When this receiver started (CLOCK_REALTIME µs): messages sent before it (less the skew) are stale.
    public let startedAt: UInt64
    /// One window per sender and receiver address: a sender counts per receiver address (``ControlStamper``), and a
    /// dual-stack receiver has an address of each family, so one sender's IPv4 and IPv6 messages to it are two
    /// sequences (one window per sender made the second look replayed).
    struct WindowKey: Hashable {
        var sender: UInt64
        var receiver: IPAddress
    }
    private var windows: [WindowKey: Window] = [:]

    public init(startedAt: UInt64, settings: Settings = Settings()) {
        self.startedAt = startedAt
        self.settings = settings
    }

    /// Windows remembered (one per sender and receiver address).
    public var senders: Int { windows.count }

    /// Checks `stamp` of a message that arrived (already authenticated) for `destination` at `nowMicros`, and
    /// records it when fresh. Returns nil when fresh, else why it is refused (nothing is recorded then).
    public mutating func admit(_ stamp: ControlStamp, destination: IPAddress?, nowMicros now: UInt64) -> Refusal? {
        guard stamp.sender != 0, stamp.counter != 0 else { return .unstamped }
        if let destination, stamp.receiver != destination { return .wrongReceiver }
        if stamp.sentAt > now, stamp.sentAt - now > settings.maxSkew { return .future }
        if now > stamp.sentAt, now - stamp.sentAt > settings.maxAge { return .stale }
        if startedAt > stamp.sentAt, startedAt - stamp.sentAt > settings.maxSkew { return .stale }
        let key = WindowKey(sender: stamp.sender, receiver: stamp.receiver)
        guard var w = windows[key] else {
            if windows.count >= settings.maxSenders { forgetSilent(now: now, force: true) }
            var bits = [UInt64](repeating: 0, count: Self.words)
            bits[0] = 1
            windows[key] = Window(highest: stamp.counter, bits: bits, lastHeard: now)
            return nil
        }
        if stamp.counter > w.highest {
            Self.shift(&w.bits, by: stamp.counter - w.highest)
            w.highest = stamp.counter
            w.bits[0] |= 1
        } else {
            let offset = w.highest - stamp.counter
            guard offset < Self.windowSize else { return .belowWindow }
            let (word, bit) = (Int(offset / 64), UInt64(1) << UInt64(offset % 64))
            guard w.bits[word] & bit == 0 else { return .duplicate }
            w.bits[word] |= bit
        }
        w.lastHeard = max(w.lastHeard, now)
        windows[key] = w
        return nil
    }

    /// Forgets senders not heard from for longer than maxAge + maxSkew: any message of theirs the window could
    /// still catch is stale by its time. With `force`, also the least recently heard one (the table is full).
    public mutating func forgetSilent(now: UInt64, force: Bool = false) {
        let horizon = settings.maxAge &+ settings.maxSkew
        windows = windows.filter { now <= $0.value.lastHeard || now - $0.value.lastHeard <= horizon }
        if force, windows.count >= settings.maxSenders,
           let oldest = windows.min(by: { $0.value.lastHeard < $1.value.lastHeard })?.key {
            windows[oldest] = nil
        }
    }

    /// Moves the bitmap `n` counters on (bit i becomes bit i + n; bits beyond the window fall off).
    public static func shift(_ bits: inout [UInt64], by n: UInt32) {
        guard n < windowSize else {
            for i in bits.indices { bits[i] = 0 }
            return
        }
        let wordShift = Int(n / 64), bitShift = UInt64(n % 64)
        for i in stride(from: bits.count - 1, through: 0, by: -1) {
            var value: UInt64 = 0
            let from = i - wordShift
            if from >= 0 {
                value = bits[from] << bitShift
                if bitShift > 0, from - 1 >= 0 { value |= bits[from - 1] >> (64 - bitShift) }
            }
            bits[i] = value
        }
    }
}
