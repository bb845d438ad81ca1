"""Benchmarks of the whole system on the embedded local stack (``python -m bench``).

One module per measurement: ``ingress`` (HTTP -> Kinesis), ``backfill`` (the
events pipeline in batch mode), ``baseline`` (the same work as a plain Python
loop, the yardstick for the backfill), ``stream`` (HTTP -> lake freshness),
``machine`` (what the figures were measured on, and peak memory of process trees)
and ``rounds`` (the check of the alternating rounds ingress and backfill run in).
Figures are relative to this machine: every service is emulated on loopback.
"""
