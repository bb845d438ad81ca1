"""Per-key token buckets: a key may sustain ``rate`` requests/s with bursts of ``burst``.

Buckets live in the server process (one set per gunicorn worker), keyed by the
non-secret key id from :mod:`ingress.auth`, so their number is bounded by the
number of configured keys.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Optional


class RateLimiter:
    def __init__(self, rate: float, burst: float, *, clock=time.monotonic):
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if rate and burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)

    def acquire(self, key_id: str, cost: float = 1.0) -> Optional[int]:
        """Take ``cost`` tokens; None when allowed, else seconds to wait (Retry-After)."""
        if not self.rate:
            return None
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._buckets[key_id] = (tokens - cost, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return max(1, math.ceil((cost - tokens) / self.rate))
