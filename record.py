"""The run record: what metrics.json says about a finished run, and the run's folder, written
whole or not at all.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import (file_sha256, is_write_failure, plot_training, staged_dir, write_failed,
                    write_json, write_text_atomic)
from memory import PeakMemory
from models import autocast_dtype, count_parameters, restore_frozen_fp32


def versions() -> dict:
    """Library versions, recorded with every run."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def folder_size_mb(folder: Path) -> float:
    """Size on disk of everything in a folder, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def run_metrics(run, model, plan, state, peak: PeakMemory, details: dict | None) -> dict:
    """Everything metrics.json records about a finished run."""
    settings = run.settings
    trainable, total = count_parameters(model)
    history = list(state.history)
    recent = history[-10:]
    dtype = autocast_dtype(run.device, run.precision)
    data_dir = Path(settings.data_dir)
    return {
        "method": run.method, "model": settings.model, "base_model_path": run.model_path,
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "train_seconds": state.train_seconds,
        "train_tokens_per_s": state.train_tokens / max(state.train_seconds, 1e-9),
        "seconds_per_100_examples": 100 * state.train_seconds / max(state.train_examples, 1),
        "peak_memory_mb": peak.peak_bytes / 1e6, "peak_memory_kind": peak.kind,
        "train_loss": sum(h["loss"] for h in recent) / len(recent),
        "train_loss_note": f"mean of the last {len(recent)} steps",
        "valid_loss": list(state.valid_loss), "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "effective_batch_size": plan.effective_batch, "processes": run.world,
        "train_examples": len(plan.train), "valid_examples": len(plan.valid),
        "device": str(run.device),
        "autocast": str(dtype).replace("torch.", "") if dtype else "none",
        "precision": run.precision,
        "step_loss": "answer_loss_at (label positions from the host)" if run.sync_free
                     else "answer_loss (boolean mask)",
        "details": details or {}, "args": settings.as_dict(), "versions": versions(),
        "data_sha256": {name: file_sha256(data_dir / name)
                        for name in ("train.jsonl", "valid.jsonl", "template.json")},
        "history": history,
    }


# An adapter whose initialisation changed the frozen weights (PiSSA: W - B0·A0 stays frozen)
# carries its starting tensors under this attribute, so it can be saved for the original base.
INITIAL_ADAPTER = "initial_adapter_state"


def remember_initial_adapter(model) -> None:
    """Keep a PEFT model's adapter tensors as they are now (before training), for saving."""
    from peft import get_peft_model_state_dict

    setattr(model, INITIAL_ADAPTER, {name: tensor.detach().cpu().clone()
                                     for name, tensor in get_peft_model_state_dict(model).items()})


def save_model(model, folder: Path, state_dict: dict | None = None) -> None:
    """save_pretrained; an adapter that changed its base is saved as a plain LoRA on the original
    base (PEFT's conversion: rank 2r, [A; A0] and [B, -B0]), which loads with the standard calls."""
    initial = getattr(model, INITIAL_ADAPTER, None)
    if initial is None:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:
        start = Path(scratch) / "initial"
        start.mkdir()
        save_file(initial, start / "adapter_model.safetensors")
        with warnings.catch_warnings():
            # the conversion loads the starting adapter beside the trained one, which makes
            # PEFT warn that PiSSA "should not be used with other adapters" and advise the
            # very conversion being done here
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            model.save_pretrained(folder, state_dict=state_dict,
                                  path_initial_model_for_weight_conversion=str(start))


def write_outputs(run, model, tokenizer, metrics: dict, state_dict: dict | None = None) -> dict:
    """Write outputs/<run name>/ in a temporary folder and move it into place when complete.

    Returns the metrics as written (with the folder's size on disk).
    """
    paths = run.paths
    final = paths.run
    try:
        with staged_dir(final) as tmp:
            # a whole model saves the base's fp32 weights, not the bf16 copies it trained with
            restore_frozen_fp32(model, metrics["base_model_path"], run.settings.trust_remote_code)
            # the full model, or only the adapter for LoRA/QLoRA; sharded, the gathered weights
            save_model(model, tmp, state_dict)
            tokenizer.save_pretrained(tmp)
            metrics = {**metrics, "size_on_disk_mb": folder_size_mb(tmp)}
            write_json(tmp / paths.metrics.name, metrics)
            plot_training(metrics, tmp / paths.training_plot.name)
            # Written last: evaluate.py takes a folder without it for an unfinished run.
            write_text_atomic(tmp / paths.completed.name, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        # staged_dir removed the partial folder; the previous <run>/ is as it was.
        raise write_failed(final, exc) from None
    return metrics


def save_outputs(run, model, tokenizer, metrics: dict) -> dict:
    """Write the finished run's folder (one process) and drop its checkpoints; returns its metrics."""
    # Sharded, every process takes part in gathering the weights; rank 0 receives them whole.
    state_dict = dict(run.accelerator.get_state_dict(model)) if run.sharded else None
    if run.rank == 0:
        metrics = write_outputs(run, model, tokenizer, metrics, state_dict)
        ckpt_dir = run.paths.checkpoints
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # leave no empty checkpoints/ folder behind
            ckpt_dir.parent.rmdir()
        print(f"wrote {run.paths.run}/ (model, metrics.json, training_metrics.png): "
              f"{metrics['train_seconds']:.1f} s, {metrics['train_tokens_per_s']:.0f} tokens/s, "
              f"peak {metrics['peak_memory_mb']:.0f} MB, final train loss "
              f"{metrics['train_loss']:.4f}, valid loss {metrics['valid_loss'][-1]['loss']:.4f}")
    run.accelerator.wait_for_everyone()
    return metrics
