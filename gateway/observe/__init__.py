"""Observability (SPEC §7, §11): Prometheus metrics and the endpoint (`metrics`) with the
multiprocess value files behind them (`metric_files`), the last minute's counts for /status
(`recent`), the event log (`logs`), the tracking log (`tracking_log`) and its query
(`track_query`, `gateway track`), `gateway status` (`status`), and the per-second clock of
timestamps (`clock`).

Nothing is imported here, so importing one module of the package does not load the others.
"""
