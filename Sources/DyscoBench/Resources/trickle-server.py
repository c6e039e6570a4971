# The drain benchmark's server: python3 trickle-server.py ADDRESS PORT SECONDS
# Writes to every connection 64 bytes a second (byte k of a stream is k mod 251) for SECONDS, then closes.
# Started by TrickleTraffic (Sources/DyscoBench/DrainBenchmark.swift).
import asyncio, resource, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
PATTERN = bytes(k % 251 for k in range(251 * 64))
async def serve(reader, writer):
    loop = asyncio.get_running_loop(); end = loop.time() + seconds; offset = 0
    try:
        while loop.time() < end:
            start = offset % 251
            writer.write(PATTERN[start:start + 64]); offset += 64
            await writer.drain(); await asyncio.sleep(1.0)
    finally:
        writer.close()
async def main():
    srv = await asyncio.start_server(serve, addr, port, backlog=4096)
    async with srv: await srv.serve_forever()
asyncio.run(main())
