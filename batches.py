"""Batching: the run's tokenised examples and step counts (Plan), its length-grouped batches,
and one micro-batch as a step takes it, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from answer_loss import label_positions
from common import PipelineError, collate, length_grouped_batches, tokenize_rows
from models import context_length, virtual_tokens


@dataclass
class Plan:
    """Tokenised examples and step counts of a run."""

    train: list[dict]
    valid: list[dict]
    lengths: list[int]
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    effective_batch: int
    max_length: int = 1 << 30  # no batch is padded beyond the model's context


def plan_training(run, model, tokenizer) -> Plan:
    """Tokenised train/validation examples and the step counts of this run."""
    settings = run.settings
    # prompt tuning's virtual tokens take their share of the context
    room = context_length(model) - virtual_tokens(model)
    max_len = min(settings.max_length or room, room)
    data_dir = Path(settings.data_dir)
    train = tokenize_rows(tokenizer, run.train_rows, max_len, settings.train_on_prompt,
                          source=str(data_dir / "train.jsonl"))
    valid = tokenize_rows(tokenizer, run.valid_rows, max_len, source=str(data_dir / "valid.jsonl"))
    lengths = [len(ex["input_ids"]) for ex in train]
    per_rank = len(length_grouped_batches(lengths, settings.batch_size, settings.seed, 0)) // run.world
    steps_per_epoch = per_rank // settings.grad_accum
    if steps_per_epoch < 1:
        raise PipelineError(f"{len(train)} training examples make no full step at batch size "
                            f"{settings.batch_size} x {settings.grad_accum} accumulation x "
                            f"{run.world} processes; lower --batch-size", data_dir / "train.jsonl")
    return Plan(train=train, valid=valid, lengths=lengths, pad_id=tokenizer.pad_token_id,
                steps_per_epoch=steps_per_epoch,
                total_steps=settings.max_steps or max(1, round(settings.epochs * steps_per_epoch)),
                effective_batch=settings.batch_size * settings.grad_accum * run.world,
                max_length=max_len)


def epoch_batches(run, plan: Plan, epoch: int) -> list[list[int]]:
    """This process's batches (lists of example indices) for one epoch."""
    batches = length_grouped_batches(plan.lengths, run.settings.batch_size, run.settings.seed, epoch)
    return batches[run.rank::run.world]


def micro_batches(plan: Plan, indices: list[list[int]], device, sync_free: bool = False,
                  multiple: tuple[int, int] = (1, 1)) -> list[dict]:
    """Collated micro-batches of the given example indices, on the device."""
    return [to_device(step_batch([plan.train[i] for i in idx], plan.pad_id, plan.max_length,
                                 sync_free, multiple), device) for idx in indices]


def step_batch(examples: list[dict], pad_id: int, max_length: int = 1 << 30,
               sync_free: bool = False, multiple: tuple[int, int] = (1, 1)) -> dict:
    """One micro-batch on the host, as a step takes it (Run.sync_free, Run.pad_multiple).

    sync_free adds the label positions counted here (answer_loss.label_positions);
    multiple pads the width and the positions to multiples, the width never past
    max_length (the model's context).
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    width = min(-(-width // multiple[0]) * multiple[0], max(max_length, width))
    batch = collate(examples, pad_id, width=width)
    if sync_free:
        batch["positions"], batch["targets"] = label_positions(batch["labels"], multiple[1])
    return batch


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the device; on CUDA through pinned memory, without waiting.

    A copy from ordinary host memory makes the host wait until the GPU has run
    everything queued before it; from pinned memory it is queued like a kernel
    (torch keeps the pinned buffer until the copy is done).
    """
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
