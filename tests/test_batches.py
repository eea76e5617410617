"""batches.py: micro-batches as a run's steps take them (padding, host-counted positions)."""

import pytest
import torch

import batches
import finetune
import models
import runs
from helpers import tiny_plan, train_args
from settings import TrainSettings

CPU = torch.device("cpu")


def test_micro_batches_pad_to_the_compile_multiples_but_never_past_the_context(data_dir, tmp_path):
    run, plan, _ = tiny_plan(data_dir, tmp_path)
    order = batches.epoch_batches(run, plan, 0)
    (batch,) = batches.micro_batches(plan, order[:1], CPU, True, (16, 64))
    longest = max(plan.lengths[i] for i in order[0])
    assert batch["input_ids"].shape[1] == -(-longest // 16) * 16
    assert len(batch["positions"]) % 64 == 0
    assert int((batch["targets"] != -100).sum()) == int((batch["labels"][:, 1:] != -100).sum())
    plan.max_length = longest + 1  # the context ends before the next multiple
    (batch,) = batches.micro_batches(plan, order[:1], CPU, True, (16, 64))
    assert batch["input_ids"].shape[1] == longest + 1


@pytest.mark.parametrize("mode, sync_free, padded", [("off", False, False),
                                                     ("default", True, False),
                                                     ("reduce-overhead", True, True)])
def test_only_cuda_graphs_pad_and_any_compilation_is_sync_free_on_the_cpu(
        mode, sync_free, padded, data_dir, tmp_path):
    """The batches a run's steps take: label positions from the host once compiled, and
    widths and positions padded to few shapes only under CUDA graphs."""
    settings = TrainSettings.from_args(train_args(finetune, data_dir, tmp_path, "--compile", mode))
    run = runs.start_run(settings, "full")
    model, tokenizer, _ = models.load_model(run.model_path, run.device)
    plan = batches.plan_training(run, model, tokenizer)
    order = batches.epoch_batches(run, plan, 0)
    widths, counts = set(), set()
    for indices in order[:6]:
        (batch,) = batches.micro_batches(plan, [indices], CPU, run.sync_free, run.pad_multiple)
        assert ("positions" in batch) == sync_free
        longest = max(plan.lengths[i] for i in indices)
        width = batch["input_ids"].shape[1]
        assert width >= longest
        assert (width == longest) == (not padded or longest % 16 == 0)
        widths.add(width)
        counts.add(len(batch["positions"]) if sync_free else 0)
    if padded:  # few shapes: widths in steps of 16, label positions in steps of 64
        assert all(w % 16 == 0 for w in widths) and all(c % 64 == 0 for c in counts)
