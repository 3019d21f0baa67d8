"""`gateway run`: the supervisor with its workers (SPEC §9), or one process with
--single-process; both with the demo sink under --demo."""
from __future__ import annotations

import trio

from ..config import GatewayConfig


def run(config: GatewayConfig, log, demo: bool = False) -> int:
    """`gateway run`: the supervisor with workers, or one process with --single-process."""
    if not config.single_process:
        from .supervisor import Supervisor
        return Supervisor(config, log, demo=demo).run()
    return run_single(config, log, demo)


def run_single(config: GatewayConfig, log, demo: bool = False) -> int:
    from ..serve.server import serve_until_signal
    from ..sink import run_demo_sink

    async def main():
        async with trio.open_nursery() as nursery:
            if demo:
                await nursery.start(run_demo_sink, config, log)
            await serve_until_signal(config, log)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        fatal, rest = group.split(OSError)      # e.g. a port already in use
        if rest is not None or fatal is None:
            raise
        for exc in fatal.exceptions:
            log.event("fatal", level="error", message=str(exc))
        return 1
    return 0
