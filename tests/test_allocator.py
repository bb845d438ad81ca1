"""Large buffers are mapped and unmapped, so a burst of them does not leave the worker's heap larger for good."""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

libc = ctypes.CDLL(None)
pytestmark = pytest.mark.skipif(not hasattr(libc, "mallinfo2"), reason="glibc >= 2.33 only (mallinfo2)")

# A fresh process frees one large mapped buffer (which raises glibc's dynamic threshold past 1 MiB), then holds
# another: where did the second come from? hblkhd counts mapped bytes, arena the heap's.
PROBE = r"""
import ctypes, json, os, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "mapped":
    from transforms.allocator import map_large_buffers
    first, again = map_large_buffers(), map_large_buffers()
else:
    first = again = None
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(1 << 20))
before = libc.mallinfo2()
held = libc.malloc(1 << 20)
after = libc.mallinfo2()
print(json.dumps({"first": first, "again": again, "mapped": after.hblkhd - before.hblkhd,
                  "heap": after.arena - before.arena}))
"""


def _probe(arm: str, env=None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, timeout=60, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_large_buffer_is_mapped_even_after_one_was_freed():
    mapped = _probe("mapped")
    assert mapped["first"] is True and mapped["again"] is False  # once per process
    assert mapped["mapped"] >= 1 << 20 and mapped["heap"] == 0


def test_without_it_glibc_serves_the_second_buffer_from_the_heap():
    """The behaviour this module turns off (the reason the test above can fail)."""
    default = _probe("default")
    assert default["mapped"] == 0 and default["heap"] >= 1 << 20


def test_the_owners_own_setting_is_left_alone(monkeypatch):
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    owned = _probe("mapped", env=env)
    assert owned["first"] is False
    assert owned["mapped"] == 0  # glibc's setting (4 MiB) stands: the 1 MiB buffer comes from the heap
