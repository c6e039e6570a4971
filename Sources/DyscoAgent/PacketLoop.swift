import AnchorBuffer
import CLinux
import DyscoBPF
import DyscoCore
import Foundation
import Logging
import Synchronization

/// Work other threads post for the packet thread (buffer releases) and the eventfd that wakes it: posted work runs
/// within microseconds, on an idle queue too (there is no receive timeout).
final class PacketMailbox: Sendable {
    let wakeup: Wakeup
    private let releases = Mutex<[UInt64]>([])
    private let posted = Atomic<Bool>(false)

    init() throws { wakeup = try Wakeup() }

    /// Asks the packet thread to issue a session's held packets, in order, with the translations now in force.
    func post(release chainID: UInt64) {
        releases.withLock { $0.append(chainID) }
        posted.store(true, ordering: .releasing)
        wakeup.signal()
    }

    /// Cheap check between packets.
    var hasPosted: Bool { posted.load(ordering: .relaxed) }
    var isEmpty: Bool { releases.withLock { $0.isEmpty } }

    /// The posted releases, in order (the packet thread).
    func take() -> [UInt64] {
        posted.store(false, ordering: .relaxed)
        return releases.withLock { work in
            defer { work.removeAll() }
            return work
        }
    }
}

/// The packet thread: `poll`s the NFQUEUE socket, the mailbox's eventfd and the kernel path's event descriptor
/// (BPF: the ring buffer, whose FIN/RST/ESTABLISHED reports go to the processor's bookkeeping here, serialized with
/// the packets and persisted with the turn), runs each queued packet through the processor and gives its verdict (one `sendmsg` with an iovec, so the packet is not copied), keeps the packets
/// an anchor holds, and ends each turn by persisting its table changes and, at the quiet point, committing the
/// fast-path batch (``KernelPath/commitIfDue(queueEmpty:now:)``). Packets ≤ 1 KiB are copied to a scratch buffer with room for the Dysco
/// trailer; larger ones (never a SYN) are rewritten in place in the receive buffer.
final class PacketLoop: @unchecked Sendable {
    static let smallPacketLimit = 1024
    static let scratchCapacity = 2048

    private let dataplane: AgentDataplane
    private let mailbox: PacketMailbox
    // Confined to the packet thread once `start()` returns (init and deinit run before/after it).
    private let queueSocket: NetfilterQueueSocket
    private var buffer: AnchorBuffer<HeldPacket>
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private let started = Atomic<Bool>(false)
    /// Copies of the buffer's totals, written by the packet thread when it appends or releases, read by scrapes.
    let bufferOccupancy = BufferOccupancy()

    init(dataplane: AgentDataplane, queueSocket: NetfilterQueueSocket, bufferLimits: AnchorBuffer<HeldPacket>.Limits,
         logger: Logger) {
        self.dataplane = dataplane
        mailbox = dataplane.mailbox
        self.queueSocket = queueSocket
        buffer = AnchorBuffer(limits: bufferLimits)
        self.logger = logger
    }

    func start() {
        started.store(true, ordering: .relaxed)
        let thread = Thread { [self] in
            run()
            done.signal()
        }
        thread.name = "dysco-nfqueue"
        thread.stackSize = 1 << 20
        thread.start()
    }

    /// Tells the thread to stop after its turn (``join()`` waits for it).
    func requestStop() { stopping.store(true, ordering: .relaxed) }

    /// Wakes the thread and waits up to 2 s for it to end (after ``requestStop()``).
    func join() {
        guard started.load(ordering: .relaxed) else { return }
        mailbox.wakeup.signal()
        _ = done.wait(timeout: .now() + 2)
    }

    private func run() {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.scratchCapacity, alignment: 16)
        defer { scratch.deallocate() }
        let fastPath = dataplane.fastPath
        var fds = [pollfd(fd: queueSocket.fileDescriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: mailbox.wakeup.fd, events: Int16(POLLIN), revents: 0)]
        // The kernel path's event descriptor (BPF: the ring buffer's epoll fd), if it reports packets it carried.
        if let eventsFD = fastPath?.eventsFD { fds.append(pollfd(fd: eventsFD, events: Int16(POLLIN), revents: 0)) }
        let count = nfds_t(fds.count)
        while !stopping.load(ordering: .relaxed) {
            // Block until a packet, posted work (eventfd) or kernel events arrive, or a fast-path commit is due.
            // The barrier is read before each look at the queue: an empty queue then proves that every packet which
            // missed a new key's entry written before that barrier has been verdicted (docs/BPF.md "New keys").
            var barrier = fastPath?.queueBarrier ?? 0
            let ready = poll(&fds, count, fastPath?.pollTimeout(now: dysco_monotonic_ns()) ?? -1)
            if ready < 0 { continue }
            if fds[1].revents != 0 {
                mailbox.wakeup.drain()
                runPosted()
            }
            // Kernel events before this turn's packets: a FIN the kernel carried precedes whatever of the session
            // still reaches the queue (its last ACK once the session left the kernel).
            if fds.count > 2, fds[2].revents != 0, let fastPath { dataplane.kernelEvents(fastPath.takeEvents()) }
            // Read what is waiting (bounded, so posted work is not starved under load).
            var queueEmpty = fds[0].revents == 0
            if !queueEmpty {
                for _ in 0..<64 {
                    barrier = fastPath?.queueBarrier ?? 0
                    do {
                        if try !queueSocket.receive({ packet in
                            // Posted releases first: a released session's held packets go before its later ones.
                            if mailbox.hasPosted { runPosted() }
                            try handle(&packet, scratch: scratch)
                            // New keys wait until every packet queued before their barrier is verdicted (BPF).
                            fastPath?.queueRead(packetID: packet.id)
                        }) {
                            queueEmpty = true
                            break
                        }
                    } catch {
                        if stopping.load(ordering: .relaxed) { break }
                        logger.error("nfqueue error", metadata: ["error": "\(error)"])
                        break
                    }
                }
            }
            if !mailbox.isEmpty { runPosted() }
            // The turn's table changes go to the state file once, after its verdicts, and its owned-key changes to
            // the worker (docs/ARCHITECTURE.md, "Agent crash and restart": a crash loses at most the changes of the
            // packets of its last turn).
            dataplane.persistTurn()
            // New keys written HELD before `barrier` go back to the kernel by the hand-over rule.
            if queueEmpty, let fastPath { fastPath.queueDrained(through: barrier, now: dysco_monotonic_ns()) }
            // Fast-path changes go to the kernel here, with no packet of ours left in the queue (``KernelPath/commitIfDue(queueEmpty:now:)``).
            fastPath?.commitIfDue(queueEmpty: queueEmpty, now: dysco_monotonic_ns())
        }
    }

    /// Releases the buffers other threads asked for: each held packet goes through the processor again (now
    /// translated for the path in force) and gets its verdict, in the order it came.
    private func runPosted() {
        for chainID in mailbox.take() {
            // On the packet thread, so no packet of the queue is handled between these two steps.
            dataplane.processor.withLock { $0.endRelease(chainID: chainID) }
            let released = buffer.take(session: chainID)
            publishBufferOccupancy()
            for held in released {
                var bytes = held.bytes
                do {
                    try bytes.withUnsafeMutableBytes { raw in
                        try handle(QueuedPacket(id: held.id, base: raw.baseAddress!, count: raw.count, capacity: raw.count,
                                                hook: held.hook, checksum: held.checksum, mayHold: false,
                                                counted: held.counted),
                                   now: dysco_monotonic_coarse_ns())
                    }
                } catch {
                    logger.error("verdict for a released packet failed", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    @inline(__always)
    private func handle(_ packet: inout NetfilterQueueSocket.Packet, scratch: UnsafeMutableRawPointer) throws {
        guard let payload = packet.payload, packet.length > 0 else {
            try queueSocket.verdict(id: packet.id, accept: true)
            return
        }
        let small = packet.length <= Self.smallPacketLimit
        let base = small ? scratch : payload
        if small { scratch.copyMemory(from: payload, byteCount: packet.length) }
        let queued = QueuedPacket(id: packet.id, base: base, count: packet.length,
                                  capacity: small ? Self.scratchCapacity : packet.length,
                                  hook: packet.hook == .preRouting ? .ingress : .egress,
                                  checksum: packet.checksumNotReady ? .partial : .complete, mayHold: true,
                                  counted: packet.hook != .preRouting || packet.mark & BPFHandOver.countedMark != 0,
                                  mark: packet.mark)
        let now = dysco_monotonic_coarse_ns()
        try handle(queued, now: now)
    }

    /// A packet through the processor, then its verdict and effects. The state file gets its changes (a new
    /// session, a FIN) at the end of the turn (``AgentDataplane/persistTurn()``).
    /// A packet of a translation being handed over to the kernel (BPF) is reported once its verdict went out
    /// (an anchor's held packet when it is released): the key is read from the bytes as queued, before the
    /// processor rewrites them.
    @inline(__always)
    private func handle(_ packet: QueuedPacket, now: UInt64) throws {
        let handOverKey = dataplane.fastPath?.handOverKey(packet.base, count: packet.count, hook: packet.hook)
        let outcome = dataplane.processor.withLock { state in
            let outcome = state.process(packet.base, count: packet.count, capacity: packet.capacity, hook: packet.hook,
                                        checksum: packet.checksum, now: now)
            state.counters.count(outcome.verdict)
            return outcome
        }
        let sent = try finish(packet, outcome)
        if sent, let handOverKey { dataplane.fastPath?.verdicted(handOverKey, counted: packet.counted) }
    }

    /// The one place a verdict goes to the kernel; then the effects go to the rest of the agent. False when no
    /// verdict went out for this packet here (an anchor keeps it, or a full buffer's retry gave it).
    @inline(__always) @discardableResult
    private func finish(_ packet: QueuedPacket, _ outcome: PacketOutcome) throws -> Bool {
        // A session opened in the kernel with this SYN reaches the map before the SYN leaves.
        let applied = dataplane.applyOpenings(outcome.effects)
        defer { if !applied { dataplane.apply(outcome.effects) } }
        let mark = outcome.markBits == 0 ? nil : packet.mark | outcome.markBits
        switch outcome.verdict {
        case .accept:
            try queueSocket.verdict(id: packet.id, accept: true, mark: mark)
        case .acceptModified(let length):
            try queueSocket.verdict(id: packet.id, accept: true, packet: UnsafeRawBufferPointer(start: packet.base, count: length),
                                    mark: mark)
        case .drop:
            try queueSocket.verdict(id: packet.id, accept: false)
        case .hold(let chainID):
            // A released packet is not held twice (its session no longer buffers); a full buffer's packet neither.
            guard packet.mayHold else {
                try queueSocket.verdict(id: packet.id, accept: true)
                return true
            }
            // A migrating session's new data: keep the kernel's packet (no verdict) and a copy of its bytes.
            let held = HeldPacket(id: packet.id, bytes: [UInt8](UnsafeRawBufferPointer(start: packet.base, count: packet.count)),
                                  hook: packet.hook, checksum: packet.checksum, counted: packet.counted)
            let appended = buffer.append(held, size: packet.count, session: chainID)
            publishBufferOccupancy()
            guard !appended else { return false }
            // Full (documented bound): this packet and the rest go on the old path; the reconfiguration is
            // cancelled, which releases the buffer there too.
            var again = packet
            again.mayHold = false
            dataplane.processor.withLock { $0.anchorStopHolding(chainID: chainID) }
            try handle(again, now: dysco_monotonic_coarse_ns())
            dataplane.bufferFull(chainID)
            return false
        }
        return true
    }

    /// The anchor buffer's occupancy for the metrics (the buffer is the packet thread's; readers get these copies).
    private func publishBufferOccupancy() {
        bufferOccupancy.packets.store(buffer.totalPackets, ordering: .relaxed)
        bufferOccupancy.bytes.store(buffer.totalBytes, ordering: .relaxed)
        bufferOccupancy.refused.store(buffer.refused, ordering: .relaxed)
    }
}

/// The anchor buffer's totals as the packet thread last published them.
final class BufferOccupancy: Sendable {
    let packets = Atomic<Int>(0)
    let bytes = Atomic<Int>(0)
    let refused = Atomic<UInt64>(0)
}

/// A packet on its way through the processor: where its bytes are (the scratch buffer, the receive buffer, a
/// released copy) and what the processor needs to know.
struct QueuedPacket {
    var id: UInt32
    var base: UnsafeMutableRawPointer
    var count: Int
    var capacity: Int
    var hook: HookPoint
    var checksum: ChecksumState
    /// False for a packet released from the anchor buffer, or refused by a full one: it is not held (again).
    var mayHold: Bool
    /// The BPF program counted it for the hand-over rule (ingress: its mark; egress: always).
    var counted: Bool = true
    /// Its mark as queued (a verdict that tags it ORs bits into it, ``PacketOutcome/markBits``).
    var mark: UInt32 = 0
}

/// A packet an anchor holds: its NFQUEUE id (no verdict yet) and its bytes as they came (untranslated).
public struct HeldPacket: Sendable {
    var id: UInt32
    var bytes: [UInt8]
    var hook: HookPoint
    var checksum: ChecksumState
    /// As ``QueuedPacket/counted``.
    var counted: Bool = true
}
