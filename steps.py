"""One optimiser step: the Trainer (optimiser, schedule, the answer-only loss's update), and
reading its numbers.

The loss is the summed answer-token NLL divided by the global answer-token count,
so processes and micro-batches weigh every token equally.  A step leaves its
loss, gradient norm and token counts on the device (StepStats); read_steps reads
pending steps at once, so a CUDA step never waits for the GPU.  A non-finite step
skips its own update without a read and stops the run at the next read (Diverged).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import checkpoints
from answer_loss import AnswerLoss
from common import PipelineError
from settings import TrainSettings


class Diverged(PipelineError):
    """The loss or gradient norm became non-finite: the run stops there, and nothing is marked complete.

    The learning-rate search records such a rate as diverged and never chooses it.
    """


@dataclass(frozen=True)
class StepStats:
    """One optimiser step's numbers, still on the device: reading them waits for it."""

    step: int              # 1 for the run's first step
    lr: float
    numbers: torch.Tensor  # float64: summed answer NLL, answer tokens, gradient norm, tokens


class Trainer:
    """The optimiser, schedule and step of one run, prepared by accelerate.

    Checkpoints hold the trainable tensors only (a LoRA checkpoint is the
    adapter, not the 135M frozen weights): accelerate's save/load hooks hand the
    model to us, and accelerate writes the optimiser, schedule and RNG states.
    """

    def __init__(self, run, model, total_steps: int):
        settings, accelerator = run.settings, run.accelerator
        self.run, self.model, self.accelerator = run, model, accelerator
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PipelineError(f"{run.method}: the model has no trainable parameters")
        optimizer = make_optimizer(params, settings)
        self.loss_module, self.optimizer = accelerator.prepare(AnswerLoss(model), optimizer)
        self.sharded = self.loss_module if run.sharded else None  # the FSDP2 root module
        if run.sharded:
            check_sharded(self.loss_module)
        if settings.compile != "off":
            # dynamic: one compilation serves every batch width and label count
            self.loss_module = torch.compile(
                self.loss_module, dynamic=True,
                mode=None if settings.compile == "default" else settings.compile)
        self.cuda_graphs = settings.compile == "reduce-overhead"
        self.params = params
        if run.sharded:
            # fully_shard replaced the parameters with sharded ones: clip and skip those
            self.params = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.scheduler = linear_schedule(optimizer, total_steps, settings.warmup_ratio)
        accelerator.register_for_checkpointing(self.scheduler)
        if not run.sharded:
            # Sharded, accelerate saves and loads the model's shards itself (before any hook
            # runs, which then get empty lists): a checkpoint holds the whole sharded model.
            accelerator.register_save_state_pre_hook(self._save_trainable)
            accelerator.register_load_state_pre_hook(self._load_trainable)

    def _save_trainable(self, models, weights, output_dir) -> None:
        """accelerate hook: write the trainable tensors ourselves; the full model is not saved."""
        weights.clear()
        checkpoints.write_trainable(self.model, output_dir, self.accelerator.is_main_process)

    def _load_trainable(self, models, input_dir) -> None:
        """accelerate hook: restore the trainable tensors; the frozen ones came with the base."""
        models.clear()
        checkpoints.read_trainable(self.model, input_dir)


    def reduce_sum(self, *values: float) -> list[float]:
        """Sum numbers over processes (identity when there is one)."""
        if self.run.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.run.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def reduce_sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over processes, left on the device (identity when there is one)."""
        if self.run.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def update(self, micro: list[dict]) -> StepStats:
        """One optimiser step over micro-batches; its numbers stay on the device (no wait for it)."""
        accelerator, run = self.accelerator, self.run
        step = self.scheduler.last_epoch + 1
        n_labels = sum((b["labels"][:, 1:] != -100).sum() for b in micro).double()
        # The loss is the mean over every answer token of the step, on all processes.  DDP
        # averages gradients over processes, so each divides its summed NLL by the global
        # label count over world (a per-process mean would weight the processes' tokens
        # unequally whenever their label counts differ).
        n_labels = self.reduce_sum_tensor(n_labels)
        # float32 as the NLL is: a float64 divisor would make the loss and its gradient float64
        per_process = (n_labels / run.world).float()
        step_nll = 0.0
        for i, batch in enumerate(micro):
            # Gradients are synchronised on the last micro-batch only.
            sync = (contextlib.nullcontext() if i == len(micro) - 1
                    else accelerator.no_sync(self.loss_module))
            with sync:
                if self.cuda_graphs:  # the previous replay's outputs are no longer needed
                    torch.compiler.cudagraph_mark_step_begin()
                nll, _ = self.loss_module(**batch)
                accelerator.backward(nll / per_process)
            step_nll = step_nll + nll.detach().double()  # float64, as the sum of Python floats was
        grad_norm = accelerator.clip_grad_norm_(self.params, run.settings.max_grad_norm)
        if run.sharded:  # a DTensor over the shards: the global norm as a plain tensor
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        tokens = sum(b["attention_mask"].sum() for b in micro).double()
        step_nll, tokens = self.reduce_sum_tensor(torch.stack([step_nll, tokens]))
        # Every process shares these numbers, so all skip together; no weight takes the update.
        self.skip_unless(torch.isfinite(step_nll) & torch.isfinite(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(step=step, lr=lr, numbers=torch.stack(
            [step_nll, n_labels, grad_norm.detach().double(), tokens]))

    def skip_unless(self, finite: torch.Tensor) -> None:
        """Make the coming optimiser step a no-op where finite is false, without reading it.

        torch's fused AdamW skips its update (and its step count) when found_inf
        is 1, as under a GradScaler; bitsandbytes' optimiser has no such input,
        so its non-finite gradients are zeroed instead (the weights stay finite).
        """
        inner = self.optimizer.optimizer  # accelerate's wrapper passes step() through
        if isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused"):
            inner.found_inf = (~finite).float()
            return
        for param in self.params:
            if param.grad is not None:
                param.grad.masked_fill_(~finite, 0.0)

    def step(self, micro: list[dict]) -> dict:
        """One optimiser step, its numbers read at once: loss, lr, grad_norm, tokens.

        For a benchmark that times whole steps; the loop calls update().
        """
        row = read_steps(self, (self.update(micro),), steps_per_epoch=1)[0]
        return {key: row[key] for key in ("loss", "lr", "grad_norm", "tokens")}

    def diverged(self, step: int, found: str) -> Diverged:
        """The error for a non-finite loss or gradient norm at a step, with what to try instead."""
        s = self.run.settings
        kept = checkpoints.listed(self.run.paths)
        where = (f"; the last good checkpoint, {kept[-1]}, was kept, but --resume continues "
                 "only at the same rate" if kept else "")
        return Diverged(f"training diverged at step {step} with --lr {s.lr:g}: {found}; nothing "
                        f"was saved as complete{where}; start afresh with a lower rate, e.g. "
                        f"--lr {s.lr / 10:g}")


def check_sharded(module) -> None:
    """Stop unless accelerate really wrapped the module with FSDP2 (never a silent DDP run)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        raise PipelineError(f"FSDP was asked for, but accelerate prepared a "
                            f"{type(module).__name__}, not an FSDP2 module")


def param_groups(params: list, lr: float) -> list[dict]:
    """One optimiser group per learning rate: lr times a parameter's lr_scale attribute (1 when
    it has none; LoRA+ gives its B matrices a larger one), each group scheduled alike."""
    groups: dict[float, list] = {}
    for param in params:
        groups.setdefault(float(getattr(param, "lr_scale", 1.0)), []).append(param)
    return [{"params": group, "lr": lr * scale} for scale, group in sorted(groups.items())]


def make_optimizer(params: list, settings: TrainSettings):
    """--optim: torch's AdamW, or bitsandbytes' 8-bit AdamW (which also runs on the CPU)."""
    params = param_groups(params, settings.lr)
    if settings.optim == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:
            raise PipelineError(f"--optim adamw_8bit needs bitsandbytes ({exc}); "
                                "pip install bitsandbytes==0.50.2") from None
        # Tensors under 4096 elements (biases, norms) keep 32-bit moments (bitsandbytes'
        # min_8bit_size): they hold little of the memory.
        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=0.0)
    # fused: one kernel updates every tensor, where the default (foreach) makes several
    # passes over weights, gradients and moments: the same update up to float rounding,
    # in a fraction of the time (results/defaults.md, fused AdamW).
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, fused=True)


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to zero.

    Kept instead of transformers.get_scheduler("linear"): that schedule's first
    step has learning rate 0, a step lost to a short run (metrics.json's "steps").
    Ours starts the warm-up at lr/warmup.
    """
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def read_steps(trainer: Trainer, pending: tuple[StepStats, ...],
               steps_per_epoch: int) -> list[dict]:
    """History rows (plus "tokens") of steps left on the device, read in one wait.

    Raises Diverged at the first step whose loss or gradient norm is not finite.
    """
    rows = torch.stack([stats.numbers for stats in pending]).tolist()
    out = []
    for stats, (nll, labels, grad_norm, tokens) in zip(pending, rows):
        if not (math.isfinite(nll) and math.isfinite(grad_norm)):
            raise trainer.diverged(stats.step, f"loss {nll / labels:.4g}, gradient norm "
                                               f"{grad_norm:.4g} at learning rate {stats.lr:.4g}")
        out.append({"step": stats.step, "epoch": round(stats.step / steps_per_epoch, 4),
                    "loss": nll / labels, "lr": stats.lr, "grad_norm": grad_norm,
                    "tokens": int(tokens)})
    return out
