"""Destinations (SPEC §4.8): the outbound half — DNS, DANE and MTA-STS (groundwork)."""
