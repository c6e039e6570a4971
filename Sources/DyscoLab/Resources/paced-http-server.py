# The sender-paced HTTP file server: python3 paced-http-server.py ROOT ADDRESS PORT BYTES_PER_SECOND
# Each response is written in 32 KiB chunks no faster than BYTES_PER_SECOND (listen backlog 1024), so a download
# stays mid-transfer for size / rate seconds. Started by PacedHTTPServer (Sources/DyscoLab/PacedHTTP.swift).
import http.server, os, socket, socketserver, sys, time
root, addr, port, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(root, self.path.lstrip('/'))
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header('Content-Length', str(size))
        self.end_headers()
        start, sent = time.monotonic(), 0
        with open(path, 'rb') as f:
            while True:
                chunk = f.read(32768)
                if not chunk: break
                self.wfile.write(chunk)
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0: time.sleep(ahead)
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
Server((addr, port), Handler).serve_forever()
