"""The training loop: loop.fit trains one run's trainable parameters and returns its metrics.

    plan -> Trainer -> start (fresh, or --resume's checkpoint) -> steps -> metrics

Each step's numbers stay on the device; the loop reads every pending step at
once at a log interval, an epoch's end, a checkpoint and the end.  It measures
the validation loss at each epoch's end, checkpoints every --save-every steps and
at each epoch's end, and on Ctrl-C or SIGTERM finishes the step, checkpoints and
stops.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

import checkpoints
import record
import steps
from answer_loss import answer_nll
from batches import Plan, epoch_batches, micro_batches, plan_training
from common import PipelineError
from memory import PeakMemory
from models import count_parameters
from runs import Callback, Control, Run
from steps import StepStats, Trainer

# Steps between reads of the device's numbers for the progress bar and history: a read
# waits for the GPU to finish, so reading every step would stall its queue.
LOG_EVERY = 10


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
    # Sharded, every forward pass is collective: each process scores the whole split (the
    # same batches), with the root's own shards (embeddings, head) gathered meanwhile.
    sharded = run.sharded
    try:
        if sharded:
            trainer.sharded.unshard()
        shard = plan.valid if sharded else plan.valid[run.rank::run.world]
        nll, count = answer_nll(model, shard, plan.pad_id, run.device,
                                batch_size=run.settings.batch_size * 2, precision=run.precision)
    finally:
        if sharded:
            trainer.sharded.reshard()
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
    if not sharded:
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


def read_pending(trainer: Trainer, plan: Plan, state: TrainState) -> TrainState:
    """The state with its pending steps read into the history (the wait counts as training time)."""
    if not state.pending:
        return state
    started = time.perf_counter()
    rows = steps.read_steps(trainer, state.pending, plan.steps_per_epoch)
    tokens = sum(row.pop("tokens") for row in rows)
    return replace(state, pending=(), history=state.history + tuple(rows),
                   train_tokens=state.train_tokens + tokens,
                   train_seconds=state.train_seconds + time.perf_counter() - started)


def train_step(trainer: Trainer, plan: Plan, state: TrainState,
               indices: list[list[int]]) -> TrainState:
    """The state after one optimiser step on these micro-batches; its numbers stay pending."""
    run = trainer.run
    started = time.perf_counter()
    stats = trainer.update(micro_batches(plan, indices, run.device, run.sync_free,
                                         run.pad_multiple))
    return replace(state, step=state.step + 1, pending=state.pending + (stats,),
                   train_seconds=state.train_seconds + time.perf_counter() - started,
                   train_examples=state.train_examples
                   + sum(len(idx) for idx in indices) * run.world)


def validate(trainer: Trainer, plan: Plan, state: TrainState, progress) -> TrainState:
    """The state with the validation loss at this step; Diverged if it is not finite."""
    step = state.step
    loss = valid_loss(trainer, plan)
    if not math.isfinite(loss):  # the last update broke the model
        raise trainer.diverged(step, f"validation loss {loss:.4g}")
    progress.write(f"step {step}: validation loss {loss:.4f}")
    trainer.model.train()
    return replace(state, valid_loss=state.valid_loss + (
        {"step": step, "loss": loss, "epoch": round(step / plan.steps_per_epoch, 4)},))


def start_state(trainer: Trainer, plan: Plan) -> TrainState:
    """The state the run starts from: --resume's newest checkpoint, else nothing (a fresh run
    drops the method's old checkpoints, so it never resumes from stale state later)."""
    run = trainer.run
    config = checkpoints.ResumeConfig.of(run.settings, plan.total_steps, run.precision)
    if run.settings.resume:
        return TrainState.restored(checkpoints.load(trainer, config))
    if run.rank == 0 and run.paths.checkpoints.exists():
        shutil.rmtree(run.paths.checkpoints)
    return TrainState(config=asdict(config))


def fit(run: Run, model, tokenizer, details: dict | None = None,
        callbacks: tuple[Callback, ...] = ()) -> dict:
    """Train the parameters that require grad; return what metrics.json records.

    details: what the method did (adapter settings, added biases, quantisation).
    Writes checkpoints only: record.save_outputs writes the finished run, and
    checkpoints.discard drops a run that is not kept (a learning-rate search run).
    """
    from tqdm.auto import tqdm

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
    state = start_state(trainer, plan)

    per_epoch, accum = plan.steps_per_epoch, settings.grad_accum
    epoch, batches = -1, []
    model.train()
    progress = tqdm(total=plan.total_steps, initial=state.step, desc=f"train {run.method}",
                    disable=run.rank != 0, dynamic_ncols=True)
    try:
        with stop_on_signals(Control()) as control, PeakMemory(run.device) as peak:
            while state.step < plan.total_steps:
                # This process's micro-batches of the step: its share of the epoch's batches
                within = state.step % per_epoch
                if state.step // per_epoch != epoch:
                    epoch = state.step // per_epoch
                    batches = epoch_batches(run, plan, epoch)
                state = train_step(trainer, plan, state,
                                   batches[within * accum:(within + 1) * accum])
                step = state.step
                progress.update(1)
                epoch_end, last = step % per_epoch == 0, step == plan.total_steps
                # The device's numbers are read where they are shown, validated or saved
                if epoch_end or last or step % LOG_EVERY == 0:
                    state = read_pending(trainer, plan, state)
                    progress.set_postfix(loss=f"{state.history[-1]['loss']:.3f}", epoch=epoch + 1)
                if epoch_end or last:
                    state = validate(trainer, plan, state, progress)
                for callback in callbacks:
                    callback(step, control)
                if last:
                    break
                if control.stop or epoch_end or step % settings.save_every == 0:
                    # Read first: a checkpoint never holds a step that was not checked
                    state = read_pending(trainer, plan, state)
                    saved = checkpoints.save(trainer, state.saved())
                if control.stop:
                    progress.close()
                    if run.rank == 0:
                        print(f"stopped at step {step}; checkpoint {saved}; continue with the "
                              "same command plus --resume", file=sys.stderr)
                    raise KeyboardInterrupt
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise oom_advice(run) from None
    finally:
        progress.close()
    return record.run_metrics(run, model, plan, state, peak, details)
