"""Event ids the ingress assigns: random version 4 UUIDs, unique across threads and across forked workers."""
from __future__ import annotations

import os
import threading
import uuid

from transforms.envelope import new_event_id


def test_ids_are_version_4_uuids_and_do_not_repeat():
    ids = [new_event_id() for _ in range(20_000)]  # many blocks of 256
    assert len(set(ids)) == len(ids)
    for text in ids[:600]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_threads_draw_different_ids():
    drawn: list[list[str]] = [[] for _ in range(8)]

    def draw(into: list) -> None:
        into.extend(new_event_id() for _ in range(1_000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = [i for into in drawn for i in into]
    assert len(everything) == 8_000 and len(set(everything)) == 8_000


def test_a_forked_worker_does_not_repeat_its_parents_ids():
    """gunicorn forks its workers after the app is loaded: bytes drawn before the fork must not be used twice."""
    new_event_id()  # the parent now holds a block with unused ids (at least 1 of 256 drawn)
    new_event_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.write(write, ",".join(new_event_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [new_event_id() for _ in range(10)]
    assert len(child) == 10 and not set(child) & set(parent)
