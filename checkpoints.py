"""Checkpoints: what one holds, where they are, writing one that appears only when complete,
resuming from the newest, and dropping them when a run is kept or discarded.

A checkpoint holds the trainable tensors only (a LoRA checkpoint is the adapter,
not the 135M frozen weights): accelerate's save/load hooks hand the model to
write_trainable and read_trainable, and accelerate writes the optimiser, schedule
and every process's RNG state.  --resume refuses a checkpoint made with another
configuration (ResumeConfig).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from common import PipelineError, is_write_failure, write_failed, write_json
from models import unwrapped
from runpaths import RunPaths
from settings import TrainSettings


@dataclass(frozen=True)
class ResumeConfig:
    """What a checkpoint was made with (its state["config"]); --resume refuses other values."""

    model: str
    batch_size: int
    grad_accum: int
    lr: float
    seed: int
    total_steps: int
    precision: str = "fp32"  # a checkpoint without this key was made in fp32 on the CPU
    optim: str = "adamw"     # and one without this key with AdamW

    @classmethod
    def of(cls, settings: TrainSettings, total_steps: int, precision: str) -> "ResumeConfig":
        return cls(model=settings.model, batch_size=settings.batch_size,
                   grad_accum=settings.grad_accum, lr=settings.lr, seed=settings.seed,
                   total_steps=total_steps, precision=precision, optim=settings.optim)


def listed(paths: RunPaths) -> list[Path]:
    """A method's complete checkpoints, oldest first."""
    return sorted(p for p in paths.checkpoints.glob("step-*") if (p / "state.json").exists())


def trainable_state(model) -> dict:
    """The tensors that training changes, by parameter name (what a checkpoint must hold); read
    from PEFT's wrapper, not causal_lm, so that prompt tuning's prompt is among them."""
    return {name: param.detach().cpu().contiguous().clone()
            for name, param in unwrapped(model).named_parameters() if param.requires_grad}


def write_trainable(model, output_dir, main_process: bool) -> None:
    """Write the trainable tensors (accelerate's save hook) (the full model is not saved)."""
    from safetensors.torch import save_file

    if main_process:
        save_file(trainable_state(model), Path(output_dir) / "trainable.safetensors")


def read_trainable(model, input_dir) -> None:
    """Restore the trainable tensors (the load hook's work); the frozen ones came with the base."""
    from safetensors.torch import load_file

    params = dict(unwrapped(model).named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(Path(input_dir) / "trainable.safetensors").items():
            params[name].copy_(tensor)


def save(trainer, state: dict) -> Path:
    """Write a checkpoint folder that appears only when complete, and prune old ones."""
    accelerator, settings = trainer.accelerator, trainer.run.settings
    final = trainer.run.paths.checkpoint(state["step"])
    partial = final.with_name(f".{final.name}.partial")  # one name every process can find
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(partial / "state.json", state)  # written last: marks it complete
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        # The older checkpoints are untouched: the new one never replaces them half-written.
        shutil.rmtree(partial, ignore_errors=True)
        raise write_failed(partial, exc) from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in listed(trainer.run.paths)[:-settings.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(trainer, config: ResumeConfig) -> dict:
    """Restore the newest checkpoint; return its progress state.  Refuses a changed configuration."""
    run = trainer.run
    folder = listed(run.paths)[-1]
    state = json.loads((folder / "state.json").read_text())
    for f in fields(config):
        key, made_with = f.name, state["config"].get(f.name, f.default)
        if made_with != getattr(config, key):
            raise PipelineError(f"--resume: the checkpoint was made with {key}="
                                f"{made_with}, this run has "
                                f"{getattr(config, key)}; use the same options or start "
                                "afresh without --resume", folder)
    trainer.accelerator.load_state(str(folder))
    print(f"resumed from {folder} (step {state['step']})")
    return state


def discard(run) -> None:
    """Drop the checkpoints of a run that is not kept, so no later --resume continues it."""
    shutil.rmtree(run.paths.checkpoints, ignore_errors=True)
    run.accelerator.wait_for_everyone()
