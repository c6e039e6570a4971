import DyscoBPF
import DyscoCore
import DyscoSystem
import Foundation
import Logging

extension DataplaneAgent {
    /// What ``purge(queue:logger:stateFile:)`` removed.
    public struct PurgeReport: Sendable, Codable {
        public var rules = false
        public var stateFile = false
        /// The BPF datapath: its tc programs were attached to a device of the namespace, or its pin
        /// directory existed (both removed).
        public var bpf = false
    }

    /// Removes what a stopped agent left for its successor (`agent --purge`): the NFQUEUE rules, the
    /// BPF datapath's tc programs and pins (`bpfPinDirectory`: where that agent pinned, if known) and the state
    /// file; the sessions they carried are then lost. Refused while an agent holds `queue`.
    public static func purge(queue: UInt16, logger: Logger, stateFile: String,
                             bpfPinDirectory: String? = nil) throws -> PurgeReport {
        // Root gets EPERM (not EBUSY) for a queue another socket has bound.
        do { _ = try NetfilterQueueSocket(queue: queue) } catch let error as SystemCallError
            where error.errno == EBUSY || error.errno == EPERM {
            throw ControlError(message: "an agent is running on queue \(queue) in this namespace (binding it: \(error)); "
                               + "stop it first (SIGTERM)")
        }
        var report = PurgeReport()
        report.rules = QueueRules.present()
        try QueueRules.remove(logger: logger)
        for interface in BPFKernelPath.devices() {
            guard let attached = try? BPFDatapath.attached(interface: interface),
                  attached.ingress != nil || attached.egress != nil else { continue }
            try BPFDatapath.detach(interface: interface)
            report.bpf = true
            logger.debug("detached the BPF programs", metadata: ["bpf.interface": "\(interface)"])
        }
        if let bpfPinDirectory, let pins = try? FileManager.default.contentsOfDirectory(atPath: bpfPinDirectory) {
            for pin in pins { unlink(bpfPinDirectory + "/" + pin) }
            rmdir(bpfPinDirectory)
            report.bpf = true
        }
        report.stateFile = unlink(stateFile) == 0
        unlink(stateFile + ".tmp")
        return report
    }
}
