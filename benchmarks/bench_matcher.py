"""Native rule matcher vs its Python twin, side by side in one run (not a test).

    .venv/bin/python benchmarks/bench_matcher.py [--lookups 20000]

ns per DomainRuleMatcher lookup at 10, 1,000 and 10,000 rules, measured two ways: inside C
over a prepared batch (one gw_rm_match_many call; for the twin, a bare loop over match) and
per Python call (m.match(s, r) as a session makes it). Rule sets are realistic: exact
domains, `*.suffix`, `*` on one side, ~10% disabled, a last `* -> *` rule; lookups mix hits on exact and subdomain rules,
the null sender and misses that fall through to the last rule. `hits`: share of lookups
answered by a rule before that last one.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from gateway.native import matcher, matcher_py

TLDS = ["com", "net", "org", "de", "fr", "example", "test"]


def rule_set(n: int, rnd: random.Random):
    doms = [f"{rnd.choice(['mx', 'mail', 'corp', 'partner', 'bank', 'shop'])}{i}."
            f"{rnd.choice(['acme', 'globex', 'initech', 'umbrella'])}.{rnd.choice(TLDS)}"
            for i in range(n)]
    rules = []
    for i in range(n):
        k = rnd.random()
        d = doms[i]
        if k < 0.45:
            s, r = "*", d                              # by recipient domain
        elif k < 0.7:
            s, r = "*", "*." + d                       # recipient subdomains
        elif k < 0.85:
            s, r = d, "*"                              # by sender domain
        elif k < 0.97:
            s, r = "*." + d, "*." + rnd.choice(doms)   # partner pairs
        else:
            s, r = "*." + rnd.choice(TLDS), d          # a whole sender TLD
        rules.append((rnd.random() >= 0.1, s, r))
    rules.append((True, "*", "*"))                      # the listener default
    return rules, doms


def lookups(doms, count: int, rnd: random.Random):
    out = []
    for _ in range(count):
        k = rnd.random()
        d = rnd.choice(doms)
        if k < 0.3:
            out.append(("sender.example.net", d))                       # exact recipient
        elif k < 0.55:
            out.append((rnd.choice(doms), "in.mx." + d))                # subdomain
        elif k < 0.7:
            out.append(("", d))                                         # null sender
        elif k < 0.85:
            out.append(("mta.sub." + d, "x." + rnd.choice(doms)))       # partner pairs
        else:
            out.append(("nobody.invalid", f"user{rnd.randint(0, 10**6)}.nowhere.org"))
    return out


def best_of(fn, rounds: int = 9) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=20_000, help="lookups per measurement")
    args = ap.parse_args()
    nat = matcher.native_backend
    if nat is None:
        sys.exit(f"native core not loaded (BACKEND={matcher.BACKEND}): "
                 "build it with `python setup.py build_ext --inplace` or `pip install .`")
    print(f"{'rules':>6} {'measure':>13} {'native ns':>10} {'python ns':>10} {'speedup':>8}"
          f" {'hits':>6}")
    for n in (10, 1000, 10_000):
        rnd = random.Random(n)
        rules, doms = rule_set(n, rnd)
        pairs = lookups(doms, args.lookups, rnd)
        mn, mp = nat.DomainRuleMatcher(rules), matcher_py.DomainRuleMatcher(rules)
        res = mn.match_many(pairs)
        assert res == mp.match_many(pairs)                    # same answers before timing
        hits = sum(1 for i in res if i != len(rules) - 1) / len(res)
        packed = mn._pack(pairs)
        k = len(pairs)
        c_ns = best_of(lambda: mn._match_packed(packed)) / k * 1e9
        pm = mp.match
        py_loop = best_of(lambda: [pm(s, r) for s, r in pairs]) / k * 1e9
        nm = mn.match
        n_call = best_of(lambda: [nm(s, r) for s, r in pairs]) / k * 1e9
        print(f"{n:>6} {'inside C':>13} {c_ns:10.0f} {py_loop:10.0f} {py_loop / c_ns:7.1f}x"
              f" {hits:6.0%}")
        print(f"{n:>6} {'per call':>13} {n_call:10.0f} {py_loop:10.0f} {py_loop / n_call:7.1f}x")


if __name__ == "__main__":
    main()
