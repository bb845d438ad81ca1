"""The additive-only check command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from transforms.schema_evolution import main
from transforms.schemas import default_schema_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dirs(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(default_schema_dir(), old)
    shutil.copytree(default_schema_dir(), new)
    return old, new


def edit(directory, name, change, *, bump=True):
    path = directory / name
    doc = json.loads(path.read_text())
    change(doc)
    if bump:
        doc["version"] += 1
    path.write_text(json.dumps(doc))


def run(dirs, capsys):
    code = main([str(dirs[0]), str(dirs[1])])
    return code, capsys.readouterr().out


def test_identical_directories_pass(dirs, capsys):
    assert run(dirs, capsys)[0] == 0


def test_new_optional_fields_and_new_event_types_pass(dirs, capsys):
    old, new = dirs
    edit(new, "workout_completed.json", lambda d: d["properties"].update(mood={"type": "string"}))
    edit(new, "_user.json", lambda d: d["properties"]["profile"]["properties"].update(gym={"type": "string"}))
    edit(new, "workout_completed.json", lambda d: d["properties"]["workout_type"]["enum"].append("pilates"))
    edit(new, "app_opened.json", lambda d: d.update(description="clarified"), bump=False)
    shutil.copy(new / "screen_viewed.json", new / "screen_closed.json")
    code, out = run(dirs, capsys)
    assert code == 0, out


def props(name):
    return lambda d: d["properties"][name]


@pytest.mark.parametrize("name, change, expected", [
    ("screen_viewed.json", lambda d: d["properties"].pop("previous_screen"), "screen_viewed.previous_screen: field removed"),
    ("workout_completed.json", lambda d: props("duration_s")(d).update(type="number"),
     "workout_completed.duration_s: type changed from integer to number"),
    ("workout_completed.json", lambda d: d["properties"]["exercises"]["items"]["properties"]["reps"].update(type="number"),
     "workout_completed.exercises[].reps: type changed from integer to number"),
    ("screen_viewed.json", lambda d: d["required"].append("duration_ms"), "screen_viewed.duration_ms: field made required"),
    ("screen_viewed.json", lambda d: (d["properties"].update(tab={"type": "string"}), d["required"].append("tab")),
     "screen_viewed.tab: new field is required"),
    ("workout_started.json", lambda d: props("workout_type")(d)["enum"].remove("yoga"),
     "workout_started.workout_type: enum narrowed (1 value(s) removed)"),
    ("screen_viewed.json", lambda d: props("screen_name")(d).update(maxLength=64),
     "screen_viewed.screen_name: maxLength tightened"),
    ("workout_completed.json", lambda d: props("note")(d).update({"x-pii": "drop"}),
     "workout_completed.note: x-pii changed from redact to drop"),
    ("_user.json", lambda d: d["properties"]["subscription"]["properties"].pop("since"),
     "_user.subscription.since: field removed"),
    ("_context.json", lambda d: d["properties"]["locale"].update(enum=["en"]), "_context.locale: enum added"),
])
def test_non_additive_changes_are_listed(dirs, capsys, name, change, expected):
    edit(dirs[1], name, change)
    code, out = run(dirs, capsys)
    assert code == 1
    assert expected in out.splitlines()


def test_removed_event_type_fails(dirs, capsys):
    os.remove(dirs[1] / "goal_achieved.json")
    code, out = run(dirs, capsys)
    assert (code, out.splitlines()) == (1, ["goal_achieved: event type removed"])


def test_a_change_without_a_version_bump_fails(dirs, capsys):
    edit(dirs[1], "app_opened.json", lambda d: d["properties"].update(tab={"type": "string"}), bump=False)
    code, out = run(dirs, capsys)
    assert code == 1 and "app_opened: schema changed but version stayed 1 (was 1)" in out


def test_every_change_is_listed(dirs, capsys):
    edit(dirs[1], "screen_viewed.json", lambda d: (d["properties"].pop("previous_screen"), d["required"].append("duration_ms")))
    os.remove(dirs[1] / "goal_achieved.json")
    code, out = run(dirs, capsys)
    assert code == 1 and len(out.splitlines()) == 3


def test_an_invalid_new_directory_exits_2(dirs, capsys):
    (dirs[1] / "app_opened.json").write_text("{broken")
    assert main([str(dirs[0]), str(dirs[1])]) == 2
    assert "app_opened.json" in capsys.readouterr().err


def test_the_module_runs_as_a_command(dirs):
    edit(dirs[1], "screen_viewed.json", lambda d: d["properties"].pop("previous_screen"))
    done = subprocess.run([sys.executable, "-m", "transforms.schema_evolution", str(dirs[0]), str(dirs[1])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "screen_viewed.previous_screen: field removed" in done.stdout
