"""answer_loss.py: the sync-free loss (answer_loss_at), the CUDA path's loss, tested on the CPU.

Label positions are counted on the host and no attention mask is passed, so
nothing in a step makes the host wait for the device; the loss and gradients
equal the exact path's up to float rounding.  --compile builds on it.
"""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import answer_loss
import batches
import common
import finetune_lora
import models
import steps
from helpers import count_reads, ours, tiny_plan

CPU = torch.device("cpu")


def batch_of(tokenizer, data_dir, n=8, width=None):
    """n training rows of several lengths, right-padded (collate's default)."""
    rows = [{**row, "prompt": row["prompt"].replace("User: ", "User: " + "Please, " * (i % 3))}
            for i, row in enumerate(common.load_split(data_dir, "train")[:n])]
    examples = common.tokenize_rows(tokenizer, rows, 512, source="train.jsonl")
    assert len({len(ex["input_ids"]) for ex in examples}) > 1  # the batch has padding
    return common.collate(examples, tokenizer.pad_token_id, width=width)


def test_label_positions_are_the_masks_positions_in_row_order():
    labels = torch.tensor([[-100, -100, 5, 6, -100],
                           [-100, 7, 8, -100, -100]])
    positions, targets = answer_loss.label_positions(labels)
    keep = labels[:, 1:] != -100
    assert positions.tolist() == keep.reshape(-1).nonzero().squeeze(1).tolist() == [1, 2, 4, 5]
    assert targets.tolist() == labels[:, 1:][keep].tolist() == [5, 6, 7, 8]
    positions, targets = answer_loss.label_positions(labels, multiple=8)
    assert len(positions) == len(targets) == 8
    assert targets.tolist() == [5, 6, 7, 8] + [-100] * 4  # padding carries no label


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_the_sync_free_loss_and_gradients_equal_the_exact_ones(model_name, data_dir):
    """fp32, no dropout; the sync-free batch has extra padding, as a compiled step's has."""
    model, tokenizer, _ = models.load_model(model_name, CPU, precision="fp32")
    model.eval()  # dropout off: both paths see the same network
    exact_batch = batch_of(tokenizer, data_dir)
    padded = batch_of(tokenizer, data_dir, width=exact_batch["input_ids"].shape[1] + 13)
    results = []
    for loss in (lambda: answer_loss.answer_loss(model, **exact_batch),
                 lambda: answer_loss.answer_loss_at(
                     model, padded["input_ids"], *answer_loss.label_positions(padded["labels"], 64))):
        model.zero_grad()
        nll, count = loss()
        nll.backward()
        results.append((float(nll.detach()), int(count), {name: p.grad.clone()
                                                for name, p in model.named_parameters()}))
    (exact, n_exact, g_exact), (free, n_free, g_free) = results
    assert n_free == n_exact
    assert free == pytest.approx(exact, rel=1e-5)
    for name, grad in g_exact.items():
        torch.testing.assert_close(g_free[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class Waits(TorchDispatchMode):
    """Every operation whose result the host must wait for on CUDA: a value read into Python,
    or an output whose size depends on values (a boolean-mask gather counts its rows first)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select") or (
                name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in args[1] if i is not None)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def two_steps(data_dir, tmp_path, monkeypatch, sync_free):
    """(waits, reads, rows) of two whole steps on the exact or the sync-free path."""
    run, plan, model = tiny_plan(data_dir, tmp_path)
    trainer = steps.Trainer(run, model, plan.total_steps)
    order = batches.epoch_batches(run, plan, 0)
    micro = [batches.micro_batches(plan, order[i:i + 1], run.device, sync_free=sync_free)
             for i in (0, 1)]
    reads = count_reads(monkeypatch)
    with Waits() as waits:
        pending = [trainer.update(m) for m in micro]
    monkeypatch.undo()
    rows = steps.read_steps(trainer, tuple(pending), plan.steps_per_epoch)
    assert [row["tokens"] for row in rows] == [int(m[0]["attention_mask"].sum()) for m in micro]
    return waits.seen, list(reads), rows


def test_a_sync_free_step_waits_only_for_transformers_check_of_its_positions(
        data_dir, tmp_path, monkeypatch):
    """The exact path's boolean-mask gather makes the host wait in every forward pass; the
    sync-free path has none.  What is left is transformers' own look at the position ids
    (packed sequences?), one value per forward, which it skips when compiled."""
    waits, reads, _ = two_steps(data_dir, tmp_path / "exact", monkeypatch, sync_free=False)
    assert "index" in waits  # the test sees the gather it is meant to catch
    waits, reads, _ = two_steps(data_dir, tmp_path / "free", monkeypatch, sync_free=True)
    assert waits == ["_local_scalar_dense"] * 2
    assert ours(reads) == [] and len(reads) == 2  # both in transformers/masking_utils.py


def test_a_compiled_run_trains_as_the_uncompiled_one(data_dir, tmp_path):
    """--compile default (inductor, on the CPU here) against the exact path, both fp32."""
    histories = {}
    for mode in ("off", "default"):
        args = finetune_lora.parse_args([
            "--device", "cpu", "--model", "tiny-llama", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path / mode), "--batch-size", "8", "--max-steps", "4",
            "--precision", "fp32", "--dropout", "0", "--compile", mode])
        finetune_lora.main(args)
        metrics = json.loads((tmp_path / mode / "lora" / "metrics.json").read_text())
        assert metrics["args"]["compile"] == mode
        histories[mode] = [h["loss"] for h in metrics["history"]]
        step_loss = metrics["step_loss"]
        assert step_loss.startswith("answer_loss_at" if mode != "off" else "answer_loss (")
    assert histories["default"] == pytest.approx(histories["off"], rel=1e-4)


