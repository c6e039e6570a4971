import DyscoCore
import CNftables
import DyscoSystem
import Foundation

/// A libnftables context (one netlink socket, in the namespace of the thread that creates it). Commands are
/// nft syntax run as one transaction per call; errors carry libnftables' own message. Not thread-safe: the
/// fast-path worker owns it.
public final class NftablesContext {
    public struct CommandError: Error, CustomStringConvertible {
        public var operation: String
        public var message: String
        public var description: String { "nftables \(operation): \(message.trimmingCharacters(in: .whitespacesAndNewlines))" }
    }

    private let ctx: OpaquePointer

    public init() throws {
        ctx = try sysCall("nft_ctx_new") { nft_ctx_new(dysco_nft_ctx_default()) }
        nft_ctx_buffer_output(ctx)
        nft_ctx_buffer_error(ctx)
    }

    deinit { nft_ctx_free(ctx) }

    /// Runs `commands` as one transaction: all of them take effect, or none.
    @discardableResult
    public func run(_ commands: String, operation: String) throws -> String {
        let rc = nft_run_cmd_from_buffer(ctx, commands)
        if rc != 0 {
            let message = nft_ctx_get_error_buffer(ctx).map { String(cString: $0) } ?? "error \(rc)"
            throw CommandError(operation: operation, message: message)
        }
        return nft_ctx_get_output_buffer(ctx).map { String(cString: $0) } ?? ""
    }

    /// Runs a listing command with JSON output; `terse` leaves out set and map elements (`nft -t`).
    public func json(_ command: String, terse: Bool = false) throws -> Data {
        nft_ctx_output_set_flags(ctx, dysco_nft_output_json() | (terse ? dysco_nft_output_terse() : 0))
        defer { nft_ctx_output_set_flags(ctx, 0) }
        return Data(try run(command, operation: command).utf8)
    }
}
