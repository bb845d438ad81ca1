"""Reading a finished run's Beam counters, whatever the runner."""
from __future__ import annotations

from collections import defaultdict

from apache_beam.metrics.metric import MetricsFilter

NAMESPACE = "eventlake"


def counter_totals(result, namespace: str = NAMESPACE) -> dict[str, int]:
    """Counter name -> total over all steps (committed, else attempted)."""
    totals: dict[str, int] = defaultdict(int)
    query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    for counter in query.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value or 0)
    return dict(totals)
