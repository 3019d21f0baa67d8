"""What one serving process runs (SPEC §2, §8, §9): the accept loops and signal handling of a
worker or of `--single-process` (`server`), each listener's runtime (`runtime`) with its TLS
contexts (`listener_tls`), the connection counts and heartbeats shared by the workers
(`conncount`), the signals and exit code the supervisor and its workers agree on (`signals`),
the alert e-mail (`alerts`) and the shared SQLite state (`state`).

Nothing is imported here, so importing one module of the package does not load the others
(the supervisor imports `listener_tls`, `conncount` and `signals` without reaching relay/).
"""
