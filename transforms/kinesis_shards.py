"""Shard discovery and lineage: which reader owns which shard, and in what order.

Resharding closes shards and opens children (a split gives one parent two
children, a merge gives two parents one child). Per-key order needs a child to
be read only after its parents are drained, which only one reader can know: so
a reader owns a whole lineage (a connected component of the parent graph) and
follows it into children as its shards close. A child created later belongs to
the reader that owns its ``ParentShardId``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class ShardInfo(NamedTuple):
    shard_id: str
    parent: Optional[str]
    adjacent_parent: Optional[str]
    closed: bool  # has an EndingSequenceNumber

    def parents(self) -> tuple[str, ...]:
        return tuple(p for p in (self.parent, self.adjacent_parent) if p)


def list_shards(client, stream: str) -> list[ShardInfo]:
    """Every shard of ``stream`` still within retention, paginated."""
    shards: list[ShardInfo] = []
    kwargs: dict = {"StreamName": stream}
    for _ in range(10_000):  # bounded: a stream has at most a few thousand shards
        page = client.list_shards(**kwargs)
        for shard in page.get("Shards", []):
            shards.append(
                ShardInfo(
                    shard["ShardId"],
                    shard.get("ParentShardId"),
                    shard.get("AdjacentParentShardId"),
                    "EndingSequenceNumber" in shard.get("SequenceNumberRange", {}),
                )
            )
        token = page.get("NextToken")
        if not token:
            break
        kwargs = {"NextToken": token}
    return shards


def lineage_groups(shards: list[ShardInfo], *, open_only: bool) -> list[list[str]]:
    """Shard ids grouped by lineage (connected components), each group sorted.

    ``open_only`` (a ``latest`` start) ignores closed shards: nothing more is
    ever written to them.
    """
    if open_only:
        shards = [s for s in shards if not s.closed]
    known = {s.shard_id for s in shards}
    root = {s.shard_id: s.shard_id for s in shards}

    def find(shard_id: str) -> str:
        while root[shard_id] != shard_id:
            root[shard_id] = root[root[shard_id]]
            shard_id = root[shard_id]
        return shard_id

    for shard in shards:
        for parent in shard.parents():
            if parent in known:
                a, b = find(shard.shard_id), find(parent)
                if a != b:
                    root[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for shard in shards:
        groups.setdefault(find(shard.shard_id), []).append(shard.shard_id)
    return sorted(sorted(group) for group in groups.values())


def owned_parents(shard: ShardInfo, owned: set[str]) -> tuple[str, ...]:
    """The parents of ``shard`` that a reader owning ``owned`` must drain first."""
    return tuple(p for p in shard.parents() if p in owned)


def adopted_children(shards: list[ShardInfo], owned: set[str]) -> list[ShardInfo]:
    """Shards not yet owned whose ``ParentShardId`` is owned: this reader's to read next."""
    return [s for s in shards if s.shard_id not in owned and s.parent in owned]
