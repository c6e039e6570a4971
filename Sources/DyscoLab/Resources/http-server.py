# The lab's HTTP file server: python3 http-server.py ADDRESS PORT ROOT
# Python's threading HTTP server with a listen backlog of 1024 (`python3 -m http.server` listens with 5, which
# drops SYNs once 100 clients connect at once). Started by Lab (Sources/DyscoLab/Lab.swift) on every server.
import functools, http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
