"""Policy: where each stage of a transaction is decided (`stages.py`)."""
