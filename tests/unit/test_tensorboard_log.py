"""The TensorBoard writer alone (hpcopt.io.tensorboard.EventLog), in one process: what it queues
is what TensorBoard's own reader finds, and a directory it cannot write costs one log line."""

from __future__ import annotations

import math

import pytest

from hpcopt.io.tensorboard import ANALYZE_SUFFIX, TRAIN_SUFFIX, EventLog, clear

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read(log_dir) -> dict:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_scalars_read_back_and_non_finite_values_are_left_out(tmp_path):
    events = EventLog(tmp_path, log=pytest.fail)
    events.scalars(10, {"a": 0.5, "b": math.nan, "c": None})
    events.scalars(20, {"a": 0.25})
    events.close()
    assert read(tmp_path) == {"a": [(10, 0.5), (20, 0.25)]}


def test_each_step_is_written_once_per_tag_the_latest_value_winning(tmp_path):
    events = EventLog(tmp_path, log=pytest.fail)
    events.scalars(10, {"a": 1.0, "b": 1.0})
    events.scalars(10, {"a": 2.0})  # a flush that found no new exchange: it replaces step 10's value
    events.scalars(20, {"a": 3.0})
    events.scalars(20, {"a": 4.0, "b": 5.0})  # the final flush at the last flush's count
    events.scalars(15, {"a": 9.0})  # behind the tag's latest step: left out
    events.close()
    assert read(tmp_path) == {"a": [(10, 2.0), (20, 4.0)], "b": [(10, 1.0), (20, 5.0)]}


def test_clear_removes_only_that_kind_of_event_file(tmp_path):
    for suffix in (TRAIN_SUFFIX, ANALYZE_SUFFIX):
        events = EventLog(tmp_path, suffix=suffix, log=pytest.fail)
        events.scalars(1, {"x": 1.0})
        events.close()
    (tmp_path / "notes.txt").write_text("mine")
    clear(tmp_path, TRAIN_SUFFIX)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [ANALYZE_SUFFIX, ".txt"]


def test_a_failure_is_one_line_and_the_end_of_the_events(tmp_path):
    (tmp_path / "file").write_text("")
    lines = []
    events = EventLog(tmp_path / "file" / "tb", log=lines.append)
    events.close()  # the writer cannot even make its directory
    for step in range(3):
        events.scalars(step, {"a": 1.0})  # no error, nothing queued
    assert events.failed and len(lines) == 1 and "no longer written" in lines[0]
