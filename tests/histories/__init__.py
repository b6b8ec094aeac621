"""Recorded orchestration histories for tests/test_replayer.py (see regenerate.py)."""
