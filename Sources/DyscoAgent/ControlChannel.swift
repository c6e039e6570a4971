import DyscoCore
import Foundation
import NIOCore
import NIOPosix

/// The agent's local control channel: a Unix stream socket (``AgentControlPaths``) speaking one JSON
/// request line and one JSON response per connection.
public struct ControlRequest: Codable, Sendable {
    public enum Command: String, Codable, Sendable {
        /// The agent's snapshot (``AgentSnapshot``).
        case sessions
        /// Take `sessions` back to the slow path; answered once the kernel no longer carries them.
        case hold
        /// Return held `sessions` to the fast path.
        case release
        /// Move this (old) box's sessions matching `replace` to new boxes (paper §3); answered when all ended.
        case replace
        /// Show, reload (the config file) or change the cordons of the agent's policy (``PolicyRequest``).
        case policy
        /// The middlebox on this host reports what it does to a session's byte streams (``DeltaRequest``, §3.4).
        case delta
        /// A session-terminating proxy on this host spliced two sockets (``SpliceRequest``; the `LD_PRELOAD`
        /// interposer, libdysco-splice.so, sends it).
        case splice
    }

    public var command: Command
    public var sessions: [UInt64]?
    public var replace: ReplaceRequest?
    public var policy: PolicyRequest?
    public var delta: DeltaRequest?
    public var splice: SpliceRequest?
    /// `sessions`: the page after this session id (nil: from the first), at most `limit` sessions (the agent
    /// caps it at ``AgentSnapshot/pageLimit``).
    public var after: UInt64?
    public var limit: Int?

    public init(_ command: Command, sessions: [UInt64]? = nil, replace: ReplaceRequest? = nil, policy: PolicyRequest? = nil,
                delta: DeltaRequest? = nil, after: UInt64? = nil, limit: Int? = nil) {
        self.command = command
        self.delta = delta
        self.sessions = sessions
        self.replace = replace
        self.policy = policy
        self.after = after
        self.limit = limit
    }
}

/// `dysco-migrate delta`: the box on the agent's host changes a session's byte streams (paper §3.4; the box's side
/// of `dysco_splice`). `session` as the box sees it, either direction; the deltas in that direction's terms.
public struct DeltaRequest: Codable, Sendable, Equatable {
    public var session: FiveTuple
    /// Bytes the box added (negative: removed) to the stream from `session`'s source to its destination.
    public var forward: Int32
    /// Bytes it added to the other stream.
    public var reverse: Int32
    public init(session: FiveTuple, forward: Int32, reverse: Int32) {
        self.session = session
        self.forward = forward
        self.reverse = reverse
    }
}

/// A proxy on the agent's host splices two TCP sockets (paper §4, `dysco_splice(fd_in, fd_out, delta)`): each
/// socket as it sees itself, local address → peer; `from` is read, `to` written; `delta` bytes the proxy added to
/// the stream from `from` before it went to `to` (negative: removed; 0 for a TCP-mode proxy).
public struct SpliceRequest: Codable, Sendable, Equatable {
    public var from: FiveTuple
    public var to: FiveTuple
    public var delta: Int32?
    public init(from: FiveTuple, to: FiveTuple, delta: Int32 = 0) {
        self.from = from
        self.to = to
        self.delta = delta
    }
}

/// The agent's answer to a ``SpliceRequest``: the joined record and the proxy's deltas, or why not.
public struct SpliceReply: Codable, Sendable, Equatable {
    public var session: UInt64?
    public var boxDelta: SessionTable.BoxDelta?
    /// The two sockets were joined before (the other direction's splice).
    public var alreadyJoined: Bool?
    /// The proxy's removal from the session: "started", or why not ("not removed: …").
    public var removal: String?
    public var error: String?
    var handshakeUnseen: Bool { error == SessionTable.JoinError.handshakeUnseen.description }
}

/// The agent's answer to a ``DeltaRequest``.
public struct DeltaReply: Codable, Sendable, Equatable {
    /// The agent's session id (nil: no session with that tuple crosses this host).
    public var session: UInt64?
    public var error: String?
}

/// `dysco-migrate policy …` and `drain`'s cordon, at one agent.
public struct PolicyRequest: Codable, Sendable {
    public enum Action: String, Codable, Sendable { case show, reload, cordon, uncordon }
    public var action: Action
    /// The box to cordon or uncordon.
    public var address: IPAddress?
    /// cordon: where new sessions go instead.
    public var replacements: [IPAddress]?

    public init(_ action: Action, address: IPAddress? = nil, replacements: [IPAddress]? = nil) {
        self.action = action
        self.address = address
        self.replacements = replacements
    }
}

/// The agent's policy as it stands (answer to every ``PolicyRequest``); `error` set when the request failed
/// (nothing changed then).
public struct PolicyReply: Codable, Sendable {
    public var configPath: String?
    public var config: AgentConfig
    public var cordons: [Cordons.Cordon]
    /// Times the config file was loaded since the agent started (1 = only at start).
    public var loads: Int
    public var error: String?

    public init(configPath: String?, config: AgentConfig, cordons: [Cordons.Cordon], loads: Int, error: String? = nil) {
        self.configPath = configPath
        self.config = config
        self.cordons = cordons
        self.loads = loads
        self.error = error
    }
}

/// The answer to hold/release: the sessions it applied to.
public struct ControlPathReply: Codable, Sendable {
    public var sessions: [UInt64]
    public init(sessions: [UInt64]) { self.sessions = sessions }
}

public struct ControlError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Serves control requests on a Unix socket with SwiftNIO.
public final class ControlServer: Sendable {
    /// A request line longer than this closes the connection (a `drain` batch names up to ~10,000 chain ids).
    public static let maxRequestBytes = 4 << 20
    private let group: any EventLoopGroup
    /// The group was made for this server (nil `group` at init) and goes with it.
    private let ownsGroup: Bool
    private let channel: Channel
    public let path: String

    /// Binds `path` (replacing a stale socket file) and answers each request with `respond`. `group`: the event
    /// loops to run on (the agent's shared group); nil: a one-thread group of its own.
    public init(path: String, group: (any EventLoopGroup)? = nil,
                respond: @escaping @Sendable (ControlRequest) async -> Data) throws {
        self.path = path
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        let ownsGroup = group == nil
        let group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            channel = try ServerBootstrap(group: group)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(RequestHandler(respond: respond))
                    }
                }
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
                .wait()
        } catch {
            if ownsGroup { try? group.syncShutdownGracefully() }
            throw error
        }
        self.group = group
        self.ownsGroup = ownsGroup
    }

    public func close() {
        try? channel.close().wait()
        if ownsGroup { try? group.syncShutdownGracefully() }
        try? FileManager.default.removeItem(atPath: path)
    }

    private final class RequestHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        private let respond: @Sendable (ControlRequest) async -> Data
        private var pending = ByteBuffer()

        init(respond: @escaping @Sendable (ControlRequest) async -> Data) { self.respond = respond }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var chunk = unwrapInboundIn(data)
            pending.writeBuffer(&chunk)
            guard let newline = pending.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
                if pending.readableBytes > ControlServer.maxRequestBytes { context.close(promise: nil) }
                return
            }
            let line = pending.readableBytesView[pending.readerIndex..<newline]
            let request = try? JSONDecoder().decode(ControlRequest.self, from: Data(line))
            let promise = context.eventLoop.makePromise(of: Data.self)
            let respond = respond
            promise.completeWithTask {
                guard let request else { return Data(#"{"error":"unknown request"}"#.utf8) }
                return await respond(request)
            }
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            promise.futureResult.whenSuccess { reply in
                var reply = reply
                reply.append(UInt8(ascii: "\n"))
                let context = bound.value
                let out = context.channel.allocator.buffer(bytes: reply)
                context.writeAndFlush(NIOAny(out)).whenComplete { _ in bound.value.close(promise: nil) }
            }
        }
    }
}

/// Sends one request to an agent's control socket and returns the response bytes.
public enum ControlClient {
    public static func request(_ request: ControlRequest, path: String) async throws -> Data {
        guard FileManager.default.fileExists(atPath: path) else {
            let directory = (path as NSString).deletingLastPathComponent
            if access(directory, X_OK) != 0, errno == EACCES {
                throw ControlError(message: "cannot look for the agent's control socket in \(directory): permission denied (run this command as root)")
            }
            throw ControlError(message: "no agent control socket at \(path): is `dysco-migrate agent` running in that namespace?")
        }
        let collector = ResponseCollector()
        let channel: Channel
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(collector)
                    }
                }
                .connect(unixDomainSocketPath: path).get()
        } catch {
            throw ControlError(message: "cannot connect to the agent at \(path): \(error)\(connectHint(errno: (error as? IOError)?.errnoCode))")
        }
        var line = try JSONEncoder().encode(request)
        line.append(UInt8(ascii: "\n"))
        try await channel.writeAndFlush(channel.allocator.buffer(bytes: line)).get()
        try await channel.closeFuture.get()
        return collector.received
    }

    /// The agent's whole snapshot, page by page (each page is one request; the agent holds its packet lock for
    /// one page only). `limit` stops after that many sessions. A session created or removed between two pages
    /// may be missed or listed once more; the counters are those of the last page.
    public static func snapshot(path: String, after: UInt64? = nil, limit: Int = .max) async throws -> AgentSnapshot {
        var cursor = after
        var sessions: [AgentSnapshot.Session] = []
        while true {
            let want = min(limit - sessions.count, AgentSnapshot.pageLimit)
            let data = try await request(ControlRequest(.sessions, after: cursor, limit: want), path: path)
            var page: AgentSnapshot
            do { page = try JSONDecoder().decode(AgentSnapshot.self, from: data) } catch {
                throw ControlError(message: "the agent at \(path) answered: \(String(decoding: data.prefix(300), as: UTF8.self))")
            }
            sessions += page.sessions
            guard let next = page.next, sessions.count < limit, !page.sessions.isEmpty else {
                page.sessions = sessions
                page.next = sessions.count < limit ? nil : page.next
                return page
            }
            cursor = next
        }
    }

    /// What a failed connect most likely means, from its errno: only a refused connection is a stale socket.
    public static func connectHint(errno: Int32?) -> String {
        switch errno {
        case ECONNREFUSED: " (nothing listens there: a stale socket of a stopped agent; start the agent again)"
        case EACCES, EPERM: " (permission denied: the control socket is root's; run this command as root)"
        case ENOENT: " (the socket went away: the agent stopped)"
        case EAGAIN: " (the agent is not accepting connections: it is overloaded or stuck)"
        default: ""
        }
    }

    private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        // Touched only on the channel's event loop, read after closeFuture completes.
        var received = Data()

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            if let bytes = buffer.readBytes(length: buffer.readableBytes) { received.append(contentsOf: bytes) }
        }
    }
}
