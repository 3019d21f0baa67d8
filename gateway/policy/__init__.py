"""Policy: where each stage of a transaction is decided (`stages.py`).

The levels of the two TLS legs, a rule's sender encryption and the cipher grades are types in
`gateway.levels` (below `config/`, `tls/` and `policy/`, which all read them): each knows what it demands of a leg (`requires_tls`; for the upstream
level also `resolve` against the client leg and `satisfied_by` a leg) and how it ranks against
another (`stricter_than`), so a decision reads the level instead of comparing words. The
members are `StrEnum`s: they equal, and print as, the words of the configuration, the logs and
the metrics.
"""
