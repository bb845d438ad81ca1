"""A moto server whose Kinesis resharding behaves like AWS (for the resharding test).

moto 5.2 routes new records to the first shard whose hash range matches, closed
or not, so after a split everything still lands in the closed parent; it also
moves a split parent's records into the children and copies merged parents'
records into the child. Kinesis does none of that: a closed shard keeps its
records and takes no new ones. This launcher fixes exactly those three points
and then runs ``moto.server`` unchanged::

    python tests/test_kinesis_faithful_moto.py -H 127.0.0.1 -p PORT
"""
from __future__ import annotations

import sys


def patch_moto() -> None:
    from moto.kinesis import models

    def get_shard_for_key(self, partition_key, explicit_hash_key):
        if explicit_hash_key:
            int_key = int(explicit_hash_key)
        else:
            int_key = int(models.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
        for shard in list(self.shards.values()):
            if shard.is_open and shard.starting_hash <= int_key <= shard.ending_hash:
                return shard
        return None

    def _next_id(self) -> int:
        return max(shard._shard_id for shard in self.shards.values()) + 1

    def split_shard(self, shard_to_split, new_starting_hash_key):
        new_start = int(new_starting_hash_key)
        parent = self.shards[shard_to_split]
        if not (parent.starting_hash < new_start < parent.ending_hash) or not parent.is_open:
            raise models.InvalidArgumentError(shard_to_split)
        first_id = _next_id(self)
        children = [
            models.Shard(first_id, starting_hash=parent.starting_hash, ending_hash=new_start - 1, parent=parent.shard_id),
            models.Shard(first_id + 1, starting_hash=new_start, ending_hash=parent.ending_hash, parent=parent.shard_id),
        ]
        for child in children:
            self.shards[child.shard_id] = child
        parent.is_open = False  # keeps its records; new ones go to the children

    def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):
        first, second = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
        if first.ending_hash + 1 == second.starting_hash:
            low, high = first, second
        elif second.ending_hash + 1 == first.starting_hash:
            low, high = second, first
        else:
            raise models.InvalidArgumentError(adjacent_shard_to_merge)
        child = models.Shard(
            _next_id(self),
            starting_hash=low.starting_hash,
            ending_hash=high.ending_hash,
            parent=first.shard_id,
            adjacent_parent=second.shard_id,
        )
        self.shards[child.shard_id] = child
        first.is_open = False
        second.is_open = False

    models.Stream.get_shard_for_key = get_shard_for_key
    models.Stream.split_shard = split_shard
    models.Stream.merge_shards = merge_shards


if __name__ == "__main__":
    patch_moto()
    from runners.moto_server import main

    sys.exit(main(sys.argv[1:]))
