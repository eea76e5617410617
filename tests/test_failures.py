"""Failures of modules outside training: non-finite numbers in JSON (common.write_json),
evaluate.py meeting a method being written, a full disk while writing predictions.

The training side's failures are tested with their modules: a diverging run in
test_loop.py and test_steps.py, the lock in test_runpaths.py, a full disk in
test_checkpoints.py and test_record.py, run_id in test_tuning.py.
"""

import errno
import json
import os

import pytest

import common
import evaluate
import runpaths
from helpers import strict_json, write_lock


# --- strict JSON ----------------------------------------------------------------------


def test_json_outputs_write_null_for_nan_and_infinity(tmp_path):
    values = {"loss": float("nan"), "history": [1.5, float("inf"), (float("-inf"),)], "n": 3}
    common.write_json(tmp_path / "a.json", values)
    common.write_jsonl(tmp_path / "b.jsonl", [values, {"x": float("nan")}])
    assert strict_json((tmp_path / "a.json").read_text()) == {
        "loss": None, "history": [1.5, None, [None]], "n": 3}
    rows = [strict_json(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert rows[1] == {"x": None}


# --- one writer per method's runs -------------------------------------------------------


def test_evaluate_skips_a_method_being_written(tmp_path, capsys, sleeper):
    for name in ("full", "lora"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"run_id": name}))
        (tmp_path / name / runpaths.COMPLETED).write_text("done\n")
    write_lock(tmp_path, "lora", sleeper.pid)
    found = evaluate.find_methods(tmp_path, None)
    assert list(found) == ["full"]
    out = capsys.readouterr().out
    assert "skipping lora" in out and f"pid {sleeper.pid}" in out


# --- a full disk ------------------------------------------------------------------------


def test_a_full_disk_while_writing_predictions_keeps_the_previous_ones(tmp_path, monkeypatch):
    evaluate.save_records(tmp_path, [{"prediction": "4"}], "old")
    before = (tmp_path / runpaths.PREDICTIONS).read_text()

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(common, "write_text_atomic", full)
    with pytest.raises(common.PipelineError) as caught:
        evaluate.save_records(tmp_path, [{"prediction": "5"}], "new")
    assert str(tmp_path / runpaths.PREDICTIONS) in str(caught.value)
    assert "MB free" in str(caught.value)
    assert (tmp_path / runpaths.PREDICTIONS).read_text() == before
    assert not (tmp_path / runpaths.FINGERPRINT).exists()  # so they are scored again


# --- run identity and paths ----------------------------------------------------------------
