"""The SMTP session's transaction side (relay/transaction.py, SPEC §13): milter hooks and the
DATA path (both of its modes) reach the session only through the `Transaction` protocol —
they hold no reference to the session object — and the protocol lists its members."""
from __future__ import annotations

import gc
import types

from gateway.config import parse_config
from gateway.observe.logs import EventLog
from gateway.relay.milter_data import HeldData
from gateway.relay.milter_hook import MilterHook
from gateway.relay.smtp_session import SMTPSession
from gateway.relay.streamed_data import StreamedData
from gateway.relay.transaction import SessionTransaction, Transaction
from gateway.serve.runtime import build_runtimes
from harness import config_dict, listener_dict

_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
         types.CodeType)


def _reaches(root, target) -> bool:
    """Is *target* reachable from *root* through the objects' references (attributes,
    containers, bound methods), not counting modules, classes and functions?"""
    seen, stack = {id(root)}, [root]
    while stack:
        obj = stack.pop()
        if obj is target:
            return True
        for ref in gc.get_referents(obj):
            if isinstance(ref, _SKIP) or (isinstance(ref, dict) and "__builtins__" in ref):
                continue
            if id(ref) not in seen:
                seen.add(id(ref))
                stack.append(ref)
    return False


def _session(tmp_path, milters=()):
    data = config_dict([listener_dict(upstream_port=25, tls="off", client_tls="none",
                                      milters=list(milters))],
                       spool_dir=str(tmp_path / "spool"))
    log = EventLog(stream=open("/dev/null", "w"))
    (rt,), _ = build_runtimes(parse_config(data), log)
    return SMTPSession(rt, None, ("192.0.2.7", 4321), log, "c1")


def test_milter_hooks_and_the_held_data_path_hold_no_reference_to_the_session(tmp_path):
    milter = {"name": "m", "address": "inet:127.0.0.1:9", "connect_timeout": 1}
    session = _session(tmp_path, [milter, dict(milter, name="m2")])
    hooks = [h for h in session.policy.hooks if isinstance(h, MilterHook)]
    mode = session._data_mode
    assert len(hooks) == 2 and isinstance(mode, HeldData)
    # the walk finds what is there: the session reaches its hooks and its DATA mode
    assert _reaches(session, hooks[0]) and _reaches(session, mode)
    for obj in (*hooks, mode, session.tx):
        assert not _reaches(obj, session), obj
    assert all(h.txn is session.tx for h in hooks)
    assert mode.tx is session.tx


def test_the_streamed_data_path_holds_no_reference_to_the_session(tmp_path):
    session = _session(tmp_path)
    mode = session._data_mode
    assert isinstance(mode, StreamedData) and session.policy.hooks == ()
    assert _reaches(session, mode) and not _reaches(mode, session)


def test_the_transaction_protocol_lists_its_members_and_the_session_side_has_them(tmp_path):
    members = {name for name in vars(Transaction) if not name.startswith("_")} | set(
        Transaction.__annotations__)
    assert members == {"rt", "log", "facts", "policy", "envelope", "leg", "data_blocked",
                       "failed", "drop", "mail_for_upstream"}
    tx = _session(tmp_path).tx
    assert isinstance(tx, SessionTransaction)
    for name in members:
        assert hasattr(tx, name), name
