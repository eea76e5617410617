"""Train one run: the answer-only loss, on length-grouped batches, with checkpoints and Ctrl-C.

    run = training.start_run(settings, "lora")
    model, tokenizer, base = models.load_model(settings.model, run.device)
    metrics = training.train(run, model, tokenizer, base, details)
    training.save_outputs(run, model, tokenizer, metrics)

`accelerate` owns the plumbing: processes (torchrun or `accelerate launch`),
the DistributedDataParallel wrapping, gradient sync only on an optimiser step's
last micro-batch, all-reduces, bf16 autocast on CUDA, seeding, and the
checkpoint files with every process's RNG state.  What is ours: the loss over
the answer tokens only, divided by the global answer-token count (so processes
and micro-batches weigh every token equally); the length-grouped batch order;
the check that --resume continues the same configuration; and the output folder
that appears only when complete.

A step leaves its loss, gradient norm and token counts on the device; the loop
reads every pending step at once at a log interval, an epoch's end, a
checkpoint and the end, so a CUDA step never waits for the GPU.  A non-finite
step skips its own update without a read and stops the run at the next read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from common import (PipelineError, collate, file_sha256, is_write_failure, length_grouped_batches,
                    load_split, load_template, plot_training, staged_dir, tokenize_rows,
                    write_failed, write_json, write_text_atomic)
from answer_loss import AnswerLoss, answer_nll, label_positions
from memory import PeakMemory
from models import (autocast_dtype, causal_lm, context_length, count_parameters, pick_device,
                    resolve_model, restore_frozen_fp32)
from runpaths import RunPaths
from settings import TrainSettings


# Under CUDA graphs (--compile reduce-overhead) batches are padded to these multiples of
# tokens and of label positions, so graphs are recorded for few shapes.  Plain compilation
# has dynamic shapes and needs none: on the CPU this padding (21% more positions on the
# default data) cost more than compiling saved (benchmarks/results-compile-cpu.md).
GRAPH_PADDING = (16, 64)


class Diverged(PipelineError):
    """The loss or gradient norm became non-finite: the run stops there, and nothing is marked complete.

    The learning-rate search records such a rate as diverged and never chooses it.
    """


@dataclass
class Control:
    """What the loop is asked to do between steps; set by Ctrl-C, SIGTERM or a callback."""

    stop: bool = False


# A callback runs after every optimiser step as callback(step, control); setting
# control.stop checkpoints and stops exactly as Ctrl-C does (the tests use this).
Callback = Callable[[int, Control], None]


@dataclass
class Run:
    """One training run: its settings, where it runs, and the rows it reads."""

    method: str
    settings: TrainSettings
    accelerator: object  # accelerate.Accelerator
    template: dict
    train_rows: list[dict]
    valid_rows: list[dict]
    name: str = ""  # the output folder's name: <method> or <method>-seed<N>

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.settings.output_dir, self.method, self.name)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def precision(self) -> str:
        """"bf16" (autocast) or "fp32": what the accelerator computes in."""
        return "bf16" if self.accelerator.mixed_precision == "bf16" else "fp32"

    @property
    def sync_free(self) -> bool:
        """Whether steps score label positions counted on the host (answer_loss_at).

        On CUDA the exact path's boolean mask, and the attention mask the model
        inspects, make the host wait for the GPU in every forward pass; a compiled
        step needs shapes that follow from its inputs.  The CPU otherwise keeps the
        exact path (the same loss up to float rounding).
        """
        return self.device.type == "cuda" or self.settings.compile != "off"

    @property
    def pad_multiple(self) -> tuple[int, int]:
        """(width, label positions) multiples a batch is padded to: few shapes to record."""
        return GRAPH_PADDING if self.settings.compile == "reduce-overhead" else (1, 1)


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


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when alone), before any set-up."""
    return int(os.environ.get("RANK", 0))


def make_accelerator(device_choice: str = "auto", precision: str = "fp32"):
    """An Accelerator for --device and --precision: bf16 autocast (models.autocast_dtype) or fp32.

    On a machine without CUDA the processes of torchrun or `accelerate launch
    --multi_gpu --num_processes N` run on the CPU and talk over gloo.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = pick_device(device_choice)
    bf16 = autocast_dtype(device, precision) == torch.bfloat16
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != ("bf16" if bf16 else "no"):
        # accelerate keeps one precision per process; a later run in the same process (a
        # test, a benchmark) at another precision starts its state afresh, processes kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    # device_placement off: models.load_model has put the model on its device already (a
    # 4-bit model must not be moved again), and batches are moved by the loop.
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no",
                       device_placement=False)


def start_run(settings: TrainSettings, method: str, name: str | None = None) -> Run:
    """Check the inputs, join the processes, resolve the model and seed everything, before loading.

    The first process resolves (builds or converts) the model before the others,
    so they never race on the cache.
    """
    from accelerate.utils import set_seed

    # Training reads train and valid only: eval.jsonl is kept for evaluate.py.
    train_rows = load_split(settings.data_dir, "train")
    valid_rows = load_split(settings.data_dir, "valid")
    template = load_template(settings.data_dir)
    if settings.resume and not checkpoints(Path(settings.output_dir), method):
        raise PipelineError("--resume: no checkpoint in "
                            f"{RunPaths(settings.output_dir, method).checkpoints}")
    accelerator = make_accelerator(settings.device, settings.precision)
    with accelerator.main_process_first():
        resolve_model(settings.model)
    # After resolving: building a tiny preset seeds torch's RNG itself, and a run that built
    # it must draw the same initialisation and dropout as every later run of the command.
    set_seed(settings.seed)
    return Run(method=method, settings=settings, accelerator=accelerator, template=template,
               train_rows=train_rows, valid_rows=valid_rows, name=name or method)


# --- checkpoints -----------------------------------------------------------------


def checkpoints(output_dir: Path, method: str) -> list[Path]:
    """A method's complete checkpoints, oldest first."""
    folder = RunPaths(output_dir, method).checkpoints
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").exists())


def trainable_state(model) -> dict:
    """The tensors that training changes, by parameter name (what a checkpoint must hold)."""
    return {name: param.detach().cpu().contiguous().clone()
            for name, param in causal_lm(model).named_parameters() if param.requires_grad}


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

    def __init__(self, run: Run, model, total_steps: int):
        settings, accelerator = run.settings, run.accelerator
        self.run, self.model, self.accelerator = run, model, accelerator
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PipelineError(f"{run.method}: the model has no trainable parameters")
        optimizer = make_optimizer(params, settings)
        self.loss_module, self.optimizer = accelerator.prepare(AnswerLoss(model), optimizer)
        if settings.compile != "off":
            # dynamic: one compilation serves every batch width and label count
            self.loss_module = torch.compile(
                self.loss_module, dynamic=True,
                mode=None if settings.compile == "default" else settings.compile)
        self.cuda_graphs = settings.compile == "reduce-overhead"
        self.params = params
        self.scheduler = linear_schedule(optimizer, total_steps, settings.warmup_ratio)
        accelerator.register_for_checkpointing(self.scheduler)
        accelerator.register_save_state_pre_hook(self._save_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)

    def _save_trainable(self, models, weights, output_dir) -> None:
        """accelerate hook: write the trainable tensors ourselves; the full model is not saved."""
        from safetensors.torch import save_file

        weights.clear()
        if self.accelerator.is_main_process:
            save_file(trainable_state(self.model), Path(output_dir) / "trainable.safetensors")

    def _load_trainable(self, models, input_dir) -> None:
        """accelerate hook: restore the trainable tensors; the frozen ones came with the base."""
        from safetensors.torch import load_file

        models.clear()
        params = dict(causal_lm(self.model).named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(Path(input_dir) / "trainable.safetensors").items():
                params[name].copy_(tensor)

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
        kept = checkpoints(s.output_dir, self.run.method)
        where = (f"; the last good checkpoint, {kept[-1]}, was kept, but --resume continues "
                 "only at the same rate" if kept else "")
        return Diverged(f"training diverged at step {step} with --lr {s.lr:g}: {found}; nothing "
                        f"was saved as complete{where}; start afresh with a lower rate, e.g. "
                        f"--lr {s.lr / 10:g}")

    def save(self, state: dict) -> Path:
        """Write a checkpoint folder that appears only when complete, and prune old ones."""
        accelerator, settings = self.accelerator, self.run.settings
        final = self.run.paths.checkpoint(state["step"])
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
            for old in checkpoints(settings.output_dir, self.run.method)[:-settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, config: ResumeConfig) -> dict:
        """Restore the newest checkpoint; return its progress state.  Refuses a changed configuration."""
        run = self.run
        folder = checkpoints(run.settings.output_dir, run.method)[-1]
        state = json.loads((folder / "state.json").read_text())
        for f in fields(config):
            key, made_with = f.name, state["config"].get(f.name, f.default)
            if made_with != getattr(config, key):
                raise PipelineError(f"--resume: the checkpoint was made with {key}="
                                    f"{made_with}, this run has "
                                    f"{getattr(config, key)}; use the same options or start "
                                    "afresh without --resume", folder)
        self.accelerator.load_state(str(folder))
        print(f"resumed from {folder} (step {state['step']})")
        return state


def make_optimizer(params: list, settings: TrainSettings):
    """--optim: torch's AdamW, or bitsandbytes' 8-bit AdamW (which also runs on the CPU)."""
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
    # in a fraction of the time (README, "Speed and memory"; benchmarks/profile.md).
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, fused=True)


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to zero.

    Kept instead of transformers.get_scheduler("linear"): that schedule's first
    step has learning rate 0, a lost step in these 40-90-step runs.  Ours starts
    the warm-up at lr/warmup.
    """
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- the loop ----------------------------------------------------------------------


def plan_training(run: Run, model, tokenizer) -> Plan:
    """Tokenised train/validation examples and the step counts of this run."""
    settings = run.settings
    max_len = min(settings.max_length or context_length(model), context_length(model))
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


def epoch_batches(run: Run, plan: Plan, epoch: int) -> list[list[int]]:
    """This process's batches (lists of example indices) for one epoch."""
    batches = length_grouped_batches(plan.lengths, run.settings.batch_size, run.settings.seed, epoch)
    return batches[run.rank::run.world]


def valid_loss(trainer: Trainer, plan: Plan) -> float:
    """Mean answer-token loss on held-out examples (the validation split), over all processes.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights in place, for
    good, into an inference-only layout the first time the layer runs in eval mode without
    gradients.  Training forwards after that go through a kernel with no backward
    (bitsandbytes::gemv_4bit: gradients stop there, silently) or fail on layers with a bias,
    so QLoRA would train wrongly after its first mid-training loss.  The repacking is
    switched off while this loss is measured.
    """
    run, model = trainer.run, trainer.model
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        shard = plan.valid[run.rank::run.world]
        nll, count = answer_nll(model, shard, plan.pad_id, run.device,
                                batch_size=run.settings.batch_size * 2, precision=run.precision)
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
    nll, count = trainer.reduce_sum(nll, count)
    return nll / max(count, 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is the device (CUDA) or the host (CPU allocator) running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def oom_advice(run: Run) -> PipelineError:
    """The error for running out of memory, with what to try instead."""
    s = run.settings
    return PipelineError(
        f"out of {run.device.type.upper()} memory at batch size {s.batch_size}; try "
        f"--batch-size {max(1, s.batch_size // 2)} --grad-accum {s.grad_accum * 2} "
        "(the same effective batch), --max-length, or finetune_qlora.py (4-bit base weights)")


@contextlib.contextmanager
def stop_on_signals(control: Control):
    """While training, Ctrl-C and SIGTERM finish the current step, checkpoint and stop."""
    import signal

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, lambda *_: setattr(control, "stop", True))
    try:
        yield control
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs of a run and its plan, fixed before the first step."""

    method: str
    device: torch.device
    rank: int
    world: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    save_every: int
    # Steps between reads of the device's numbers for the progress bar and history: a read
    # waits for the GPU to finish, so reading every step would stall its queue.
    log_every: int = 10
    sync_free: bool = False                  # Run.sync_free
    pad_multiple: tuple[int, int] = (1, 1)   # Run.pad_multiple

    @classmethod
    def of(cls, run: Run, plan: Plan) -> "LoopConfig":
        s = run.settings
        return cls(method=run.method, device=run.device, rank=run.rank, world=run.world,
                   grad_accum=s.grad_accum, steps_per_epoch=plan.steps_per_epoch,
                   total_steps=plan.total_steps, save_every=s.save_every,
                   sync_free=run.sync_free, pad_multiple=run.pad_multiple)


@dataclass(frozen=True)
class TrainState:
    """A run's progress (what a checkpoint holds), plus the steps not yet read from the device."""

    step: int = 0
    history: tuple[dict, ...] = ()
    valid_loss: tuple[dict, ...] = ()
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_examples: int = 0
    config: dict = field(default_factory=dict)
    pending: tuple[StepStats, ...] = ()

    def saved(self) -> dict:
        """The state a checkpoint's state.json holds; every step must have been read."""
        assert not self.pending, "read the pending steps before saving"
        out = asdict(replace(self, pending=()))
        del out["pending"]
        return {**out, "history": list(self.history), "valid_loss": list(self.valid_loss)}

    @classmethod
    def restored(cls, saved: dict) -> "TrainState":
        """The state of a checkpoint's state.json."""
        return cls(**{**saved, "history": tuple(saved["history"]),
                      "valid_loss": tuple(saved["valid_loss"])})


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


def read_pending(trainer: Trainer, config: LoopConfig, state: TrainState) -> TrainState:
    """The state with its pending steps read into the history (the wait counts as training time)."""
    if not state.pending:
        return state
    started = time.perf_counter()
    rows = read_steps(trainer, state.pending, config.steps_per_epoch)
    tokens = sum(row.pop("tokens") for row in rows)
    return replace(state, pending=(), history=state.history + tuple(rows),
                   train_tokens=state.train_tokens + tokens,
                   train_seconds=state.train_seconds + time.perf_counter() - started)


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


def train_step(trainer: Trainer, plan: Plan, config: LoopConfig, state: TrainState,
               indices: list[list[int]]) -> TrainState:
    """The state after one optimiser step on these micro-batches; its numbers stay pending."""
    started = time.perf_counter()
    stats = trainer.update(micro_batches(plan, indices, config.device, config.sync_free,
                                         config.pad_multiple))
    return replace(state, step=state.step + 1, pending=state.pending + (stats,),
                   train_seconds=state.train_seconds + time.perf_counter() - started,
                   train_examples=state.train_examples
                   + sum(len(idx) for idx in indices) * config.world)


def validate(trainer: Trainer, plan: Plan, config: LoopConfig, state: TrainState,
             progress) -> TrainState:
    """The state with the validation loss at this step; Diverged if it is not finite."""
    step = state.step
    loss = valid_loss(trainer, plan)
    if not math.isfinite(loss):  # the last update broke the model
        raise trainer.diverged(step, f"validation loss {loss:.4g}")
    progress.write(f"step {step}: validation loss {loss:.4f}")
    trainer.model.train()
    return replace(state, valid_loss=state.valid_loss + (
        {"step": step, "loss": loss, "epoch": round(step / config.steps_per_epoch, 4)},))


def run_steps(trainer: Trainer, plan: Plan, state: TrainState,
              callbacks: tuple[Callback, ...] = ()) -> tuple[TrainState, PeakMemory]:
    """The training loop: steps, validation loss at each epoch's end, checkpoints, Ctrl-C.

    Returns the final state, every step read, and the peak memory measured while training.
    """
    from tqdm.auto import tqdm

    run = trainer.run
    config = LoopConfig.of(run, plan)
    epoch, batches = -1, []
    trainer.model.train()
    progress = tqdm(total=config.total_steps, initial=state.step, desc=f"train {run.method}",
                    disable=config.rank != 0, dynamic_ncols=True)
    try:
        with stop_on_signals(Control()) as control, PeakMemory(config.device) as peak:
            while state.step < config.total_steps:
                # This process's micro-batches of the step: its share of the epoch's batches
                within = state.step % config.steps_per_epoch
                if state.step // config.steps_per_epoch != epoch:
                    epoch = state.step // config.steps_per_epoch
                    batches = epoch_batches(run, plan, epoch)
                accum = config.grad_accum
                state = train_step(trainer, plan, config, state,
                                   batches[within * accum:(within + 1) * accum])
                step = state.step
                progress.update(1)
                epoch_end, last = step % config.steps_per_epoch == 0, step == config.total_steps
                # The device's numbers are read where they are shown, validated or saved
                if epoch_end or last or step % config.log_every == 0:
                    state = read_pending(trainer, config, state)
                    progress.set_postfix(loss=f"{state.history[-1]['loss']:.3f}", epoch=epoch + 1)
                if epoch_end or last:
                    state = validate(trainer, plan, config, state, progress)
                for callback in callbacks:
                    callback(step, control)
                if last:
                    break
                if control.stop or epoch_end or step % config.save_every == 0:
                    # Read first: a checkpoint never holds a step that was not checked
                    state = read_pending(trainer, config, state)
                    saved = trainer.save(state.saved())
                if control.stop:
                    progress.close()
                    if config.rank == 0:
                        print(f"stopped at step {step}; checkpoint {saved}; continue with the "
                              "same command plus --resume", file=sys.stderr)
                    raise KeyboardInterrupt
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise oom_advice(run) from None
    finally:
        progress.close()
    return state, peak


# --- what a finished run writes ------------------------------------------------------


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


def run_metrics(run: Run, model, plan: Plan, state: TrainState, peak: PeakMemory,
                base_path: str, details: dict | None) -> dict:
    """Everything metrics.json records about a finished run."""
    settings = run.settings
    trainable, total = count_parameters(model)
    history = list(state.history)
    recent = history[-10:]
    dtype = autocast_dtype(run.device, run.precision)
    data_dir = Path(settings.data_dir)
    return {
        "method": run.method, "model": settings.model, "base_model_path": base_path,
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


def write_outputs(run: Run, model, tokenizer, metrics: dict) -> dict:
    """Write outputs/<run name>/ in a temporary folder and move it into place when complete.

    Returns the metrics as written (with the folder's size on disk).
    """
    paths = run.paths
    final = paths.run
    try:
        with staged_dir(final) as tmp:
            # a whole model saves the base's fp32 weights, not the bf16 copies it trained with
            restore_frozen_fp32(model, metrics["base_model_path"], run.settings.trust_remote_code)
            model.save_pretrained(tmp)  # the full model, or only the adapter for LoRA/QLoRA
            tokenizer.save_pretrained(tmp)
            metrics = {**metrics, "size_on_disk_mb": folder_size_mb(tmp)}
            write_json(tmp / "metrics.json", metrics)
            plot_training(metrics, tmp / "training_metrics.png")
            # Written last: evaluate.py takes a folder without it for an unfinished run.
            write_text_atomic(tmp / paths.completed.name, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        # staged_dir removed the partial folder; the previous <run>/ is as it was.
        raise write_failed(final, exc) from None
    return metrics


def train(run: Run, model, tokenizer, base_path: str, details: dict | None = None,
          callbacks: tuple[Callback, ...] = ()) -> dict:
    """Train the parameters that require grad; return what metrics.json records.

    details: what the method did (adapter settings, added biases, quantisation).
    Writes checkpoints only: save_outputs writes the finished run, and
    discard_checkpoints drops a run that is not kept (a learning-rate search run).
    """
    settings = run.settings
    # Tokenise: prompt + answer + EOS, loss on the answer
    plan = plan_training(run, model, tokenizer)

    # Optimiser over the parameters the method left trainable
    trainer = Trainer(run, model, plan.total_steps)
    trainable, total = count_parameters(model)
    if run.rank == 0:
        print(f"{run.method}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.3f}%); {len(plan.train)} examples, "
              f"{plan.total_steps} steps of {plan.effective_batch} examples, lr {settings.lr:g}, "
              f"on {run.device}" + (f" x {run.world} processes" if run.world > 1 else ""))

    # Start afresh, or from the newest checkpoint with --resume
    config = ResumeConfig.of(settings, plan.total_steps, run.precision)
    state = TrainState(config=asdict(config))
    ckpt_dir = run.paths.checkpoints
    if settings.resume:
        state = TrainState.restored(trainer.load(config))
    elif run.rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must never resume from stale state later

    state, peak = run_steps(trainer, plan, state, callbacks)
    return run_metrics(run, model, plan, state, peak, base_path, details)


def save_outputs(run: Run, model, tokenizer, metrics: dict) -> dict:
    """Write the finished run's folder (one process) and drop its checkpoints; returns its metrics."""
    if run.rank == 0:
        metrics = write_outputs(run, model, tokenizer, metrics)
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


def discard_checkpoints(run: Run) -> None:
    """Drop the checkpoints of a run that is not kept, so no later --resume continues it."""
    shutil.rmtree(run.paths.checkpoints, ignore_errors=True)
    run.accelerator.wait_for_everyone()
