/// The kernel datapath's vocabulary shared by the processor, the agent and the BPF datapath (docs/BPF.md): a
/// session's translations and the packet-mark bits the tc ingress program sets and the NFQUEUE rules
/// (``QueueRules``) read.
public enum FastPath {
    /// Set by the tc ingress program on a packet it rewrote (the raw-PREROUTING queue rule skips it). Egress needs
    /// no mark: the queue rules ask the pinned `dysco_egress_carried` filter instead (tc egress runs after them).
    public static let ingressMark: UInt32 = 0x1000_0000
    /// The egress hook's bit: the egress queue rules skip packets carrying it (`! --mark egress/egress`). The
    /// agent's raw socket sets it on the packets it builds and sends itself (``ControlPlane``); the kernel's
    /// egress rewrites need none (the queue rules ask the pinned `dysco_egress_carried` filter: tc egress runs
    /// after them).
    public static let egressMark: UInt32 = 0x2000_0000
    /// A packet whose key is owned: a session past its handshake that the kernel does not rewrite. Queued without
    /// bypass: while no agent runs, it is dropped (TCP retransmits it), never passed unrewritten.
    public static let ownedIngressMark: UInt32 = 0x0400_0000
    public static let ownedEgressMark: UInt32 = 0x0800_0000
    /// The paper's SYN tag (§2.1): the agent of a box that translates tuples (``PacketProcessor/Settings/natBox``)
    /// sets it in its verdict on a Dysco SYN it took in; the tc egress program drops the tagged SYN after the box's
    /// NAT and reports its translated tuple (`DYSCO_NAT_SYN_MARK`, the same bit; docs/ARCHITECTURE.md "Boxes that
    /// translate"). No queue rule matches on it.
    public static let natSynMark: UInt32 = 0x0040_0000

    /// One translation of one session: key tuple → target tuple at a hook.
    public struct Translation: Equatable, Sendable {
        public enum Hook: String, Sendable { case ingress, egress }
        public var hook: Hook
        public var key: FiveTuple
        public var target: FiveTuple
        /// The subsession's sequence delta (§3.4, ``SessionTable/Subsession/seqDelta``): the kernel adds it to the
        /// sequence number at ingress, subtracts it from the acknowledgment number and SACK blocks at egress.
        public var seqDelta: Int32
        /// The key's packets meet the kernel only after every queue rule: tc egress sees them as a box's NAT made
        /// them (docs/ARCHITECTURE.md, "Boxes that translate"). Such an entry is never written held: no queue rule
        /// can take a held packet of it to the agent, so tc egress would pass it untranslated (the NAT'd tuple on
        /// the wire, at no subsession).
        public var afterQueueRules: Bool
        public init(hook: Hook, key: FiveTuple, target: FiveTuple, seqDelta: Int32 = 0, afterQueueRules: Bool = false) {
            self.hook = hook
            self.key = key
            self.target = target
            self.seqDelta = seqDelta
            self.afterQueueRules = afterQueueRules
        }
    }
}

extension SessionTable.Record {
    /// The record's translations for the fast path, in a fixed order (the restart compares them with the map).
    public var fastPathTranslations: [FastPath.Translation] {
        var result: [FastPath.Translation] = []
        if let link = leftLink {
            let (left, delta) = (link.active.tuple, link.active.seqDelta)
            result.append(.init(hook: .ingress, key: left, target: session, seqDelta: delta))
            result.append(.init(hook: .egress, key: session.reversed, target: left.reversed, seqDelta: delta))
        }
        if let link = rightLink {
            let (right, delta, session) = (link.active.tuple, link.active.seqDelta, rightSession)
            result.append(.init(hook: .egress, key: session, target: right, seqDelta: delta))
            result.append(.init(hook: .ingress, key: right.reversed, target: session.reversed, seqDelta: delta))
        }
        if let translated, leftLink != nil, rightLink != nil {
            // A box that translates (docs/ARCHITECTURE.md, "Boxes that translate"): the egress queue rules run before
            // its NAT is complete (source NAT comes after them, the reply's destination NAT is undone after them),
            // where the packets carry a tuple between the two. An identity entry for it tells the rules that the
            // kernel carries them (tc egress, after the NAT, sees the translated tuples above).
            let between = FiveTuple(srcAddr: session.srcAddr, srcPort: session.srcPort,
                                    dstAddr: translated.dstAddr, dstPort: translated.dstPort)
            // The tuples tc egress sees after the NAT and the rules never do (source NAT forward, the reply's
            // destination NAT undone backward): their entries are never held (``FastPath/Translation/afterQueueRules``).
            for i in result.indices where result[i].hook == .egress
                && (result[i].key == translated && between != translated
                    || result[i].key == session.reversed && between.reversed != session.reversed) {
                result[i].afterQueueRules = true
            }
            if between != translated { result.append(.init(hook: .egress, key: between, target: between, seqDelta: 0)) }
            if between.reversed != session.reversed {
                result.append(.init(hook: .egress, key: between.reversed, target: between.reversed, seqDelta: 0))
            }
        }
        return result
    }
}

