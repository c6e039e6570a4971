/// How `drain` moves every session off a box (pure; executed by DyscoAgent's ``Evacuation``): sessions are spread
/// over the targets in turn, then grouped into batches of sessions that share the left anchor, the right anchor
/// and the target, so that each batch is one `replace` request whose messages travel bundled hop by hop (one
/// lock round, one new-path round, one state job per box: cost grows with batches, not sessions).
public struct EvacuationPlan: Sendable, Equatable {
    public struct Candidate: Sendable, Equatable {
        public var chainID: UInt64
        public var session: FiveTuple
        public var leftAnchor: IPAddress
        public var rightAnchor: IPAddress
        public init(chainID: UInt64, session: FiveTuple, leftAnchor: IPAddress, rightAnchor: IPAddress) {
            self.chainID = chainID
            self.session = session
            self.leftAnchor = leftAnchor
            self.rightAnchor = rightAnchor
        }
    }

    public struct Batch: Sendable, Equatable {
        public var target: IPAddress
        public var leftAnchor: IPAddress
        public var rightAnchor: IPAddress
        public var sessions: [Candidate]
    }

    public var batches: [Batch]
    public var sessionCount: Int { batches.reduce(0) { $0 + $1.sessions.count } }

    /// Sessions in chain-id order go to `targets[i % targets.count]` (ties of a session to a target are stable
    /// across runs of the same set); each (left anchor, right anchor, target) group is cut into batches of at
    /// most `batchSize` sessions. Batches are ordered so that the targets alternate.
    public init(_ candidates: [Candidate], targets: [IPAddress], batchSize: Int) {
        precondition(!targets.isEmpty && batchSize > 0)
        struct Key: Hashable { var target, left, right: IPAddress }
        var groups: [Key: [Candidate]] = [:]
        var order: [Key] = []
        for (i, candidate) in candidates.sorted(by: { $0.chainID < $1.chainID }).enumerated() {
            let key = Key(target: targets[i % targets.count], left: candidate.leftAnchor, right: candidate.rightAnchor)
            if groups[key] == nil { order.append(key) }
            groups[key, default: []].append(candidate)
        }
        var perTarget: [[Batch]] = targets.map { _ in [] }
        for key in order {
            let members = groups[key]!
            for start in stride(from: 0, to: members.count, by: batchSize) {
                let slice = Array(members[start..<min(start + batchSize, members.count)])
                let index = targets.firstIndex(of: key.target)!
                perTarget[index].append(Batch(target: key.target, leftAnchor: key.left, rightAnchor: key.right, sessions: slice))
            }
        }
        var interleaved: [Batch] = []
        var round = 0
        while interleaved.count < perTarget.reduce(0, { $0 + $1.count }) {
            for list in perTarget where round < list.count { interleaved.append(list[round]) }
            round += 1
        }
        batches = interleaved
    }
}
