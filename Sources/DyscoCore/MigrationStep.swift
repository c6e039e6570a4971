/// Where the reconfiguration of a session stands at its left anchor; the order is the protocol's (paper §3:
/// lock §3.2, new path §3.1/§3.3, drain §3.5, state §3.5, release, teardown). A cancelled or refused
/// reconfiguration reports the step it failed at (``TriggerResult/failedStep``).
public enum MigrationStep: String, Sendable, Codable, CaseIterable, CustomStringConvertible {
    case lock, newPath = "new-path", drain, state, release, teardown

    /// Its code in a triggerResult (control protocol version 3, docs/CONTROL-PROTOCOL.md): 1...6; 0 is "none".
    public var wireCode: UInt8 {
        switch self {
        case .lock: 1
        case .newPath: 2
        case .drain: 3
        case .state: 4
        case .release: 5
        case .teardown: 6
        }
    }

    public init?(wireCode: UInt8) {
        guard let step = Self.allCases.first(where: { $0.wireCode == wireCode }) else { return nil }
        self = step
    }

    public var description: String { rawValue }
}

/// The phase times a left anchor reports with its result (``TriggerResult/phases``): when each step ended,
/// in microseconds since the trigger arrived at the left anchor (a step that did not run ends with the one
/// before it), the boxes' own export and import durations, and the paper's measure (§5.3).
public struct PhaseTimes: Sendable, Equatable {
    public var lockEnd: UInt32
    public var newPathEnd: UInt32
    public var drainEnd: UInt32
    public var stateEnd: UInt32
    public var releaseEnd: UInt32
    public var teardownEnd: UInt32
    /// The old box's export of the firewall state (µs), 0 when there was none.
    public var exportMicroseconds: UInt32
    /// The new box's import (µs), 0 when there was none.
    public var importMicroseconds: UInt32
    /// The paper's measure (§5.3): new-path SYN sent → new path used (µs).
    public var newPathSynToUse: UInt32

    public init(lockEnd: UInt32 = 0, newPathEnd: UInt32 = 0, drainEnd: UInt32 = 0, stateEnd: UInt32 = 0,
                releaseEnd: UInt32 = 0, teardownEnd: UInt32 = 0, exportMicroseconds: UInt32 = 0,
                importMicroseconds: UInt32 = 0, newPathSynToUse: UInt32 = 0) {
        self.lockEnd = lockEnd
        self.newPathEnd = newPathEnd
        self.drainEnd = drainEnd
        self.stateEnd = stateEnd
        self.releaseEnd = releaseEnd
        self.teardownEnd = teardownEnd
        self.exportMicroseconds = exportMicroseconds
        self.importMicroseconds = importMicroseconds
        self.newPathSynToUse = newPathSynToUse
    }

    /// The end of `step`.
    public func end(of step: MigrationStep) -> UInt32 {
        switch step {
        case .lock: lockEnd
        case .newPath: newPathEnd
        case .drain: drainEnd
        case .state: stateEnd
        case .release: releaseEnd
        case .teardown: teardownEnd
        }
    }

    public mutating func setEnd(of step: MigrationStep, _ micros: UInt32) {
        switch step {
        case .lock: lockEnd = micros
        case .newPath: newPathEnd = micros
        case .drain: drainEnd = micros
        case .state: stateEnd = micros
        case .release: releaseEnd = micros
        case .teardown: teardownEnd = micros
        }
    }

    /// Fields on the wire, in order (u32 each).
    static let wireFields = 9
    var wireValues: [UInt32] {
        [lockEnd, newPathEnd, drainEnd, stateEnd, releaseEnd, teardownEnd, exportMicroseconds, importMicroseconds,
         newPathSynToUse]
    }
    init(wireValues v: [UInt32]) {
        self.init(lockEnd: v[0], newPathEnd: v[1], drainEnd: v[2], stateEnd: v[3], releaseEnd: v[4], teardownEnd: v[5],
                  exportMicroseconds: v[6], importMicroseconds: v[7], newPathSynToUse: v[8])
    }
}

/// What the boxes report of a state transfer with stateInstalled (control protocol version 3): how long the
/// old box's export and the new box's import took, in microseconds (0: not done, or not known to the sender).
public struct StateTimes: Sendable, Equatable {
    public var exportMicroseconds: UInt32
    public var importMicroseconds: UInt32
    public init(exportMicroseconds: UInt32 = 0, importMicroseconds: UInt32 = 0) {
        self.exportMicroseconds = exportMicroseconds
        self.importMicroseconds = importMicroseconds
    }
}
