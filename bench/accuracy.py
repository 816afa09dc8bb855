#!/usr/bin/env python3
"""Drives one API key at a fixed request rate and counts what was admitted.

    accuracy.py URL KEY [--rate 2000] [--seconds 5] [--connections 8]

Requests are paced (not as fast as possible) over keep-alive connections, so the count can be
compared with what a token bucket admits: burst + rate x duration. Prints "admitted refused other".
"""
import argparse
import asyncio
import time
from urllib.parse import urlsplit


async def worker(host, port, path, key, interval, deadline, start_at, counts):
    reader, writer = await asyncio.open_connection(host, port)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nx-api-key: {key}\r\n\r\n").encode()
    next_at = start_at
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if next_at > now:
            await asyncio.sleep(next_at - now)
        next_at += interval
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length:
            await reader.readexactly(length)
        counts[status] = counts.get(status, 0) + 1
    writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("key")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--connections", type=int, default=8)
    a = ap.parse_args()
    u = urlsplit(a.url)
    counts = {}
    start = time.monotonic() + 0.2
    deadline = start + a.seconds
    interval = a.connections / a.rate
    await asyncio.gather(*[
        worker(u.hostname, u.port, u.path or "/", a.key, interval, deadline, start + i * interval / a.connections, counts)
        for i in range(a.connections)
    ])
    admitted = counts.get(200, 0)
    refused = counts.get(429, 0) + counts.get(503, 0)
    other = sum(counts.values()) - admitted - refused
    print(admitted, refused, other)


asyncio.run(main())
