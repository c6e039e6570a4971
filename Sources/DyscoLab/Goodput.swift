import Foundation

/// Goodput at the receiving side from periodic samples of each session's received bytes (pure: `measure` feeds
/// it the sizes of the growing download files, sampled every 100 ms).
public enum Goodput {
    /// One sample: seconds since the downloads started, and each session's bytes received so far.
    public struct Sample: Sendable, Equatable {
        public var seconds: Double
        public var bytes: [Int64]
        public init(seconds: Double, bytes: [Int64]) {
            self.seconds = seconds
            self.bytes = bytes
        }
    }

    /// Where a bin lies relative to the migration.
    public enum Phase: String, Codable, Sendable, CaseIterable {
        /// Before every session is up (not counted).
        case ramp
        case before, during, after
        /// After the first session completed (not counted: fewer sessions remain).
        case tail
    }

    /// The bytes each bundle received between two consecutive samples.
    public struct Bin: Codable, Sendable, Equatable {
        public var start: Double
        public var end: Double
        /// Per bundle.
        public var bytes: [Int64]
        public init(start: Double, end: Double, bytes: [Int64]) {
            self.start = start
            self.end = end
            self.bytes = bytes
        }

        /// Bundle `b`'s goodput in this bin, MiB/s.
        public func mibps(_ b: Int) -> Double { end > start ? Double(bytes[b]) / 1_048_576 / (end - start) : 0 }
    }

    /// The steady part of a run and the migration window, seconds since the downloads started.
    public struct Timeline: Codable, Sendable, Equatable {
        /// Every session is established from here on.
        public var steadyFrom: Double
        public var windowStart: Double
        public var windowEnd: Double
        /// The first session completed here.
        public var steadyUntil: Double
        public init(steadyFrom: Double, windowStart: Double, windowEnd: Double, steadyUntil: Double) {
            self.steadyFrom = steadyFrom
            self.windowStart = windowStart
            self.windowEnd = windowEnd
            self.steadyUntil = steadyUntil
        }

        /// during: the bin overlaps the window; before/after: wholly in the steady part before/after it.
        public func phase(of bin: Bin) -> Phase {
            if bin.start < windowEnd && bin.end > windowStart { return .during }
            if bin.end <= windowStart { return bin.start >= steadyFrom ? .before : .ramp }
            return bin.end <= steadyUntil ? .after : .tail
        }
    }

    /// Mean goodput of one bundle per phase, MiB/s (bytes over the bins' total time; 0 without bins).
    public struct PhaseMeans: Codable, Sendable, Equatable {
        public var before: Double
        public var during: Double
        public var after: Double
        /// Bins counted in each.
        public var binsBefore: Int
        public var binsDuring: Int
        public var binsAfter: Int
    }

    /// One bin per pair of consecutive samples; a session's bytes in a bin are its growth (never negative),
    /// summed per bundle (`bundleOf[session]`).
    public static func bins(_ samples: [Sample], bundleOf: [Int], bundles: Int) -> [Bin] {
        guard samples.count >= 2 else { return [] }
        return zip(samples, samples.dropFirst()).map { a, b in
            var bytes = [Int64](repeating: 0, count: bundles)
            for (session, bundle) in bundleOf.enumerated() where session < a.bytes.count && session < b.bytes.count {
                bytes[bundle] += max(0, b.bytes[session] - a.bytes[session])
            }
            return Bin(start: a.seconds, end: b.seconds, bytes: bytes)
        }
    }

    public static func means(_ bins: [Bin], bundle: Int, timeline: Timeline) -> PhaseMeans {
        var bytes: [Phase: Int64] = [:], time: [Phase: Double] = [:], count: [Phase: Int] = [:]
        for bin in bins {
            let phase = timeline.phase(of: bin)
            bytes[phase, default: 0] += bin.bytes[bundle]
            time[phase, default: 0] += bin.end - bin.start
            count[phase, default: 0] += 1
        }
        func mean(_ p: Phase) -> Double {
            guard let t = time[p], t > 0 else { return 0 }
            return Double(bytes[p] ?? 0) / 1_048_576 / t
        }
        return PhaseMeans(before: mean(.before), during: mean(.during), after: mean(.after),
                          binsBefore: count[.before] ?? 0, binsDuring: count[.during] ?? 0, binsAfter: count[.after] ?? 0)
    }

    /// The first sample time at which any session has `complete` bytes (nil: none has).
    public static func firstCompletion(_ samples: [Sample], complete: Int64) -> Double? {
        samples.first { $0.bytes.contains { $0 >= complete } }?.seconds
    }
}
