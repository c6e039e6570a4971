# The drain benchmark's client: python3 trickle-client.py SERVER PORT CONNECTIONS RESULT_PATH
# Opens CONNECTIONS connections, checks every byte against the trickle pattern and writes a JSON result
# {intact, broken, bytes, errors}. Started by TrickleTraffic (Sources/DyscoBench/DrainBenchmark.swift).
import asyncio, json, resource, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
addr, port, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
result = {"intact": 0, "broken": 0, "bytes": 0, "errors": []}
async def one(i, gate):
    async with gate:
        for attempt in range(20):
            try:
                reader, writer = await asyncio.open_connection(addr, port); break
            except OSError:
                await asyncio.sleep(0.2)
        else:
            result["broken"] += 1; result["errors"].append("connect failed"); return
    offset, ok = 0, True
    try:
        while True:
            data = await reader.read(65536)
            if not data: break
            for b in data:
                if b != offset % 251: ok = False
                offset += 1
    except OSError as e:
        ok = False; result["errors"].append(str(e))
    result["bytes"] += offset
    result["intact" if ok and offset > 0 else "broken"] += 1
async def main():
    gate = asyncio.Semaphore(200)
    await asyncio.gather(*(one(i, gate) for i in range(n)))
asyncio.run(main())
result["errors"] = result["errors"][:10]
json.dump(result, open(out, "w"))
