# A raw SYN flooder: python3 syn-flood.py SRC DST DPORT COUNT KIND RATE   (KIND: plain | dysco; RATE 0: unlimited)
# IPPROTO_RAW, so the packets traverse the sending host's OUTPUT hooks; 'dysco' SYNs carry a trailer v2 with a
# random MAC (family 4 or 6, as the addresses are). Either family: IPv6 addresses make IPv6 SYNs (IPPROTO_RAW on
# AF_INET6 takes the packet's own IPv6 header). Prints: sent dropped seconds. Started by SynFlood
# (Sources/DyscoBench/FloodBenchmark.swift).
import errno, os, random, socket, struct, sys, time
src, dst, dport, count, kind, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
v6 = ":" in dst
family = socket.AF_INET6 if v6 else socket.AF_INET
s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
sa, da = socket.inet_pton(family, src), socket.inet_pton(family, dst)
def fold(x):
    while x >> 16: x = (x & 0xffff) + (x >> 16)
    return x
def sum16(b):
    if len(b) % 2: b += b"\0"
    return sum(struct.unpack("!%dH" % (len(b) // 2), b))
payload = b""
if kind == "dysco":
    # version 2, family, one remaining hop (the destination), flags 0 | chain id, nonce | session | hop | MAC | length | magic
    body = bytes([2, 6 if v6 else 4, 1, 0]) + os.urandom(16) + sa + da + struct.pack("!HH", 40000, dport) + da
    payload = body + os.urandom(16) + struct.pack("!H", len(body) + 22) + b"DYSC"
tlen = 20 + len(payload)
if v6:
    iph = struct.pack("!IHBB16s16s", 6 << 28, tlen, 6, 64, sa, da)
    pseudo = sum16(sa + da + struct.pack("!IxxxB", tlen, 6))
else:
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tlen, 0, 0x4000, 64, 6, 0, sa, da)
    pseudo = sum16(sa + da + struct.pack("!BBH", 0, 6, tlen))
rnd = random.Random()
ports = list(range(1024, 65536)); rnd.shuffle(ports)
sent = dropped = 0; t0 = time.time()
for i in range(count):
    if rate > 0 and i % 100 == 0:
        ahead = t0 + i / rate - time.time()
        if ahead > 0: time.sleep(ahead)
    tcp = struct.pack("!HHIIBBHHH", ports[i % len(ports)], dport, rnd.getrandbits(32), 0, 5 << 4, 2, 64240, 0, 0) + payload
    c = (~fold(pseudo + sum16(tcp))) & 0xffff
    pkt = iph + tcp[:16] + struct.pack("!H", c) + tcp[18:]
    while True:
        try:
            s.sendto(pkt, (dst, 0)); sent += 1; break
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.EAGAIN): time.sleep(0.0005); continue
            if e.errno == errno.EPERM: dropped += 1; break  # a local hook (the agent) dropped it
            raise
print(sent, dropped, time.time() - t0)
