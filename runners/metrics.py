"""Reading a finished run's Beam counters, whatever the runner."""
from __future__ import annotations

from collections import defaultdict

from apache_beam.metrics.metric import MetricsFilter

NAMESPACE = "eventlake"


def counter_totals(result, namespace: str = NAMESPACE) -> dict[str, int]:
    """Counter name -> total over all steps.

    Per step, the larger of the committed and attempted values: a runner may report only one of them, and a
    counter only grows. Prism's attempted value is its latest progress report, not a total (committed 60 with
    attempted 15 was seen). Its committed value lost the counts of bundles that finished while the counter's short
    id was being resolved (30 of 60 lake rows, 230 of 1,100 core records); the Prism that ``runners.prism`` builds
    carries the fix (``runners/prism_patches/0001``). Runners that retry bundles may count a retried bundle's
    increments twice in ``attempted``; Prism and the FnApiRunner do not retry.
    """
    totals: dict[str, int] = defaultdict(int)
    query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    for counter in query.get("counters", []):
        values = [int(v) for v in (counter.committed, counter.attempted) if v is not None]
        totals[counter.key.metric.name] += max(values, default=0)
    return dict(totals)
