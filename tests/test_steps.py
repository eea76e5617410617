"""steps.Trainer: a step's numbers stay on the device until read, and a non-finite step takes no update."""

import math

import pytest
import torch

import batches
import checkpoints
import finetune
import loop
import models
import runs
import steps
from helpers import count_reads, ours, strict_json, tiny_plan
from runpaths import RunPaths
from settings import TrainSettings


def test_a_step_returns_tensors_that_are_read_only_when_asked(data_dir, tmp_path, monkeypatch):
    run, plan, model = tiny_plan(data_dir, tmp_path)
    trainer = steps.Trainer(run, model, plan.total_steps)
    order = batches.epoch_batches(run, plan, 0)
    micro = [batches.micro_batches(plan, order[i:i + 1], run.device) for i in (0, 1)]
    reads = count_reads(monkeypatch)
    pending = tuple(trainer.update(m) for m in micro)
    assert ours(reads) == []  # two whole steps, forward to optimiser update, without one read
    assert all(isinstance(stats.numbers, torch.Tensor) for stats in pending)
    rows = steps.read_steps(trainer, pending, plan.steps_per_epoch)
    assert ours(reads) == ["tolist"]  # both steps in one read
    monkeypatch.undo()
    assert [row["step"] for row in rows] == [1, 2]
    tokens = [int(m[0]["attention_mask"].sum()) for m in micro]
    assert [row["tokens"] for row in rows] == tokens
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)


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
