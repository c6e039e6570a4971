# The drain benchmark's server: python3 trickle-server.py ADDRESS PORT SECONDS [INTERVAL]
# Writes to every connection 64 bytes every INTERVAL seconds (default 1; byte k of a stream is k mod 251) for
# SECONDS, or until SIGUSR1 (several may share the port: SO_REUSEPORT): then it writes one more chunk to every connection (so each stream carries bytes after
# whatever happened before the signal) and closes. Started by TrickleTraffic (Sources/DyscoBench/DrainBenchmark.swift).
import asyncio, resource, signal, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
interval = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
PATTERN = bytes(k % 251 for k in range(251 * 64))
stop = None
async def serve(reader, writer):
    loop = asyncio.get_running_loop(); end = loop.time() + seconds; offset = 0
    try:
        while loop.time() < end and not stop.is_set():
            start = offset % 251
            writer.write(PATTERN[start:start + 64]); offset += 64
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
        if stop.is_set():
            start = offset % 251
            writer.write(PATTERN[start:start + 64]); offset += 64
            await writer.drain()
    finally:
        writer.close()
async def main():
    global stop
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    srv = await asyncio.start_server(serve, addr, port, backlog=4096, reuse_port=True)
    async with srv: await srv.serve_forever()
asyncio.run(main())
