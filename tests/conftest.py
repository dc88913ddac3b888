"""Fixtures shared by the test files: the corpus, shards, tiny run config and reference run (tests/runs.py)."""
from runs import config, reference, shards  # noqa: F401  (pytest fixtures, session-scoped)
