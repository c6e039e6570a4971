import DyscoCore
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// The agent's `/metrics` endpoint (`agent --metrics ADDR:PORT`): a small HTTP/1.1 server on SwiftNIO in the
/// agent's network namespace. `GET /metrics` answers the Prometheus text format (`text/plain; version=0.0.4`)
/// that `render` returns; other paths are 404, other methods 405. On the agent's shared event loops; a scrape is
/// rendered off them (it reads the kernel's counters), so the control traffic on those loops never waits for it.
final class MetricsServer: Sendable {
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private let group: any EventLoopGroup
    /// The group was made for this server (nil `group` at init) and goes with it.
    private let ownsGroup: Bool
    private let channel: any Channel
    private let logger: Logger
    let endpoint: MetricsEndpoint

    /// Binds `endpoint`; throws a ``ControlError`` naming the address when it cannot (in use, not an address of
    /// this namespace, no permission).
    init(endpoint: MetricsEndpoint, group: (any EventLoopGroup)? = nil, logger: Logger,
         render: @escaping @Sendable () -> [UInt8]) throws {
        self.endpoint = endpoint
        self.logger = logger
        ownsGroup = group == nil
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            channel = try ServerBootstrap(group: self.group)
                .serverChannelOption(.backlog, value: 64)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(Handler(render: render))
                    }
                }
                .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: endpoint.address.description, port: Int(endpoint.port))
                .wait()
        } catch {
            if ownsGroup { try? self.group.syncShutdownGracefully() }
            let hint = if let io = error as? IOError {
                switch io.errnoCode {
                case EADDRINUSE: " (address in use: another agent or program listens on it; choose another --metrics port)"
                case EADDRNOTAVAIL: " (not an address of this network namespace; 0.0.0.0 listens on every address)"
                case EACCES, EPERM: " (permission denied)"
                default: ""
                }
            } else { "" }
            throw ControlError(message: "cannot serve metrics on \(endpoint): \(error)\(hint)")
        }
        logger.info("metrics served", metadata: ["metrics.endpoint": "http://\(endpoint)/metrics"])
    }

    func close() {
        try? channel.close().wait()
        if ownsGroup { try? group.syncShutdownGracefully() }
    }

    private final class Handler: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        let render: @Sendable () -> [UInt8]
        init(render: @escaping @Sendable () -> [UInt8]) { self.render = render }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .head(let head) = unwrapInboundIn(data) else { return }
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            var headers = HTTPHeaders()
            if path != "/metrics" {
                headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
                respond(context, head, .notFound, headers, Array("not found: the metrics are at /metrics\n".utf8))
            } else if head.method != .GET && head.method != .HEAD {
                headers.add(name: "Allow", value: "GET, HEAD")
                headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
                respond(context, head, .methodNotAllowed, headers, Array("only GET /metrics\n".utf8))
            } else {
                headers.add(name: "Content-Type", value: MetricsServer.contentType)
                // Rendered off the event loops, which the agent's control traffic shares (HTTP pipelining keeps
                // the answers in order: the pipeline holds the next request until this one's end is written).
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                let eventLoop = context.eventLoop
                let render = render
                let headers = headers
                DispatchQueue.global().async {
                    let body = render()
                    eventLoop.execute {
                        let (handler, context) = bound.value
                        handler.respond(context, head, .ok, headers, body)
                    }
                }
            }
        }

        private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ status: HTTPResponseStatus,
                             _ headers: HTTPHeaders, _ body: [UInt8]) {
            var headers = headers
            headers.add(name: "Content-Length", value: "\(body.count)")
            let keepAlive = head.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
                          promise: nil)
            if head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
            }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive {
                let channel = context.channel
                done.whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}
