"""Destinations (SPEC §4.8): DNS, DANE and MTA-STS for the outbound leg — groundwork, not wired in yet."""
