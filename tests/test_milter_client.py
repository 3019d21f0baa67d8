"""The trio milter client (gateway/relay/milter_client.py) against a scripted test milter,
and against real rspamd and OpenDKIM (private instances, tests/milters.py)."""
from __future__ import annotations

import struct

import pytest
import trio

from gateway.proto import milter as M
from gateway.proto.milter import Action
from gateway.relay.milter_client import MilterClient, MilterError

from milters import (ACCEPT, CONTINUE, PROGRESS, REJECT, TEMPFAIL, FilterPeer, addheader,
                     chgfrom, cstrings, delrcpt, insheader, replycode, scripted_milter)
from peers import free_port

FAST = dict(connect_timeout=2, command_timeout=0.3, content_timeout=0.3)


async def _eof(peer: FilterPeer) -> None:
    """Read until the client hangs up (QUIT then EOF)."""
    while (packet := await peer.recv()) is not None:
        pass


async def test_a_whole_conversation_with_no_reply_and_skip_flags_and_changes():
    body = b"".join(b"line %06d\r\n" % i for i in range(10000))        # 120 kB: 2 chunks
    seen = {}
    done = trio.Event()

    async def milter(peer: FilterPeer):
        seen["optneg"] = await peer.negotiate(
            actions=M.F_ADDHDRS | M.F_CHGFROM | M.F_DELRCPT | M.F_CHGHDRS,
            protocol=M.P_NR_CONN | M.P_NOHELO | M.P_NR_HDR)
        seen["connect"] = await peer.expect(b"C")                  # no reply: NR_CONN
        seen["mail"] = await peer.expect(b"M")                     # HELO skipped
        await peer.send(CONTINUE)
        await peer.expect(b"R")
        await peer.send(TEMPFAIL)
        await peer.expect(b"R")
        await peer.send(CONTINUE)
        await peer.expect(b"T")
        await peer.send(CONTINUE)
        seen["headers"] = [await peer.expect(b"L"), await peer.expect(b"L")]   # no replies
        await peer.expect(b"N")
        await peer.send(CONTINUE)
        chunks = []
        while len(b"".join(chunks)) < len(body):
            chunks.append(await peer.expect(b"B"))
            await peer.send(CONTINUE)
        seen["chunks"] = chunks
        await peer.expect(b"E")
        await peer.send(PROGRESS, insheader(0, "X-Signed", "yes"), chgfrom("<new@x.test>"),
                        delrcpt("<b@example.net>"), ACCEPT)
        await peer.expect(b"A")
        seen["macros"] = list(peer.macros)
        await peer.expect(b"Q")
        await _eof(peer)
        done.set()

    with trio.fail_after(10):
        async with scripted_milter(milter) as address:
            async with MilterClient(address, name="test", **FAST) as client:
                assert client.negotiated.protocol == M.P_NR_CONN | M.P_NOHELO | M.P_NR_HDR
                v = await client.connect("[192.0.2.1]", "192.0.2.1", 4711,
                                         macros={"j": "gw.test", "{daemon_name}": "smtp"})
                assert (v.action, v.replied) == (Action.CONTINUE, False)
                assert not (await client.helo("client.test")).replied
                assert (await client.mail(["<a@example.com>", "SIZE=99"],
                                          macros={"i": "T1"})).replied
                assert (await client.rcpt(["<b@example.net>"])).action is Action.TEMPFAIL
                assert (await client.rcpt(["<c@example.net>"])).action is Action.CONTINUE
                await client.data()
                await client.header("From", " a@example.com")
                await client.header("Subject", " hi")
                await client.eoh()
                assert (await client.body(body)).action is Action.CONTINUE
                v = await client.eom(macros={"i": "T1"})
                assert v.action is Action.ACCEPT
                assert v.modifications == (M.InsertHeader(0, "X-Signed", " yes"),
                                           M.ChangeFrom("<new@x.test>"))  \
                    + (M.DeleteRecipient("<b@example.net>"),)
                await client.abort()
            await done.wait()
    assert struct.unpack("!III", seen["optneg"])[0] == 6
    assert seen["connect"] == b"[192.0.2.1]\x004" + struct.pack("!H", 4711) + b"192.0.2.1\0"
    assert seen["mail"] == cstrings("<a@example.com>", "SIZE=99")
    assert seen["headers"] == [cstrings("From", "a@example.com"), cstrings("Subject", "hi")]
    assert [len(c) for c in seen["chunks"]] == [65535, len(body) - 65535]
    assert b"".join(seen["chunks"]) == body
    assert (b"C", cstrings("j", "gw.test", "{daemon_name}", "smtp")) in seen["macros"]
    assert (b"E", cstrings("i", "T1")) in seen["macros"]


async def test_a_unix_socket_milter_and_reject_replies(tmp_path):
    async def milter(peer: FilterPeer):
        await peer.negotiate(protocol=M.P_NR_CONN | M.P_NR_HELO)
        await peer.expect(b"C")
        await peer.expect(b"H")
        await peer.expect(b"M")
        await peer.send(REJECT)
        await peer.expect(b"A")
        await peer.expect(b"M")
        await peer.send(CONTINUE)
        await peer.expect(b"R")
        await peer.send(replycode("550-5.7.1 no\r\n550 5.7.1 really"))
        await _eof(peer)

    with trio.fail_after(10):
        async with scripted_milter(milter, unix_path=tmp_path / "m.sock") as address:
            assert address.startswith("unix:/")
            async with MilterClient(address, **FAST) as client:
                await client.connect("localhost", "/run/x", 0)
                await client.helo("h")
                v = await client.mail(["<a@x>"])
                assert (v.action, v.reply) == (Action.REJECT, (550, "5.7.1 Command rejected"))
                await client.mail(["<a@x>"])                       # sends ABORT first
                v = await client.rcpt(["<b@y>"])
                assert v.reply == (550, ("5.7.1 no", "5.7.1 really"))


async def test_accept_at_connect_hangs_up_and_later_stages_need_no_milter():
    got = []
    done = trio.Event()

    async def milter(peer: FilterPeer):
        await peer.negotiate()
        await peer.expect(b"C")
        await peer.send(ACCEPT)
        got.append(await peer.recv())
        got.append(await peer.recv())
        done.set()

    with trio.fail_after(10):
        async with scripted_milter(milter) as address:
            async with MilterClient(address, **FAST) as client:
                assert (await client.connect("c", "192.0.2.1", 1)).action is Action.ACCEPT
                assert not client.active
                for v in (await client.helo("h"), await client.mail(["<a@x>"]),
                          await client.eom()):
                    assert (v.action, v.replied) == (Action.CONTINUE, False)
            await done.wait()
    assert got == [(b"Q", b""), None]                  # QUIT, then the socket closed


async def test_progress_keeps_a_slow_end_of_message_alive():
    async def milter(peer: FilterPeer):
        await peer.negotiate(protocol=M.P_NR_CONN | M.P_NOHELO | M.P_NOMAIL | M.P_NORCPT
                             | M.P_NODATA | M.P_NOHDRS | M.P_NOEOH | M.P_NOBODY)
        await peer.expect(b"C")
        await peer.expect(b"E")
        for _ in range(6):                     # 0.6 s in all, twice the content timeout
            await trio.sleep(0.1)
            await peer.send(PROGRESS)
        await peer.send(addheader("X-Slow", "1"), CONTINUE)
        await _eof(peer)

    with trio.fail_after(10):
        async with scripted_milter(milter) as address:
            async with MilterClient(address, **FAST) as client:
                await client.connect("c", "192.0.2.1", 1)
                start = trio.current_time()
                v = await client.eom()
                assert trio.current_time() - start >= 0.5
                assert v.modifications == (M.AddHeader("X-Slow", " 1"),)


async def _expect_failure(handler, stages, *, result: str, stage: str, **timeouts):
    """Run `stages(client)` against `handler`; it must end in one MilterError."""
    with trio.fail_after(10):
        async with scripted_milter(handler) as address:
            client = MilterClient(address, **{**FAST, **timeouts})
            start = trio.current_time()
            with pytest.raises(MilterError) as info:
                await client.open()
                await stages(client)
            elapsed = trio.current_time() - start
            # broken for good: every later stage fails the same way, at once
            with pytest.raises(MilterError):
                await client.eom()
            await client.quit()
    assert (info.value.result, info.value.stage) == (result, stage), info.value
    return info.value, elapsed


async def _to_eom(client: MilterClient) -> None:
    await client.connect("c", "192.0.2.1", 1)
    await client.mail(["<a@x>"])
    await client.rcpt(["<b@y>"])
    await client.data()
    await client.header("Subject", " x")
    await client.eoh()
    await client.body(b"body\r\n" * 100)
    await client.eom()


def _answer_all_until(stop: bytes, then):
    async def milter(peer: FilterPeer):
        await peer.negotiate()
        while (packet := await peer.recv()) is not None:
            if packet[0] == b"D":
                continue
            if packet[0] == stop:
                await then(peer)
                return
            await peer.send(CONTINUE)
    return milter


async def test_a_milter_that_stalls_times_out():
    async def stall(peer):
        await trio.sleep_forever()

    err, elapsed = await _expect_failure(_answer_all_until(b"R", stall), _to_eom,
                                         result="timeout", stage="rcpt")
    assert 0.25 <= elapsed < 2
    assert "no answer within 0.3 s" in err.reason


async def test_a_stalled_negotiation_times_out():
    async def milter(peer):
        await peer.expect(b"O")
        await trio.sleep_forever()

    await _expect_failure(milter, _to_eom, result="timeout", stage="negotiate")


async def test_a_milter_closing_mid_message_is_an_error():
    async def close(peer):
        await peer.stream.aclose()

    err, _ = await _expect_failure(_answer_all_until(b"B", close), _to_eom, result="error",
                                   stage="body")
    assert "closed" in err.reason or "lost" in err.reason


async def test_a_milter_answering_garbage_is_an_error():
    async def garbage(peer):
        await peer.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await trio.sleep_forever()

    err, elapsed = await _expect_failure(_answer_all_until(b"E", garbage), _to_eom,
                                         result="error", stage="eom")
    assert "octets" in err.reason and elapsed < 0.25     # refused at once, not timed out


async def test_garbage_instead_of_a_negotiation_is_an_error():
    async def milter(peer):
        await peer.expect(b"O")
        await peer.send(b"\0\0\0\x05zzzzz")
        await trio.sleep_forever()

    await _expect_failure(milter, _to_eom, result="error", stage="negotiate")


async def test_refused_and_missing_addresses_are_errors(tmp_path):
    with trio.fail_after(10):
        for address in (f"inet:127.0.0.1:{free_port()}", f"unix:{tmp_path}/none.sock",
                        "inet:nowhere"):
            client = MilterClient(address, **FAST)
            with pytest.raises(MilterError) as info:
                await client.open()
            assert (info.value.result, info.value.stage) == ("error", "open")
            with pytest.raises(MilterError):
                await client.connect("c", "192.0.2.1", 1)


async def test_cancelled_by_the_caller_mid_stage_leaves_the_client_unusable():
    async def stall(peer):
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with scripted_milter(_answer_all_until(b"M", stall)) as address:
            async with MilterClient(address, **{**FAST, "command_timeout": 30}) as client:
                await client.connect("c", "192.0.2.1", 1)
                with trio.move_on_after(0.1) as scope:
                    await client.mail(["<a@x>"])
                assert scope.cancelled_caught
                with pytest.raises(MilterError, match="interrupted"):
                    await client.rcpt(["<b@y>"])
