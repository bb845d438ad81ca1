"""Dead letters of a backfill on two worker processes: none lost, none doubled, each with its reason.

Each stage's dead letters are written by a sink of their own, where the stage makes them (no Flatten gathers
them first, which the FnApiRunner would materialize in the driver). The core's letters are what valid input can
produce here: the core only passes rows that fit their lake schema, so the lake writer's own letters
(``row_schema_mismatch`` and the like) are reached in tests/test_lake.py, not from envelopes.
"""
from __future__ import annotations

import json

import pytest

from pipelines import events
from runners.loadgen import EventMix, write_backfill
from transforms.dead_letter import decode_payload
from transforms.dead_letter_store import open_dead_letters
from transforms.envelope import format_rfc3339_ms, stamp, utc_now_ms, validate_event
from transforms.schemas import default_schema_dir

SCHEMAS = default_schema_dir()
TWO_WORKERS = ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner", "--direct_num_workers=2",
               "--direct_running_mode=multi_processing"]


@pytest.mark.slow
def test_on_two_workers_the_dead_letter_files_hold_every_refused_event_once(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("EVENTLAKE_PSEUDONYMIZATION_KEYS", "t1=test-secret-of-enough-bytes")
    mix = EventMix(SCHEMAS, users=20, seed=11, invalid_rate=0.3)
    stack.seed_users(mix.users())
    now, expected, paths = utc_now_ms(), {}, []
    for part in range(4):  # four files: the two workers get two each
        envelopes = []
        for n in range(150):
            reason, event = mix.next()
            at = now + part * 1000 + n
            envelope = stamp(validate_event(event), received_at=format_rfc3339_ms(at), caller_ip=None)
            if reason is not None:
                expected[envelope["event_id"]] = reason
            envelopes.append(envelope)
        paths.append(str(tmp_path / f"events-{part}.jsonl"))
        write_backfill(paths[-1], iter(envelopes))
    dead = tmp_path / "dead"

    summary = events.run(["--mode=backfill", f"--input={tmp_path / 'events-*.jsonl'}",
                          f"--users_table={stack.config.users_table}", f"--output={tmp_path / 'lake'}",
                          f"--dead_letter={dead}", f"--schema_dir={SCHEMAS}", "--window_seconds=5",
                          "--skip_preflight", *TWO_WORKERS])

    assert summary["conserved"] and summary["read"] == 600
    assert summary["dead_letters"] == len(expected) and summary["rows_written"] == 600 - len(expected)
    letters = list(open_dead_letters(str(dead)).scan())
    refused = {}
    for letter in letters:
        event_id = json.loads(decode_payload(letter.record))["event_id"]
        assert event_id not in refused, "a dead letter written twice"
        refused[event_id] = letter.failure["reason"]
        assert "@" not in letter.failure["message"]
    assert refused == expected
