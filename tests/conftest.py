"""Shared fixtures: the local stack (moto server on loopback) and its clients."""
from __future__ import annotations

import os

import pytest

from runners.local import LocalStack, MotoServer, StackConfig


@pytest.fixture(scope="session")
def moto_server():
    """One moto server process for the whole session; tests isolate by resource name."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def stack(moto_server, request, monkeypatch):
    """A freshly provisioned stack with resource names unique to the test."""
    suffix = f"{abs(hash(request.node.nodeid)) % 10**8:08d}"
    config = StackConfig(
        stream=f"events-{suffix}",
        shards=getattr(request, "param", {}).get("shards", 2),
        users_table=f"users-{suffix}",
        dead_letter_queue=f"dlq-{suffix}",
        bucket=f"lake-{suffix}",
    )
    local = LocalStack(config, server=moto_server).start()
    for key, value in local.env().items():
        monkeypatch.setenv(key, value)
    yield local
