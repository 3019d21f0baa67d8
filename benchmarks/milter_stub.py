"""An accept-all milter for the benchmarks (not a test): it negotiates no actions and no
"no reply" flags, so every stage costs the MTA a full round trip, and answers CONTINUE to
each one, end of message included. One asyncio process.

    .venv/bin/python benchmarks/milter_stub.py --port 11340
"""
from __future__ import annotations

import argparse
import asyncio
import struct

_LEN = struct.Struct("!I")
_CONTINUE = _LEN.pack(1) + b"c"
_OPTNEG = _LEN.pack(13) + b"O" + struct.pack("!III", 6, 0, 0)
_ANSWERED = frozenset(b"CHMRTLNBE")        # commands that get a reply (no flags negotiated)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(4)
            (length,) = _LEN.unpack(head)
            packet = await reader.readexactly(length)
            cmd = packet[0]
            if cmd == ord("O"):
                writer.write(_OPTNEG)
            elif cmd in _ANSWERED:
                writer.write(_CONTINUE)
            elif cmd == ord("Q"):
                break
            else:                       # D (macros), A (abort), K: no reply
                continue
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(serve, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    asyncio.run(main(a.host, a.port))
