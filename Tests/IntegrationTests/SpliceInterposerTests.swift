import DyscoSystem
import Foundation
import Testing

/// libdysco-splice.so (Sources/DyscoSplice), preloaded into a python3 "proxy" that splices loopback TCP sockets
/// through one reused pipe, as HAProxy does, with a fake agent on a Unix socket in the same script. No root and no
/// network namespace; it needs the built library beside $DYSCO_BIN (`make release`, or `swift build`) and python3 ≥ 3.10
/// (os.splice). The check through a real HAProxy is manual (LD_PRELOAD into `haproxy -db`, see dysco_splice.h).
@Suite struct SpliceInterposerTests {
    static func library() throws -> String {
        let path = URL(fileURLWithPath: try TestSupport.dyscoBinary()).deletingLastPathComponent()
            .appendingPathComponent("libdysco-splice.so").path
        guard FileManager.default.fileExists(atPath: path) else {
            throw SpliceTestError("no libdysco-splice.so beside \(try TestSupport.dyscoBinary()): run `make release`")
        }
        return path
    }

    struct SpliceTestError: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// The "proxy": each pair of sockets is reported once, whichever way bytes go first, also through a reused
    /// pipe; a closed socket's pairs are forgotten; dysco_splice reports its delta; the JSON is the request the
    /// agent's `splice` command reads.
    static let script = #"""
    import ctypes, json, os, socket, sys
    lib, agent_path = sys.argv[1], sys.argv[2]
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.bind(agent_path)
    agent.listen(8)
    agent.settimeout(10)
    def report():
        c, _ = agent.accept()
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk: break
            data += chunk
        c.sendall(b'{"ok":true}\n')
        c.close()
        return json.loads(data)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    def pair():
        outside = socket.create_connection(listener.getsockname())
        inside, _ = listener.accept()
        return outside, inside
    def end(s):
        local, peer = s.getsockname(), s.getpeername()
        return {"src": local[0], "sport": local[1], "dst": peer[0], "dport": peer[1]}
    def relay(src_out, src_in, dst_in, dst_out, r, w, payload):
        src_out.sendall(payload)
        n = os.splice(src_in.fileno(), w, len(payload))
        assert os.splice(r, dst_in.fileno(), n) == n
        assert dst_out.recv(len(payload)) == payload
    a_out, a = pair()
    b_out, b = pair()
    r, w = os.pipe()
    relay(a_out, a, b, b_out, r, w, b"request")
    first = report()
    assert first == {"command": "splice", "splice": {"from": end(a), "to": end(b), "delta": 0}}, first
    relay(b_out, b, a, a_out, r, w, b"response")
    c_out, c = pair()
    d_out, d = pair()
    relay(d_out, d, c, c_out, r, w, b"next")
    second = report()
    assert second["splice"]["from"] == end(d) and second["splice"]["to"] == end(c), second
    b.close()
    b_out.close()
    e_out, e = pair()
    relay(a_out, a, e, e_out, r, w, b"again")
    third = report()
    assert third["splice"]["from"] == end(a) and third["splice"]["to"] == end(e), third
    dysco = ctypes.CDLL(lib, use_errno=True)
    assert dysco.dysco_splice(c.fileno(), d.fileno(), -3) == 0
    fourth = report()
    assert fourth == {"command": "splice", "splice": {"from": end(c), "to": end(d), "delta": -3}}, fourth
    assert dysco.dysco_splice(r, c.fileno(), 0) == -1 and ctypes.get_errno() == 88
    agent.settimeout(1)
    try:
        extra = report()
        raise AssertionError("unexpected report %r" % extra)
    except socket.timeout:
        pass
    print("ok")
    """#

    @Test("the preloaded library reports each spliced socket pair once, with both tuples, and dysco_splice's delta")
    func reportsSplicedPairs() throws {
        let library = try Self.library()
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("dysco-splice-test-\(getpid())-\(UInt32.random(in: 0 ... .max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = "\(directory)/agent.sock", log = "\(directory)/splice.log"
        let result = try Command.run(["env", "LD_PRELOAD=\(library)", "DYSCO_CONTROL_SOCKET=\(socket)",
                                      "DYSCO_SPLICE_LOG=\(log)", "python3", "-c", Self.script, library, socket],
                                     check: false)
        #expect(result.succeeded, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("ok"))
        let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(lines.count == 4, "\(lines)")
        #expect(lines.allSatisfy { $0.hasPrefix("reported 127.0.0.1:") && $0.hasSuffix(": {\"ok\":true}") }, "\(lines)")
    }
}
