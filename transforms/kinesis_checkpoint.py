"""Where a Kinesis reader stands: its checkpoint mark and a deterministic coder for it.

A mark lists, for every shard a reader owns, how to resume it: from the source's
start position (nothing read yet), ``AFTER_SEQUENCE_NUMBER`` of the last record
emitted, ``AT_TIMESTAMP`` of the moment a ``latest`` iterator was taken (so a
resume does not skip what arrived in between), or done (closed and drained).
Marks are encoded as canonical JSON, never pickle: Flink savepoints outlive the
code that wrote them, and equal marks must encode to equal bytes (Beam keys its
reader cache on them).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, NamedTuple, Optional

from apache_beam.coders.coders import Coder
from apache_beam.io.unbounded_source import CheckpointMark

START = "start"  # nothing read yet: use the source's start position
AFTER = "after"  # value = sequence number of the last record emitted
AT_TIMESTAMP = "at_timestamp"  # value = epoch ms (a ``latest`` start made resumable)
DONE = "done"  # closed and drained; children (if owned) are listed separately

_KINDS = (START, AFTER, AT_TIMESTAMP, DONE)
_FORMAT_VERSION = 1


class ShardPosition(NamedTuple):
    shard_id: str
    kind: str
    value: Optional[str] = None
    parents: tuple[str, ...] = ()  # parents owned by the same reader: read this shard after them


class KinesisCheckpointMark(CheckpointMark):
    """Positions of the shards one reader owns, sorted by shard id, and the watermark it reported.

    ``watermark_ms`` lets a reader resumed from the mark (the runner keeps live
    readers only per DoFn instance) keep clamping stragglers to the watermark the
    runner already holds; without it a resumed reader emits them late.
    """

    def __init__(self, positions: Iterable[ShardPosition], watermark_ms: Optional[int] = None):
        self.positions = tuple(sorted(positions))
        self.watermark_ms = watermark_ms
        # Called once the runner has committed the bundle that cut this mark; in memory only, never encoded.
        self.on_finalize: Optional[Callable[[], None]] = None
        for position in self.positions:
            if position.kind not in _KINDS:
                raise ValueError(f"unknown shard position kind {position.kind!r}")

    def position(self, shard_id: str) -> Optional[ShardPosition]:
        for position in self.positions:
            if position.shard_id == shard_id:
                return position
        return None

    def finalize_checkpoint(self) -> None:
        # Kinesis has no acknowledgement: the mark itself is the durable position. What runs here is the
        # reader's sibling-watermark publication (transforms.kinesis_watermarks), when it has one.
        if self.on_finalize is not None:
            self.on_finalize()

    def __eq__(self, other) -> bool:
        return (isinstance(other, KinesisCheckpointMark) and other.positions == self.positions
                and other.watermark_ms == self.watermark_ms)

    def __hash__(self) -> int:
        return hash((self.positions, self.watermark_ms))

    def __repr__(self) -> str:
        return f"KinesisCheckpointMark({list(self.positions)!r}, watermark_ms={self.watermark_ms!r})"


class KinesisCheckpointCoder(Coder):
    """Canonical JSON (sorted keys, no whitespace) of a :class:`KinesisCheckpointMark`."""

    def encode(self, value: KinesisCheckpointMark) -> bytes:
        doc = {
            "v": _FORMAT_VERSION,
            "shards": [[p.shard_id, p.kind, p.value, list(p.parents)] for p in value.positions],
        }
        if value.watermark_ms is not None:
            doc["wm"] = value.watermark_ms
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def decode(self, encoded: bytes) -> KinesisCheckpointMark:
        doc = json.loads(encoded.decode("utf-8"))
        if doc.get("v") != _FORMAT_VERSION:
            raise ValueError(f"unsupported Kinesis checkpoint format version {doc.get('v')!r}")
        return KinesisCheckpointMark(
            (ShardPosition(shard_id, kind, value, tuple(parents)) for shard_id, kind, value, parents in doc["shards"]),
            doc.get("wm"),
        )

    def is_deterministic(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))
