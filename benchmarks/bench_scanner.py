"""Native line scanner vs its pure-Python twin, side by side in one run (not a test).

    .venv/bin/python benchmarks/bench_scanner.py [--mb 10] [--chunk 65536]

DataScanner throughput in MB/s on a ~10 MB realistic message (headers, text, a base64
attachment, client-stuffed dot lines) fed in reads of --chunk bytes as a session does;
scan_line and find_literal in ns per call on command lines. The ratio is the speedup of the
native core (higher is better for both units).
"""
from __future__ import annotations

import argparse
import base64
import random
import sys
import time

from gateway.native import scanner, scanner_py


def message(size: int) -> bytes:
    rnd = random.Random(5321)
    head = (b"Received: from mx.example.net (mx.example.net [192.0.2.7])\r\n"
            b"\tby gw.example.com with ESMTPS id 4XyZ; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"From: Alice <alice@example.net>\r\nTo: bob@example.com\r\n"
            b"Subject: quarterly report\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"consectetur", b"adipiscing",
             b"elit", b"sed", b"do", b"eiusmod", b"tempor", b"incididunt", b"ut", b"labore"]
    parts = [head]
    total = len(head)
    text_target = size // 3
    while total < text_target:                                # text, a few stuffed dot lines
        line = b" ".join(rnd.choices(words, k=rnd.randint(3, 14)))
        if rnd.random() < 0.02:
            line = b".." + line
        parts.append(line + b"\r\n")
        total += len(line) + 2
    parts.append(b"\r\n--b1\r\nContent-Type: application/pdf\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n")
    blob = base64.encodebytes(rnd.randbytes(max(0, (size - total) * 3 // 4)))
    parts.append(blob.replace(b"\n", b"\r\n"))
    parts.append(b"--b1--\r\n")
    return b"".join(parts) + b".\r\nQUIT\r\n"


def data_mbps(backend, data: bytes, chunk: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        sc = backend.DataScanner()
        feed = sc.feed
        t = time.perf_counter()
        for i in range(0, len(data), chunk):
            feed(data[i:i + chunk])
            if sc.done:
                break
        best = min(best, time.perf_counter() - t)
        assert sc.done
    return len(data) / best / 1e6


def per_call_ns(fn, args_list, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n // len(args_list)):
            for args in args_list:
                fn(*args)
        best = min(best, time.perf_counter() - t)
    return best / (n // len(args_list) * len(args_list)) * 1e9


COMMANDS = [(b"MAIL FROM:<alice@example.net> SIZE=12345 BODY=8BITMIME\r\n",),
            (b"RCPT TO:<someone@example.com> NOTIFY=NEVER\r\n",),
            (b"EHLO mx.example.net\r\n",),
            (b"DATA\r\n",)]
IMAP_LINES = [(b"a001 LOGIN alice {11}",), (b"a002 APPEND INBOX (\\Seen) {4821+}",),
              (b"a003 SELECT INBOX",)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="message size in MB")
    ap.add_argument("--chunk", type=int, default=65536, help="bytes per feed")
    ap.add_argument("--calls", type=int, default=200_000, help="calls per per-call benchmark")
    args = ap.parse_args()
    nat = scanner.native_backend
    if nat is None:
        sys.exit(f"native core not loaded (BACKEND={scanner.BACKEND}): "
                 "build it with `python setup.py build_ext --inplace` or `pip install .`")
    data = message(int(args.mb * 1e6))
    out_py = scanner_py.DataScanner().feed(data)
    assert nat.DataScanner().feed(data) == out_py             # same result before timing

    rows = []
    n, p = data_mbps(nat, data, args.chunk), data_mbps(scanner_py, data, args.chunk)
    rows.append((f"DataScanner {len(data) / 1e6:.1f} MB, {args.chunk} B feeds", "MB/s",
                 n, p, n / p))
    n = per_call_ns(nat.scan_line, COMMANDS, args.calls)
    p = per_call_ns(scanner_py.scan_line, COMMANDS, args.calls)
    rows.append(("scan_line, SMTP command lines", "ns/call", n, p, p / n))
    n = per_call_ns(nat.find_literal, IMAP_LINES, args.calls)
    p = per_call_ns(scanner_py.find_literal, IMAP_LINES, args.calls)
    rows.append(("find_literal, IMAP command lines", "ns/call", n, p, p / n))

    print(f"{'benchmark':42} {'unit':>8} {'native':>10} {'python':>10} {'speedup':>8}")
    for name, unit, nv, pv, ratio in rows:
        print(f"{name:42} {unit:>8} {nv:10.1f} {pv:10.1f} {ratio:7.1f}x")


if __name__ == "__main__":
    main()
