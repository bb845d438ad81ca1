"""The batch-processing process's cycle collector: tuned once from CPython's defaults (what the process holds then
is frozen), an owner's choice kept."""
from __future__ import annotations

import gc

import pytest

from transforms.garbage_collection import BATCH_THRESHOLDS, CPYTHON_DEFAULT, freeze_before_exit, tune_for_batches


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
    assert gc.get_freeze_count() > 10_000  # the modules and objects held at set-up are out of the collector's way
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
    del a, b
    assert gc.collect() >= 2  # a cycle made after the freeze is collected as before

