"""Native line scanner vs its pure-Python twin, side by side in one run.

    .venv/bin/python benchmarks/bench_scanner.py

Prints MB/s for the DATA transducer on a ~10 MB realistic message (fed in 64 KiB reads, as
the session does) and ns per call for scan_line on a command line, with the ratio.
"""
from __future__ import annotations

import time

from gateway import native, pyscan


def message(size: int = 10 * 1024 * 1024) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n"
    body = (b"Subject: bench\r\n\r\n" + line * (size // len(line)) + b"..dotted\r\n")
    return body + b".\r\n"


def data_mbps(backend, data: bytes, chunk: int = 65536, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        sc = backend.DataScanner()
        t = time.perf_counter()
        for i in range(0, len(data), chunk):
            sc.feed(data[i:i + chunk])
        best = min(best, time.perf_counter() - t)
        assert sc.done
    return len(data) / best / 1e6


def scan_ns(backend, n: int = 200_000) -> float:
    buf = b"RCPT TO:<someone@example.com> NOTIFY=NEVER\r\n"
    f = backend.scan_line
    t = time.perf_counter()
    for _ in range(n):
        f(buf)
    return (time.perf_counter() - t) / n * 1e9


def main() -> None:
    if native.native_backend is None:
        raise SystemExit("native core not built: pip install . first")
    data = message()
    rows = [("DATA transducer (MB/s, higher is better)", data_mbps(native.native_backend, data),
             data_mbps(pyscan, data)),
            ("scan_line (ns/call, lower is better)", scan_ns(native.native_backend),
             scan_ns(pyscan))]
    print(f"{'benchmark':45} {'native':>10} {'python':>10} {'ratio':>8}")
    for name, nat, py in rows:
        print(f"{name:45} {nat:10.1f} {py:10.1f} {nat / py:8.2f}")


if __name__ == "__main__":
    main()
