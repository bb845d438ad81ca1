"""Alternating rounds: a measurement and its yardstick run in turns, several times, on a machine whose speed drifts.

``bench.backfill`` (the pipeline and the one-process loop) and ``bench.ingress`` (the Kinesis ceiling and the
ingress's closed load) report medians over their rounds; this is the check both make of how many.
"""
from __future__ import annotations


def check_rounds(rounds) -> int:
    """``rounds`` when it is an integer >= 1 (not a bool); else ``ValueError``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    return rounds
