"""The batch-processing process's cycle collector: tuned once from CPython's defaults, an owner's choice kept."""
from __future__ import annotations

import gc

import pytest

from transforms.garbage_collection import BATCH_THRESHOLDS, CPYTHON_DEFAULT, tune_for_batches


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_a_process_with_the_default_collector_gets_fewer_larger_collections(thresholds):
    gc.set_threshold(*CPYTHON_DEFAULT)
    assert tune_for_batches() is True
    assert gc.get_threshold() == BATCH_THRESHOLDS
    assert tune_for_batches() is False  # every DoFn instance calls it; the first one tunes
    assert gc.get_threshold() == BATCH_THRESHOLDS


def test_a_collector_tuned_by_the_process_owner_is_left_alone(thresholds):
    gc.set_threshold(2_000, 5, 5)
    assert tune_for_batches() is False
    assert gc.get_threshold() == (2_000, 5, 5)

