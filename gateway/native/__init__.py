"""The native core's facades and their pure-Python twins: which one runs (`backend`), the
byte scanners (`scanner`, twin `scanner_py`), the rule matchers (`matcher`, twin
`matcher_py`) and the per-IP table (`perip`, twin `perip_py`). The C extension itself is
`gateway._native` (built from _native/ by setup.py); each facade uses it when it is there and
its twin otherwise (`gateway --version` says which).

Nothing is imported here, so importing one module of the package does not load the others.
"""
