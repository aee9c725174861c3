#!/usr/bin/env python3
"""Slowloris against a running `ladle serve`: N connections that send a request head one
header line every 0.3 s and never finish it, while /healthz is probed on fresh connections
every 50 ms. Prints how long the server kept the slow connections open and the /healthz
latencies meanwhile (median, p95, max).

    python3 benches/slowloris.py 127.0.0.1:8080 [N=200] [give_up_after_s=30]

Only the standard library. See BENCHMARKS.md for the figures and the commands around it.
"""

import asyncio
import statistics
import sys
import time


async def loris(host, port, give_up):
    r, w = await asyncio.open_connection(host, port)
    opened = time.monotonic()
    w.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
    await w.drain()
    while time.monotonic() - opened < give_up:
        try:
            data = await asyncio.wait_for(r.read(1024), 0.3)
            if not data:
                return time.monotonic() - opened
        except asyncio.TimeoutError:
            try:
                w.write(b"X-Slow: 1\r\n")
                await w.drain()
            except (ConnectionError, OSError):
                return time.monotonic() - opened
        except (ConnectionError, OSError):
            return time.monotonic() - opened
    w.close()
    return None  # still open when we gave up


async def healthz(host, port):
    t = time.monotonic()
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await w.drain()
    data = await r.read()
    w.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:80]
    return time.monotonic() - t


def pct(xs, p):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * p)]


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    give_up = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    tasks = [asyncio.create_task(loris(host, int(port), give_up)) for _ in range(n)]
    probes = []
    while not all(t.done() for t in tasks):
        probes.append(await healthz(host, int(port)))
        await asyncio.sleep(0.05)
    closed = [t.result() for t in tasks]
    shut = [c for c in closed if c is not None]
    print(f"slowloris: {n} connections; closed by the server: {len(shut)}, "
          f"still open after {give_up:.0f} s: {n - len(shut)}")
    if shut:
        print(f"  closed after: median {statistics.median(shut) * 1e3:.0f} ms, "
              f"max {max(shut) * 1e3:.0f} ms")
    print(f"  /healthz meanwhile: {len(probes)} probes, median {statistics.median(probes) * 1e3:.1f} ms, "
          f"p95 {pct(probes, 0.95) * 1e3:.1f} ms, max {max(probes) * 1e3:.1f} ms")


asyncio.run(main())
