"""The import layering of gateway/, read statically (ast) from the source files.

Every `import` counts, at module level or inside a function (a lazy import is still an edge).
Relative imports are resolved; importing `gateway.x.y` is an edge to `gateway.x` (its
`__init__.py`, which Python runs first) and to `gateway.x.y`; `from gateway.x import y` is also
an edge to `gateway.x.y` when that is a module. Edges to a module's own enclosing packages are
left out: Python has always started importing those before the module itself runs.

The rules:
- the sans-IO cores in gateway/proto/ never reach trio, socket, ssl or OpenSSL, not even
  through another gateway module;
- the supervisor never reaches gateway/relay/ or gateway/proto/: it builds TLS contexts, binds
  sockets and forks, and only the forked child enters the worker (gateway.process.worker, whose
  imports are therefore not followed);
- the module graph has no import cycle, and neither has the graph of gateway's folders (each
  package directly under gateway/, each module loose at its top, as one node);
- at most 8 modules lie loose at the top of gateway/: the rest live in packages named for their
  job (process/, serve/, observe/, native/, ...);
- no level word (`verify`, `none`, ...) is compared as a string outside the level module and
  the configuration parser: a decision reads the level's members and properties;
- no function or method in gateway/ is over 100 lines;
- no module touches another object's underscore attribute (`x._attr` where x is not `self` or
  `cls`) outside the pyOpenSSL shim gateway/tls/_ossl.py: what a caller needs is the owner's
  public interface.
- at most 2 places in gateway/ compare a listener's protocol with a protocol's name (`"smtp"`,
  `Protocol.IMAP`, ...): the rest asks the protocol's capabilities (gateway.config.protocols)
  or the serve-side dispatch (gateway.serve.protocols).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from harness import NEUTRAL_CWD, gateway_subprocess_env

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

PROTO_FORBIDDEN = {"trio", "socket", "ssl", "OpenSSL"}
SUPERVISOR = "gateway.process.supervisor"
SUPERVISOR_ENTRY_TO_WORKER = "gateway.process.worker"
SUPERVISOR_FORBIDDEN = ("gateway.relay", "gateway.proto")

# Known cycles outside this change, each the exact set of modules of one strongly connected
# component. For the lead to remove once each cycle is broken; a cycle that grows or a new one
# fails the test.
KNOWN_CYCLES: list[frozenset[str]] = [
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str, sources: dict[str, Path]) -> bool:
    return sources[name].name == "__init__.py"


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(name: str, sources: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(gateway modules *name* imports, top-level names of the other modules it imports)."""
    tree = ast.parse(sources[name].read_text(), str(sources[name]))
    targets: set[str] = set()
    external: set[str] = set()

    def add(dotted: str) -> None:
        if dotted.split(".")[0] != "gateway":
            external.add(dotted.split(".")[0])
            return
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):      # parent packages are imported first
            prefix = ".".join(parts[:i])
            if prefix in sources:
                targets.add(prefix)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if _is_package(name, sources) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module
            add(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in sources:
                    add(f"{base}.{alias.name}")
    return targets - _ancestors(name) - {name}, external


def _graph():
    sources = _sources()
    edges, external = {}, {}
    for name in sources:
        edges[name], external[name] = _imports(name, sources)
    return edges, external


def _path(edges, start: str, goal, skip=frozenset()) -> list[str] | None:
    """A shortest import chain from *start* to a module for which goal(module) holds."""
    came = {start: None}
    queue = [start]
    for node in queue:
        if goal(node):
            chain = []
            while node is not None:
                chain.append(node)
                node = came[node]
            return chain[::-1]
        for nxt in sorted(edges[node]):
            if nxt not in came and nxt not in skip:
                came[nxt] = node
                queue.append(nxt)
    return None


def _components(edges) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(component)
    return out


def _cycle_in(edges, component: set[str]) -> list[str]:
    """One concrete cycle through the first module of *component*, for the message."""
    start = min(component)
    inner = {n: edges[n] & component for n in component}
    best = None
    for nxt in sorted(inner[start]):
        chain = _path(inner, nxt, lambda n: n == start)
        if chain is not None and (best is None or len(chain) < len(best)):
            best = chain
    return [start, *best]


def test_the_graph_is_read():
    """The reader sees the imports these rules depend on (else every rule passes vacuously)."""
    edges, external = _graph()
    assert "gateway.proto.smtp_server" in edges and "gateway.process.supervisor" in edges
    assert "gateway.relay.upstream" in edges["gateway.relay.smtp_session"]
    assert {"gateway.proto", "gateway.proto.smtp_client"} <= edges["gateway.relay.upstream"]
    assert "gateway.native.scanner" in edges["gateway.proto.smtp_server"]  # from ..native
    assert "gateway.process.worker" in edges[SUPERVISOR]    # lazy, in the child
    assert "trio" in external["gateway.relay.pool"]


@pytest.mark.parametrize("module", sorted(m for m in _sources()
                                          if m == "gateway.proto" or
                                          m.startswith("gateway.proto.")))
def test_proto_cores_reach_no_io(module):
    edges, external = _graph()
    chain = _path(edges, module, lambda n: bool(external[n] & PROTO_FORBIDDEN))
    assert chain is None, (
        f"{module} reaches {sorted(external[chain[-1]] & PROTO_FORBIDDEN)} through "
        f"{' -> '.join(chain)}")


def test_proto_cores_load_no_io_at_run_time():
    """The same rule, run: importing every core loads none of them, not even through the
    standard library (email.utils, for one, imports socket), which the static rule does not
    follow."""
    modules = sorted(m for m in _sources() if m.startswith("gateway.proto"))
    forbidden = sorted(PROTO_FORBIDDEN)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=NEUTRAL_CWD, env=gateway_subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_supervisor_reaches_no_relay_or_proto():
    edges, _ = _graph()

    def forbidden(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in SUPERVISOR_FORBIDDEN)
    chain = _path(edges, SUPERVISOR, forbidden, skip={SUPERVISOR_ENTRY_TO_WORKER})
    assert chain is None, f"the supervisor imports {' -> '.join(chain)}"


def test_no_import_cycles():
    edges, _ = _graph()
    found = [c for c in _components(edges) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(_cycle_in(edges, c)) + f"   (component: {sorted(c)})" for c in found)


def test_known_cycles_are_still_there():
    """An allowlisted cycle that is gone must leave the list (so it cannot come back)."""
    edges, _ = _graph()
    present = {frozenset(c) for c in _components(edges)}
    assert [sorted(c) for c in KNOWN_CYCLES if c not in present] == []


def _unit(module: str) -> str:
    """The folder of *module*: its package directly under gateway/, or the loose module."""
    return ".".join(module.split(".")[:2])


def _folder_graph(edges) -> tuple[dict, dict]:
    """(folder -> folders it imports, (folder, folder) -> the module edges behind it)."""
    graph: dict[str, set[str]] = {_unit(m): set() for m in edges}
    why: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for module, targets in edges.items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and a != "gateway" and b != "gateway":   # gateway/__init__ is no folder
                graph[a].add(b)
                why.setdefault((a, b), []).append((module, target))
    return graph, why


MAX_LOOSE = 8


def test_few_modules_lie_loose():
    """The top of gateway/ shows the architecture: its packages, and only a few modules (the
    entry points and what every package reads) outside them."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert "cli.py" in loose and "__init__.py" in loose          # the reader sees the top
    assert len(loose) <= MAX_LOOSE, f"{len(loose)} modules loose at the top of gateway/: {loose}"


def test_no_folder_loops():
    """A loop between folders (policy -> rules -> config -> policy) means a folder's job is
    split between two places, even when no module cycle shows it."""
    graph, why = _folder_graph(_graph()[0])
    assert ("gateway.relay", "gateway.proto") in why          # the reader sees folders
    loops = _components(graph)
    lines = []
    for component in loops:
        chain = _cycle_in(graph, component)
        lines.append(" -> ".join(chain) + "   (" + "; ".join(
            f"{why[a, b][0][0]} imports {why[a, b][0][1]}"
            for a, b in zip(chain, chain[1:])) + ")")
    assert not loops, "folder loops:\n" + "\n".join(lines)


LEVEL_MODULES = {"gateway.levels", "gateway.config.parse"}
LEVEL_WORDS = {"none", "optional", "required", "verify", "preferred", "allowed", "medium",
               "high"}
LEVEL_NAMES = {"level", "tls", "client_tls", "recipient_encryption", "sender_encryption",
               "cipher_strength"}


def _level_named(node: ast.expr) -> bool:
    """Is *node* a name or attribute named like a level (`level`, `rule.client_tls`,
    `facts.client_level`, ...)?"""
    name = (node.id if isinstance(node, ast.Name) else
            node.attr if isinstance(node, ast.Attribute) else None)
    return name is not None and (name in LEVEL_NAMES or name.endswith("_level"))


def _level_words(node: ast.expr) -> set[str]:
    """The level words *node* spells: a string constant, or a tuple/list/set of them."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items
            if isinstance(i, ast.Constant) and i.value in LEVEL_WORDS}


def _level_word_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        for a, b in zip(sides, sides[1:]):
            for named, other in ((a, b), (b, a)):
                words = _level_words(other)
                if words and _level_named(named):
                    found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_level_word_scan_sees_comparisons():
    tree = ast.parse('if lst.client_tls == "verify" or "none" != facts.client_level: pass\n'
                     'ok = level in ("required", "verify")\n'
                     'fine = listener.tls == "starttls" or protocol == "none"\n')
    assert sorted(line for line, _ in _level_word_comparisons(tree)) == [1, 1, 2]


def test_no_level_word_compared_as_a_string():
    found = []
    for name, path in _sources().items():
        if name in LEVEL_MODULES:
            continue
        for line, text in _level_word_comparisons(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, "level words compared as strings:\n" + "\n".join(sorted(found))


MAX_FUNCTION_LINES = 100


def _long_functions(tree: ast.AST) -> list[tuple[int, str, int]]:
    return [(node.lineno, node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_the_length_scan_sees_long_functions():
    def body(n: int) -> str:
        return "".join(f"        x = {i}\n" for i in range(n - 1))
    tree = ast.parse(f"class C:\n    def long(self):\n{body(101)}"
                     f"    async def just(self):\n{body(100)}")
    assert [(name, n) for _, name, n in _long_functions(tree)] == [("long", 101)]


def test_no_function_over_100_lines():
    """A function longer than a screenful does several jobs: split it into named parts."""
    found = []
    for path in _sources().values():
        for line, name, n in _long_functions(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line}: {name} ({n} lines)")
    assert not found, "functions over 100 lines:\n" + "\n".join(sorted(found))


# The pyOpenSSL shim reaches into OpenSSL.SSL's objects (their `_ssl` pointers) by design.
PRIVATE_ACCESS_EXEMPT = {"gateway.tls._ossl"}
# `os._exit` is the standard library's documented call for a forked child that must leave
# without running its parent's cleanup (atexit, buffered files, trio's state): the underscore
# is the name of the function, not a private attribute.
PRIVATE_ACCESS_ALLOWED = {("os", "_exit")}
# An enum member's `_value_` is set in the enum's own __new__ (the documented way to give a
# member a value besides its extra attributes): enum's "sunder" name, not a private one.
SUNDER_ALLOWED = {"_value_"}


def _private_accesses(tree: ast.AST) -> list[tuple[int, str]]:
    """`x._attr` (read, written or deleted) where x is not `self`/`cls`; dunders are fine."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr, value = node.attr, node.value
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")) \
                or attr in SUNDER_ALLOWED:
            continue
        if isinstance(value, ast.Name) and (value.id in ("self", "cls")
                                            or (value.id, attr) in PRIVATE_ACCESS_ALLOWED):
            continue
        found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_private_access_scan_sees_reads():
    tree = ast.parse("a = leg._open\nself._ok = cls._ok\nb = Cls._cmd(self, t)\n"
                     "c = x.__class__\nos._exit(0)\nd = super()._hook\ne = f(y)._z\n")
    assert _private_accesses(tree) == [(1, "leg._open"), (3, "Cls._cmd"), (6, "super()._hook"),
                                       (7, "f(y)._z")]


def test_no_private_attribute_of_another_object():
    """A module reads what another object publishes (a property, a method), never its
    underscore attributes: those are the owner's to change."""
    found = []
    for name, path in _sources().items():
        if name in PRIVATE_ACCESS_EXEMPT:
            continue
        for line, text in _private_accesses(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, "private attributes of other objects:\n" + "\n".join(sorted(found))
PROTOCOL_WORDS = {"smtp", "imap"}
MAX_PROTOCOL_BRANCHES = 2


def _protocol_named(node: ast.expr) -> bool:
    """Is *node* a name or attribute named like a protocol (`protocol`, `lst.protocol`)?"""
    name = (node.id if isinstance(node, ast.Name) else
            node.attr if isinstance(node, ast.Attribute) else None)
    return name is not None and (name == "protocol" or name.endswith("_protocol")
                                 and name != "proxy_protocol")


def _protocol_names(node: ast.expr) -> bool:
    """Does *node* spell a protocol: a word (`"smtp"`), a member (`Protocol.IMAP`), or a
    tuple/list/set holding one?"""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(i, ast.Constant) and isinstance(i.value, str)
               and i.value.lower() in PROTOCOL_WORDS
               or isinstance(i, ast.Attribute) and i.attr.lower() in PROTOCOL_WORDS
               for i in items)


def _protocol_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_protocol_named(a) and _protocol_names(b) or
                   _protocol_named(b) and _protocol_names(a)
                   for a, b in zip(sides, sides[1:])):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match) and _protocol_named(node.subject):
            found.append((node.lineno, f"match {ast.unparse(node.subject)}"))
    return found


def test_the_protocol_scan_sees_comparisons():
    tree = ast.parse('if lst.protocol == "imap" or "smtp" != protocol: pass\n'
                     'ok = rt.listener.protocol is Protocol.SMTP\n'
                     'also = listener.protocol in ("smtp",)\n'
                     'fine = lst.proxy_protocol == "smtp" or listener.tls == "imap"\n'
                     'match listener.protocol:\n    case _: pass\n')
    assert sorted(line for line, _ in _protocol_comparisons(tree)) == [1, 1, 2, 3, 5]


def test_few_places_compare_a_protocol_name():
    found = []
    for path in _sources().values():
        for line, text in _protocol_comparisons(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert len(found) <= MAX_PROTOCOL_BRANCHES, (
        f"{len(found)} places compare a protocol name (at most {MAX_PROTOCOL_BRANCHES}; ask "
        "the protocol's capabilities instead):\n" + "\n".join(sorted(found)))


SESSION_MODULES = ("relay/smtp_session.py", "relay/imap_session.py")
SHARED_SESSION_METHODS = {"_handshake", "_flush", "_closed"}


def _session_duplicates(sources: dict[str, str]) -> list[str]:
    """What the SMTP and IMAP sessions still write twice: a session class not built on
    `ClientSession`, or one defining a method that class shares."""
    found = []
    for rel, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Session"):
                if "ClientSession" not in {ast.unparse(b) for b in node.bases}:
                    found.append(f"{rel}: {node.name} is not a ClientSession")
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                            and item.name in SHARED_SESSION_METHODS:
                        found.append(f"{rel}:{item.lineno}: {node.name}.{item.name}")
    return found


def test_the_sessions_share_their_client_leg():
    """The client leg's handshake, sending the core's output and the session's end are
    written once (relay/client_session.py), not in each protocol's session."""
    found = _session_duplicates({rel: (PACKAGE / rel).read_text() for rel in SESSION_MODULES})
    assert not found, "SMTP/IMAP session duplicates:\n" + "\n".join(found)


# Where a session's upstream leg is opened: the leg-owning object (`relay.legs.Legs`), for a
# route, with the pool, the failure report and the AUTH binding; the TLS alert mail opens its
# own leg to its relay (serve/alerts.py), not a session's.
LEG_OPENERS = {"gateway.relay.legs", "gateway.serve.alerts"}


def _leg_openings(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls of `<Something>UpstreamLeg.open(...)`."""
    return [(node.lineno, ast.unparse(node.func)) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "open" and isinstance(node.func.value, ast.Name)
            and node.func.value.id.endswith("UpstreamLeg")]


def test_the_leg_scan_sees_openings():
    tree = ast.parse("leg = await IMAPUpstreamLeg.open(u, level)\n"
                     "other = await UpstreamLeg.open(u, level, client_addr=a)\n"
                     "fine = await legs.open(route)\nf = open(path)\n")
    assert _leg_openings(tree) == [(1, "IMAPUpstreamLeg.open"), (2, "UpstreamLeg.open")]


def test_sessions_open_their_legs_through_legs():
    """The SMTP and the IMAP session both hold their upstream leg through `Legs` (#22 item
    2): no session opens an `UpstreamLeg`/`IMAPUpstreamLeg` itself."""
    found = []
    for name, path in _sources().items():
        if name in LEG_OPENERS:
            continue
        for line, text in _leg_openings(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, "upstream legs opened outside relay/legs.py:\n" + "\n".join(found)
