"""Interruption, resume and determinism: a run stopped and resumed ends where an unbroken one does."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import common
import evaluate
import finetune
import runpaths
from helpers import (SCRIPTS, hidden, run_and_expect_exit, stop_at, strict_json,
                     train_args)
from runpaths import RunPaths

TIMING_KEYS = {"train_seconds", "train_tokens_per_s", "seconds_per_100_examples",
               "peak_memory_mb", "args", "size_on_disk_mb"}


def train(method, data_dir, out, *extra, callbacks=()):
    """A 10-step tiny-gpt2 run with a checkpoint every 3 steps (epochs are 6 steps long)."""
    script = SCRIPTS[method]
    script.main(script.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                   str(data_dir),
                                   "--output-dir", str(out), "--batch-size", "8",
                                   "--max-steps", "10", "--save-every", "3", *extra]),
                callbacks)


def weights(folder):
    """The saved tensors of a run's output folder."""
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    return load_file(folder / name)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "bitfit"])
def test_interrupted_then_resumed_run_matches_an_unbroken_one(method, data_dir, tmp_path):
    train(method, data_dir, tmp_path / "unbroken")

    with pytest.raises(KeyboardInterrupt):
        train(method, data_dir, tmp_path / "broken", callbacks=[stop_at(4)])
    # Interrupted: a checkpoint of its own, and no folder that looks finished.
    assert not (tmp_path / "broken" / method).exists()
    saved = checkpoints.listed(RunPaths(tmp_path / "broken", method))
    assert [p.name for p in saved] == ["step-0000003", "step-0000004"]
    assert not [p for p in (tmp_path / "broken").iterdir() if p.name.startswith(".")]

    train(method, data_dir, tmp_path / "broken", "--resume")
    a, b = weights(tmp_path / "unbroken" / method), weights(tmp_path / "broken" / method)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = json.loads((tmp_path / "unbroken" / method / "metrics.json").read_text())
    mb = json.loads((tmp_path / "broken" / method / "metrics.json").read_text())
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    assert ma["valid_loss"] == mb["valid_loss"]
    # cleaned up once finished
    assert not checkpoints.listed(RunPaths(tmp_path / "broken", method))


def test_the_run_that_builds_the_tiny_model_trains_like_later_runs(data_dir, tmp_path,
                                                                  monkeypatch):
    """Building a preset seeds torch's RNG: the first run must still draw as later runs do."""
    monkeypatch.setenv("QA_FT_CACHE", str(tmp_path / "empty-cache"))
    train("full", data_dir, tmp_path / "first")  # builds tiny-gpt2
    train("full", data_dir, tmp_path / "second")  # finds it built
    a, b = weights(tmp_path / "first" / "full"), weights(tmp_path / "second" / "full")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoints_keep_only_the_last_few(data_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train("lora", data_dir, tmp_path, "--keep-checkpoints", "2", callbacks=[stop_at(9)])
    assert [p.name for p in checkpoints.listed(RunPaths(tmp_path, "lora"))] == ["step-0000006",
                                                                     "step-0000009"]


def test_resume_refuses_a_checkpoint_made_with_other_options(data_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train("lora", data_dir, tmp_path, callbacks=[stop_at(2)])
    with pytest.raises(common.PipelineError, match="lr="):
        train("lora", data_dir, tmp_path, "--resume", "--lr", "1e-3")


def test_a_crash_leaves_the_previous_output_untouched(data_dir, tmp_path):
    train("lora", data_dir, tmp_path)
    before = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()

    def crash(step, control):
        if step == 2:
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated"):
        train("lora", data_dir, tmp_path, "--lr", "1e-3", callbacks=[crash])
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "lora" / "COMPLETED").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_command_twice_gives_identical_metrics_and_predictions(data_dir, tmp_path):
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        train("lora", data_dir, out)
        evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data_dir),
                                           "--output-dir",
                                           str(out)]))
        metrics = json.loads((out / "lora" / "metrics.json").read_text())
        history = [{k: v for k, v in h.items()} for h in metrics.pop("history")]
        runs.append(({k: v for k, v in metrics.items() if k not in TIMING_KEYS}, history,
                     (out / "lora" / "predictions.jsonl").read_text(),
                     (out / "base" / "predictions.jsonl").read_text()))
    assert runs[0] == runs[1]


def test_resume_refuses_a_changed_rate_and_keeps_the_checkpoint(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        common.run_main(lambda a: finetune.main(a, callbacks=[stop_at(1)]),
                        train_args(finetune, data_dir, tmp_path))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--resume", "--lr", "1e-5"), capsys)
    assert "made with lr=0.00015, this run has 1e-05" in line
    assert [p.name for p in checkpoints.listed(RunPaths(tmp_path, "full"))] == ["step-0000001"]
    assert not runpaths.lock_file(tmp_path, "full").exists()


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
