"""The worker's client-read timer (gateway.relay.watchdog), alone and inside serve()."""
from __future__ import annotations

import smtplib

import trio

from gateway.config import parse_config
from gateway.observe.logs import EventLog
from gateway.relay.watchdog import ReceiveWatchdog, tick_for
from gateway.serve.runtime import WorkerState
from gateway.serve.server import serve
from harness import LogCapture, config_dict, in_thread, listener_dict, running_sink


async def test_check_cancels_only_what_has_expired():
    wd = ReceiveWatchdog()
    early, late, gone = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    wd.watch(early, 10.0)
    wd.watch(late, 20.0)
    wd.watch(gone, 5.0)
    wd.unwatch(gone)                       # the read returned in time
    assert wd.check(9.9) == 0
    assert wd.check(10.0) == 1
    assert early.cancel_called and not late.cancel_called and not gone.cancel_called
    assert wd.check(15.0) == 0             # a cancelled scope is not watched any more


def test_tick_is_a_quarter_of_the_shortest_timeout_within_bounds():
    assert tick_for([300, 180]) == 0.5
    assert tick_for([0.4, 300]) == 0.1
    assert tick_for([0.01]) == 0.05
    assert tick_for([]) == 0.5


async def test_serve_runs_the_watchdog_and_an_idle_client_times_out_by_it():
    async with running_sink() as sink:
        config = parse_config(config_dict([listener_dict(
            upstream_port=sink.port, client_tls="none", timeouts={"command": 0.4})]))
        state = WorkerState()
        logs = LogCapture()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(lambda task_status: serve(
                    config, EventLog(fmt="json", stream=logs), state=state,
                    task_status=task_status))
                port = gw.addresses["smtp"][1]

                def idle_client():
                    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                        s.ehlo("client.test")
                        return s.getreply()        # wait, saying nothing
                assert state.watchdog.running and state.watchdog.tick == 0.1
                code, text = await in_thread(idle_client)
                nursery.cancel_scope.cancel()
    assert (code, text) == (421, b"4.4.2 Timeout exceeded")
    assert logs.of("reject", code=421, reason="timeout")
    assert not state.watchdog.running      # it ends with serve()
