"""Resharding while records flow: split one shard, merge its children; nothing lost, parents first.

Runs on a moto server whose resharding behaves like AWS (``test_kinesis_faithful_moto``):
stock moto keeps routing records to closed shards.
"""
from __future__ import annotations

import os
import sys
import time

import pytest

from runners.local import LocalStack, MotoServer, StackConfig, wait_until
from tests.test_kinesis_support import (
    Producer,
    assert_exactly_once_in_order,
    decode,
    kinesis_client,
    open_shards,
    split_readers,
    wait_for_active,
)
from transforms.kinesis import KinesisSource, ReaderConfig, StartPosition

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_kinesis_faithful_moto.py")


class FaithfulMotoServer(MotoServer):
    """moto with the Kinesis resharding fixes of ``test_kinesis_faithful_moto``."""

    def command(self) -> list[str]:
        return [sys.executable, LAUNCHER, "-H", "127.0.0.1", "-p", str(self.port)]


@pytest.fixture(scope="module")
def faithful_server():
    server = FaithfulMotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def faithful_stack(faithful_server, monkeypatch):
    local = LocalStack(StackConfig(stream="reshard", shards=2), server=faithful_server).start()
    for key, value in local.env().items():
        monkeypatch.setenv(key, value)
    yield local
    faithful_server.reset()


def _source(stack, **config):
    return KinesisSource(stack.config.stream, StartPosition.parse("trim_horizon"), ReaderConfig(**config))


@pytest.mark.slow
def test_split_and_merge_while_records_flow_reads_parents_before_children(faithful_stack):
    client = kinesis_client()
    stream = faithful_stack.config.stream
    keys = [f"user-{i}" for i in range(40)]
    producer = Producer(client, stream, keys, batch=40, interval=0.05)
    readers = split_readers(_source(faithful_stack, stop_when_idle_seconds=3.0))
    started = [False] * len(readers)
    out: list = []
    done: set[int] = set()

    def pump(seconds: float) -> None:
        """Drives every reader round robin for ``seconds`` (as bundles would)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(done) < len(readers):
            for index, reader in enumerate(readers):
                if index in done:
                    continue
                has = False
                for _ in range(500):  # one bundle
                    has = reader.advance() if started[index] else reader.start()
                    started[index] = True
                    if not has:
                        break
                    out.append(reader.get_current())
                if not has and reader.get_watermark().micros >= 2**62:
                    done.add(index)
            time.sleep(0.02)

    producer.start()
    pump(2.0)
    first = open_shards(client, stream)[0]
    start_key = int(client.list_shards(StreamName=stream)["Shards"][0]["HashKeyRange"]["StartingHashKey"])
    end_key = int(client.list_shards(StreamName=stream)["Shards"][0]["HashKeyRange"]["EndingHashKey"])
    client.split_shard(StreamName=stream, ShardToSplit=first.shard_id, NewStartingHashKey=str((start_key + end_key) // 2))
    wait_until(lambda: wait_for_active(client, stream), timeout=30, what="split")
    pump(2.0)
    children = [s for s in open_shards(client, stream) if s.parent == first.shard_id]
    assert len(children) == 2
    client.merge_shards(StreamName=stream, ShardToMerge=children[0].shard_id, AdjacentShardToMerge=children[1].shard_id)
    wait_until(lambda: wait_for_active(client, stream), timeout=30, what="merge")
    pump(2.0)
    expected = producer.stop()
    pump(60.0)
    assert len(done) == len(readers), "readers did not finish after the producer stopped"

    shards_seen = {r.shard_id for r in out}
    merged = [s for s in open_shards(client, stream) if s.parent in {c.shard_id for c in children}]
    assert {first.shard_id, *(c.shard_id for c in children), merged[0].shard_id} <= shards_seen
    assert_exactly_once_in_order([decode(r.data) for r in out], expected)
    # Parents before children: no record of a parent is emitted after a record of its child.
    position = {}
    for index, record in enumerate(out):
        position.setdefault(record.shard_id, []).append(index)
    lineage = [(first.shard_id, c.shard_id) for c in children] + [(c.shard_id, merged[0].shard_id) for c in children]
    for parent, child in lineage:
        assert max(position[parent]) < min(position[child]), f"{child} read before {parent} was drained"
