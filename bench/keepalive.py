#!/usr/bin/env python3
"""Sends a fixed number of keyed GETs over keep-alive connections, one round at a time (each
connection sends one request, then all answers are read), and fails unless every answer is a 200.

    bench/keepalive.py URL KEY --requests N [--connections C] [--cafile PEM]

An https URL is spoken over TLS 1.3, trusting the certificates in PEM.

For instruction counts (bench/instructions.sh): the work is fixed, so a server's instruction total
divided by N is its cost per request, however fast this client is.
"""
import argparse
import socket
import ssl
import sys
import urllib.parse


def recv(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed inside a response")
    return chunk


def fill_until(sock, buf, marker):
    while marker not in buf:
        buf += recv(sock)
    return buf


def read_response(sock, pending):
    """Reads one response (Content-Length or chunked framing) from sock; returns (status, rest)."""
    buf = fill_until(sock, pending, b"\r\n\r\n")
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower().endswith("chunked"):
        while True:
            buf = fill_until(sock, buf, b"\r\n")
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                # Trailer fields, then the blank line.
                while True:
                    buf = fill_until(sock, buf, b"\r\n")
                    line, _, buf = buf.partition(b"\r\n")
                    if not line:
                        return status, buf
            while len(buf) < size + 2:
                buf += recv(sock)
            buf = buf[size + 2 :]
    length = int(fields.get("content-length", "0"))
    while len(buf) < length:
        buf += recv(sock)
    return status, buf[length:]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("key")
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--cafile")
    a = p.parse_args()
    u = urllib.parse.urlsplit(a.url)
    request = (
        f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nx-api-key: {a.key}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection((u.hostname, u.port)) for _ in range(a.connections)]
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=a.cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        socks = [ctx.wrap_socket(s, server_hostname=u.hostname) for s in socks]
    pending = [b""] * len(socks)
    sent = 0
    while sent < a.requests:
        round_socks = socks[: min(len(socks), a.requests - sent)]
        for s in round_socks:
            s.sendall(request)
        for i, s in enumerate(round_socks):
            status, pending[i] = read_response(s, pending[i])
            if status != 200:
                print(f"answer {status}", file=sys.stderr)
                sys.exit(1)
        sent += len(round_socks)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
