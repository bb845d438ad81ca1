"""The batch-processing process's cycle collector: tuned once from CPython's defaults (and its heap frozen at exit),
an owner's choice kept."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest

from transforms.garbage_collection import BATCH_THRESHOLDS, CPYTHON_DEFAULT, freeze_before_exit, tune_for_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_a_process_with_the_default_collector_gets_fewer_larger_collections(thresholds):
    gc.set_threshold(*CPYTHON_DEFAULT)
    assert tune_for_batches() is True
    assert gc.get_threshold() == BATCH_THRESHOLDS
    assert gc.get_freeze_count() == 0  # nothing is frozen while the process works
    assert tune_for_batches() is False  # every DoFn instance calls it; the first one tunes
    assert gc.get_threshold() == BATCH_THRESHOLDS


def test_a_collector_tuned_by_the_process_owner_is_left_alone(thresholds):
    gc.set_threshold(2_000, 5, 5)
    assert tune_for_batches() is False
    assert gc.get_threshold() == (2_000, 5, 5)
    assert gc.get_freeze_count() == 0


def test_a_finished_command_freezes_what_it_holds_and_cycles_made_after_are_still_collected(thresholds):
    freeze_before_exit()
    assert gc.get_freeze_count() > 10_000

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    gc.collect()
    assert alive() is None  # a cycle made after the freeze is collected as before


def test_a_tuned_process_freezes_its_heap_when_it_exits():
    # The probe is registered first, so it runs last: after the tuning's exit handler.
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
             "gc.set_threshold(700, 10, 10)\n"
             "from transforms.garbage_collection import tune_for_batches\n"
             "assert tune_for_batches()\n"
             "print('frozen while working', gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split("\n")
    assert out[0] == "frozen while working 0"
    assert out[1].startswith("frozen at exit ") and int(out[1].split()[-1]) > 1_000


def test_tuning_again_after_a_reset_still_freezes_once_at_exit():
    probe = ("import atexit, gc\n"
             "calls = []\n"
             "gc.freeze = lambda: calls.append(1)\n"
             "atexit.register(lambda: print('freezes at exit', len(calls)))\n"
             "from transforms.garbage_collection import tune_for_batches\n"
             "for _ in range(3):\n"
             "    gc.set_threshold(700, 10, 10)\n"
             "    assert tune_for_batches()\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "freezes at exit 1"
