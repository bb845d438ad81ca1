"""Reading a finished run's counters: whatever the runner reports short is not taken as the total."""
from __future__ import annotations

from types import SimpleNamespace

from runners.metrics import counter_totals


class _Result:
    """A finished run whose metrics are given (the real shapes: ``MetricResult``-like records)."""

    def __init__(self, counters):
        self._counters = counters

    def metrics(self):
        return SimpleNamespace(query=lambda _filter: {"counters": self._counters})


def _counter(name, committed, attempted):
    return SimpleNamespace(key=SimpleNamespace(metric=SimpleNamespace(name=name)),
                           committed=committed, attempted=attempted)


def test_steps_are_summed_and_the_larger_report_of_a_step_is_taken():
    result = _Result([
        _counter("lake.rows_written", 60, None),   # Prism, usual: committed only
        _counter("lake.rows_written", 60, 15),     # Prism after a split bundle: attempted short
        _counter("lake.rows_written", 30, 60),     # committed short
        _counter("lake.files_written", None, 4),   # attempted only
        _counter("kinesis.records_read", None, None),
    ])
    assert counter_totals(result) == {"lake.rows_written": 180, "lake.files_written": 4, "kinesis.records_read": 0}
