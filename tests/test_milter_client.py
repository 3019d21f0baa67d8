"""The trio milter client (gateway/relay/milter_client.py) against a scripted test milter,
and against real rspamd and OpenDKIM (private instances, tests/milters.py)."""
from __future__ import annotations

import os
import struct

import pytest
import trio

from gateway.proto import milter as M
from gateway.proto.milter import Action
from gateway.relay.milter_client import MilterClient, MilterError

from milters import (ACCEPT, CONTINUE, GTUBE, PROGRESS, REJECT, TEMPFAIL, FilterPeer,
                     OpenDKIMInstance, RspamdInstance, addheader, chgfrom, cstrings, delrcpt,
                     insheader, make_message, replycode, scripted_milter, split_message)
from peers import free_port

FAST = dict(connect_timeout=2, command_timeout=0.3, content_timeout=0.3)


async def _eof(peer: FilterPeer) -> None:
    """Read until the client hangs up (QUIT then EOF)."""
    while await peer.recv() is not None:
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


# --- real milters --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rspamd():
    """One private rspamd for the whole run: it needs ~15 s to compile its regexps."""
    with RspamdInstance() as instance:
        yield instance


@pytest.fixture(scope="session")
def opendkim():
    with OpenDKIMInstance(domain="example.com") as instance:
        yield instance


REAL = dict(connect_timeout=5, command_timeout=10, content_timeout=20)


async def _deliver(client: MilterClient, message: bytes, *, sender="<alice@example.com>",
                   recipient="<bob@example.net>") -> M.Verdict:
    """Every stage for one message, as the session will drive them; the end verdict."""
    macros = {"j": "gw.example.net", "{daemon_name}": "smtp", "v": "mail-tls-gateway"}
    for verdict in (
            await client.connect("client.example.com", "127.0.0.1", 40000, macros=macros),
            await client.helo("client.example.com"),
            await client.mail([sender], macros={"i": "TEST1", "{mail_addr}": sender[1:-1]}),
            await client.rcpt([recipient], macros={"{rcpt_addr}": recipient[1:-1]}),
            await client.data()):
        assert verdict.action is Action.CONTINUE, verdict
    headers, body = split_message(message)
    for name, value in headers:
        await client.header(name, value)
    await client.eoh()
    await client.body(body)
    return await client.eom(macros={"i": "TEST1"})


@pytest.mark.peers
async def test_rspamd_refuses_gtube_with_its_own_reply(rspamd):
    message = make_message(subject="test", body=b"Hello\r\n" + GTUBE + b"\r\n")
    with trio.fail_after(60):
        async with MilterClient(rspamd.address, name="rspamd", **REAL) as client:
            verdict = await _deliver(client, message)
    assert verdict.action is Action.REPLYCODE
    assert verdict.reply == (554, "5.7.1 Gtube pattern")


@pytest.mark.peers
async def test_rspamd_forces_no_reply_flags_and_adds_its_header_to_clean_mail(rspamd):
    # Offer no "no reply" flag at all: rspamd sets them anyway, and a client that then
    # waited for the replies it was told not to expect would hang here.
    offer = M.OFFERED_PROTOCOL & ~M.P_NOREPLY_MASK
    with trio.fail_after(60):
        async with MilterClient(rspamd.address, name="rspamd", protocol=offer,
                                **REAL) as client:
            assert client.negotiated.protocol & M.P_NOREPLY_MASK & ~offer
            verdict = await _deliver(client, make_message())
    assert verdict.action in (Action.ACCEPT, Action.CONTINUE), verdict
    added = [m for m in verdict.modifications
             if isinstance(m, M.AddHeader) and m.name == "X-Spamd-Result"]
    assert len(added) == 1, verdict.modifications
    assert added[0].value.startswith(" default: False [")


def _dkim():
    try:
        import dkim
    except ImportError:
        msg = "dkimpy not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return dkim


def _apply_header_changes(message: bytes, mods) -> bytes:
    """The header additions a signing milter asks for, applied the way the session will."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    for mod in mods:
        field = f"{mod.name}:{mod.value}".encode()
        if isinstance(mod, M.InsertHeader):
            fields.insert(mod.index, field)
        elif isinstance(mod, M.AddHeader):
            fields.append(field)
        else:
            raise AssertionError(f"unexpected change {mod!r}")
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


@pytest.mark.peers
async def test_opendkim_signs_mail_from_its_domain_and_the_signature_verifies(opendkim):
    dkim = _dkim()
    body = b"".join(b"line %d of a message long enough for two body packets\r\n" % i
                    for i in range(2000))
    message = make_message(sender=f"alice@{opendkim.domain}", body=body)
    with trio.fail_after(60):
        async with MilterClient(opendkim.address, name="opendkim", **REAL) as client:
            assert client.negotiated.protocol & M.P_HDR_LEADSPC
            verdict = await _deliver(client, message, sender=f"<alice@{opendkim.domain}>")
    assert verdict.action in (Action.ACCEPT, Action.CONTINUE), verdict
    [sig] = [m for m in verdict.modifications if m.name == "DKIM-Signature"]
    assert isinstance(sig, (M.InsertHeader, M.AddHeader))
    assert f"d={opendkim.domain};" in sig.value and f"s={opendkim.selector};" in sig.value
    signed = _apply_header_changes(message, verdict.modifications)
    assert dkim.verify(signed, dnsfunc=opendkim.dnsfunc)
    tampered = signed.replace(b"line 7 of", b"line 8 of")
    assert not dkim.verify(tampered, dnsfunc=opendkim.dnsfunc)
