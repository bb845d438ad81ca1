"""Sibling watermarks: each Kinesis reader reports at most what its siblings have committed.

Why this exists: Prism (Beam 2.77, ``engine/elementmanager.go``, ``PersistBundle``
and ``updateWatermarks``) sets a splittable DoFn stage's output watermark from
the residuals of the bundle that completed *last* (``stage.estimatedOutput`` is
overwritten per bundle, not held per restriction), and lets it override the
stage's input watermark, so neither the other restrictions nor the bundles still
running hold it back. A Kinesis read is one restriction per shard lineage. When
the readers stand at different event times (a backlog on unevenly filled shards,
a drained shard next to a busy one), the watermark jumped past records a slower
reader had emitted in a bundle not yet committed, or had still to read, and the
lake's GroupByKey dropped them as late. Catching up 24,000 records on one shard
and 500 on each of three others, 2,904 of 25,500 rows reached the lake.

The workaround, for runners with that behaviour (``ReadFromKinesis`` switches
it on for the local runner only): every reader of a split source *publishes*
its own watermark here when the runner finalizes the bundle that cut it (Beam
calls ``finalize_checkpoint`` only after the bundle's output is committed, so
every record emitted before the cut is then downstream), and *reports* to the
runner the minimum of its own watermark and what its siblings published (a
sibling that has published nothing yet counts as ``MIN_TIMESTAMP``). Whichever
bundle completes last, the stage watermark then never passes a record that is
still on its way. A finished reader publishes ``MAX_TIMESTAMP`` when its last
bundle is finalized, and so stops holding the others back.

The cost is lag: the reported watermark trails the slowest reader by up to one
bundle (``max_bundle_seconds``). Runners that hold a watermark per restriction
(Flink, Dataflow) do not need this, and run readers in several processes, where
an unseen sibling would hold the watermark forever: there it stays off.

The registry is process-local (Prism's LOOPBACK worker runs every reader in the
launching process) and keyed by the split's id, so pipelines run one after the
other in one process never see each other's readers; a run's entries go once all
its readers have finished.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

_LOCK = threading.Lock()
_PUBLISHED: dict[str, dict[str, Timestamp]] = {}


class SiblingGroup(NamedTuple):
    """The readers created by one ``split``: its id, and the member (lineage) names."""

    group_id: str
    members: tuple[str, ...]


def publish(group: SiblingGroup, member: str, watermark: Timestamp) -> None:
    """Records ``member``'s committed watermark. Only ever rises: a late, older finalization changes nothing.

    A group is forgotten once every member has published ``MAX_TIMESTAMP`` (all its readers are finished), so a
    long-lived process does not keep one entry per run.
    """
    with _LOCK:
        published = _PUBLISHED.setdefault(group.group_id, {})
        if watermark > published.get(member, MIN_TIMESTAMP):
            published[member] = watermark
        if all(published.get(m, MIN_TIMESTAMP) >= MAX_TIMESTAMP for m in group.members):
            del _PUBLISHED[group.group_id]


def aligned(group: SiblingGroup, member: str, own: Timestamp) -> Timestamp:
    """The watermark ``member`` may report: its own, held back by every sibling's committed watermark."""
    with _LOCK:
        published = _PUBLISHED.get(group.group_id, {})
        others = (published.get(m, MIN_TIMESTAMP) for m in group.members if m != member)
        return min(own, min(others, default=own))


def published(group: SiblingGroup) -> dict[str, Timestamp]:
    """What each member has published so far (for tests and debugging)."""
    with _LOCK:
        return dict(_PUBLISHED.get(group.group_id, {}))
