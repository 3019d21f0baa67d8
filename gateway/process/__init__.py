"""The process model (SPEC §9): `gateway run` (`launch`), the supervisor that binds, forks and
watches the workers (`supervisor`), a worker's entry after the fork (`worker`), the metrics
and demo-sink side processes (`sidecars`), dying with the parent (`parent_death`), systemd
readiness (`notify`) and the one-instance-per-address check (`addrcheck`).

The layering: process/ sits above serve/ (what one worker runs); the supervisor never reaches
relay/ or proto/ (tests/test_layering.py). Nothing is imported here, so importing one module
of the package does not load the others.
"""
