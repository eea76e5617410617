"""Failures users meet: a diverging rate, two runs on one folder, a full disk, non-finite numbers.

Each ends in one line (exit 2) and leaves the files as they were before the failed step.
"""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import common
import evaluate
import finetune
import finetune_lora
import loop
import models
import record
import runpaths
import runs
import steps
import tuning
from helpers import ROOT, run_and_expect_exit, stop_at, train_args
from runpaths import RunPaths
from settings import TrainSettings, option


def strict_json(text):
    """Parse JSON as a strict reader does: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def finished_files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, by name (to show it was left as it was)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temporary (dot) files and folders left in a folder."""
    return sorted(p.name for p in folder.rglob(".*"))


# --- divergence ---------------------------------------------------------------------


def test_a_diverging_rate_stops_with_one_line_and_marks_nothing_complete(data_dir, tmp_path):
    out = tmp_path / "out"
    # Loss 6.25 at step 1, NaN from step 2 on at this rate (checked: it diverges on tiny-gpt2).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--device", "cpu", "--model", "tiny-gpt2",
         "--lr", "1e6", "--max-steps", "6", "--batch-size", "8", "--data-dir", str(data_dir),
         "--output-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "diverged at step 2" in errors[0] and "--lr 1e+06" in errors[0]
    assert "lower rate" in errors[0]
    assert not (out / "full").exists()
    assert not list(out.rglob(runpaths.COMPLETED))
    assert not (out / ".full.lock").exists()


def test_the_weights_never_take_the_non_finite_update_and_the_checkpoint_stays(data_dir,
                                                                               tmp_path):
    settings = TrainSettings.from_args(finetune.parse_args(
        ["--device", "cpu", "--model", "tiny-gpt2", "--lr", "1e6", "--max-steps", "6",
         "--batch-size", "8", "--save-every", "1", "--data-dir", str(data_dir),
         "--output-dir", str(tmp_path)]))
    run = runs.start_run(settings, "full")
    model, tokenizer, _ = models.load_model(settings.model, run.device)
    model, details = finetune.prepare(model, settings)
    with pytest.raises(steps.Diverged) as caught:
        loop.fit(run, model, tokenizer, details)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kept = checkpoints.listed(RunPaths(tmp_path, "full"))
    assert [p.name for p in kept] == ["step-0000001"]  # the last good step, not deleted
    assert str(kept[-1]) in str(caught.value) and "step 2" in str(caught.value)
    strict_json((kept[-1] / "state.json").read_text())
    assert not (tmp_path / "full").exists()


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


@pytest.fixture
def sleeper():
    """A live process that is not this one (the pid of the other run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(output_dir: Path, method: str, pid: int) -> Path:
    path = runpaths.lock_file(output_dir, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                "started": "2026-12-04T10:00:00",
                                "command": "finetune.py --save-every 2"}))
    return path


def test_a_second_run_of_a_method_while_one_runs_is_refused(data_dir, tmp_path, capsys,
                                                            sleeper):
    lock = write_lock(tmp_path, "full", sleeper.pid)
    before = lock.read_text()
    for extra in ((), ("--resume",)):
        line = run_and_expect_exit(finetune.main,
                                   train_args(finetune, data_dir, tmp_path, *extra), capsys)
        assert f"pid {sleeper.pid}" in line and "2026-12-04T10:00:00" in line
        assert "finetune.py --save-every 2" in line
    assert lock.read_text() == before  # the other run's lock is left alone
    assert not (tmp_path / "full").exists()
    # Another method on the same folder: the everyday loop, allowed.
    finetune_lora.main(train_args(finetune_lora, data_dir, tmp_path))
    assert runpaths.is_complete(tmp_path / "lora")
    assert not runpaths.lock_file(tmp_path, "lora").exists()


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(data_dir, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = write_lock(tmp_path, "full", gone.pid)
    finetune.main(train_args(finetune, data_dir, tmp_path))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"pid {gone.pid}" in notes[0] and "process is gone" in notes[0]
    assert runpaths.is_complete(tmp_path / "full")
    assert not lock.exists()  # released on success


def test_the_lock_is_released_on_error_and_on_ctrl_c(data_dir, tmp_path, capsys):
    lock = runpaths.lock_file(tmp_path, "full")
    with pytest.raises(SystemExit) as exc:
        common.run_main(lambda a: finetune.main(a, callbacks=[stop_at(1)]),
                        train_args(finetune, data_dir, tmp_path, "--save-every", "1"))
    assert exc.value.code == 130 and not lock.exists()
    run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path, "--lr", "1e6",
                                                  "--max-steps", "6"), capsys)
    assert not lock.exists()


def test_resume_refuses_a_changed_rate_and_keeps_the_checkpoint(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        common.run_main(lambda a: finetune.main(a, callbacks=[stop_at(1)]),
                        train_args(finetune, data_dir, tmp_path))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--resume", "--lr", "1e-5"), capsys)
    assert "made with lr=0.00015, this run has 1e-05" in line
    assert [p.name for p in checkpoints.listed(RunPaths(tmp_path, "full"))] == ["step-0000001"]
    assert not runpaths.lock_file(tmp_path, "full").exists()


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


def no_space(names, real):
    """A write_json that fails with a full disk for the named files."""
    def write(path, obj):
        if Path(path).name in names:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)
    return write


def test_a_full_disk_while_saving_the_model_keeps_the_previous_one(data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    finetune.main(train_args(finetune, data_dir, tmp_path))
    before = finished_files(tmp_path / "full")
    monkeypatch.setattr(record, "write_json", no_space({"metrics.json"}, common.write_json))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--save-every", "1"), capsys)
    assert str(tmp_path / "full") in line and "No space left on device" in line
    assert "MB free" in line
    assert finished_files(tmp_path / "full") == before
    assert hidden(tmp_path) == []  # no partial folder, no lock
    # The checkpoint of the run that could not be saved stays, for --resume.
    assert [p.name for p in checkpoints.listed(RunPaths(tmp_path, "full"))] == ["step-0000001"]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(data_dir, tmp_path,
                                                                       capsys, monkeypatch):
    calls = []

    def write(path, obj):
        calls.append(Path(path).name)
        if calls.count("state.json") == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        common.write_json(path, obj)

    monkeypatch.setattr(checkpoints, "write_json", write)
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--save-every", "1", "--max-steps", "4"),
                               capsys)
    assert "checkpoints" in line and "No space left on device" in line
    kept = checkpoints.listed(RunPaths(tmp_path, "full"))
    assert [p.name for p in kept] == ["step-0000001"]
    assert strict_json((kept[0] / "state.json").read_text())["step"] == 1
    assert hidden(tmp_path) == []
    assert not (tmp_path / "full").exists()


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


def test_a_new_unmarked_setting_leaves_run_id_unchanged(data_dir):
    @dataclasses.dataclass(frozen=True)
    class WithMore(TrainSettings):
        colour: str = option("red", "an option that does not define the run")
        width: int = option(3, "one that does", identity=True)

    base = dict(model="tiny-gpt2", data_dir=str(data_dir), method_options={"rank": 8})
    plain = tuning.run_id(TrainSettings(**base), "lora")
    assert tuning.run_id(WithMore(**base), "lora") != plain
    assert tuning.run_id(WithMore(**base, colour="blue"), "lora") == \
        tuning.run_id(WithMore(**base), "lora")
    # Seeds and where the files go never define the run; the rate does.
    assert tuning.run_id(TrainSettings(**base, seed=7, output_dir="elsewhere"), "lora") == plain
    assert tuning.run_id(TrainSettings(**base, lr=1.0), "lora") != plain


def test_run_paths_name_the_files_the_scripts_write(data_dir, tmp_path):
    finetune_lora.main(train_args(finetune_lora, data_dir, tmp_path, "--seeds", "2"))
    paths = RunPaths(tmp_path, "lora", "lora-seed43")
    assert paths.completed.exists() and paths.run == tmp_path / "lora-seed43"
    assert paths.checkpoint(12) == tmp_path / "checkpoints" / "lora" / "step-0000012"
    assert paths.search == tmp_path / "search" / "lora.json"
    assert paths.lock == tmp_path / ".lora.lock" and not paths.lock.exists()
