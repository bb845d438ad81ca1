"""Prometheus metrics of one ingress app, in a registry of its own.

Labels are status codes and reason codes only, never values from events.
Each server process (gunicorn worker) exports its own counts.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("eventlake_ingress_requests", "HTTP requests by status code",
                                ["status"], registry=self.registry)
        self.events_accepted = Counter("eventlake_ingress_events_accepted",
                                       "Events acknowledged by Kinesis and answered 202", registry=self.registry)
        self.events_rejected = Counter("eventlake_ingress_events_rejected", "Events refused, by reason code",
                                       ["reason"], registry=self.registry)
        self.publish_seconds = Histogram(
            "eventlake_ingress_publish_seconds", "Time for a request's events to be acknowledged by Kinesis",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.kinesis_retries = Counter("eventlake_ingress_kinesis_retries",
                                       "Records put again after a failed or throttled PutRecords",
                                       registry=self.registry)
        self.kinesis_calls = Counter("eventlake_ingress_kinesis_put_records_calls", "PutRecords calls by outcome",
                                     ["outcome"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
