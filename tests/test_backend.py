"""gateway.native.backend: the compiled core loaded once, and which backend the line scanner and the
rule matcher use under GATEWAY_PURE_PYTHON / GATEWAY_REQUIRE_NATIVE (each case in a fresh
interpreter: the choice is made at import)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway.native import backend, matcher, scanner

ROOT = str(Path(gateway.__file__).resolve().parent.parent)


def test_the_facades_follow_the_loader():
    assert scanner.BACKEND == backend.SCANNER
    assert matcher.BACKEND == backend.MATCHER
    if backend.SCANNER == "native":
        assert scanner._lib is backend._lib          # one module, loaded once
    if backend.MATCHER == "native":
        assert matcher._lib is backend._lib


def test_core_refuses_an_unknown_part():
    with pytest.raises(ValueError, match="unknown part 'parser'"):
        backend.core("parser")


# The probe: optionally block gateway._native, or replace it by a build without the matcher;
# then import the loader and both facades, each on its own, and report.
_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
mode = {mode!r}
if mode == "blocked":
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "gateway._native":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
elif mode == "old-build":
    import types
    import gateway._native as real

    class OldLib:                      # a build from before the rule matcher
        def __getattr__(self, name):
            if name.startswith(("gw_rm_", "gw_nm_")):
                raise AttributeError(name)
            return getattr(real.lib, name)

    sys.modules["gateway._native"] = types.SimpleNamespace(ffi=real.ffi, lib=OldLib())
out = {{}}
import gateway.native.backend as b
out["loader"] = [b.SCANNER, b.MATCHER]
for name in ("scanner", "matcher"):
    try:
        m = __import__("gateway.native." + name, fromlist=["BACKEND"])
    except ImportError as exc:
        out[name] = "ImportError: " + str(exc)
    else:
        out[name] = m.BACKEND
print(json.dumps(out))
"""

_BLOCKED = "blocked for the test"
_OLD = "gateway._native was built without the rule matcher (rebuild it)"


@pytest.mark.parametrize("env,mode,expect", [
    ({}, "real", {"loader": ["native", "native"], "scanner": "native", "matcher": "native"}),
    ({"GATEWAY_REQUIRE_NATIVE": "1"}, "real",
     {"loader": ["native", "native"], "scanner": "native", "matcher": "native"}),
    ({"GATEWAY_PURE_PYTHON": "1"}, "real",
     {"loader": ["python", "python"], "scanner": "python", "matcher": "python"}),
    ({}, "blocked", {"loader": ["python", "python"], "scanner": "python", "matcher": "python"}),
    ({"GATEWAY_REQUIRE_NATIVE": "1"}, "blocked",
     {"loader": ["python", "python"],
      "scanner": "ImportError: GATEWAY_REQUIRE_NATIVE=1 but the native core gateway._native "
                 f"cannot be imported: {_BLOCKED}",
      "matcher": "ImportError: GATEWAY_REQUIRE_NATIVE=1 but the native rule matcher in "
                 f"gateway._native cannot be imported: {_BLOCKED}"}),
    ({"GATEWAY_PURE_PYTHON": "1", "GATEWAY_REQUIRE_NATIVE": "1"}, "blocked",
     {"loader": ["python", "python"], "scanner": "python", "matcher": "python"}),
    ({}, "old-build", {"loader": ["native", "python"], "scanner": "native",
                       "matcher": "python"}),
    ({"GATEWAY_REQUIRE_NATIVE": "1"}, "old-build",
     {"loader": ["native", "python"], "scanner": "native",
      "matcher": "ImportError: GATEWAY_REQUIRE_NATIVE=1 but the native rule matcher in "
                 f"gateway._native cannot be imported: {_OLD}"}),
])
def test_backend_selection(env, mode, expect):
    if mode != "blocked" and not env.get("GATEWAY_PURE_PYTHON") and scanner.native_backend is None:
        pytest.skip("native core not built")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("GATEWAY_PURE_PYTHON", "GATEWAY_REQUIRE_NATIVE")}
    res = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, mode=mode)],
                         env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == expect
