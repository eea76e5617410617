"""Hugging Face TRL's SFTTrainer on our model, rows and batch size: the "ours vs TRL" worker.

    from trl_runs import task_trl
    result = task_trl({"model_dir": "smollm2-135m", "data_dir": "data", "method": "lora",
                       "batch_size": 16, "warmup": 2, "steps": 3, "repeats": 3,
                       "threads": None, "preset": "best", "device": "cpu",
                       "precision": "bf16"}, baseline_rss_bytes)

Benchmark-only: needs trl (pip install --no-deps -r benchmarks/requirements.txt);
nothing in the pipeline imports this module.

The model is loaded and prepared by the project's own code (models.load_model,
then finetune / finetune_lora / finetune_qlora .prepare with the scripts'
default settings), so TRL trains exactly the parameters our loop trains; the
already PEFT-wrapped model goes to SFTTrainer without a peft_config.  TRL picks
its own batches (its own sampler), so its tokens per second are compared with
ours, and real and padded tokens are reported so its padding is visible.

Presets (config["preset"]):
  best      TRL at its best on a CPU, at config["precision"]: fp32, or bf16
            autocast over fp32 weights (bf16=True; on the CPU with use_cpu=True,
            which transformers turns into accelerate's CPU bf16 autocast, the
            same autocast our loop uses), no gradient checkpointing,
            completion-only loss on prompt-completion rows, length-grouped
            batches (transformers 5: train_sampling_strategy="group_by_length";
            the old group_by_length flag is gone), no packing, no workers, no
            logging/saving/eval, our learning rate, linear decay without
            warm-up, no weight decay, clipping at 1.0, seed 42.
  defaults  SFTConfig(output_dir, max_steps, per_device_train_batch_size,
            report_to="none", save_strategy="no") and TRL's defaults otherwise
            (TRL 1.16 turns on bf16 autocast and gradient checkpointing), plus
            use_cpu=True on the CPU, without which a CPU-only machine rejects
            bf16 (never on CUDA: it would keep the model off the GPU).  Slow
            on a CPU, so it runs 1 warm-up + 1 timed step and stops cleanly
            once config["time_limit_s"] (default 300 s) would be passed.

QLoRA: SFTTrainer casts a quantised model's trainable adapters to bf16.  The
best preset casts them back to fp32 before the optimiser exists (fp32 weights as
ours at either precision: bf16 is autocast, not bf16 parameters;
config["qlora_adapter_fp32"]=False keeps TRL's bf16); defaults keeps bf16.
settings_used["qlora_adapter_dtype"] and trainable_trl record which.

Timing: a callback notes time.perf_counter() at on_step_begin and on_step_end
of each optimiser step (forward, backward, clipping, AdamW, schedule, zeroed
gradients: "callback_seconds").  The loader collates the batch before
on_step_begin, so the wrapped collator times that too, and a step's "seconds"
is the sum: from collating the batch to the zeroed gradients, as our worker
times its own step.  "cycle_seconds" (one on_step_end to the next) adds the
Trainer's bookkeeping between steps.  SFTTrainer tokenises the rows in its
__init__, before any timing.  On CUDA each reading waits for the queued
kernels first (workers.sync).  FLOPs are counted as for our loop
(workers.step_flops on a profile of our forward on the same model).
"""

from __future__ import annotations

import tempfile
import time

import workers  # this project's worker: set-up, FLOP counting, summaries

LOSS_CHECK_ROWS = 64          # rows whose loss positions are compared with ours
DEFAULTS_TIME_LIMIT_S = 300   # the "defaults" preset's wall-clock cap


# =============================================================================
# Set-up: the model exactly as our scripts prepare it
# =============================================================================


def setup_model(model_dir: str, method: str, device, precision: str):
    """(model, tokenizer, settings): loaded and prepared exactly as bench_speed's own worker does."""
    import torch

    torch.manual_seed(workers.SEED)  # as bench_speed's own worker: the same LoRA initialisation
    return workers.setup_ours(model_dir, method, device, precision)


def trainable_summary(model) -> dict:
    """Trainable parameter count and dtypes: the check that TRL trains what we train."""
    count, dtypes = 0, {}
    for param in model.parameters():
        if param.requires_grad:
            count += param.numel()
            key = str(param.dtype).replace("torch.", "")
            dtypes[key] = dtypes.get(key, 0) + param.numel()
    return {"params": count, "dtypes": dtypes}


# =============================================================================
# TRL configuration
# =============================================================================


def sft_config(preset: str, output_dir: str, max_steps: int, batch_size: int, lr: float,
               max_length: int, precision: str = "fp32", device_type: str = "cpu"):
    """The SFTConfig of a preset (see the module docstring); precision is the best preset's."""
    from trl import SFTConfig

    use_cpu = device_type == "cpu"
    if preset == "defaults":
        # use_cpu=True is the one addition on a CPU: with TRL's default bf16=True,
        # TrainingArguments refuses to construct on a machine without a bf16 GPU unless
        # use_cpu is set ("Your setup doesn't support bf16/gpu. You need to assign use_cpu ...").
        return SFTConfig(output_dir=output_dir, max_steps=max_steps,
                         per_device_train_batch_size=batch_size, report_to="none",
                         save_strategy="no", use_cpu=use_cpu)
    if preset != "best":
        raise ValueError(f"preset {preset!r}: use 'best' or 'defaults'")
    return SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,           # one batch per optimiser step, as ours
        # Precision as our run compared with it: bf16 autocast over fp32 weights (the Trainer's
        # accelerate mixed_precision="bf16", on a CPU too with use_cpu) or fp32; checkpointing
        # only costs time when memory is plentiful, as here
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=use_cpu,
        # Data: prompt-completion rows, loss on the completion (+EOS) only, like ours
        completion_only_loss=True, packing=False, padding_free=False,
        max_length=max_length,                   # our context length: nothing cut that we keep
        train_sampling_strategy="group_by_length",  # transformers 5's group_by_length=True
        dataloader_num_workers=0, dataloader_pin_memory=False,
        # Optimisation as our loop (TRL's default adamw_torch_fused is kept: its best)
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=workers.SEED,
        # Nothing but training: no logs, checkpoints, evaluation or progress bar
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True,
    )


def settings_used(args, trainer, adapter_dtype: str | None) -> dict:
    """The settings TRL actually trained with, read back from its args and trainer."""
    return {
        "bf16": bool(args.bf16), "fp16": bool(args.fp16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "group_by_length": args.train_sampling_strategy == "group_by_length",
        "train_sampling_strategy": args.train_sampling_strategy,
        "completion_only_loss": bool(trainer.completion_only_loss),
        "padding_free": bool(trainer.padding_free), "packing": bool(args.packing),
        "max_length": args.max_length, "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "dataloader_num_workers": args.dataloader_num_workers,
        "loss_type": args.loss_type, "use_cpu": bool(args.use_cpu),
        "device": str(args.device), "seed": args.seed,
        "qlora_adapter_dtype": adapter_dtype,
    }


# =============================================================================
# Recording: step times, batches, losses
# =============================================================================


def make_timer_callback(time_limit_s: float | None, device):
    """A TrainerCallback timing each optimiser step and stopping before time_limit_s is passed."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """perf_counter at each step's begin and end; stops cleanly at the time limit."""

        def __init__(self):
            self.train_begin, self.begins, self.ends = None, [], []
            self.stop_reason = None

        def on_train_begin(self, args, state, control, **kwargs):
            workers.sync(device)
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            workers.sync(device)
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            workers.sync(device)
            now = time.perf_counter()
            self.ends.append(now)
            if time_limit_s is None or state.global_step >= state.max_steps:
                return
            elapsed, last = now - self.train_begin, now - self.begins[-1]
            if elapsed + last > time_limit_s:  # the next step would pass the limit
                self.stop_reason = (f"stopped after {state.global_step} steps: {elapsed:.1f} s "
                                    f"elapsed, next step ~{last:.1f} s, limit {time_limit_s:g} s")
                control.should_training_stop = True

    return StepTimer()


class RecordingCollator:
    """Wraps TRL's collator: per batch, in order, what it holds and how long collating took."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        started = time.perf_counter()
        batch = self.inner(examples)
        seconds = time.perf_counter() - started
        ids, labels = batch["input_ids"], batch["labels"]
        if "attention_mask" in batch:
            seq_lens = [int(n) for n in batch["attention_mask"].sum(1).tolist()]
        else:  # padding-free: one flattened row, sequence boundaries in cu_seq_lens
            seq_lens = [int(n) for n in batch["cu_seq_lens_q"].diff().tolist()]
        self.batches.append({
            "examples": len(examples),
            "real_tokens": sum(seq_lens),
            "padded_tokens": int(ids.numel()),
            "label_positions": int((labels != -100).sum()),
            # bench_speed's lm_positions: where the LM head runs on a next-token target
            "lm_positions": int((labels[:, 1:] != -100).sum()),
            "seq_lens": seq_lens,
            "collate_seconds": seconds,
        })
        return batch

    def __getattr__(self, name):  # anything else the Trainer asks of the collator
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def summarise(steps: list[dict]) -> dict:
    """One repeat's totals and rates, as workers.summarise_steps gives ours, plus TRL's extras."""
    return {**workers.summarise_steps(steps),
            "label_positions": sum(s["label_positions"] for s in steps),
            "callback_seconds": [s["callback_seconds"] for s in steps],
            "cycle_seconds": [s["cycle_seconds"] for s in steps],
            "collate_seconds": [s["collate_seconds"] for s in steps],
            "step_seq_lens": [s["seq_lens"] for s in steps],
            "step_lm_positions": [s["lm_positions"] for s in steps]}


# =============================================================================
# Check: TRL's loss positions against ours
# =============================================================================


def compare_loss_positions(tokenizer, rows: list[dict], prepared, max_len: int) -> dict:
    """Per row, labels != -100 in our tokenisation (common.tokenize_rows) and in TRL's dataset.

    prepared is SFTTrainer's tokenised train dataset; it keeps the prompt column,
    so rows are matched by index when nothing was dropped, else by prompt text.
    """
    import common

    rows = rows[:LOSS_CHECK_ROWS]
    ours = common.tokenize_rows(tokenizer, rows, max_len, source="train.jsonl")
    if len(prepared) >= len(rows) and "prompt" in prepared.column_names and all(
            prepared[i]["prompt"] == rows[i]["prompt"] for i in range(len(rows))):
        theirs = [prepared[i] for i in range(len(rows))]
    else:
        by_prompt = {ex["prompt"]: ex for ex in prepared} if "prompt" in prepared.column_names \
            else {}
        theirs = [by_prompt.get(row["prompt"]) for row in rows]
    total_ours = total_trl = differing = ids_differing = missing = 0
    examples = []
    for number, (mine, trl_ex) in enumerate(zip(ours, theirs)):
        n_ours = sum(label != -100 for label in mine["labels"])
        total_ours += n_ours
        if trl_ex is None:
            missing += 1
            continue
        n_trl = sum(label != -100 for label in trl_ex["labels"])
        total_trl += n_trl
        same_ids = list(trl_ex["input_ids"]) == list(mine["input_ids"])
        ids_differing += not same_ids
        if n_ours != n_trl or not same_ids:
            differing += n_ours != n_trl
            if len(examples) < 3:
                examples.append({"row": number, "ours": n_ours, "trl": n_trl,
                                 "same_input_ids": same_ids,
                                 "ours_ids": mine["input_ids"], "trl_ids": list(trl_ex["input_ids"]),
                                 "ours_labels": mine["labels"], "trl_labels": list(trl_ex["labels"])})
    return {"rows": len(rows), "ours": total_ours, "trl": total_trl,
            "rows_with_different_count": differing, "rows_with_different_ids": ids_differing,
            "rows_missing_in_trl": missing, "match": differing == 0 and missing == 0,
            "examples": examples}


# =============================================================================
# The task
# =============================================================================


def task_trl(config: dict, baseline: int) -> dict:
    """Train with TRL's SFTTrainer on our prepared model; time warm-up + repeats x steps."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from datasets.utils.tqdm import disable_progress_bars
    from trl import SFTTrainer

    import common
    import models
    from memory import PeakMemory, release_free_heap, rss_bytes

    class QuietSFTTrainer(SFTTrainer):
        """SFTTrainer without its Hub telemetry ping (a network thread during timing)."""

        def _send_telemetry(self):
            return None

    method, preset = config["method"], config.get("preset", "best")
    device = workers.device_of(config)
    # The defaults preset's bf16 is TRL's own choice; the best preset's is the run's.
    precision = models.resolve_precision(
        device, "bf16" if preset == "defaults" else config.get("precision", "fp32"))
    if preset == "defaults":  # known to be slow on a CPU: one warm-up, one timed step
        warmup, steps, repeats = 1, 1, 1
        time_limit = config.get("time_limit_s", DEFAULTS_TIME_LIMIT_S)
    else:
        warmup, steps, repeats = config["warmup"], config["steps"], config["repeats"]
        time_limit = config.get("time_limit_s")
    max_steps = warmup + steps * repeats
    disable_progress_bars()  # SFTTrainer's tokenising passes; stderr stays readable

    model, tokenizer, settings = setup_model(config["model_dir"], method, device, precision)
    trainable_ours = trainable_summary(model)
    max_len = models.context_length(model)
    rows = common.load_split(config["data_dir"], "train")
    flop_counter, profile = flop_profile(model, tokenizer, rows, max_len, device)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
        args = sft_config(preset, output_dir, max_steps, config["batch_size"], settings.lr,
                          max_len, precision, device.type)
        timer = make_timer_callback(time_limit, device)
        # Tokenises the whole data set here, before any timing.
        trainer = QuietSFTTrainer(model=model, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[timer])
        trained = trainer.model
        # QLoRA: SFTTrainer casts the adapters to bf16 (the QLoRA paper's choice).  The
        # best preset is fp32 and must train what we train, so they go back to fp32; the
        # optimiser is built in train(), after this.
        adapter_dtype = None
        if method == "qlora":
            if preset == "best" and config.get("qlora_adapter_fp32", True):
                for param in trained.parameters():
                    if param.requires_grad and param.dtype != torch.float32:
                        param.data = param.data.float()
            adapter_dtypes = {str(p.dtype).replace("torch.", "")
                              for p in trained.parameters() if p.requires_grad}
            adapter_dtype = ",".join(sorted(adapter_dtypes))
        trainable_trl = trainable_summary(trained)
        loss_check = compare_loss_positions(tokenizer, rows, trainer.train_dataset, max_len)
        collator = RecordingCollator(trainer.data_collator)
        trainer.data_collator = collator
        losses = []
        inner_step = trainer.training_step

        def training_step(*a, **k):
            loss = inner_step(*a, **k)
            losses.append(loss.detach())  # read after training: no sync inside the step
            return loss

        trainer.training_step = training_step
        used = settings_used(trainer.args, trainer, adapter_dtype)

        release_free_heap()
        loaded = rss_bytes()
        with PeakMemory(device) as peak:
            trainer.train()

    finished = trainer.state.global_step
    problems = []
    if not (len(timer.begins) == len(timer.ends) == finished == len(losses)):
        problems.append(f"step count mismatch: {len(timer.begins)} begins, {len(timer.ends)} "
                        f"ends, {finished} global steps, {len(losses)} losses")
    # The loader may collate one batch ahead (accelerate prefetches to spot the end)
    if not finished <= len(collator.batches) <= finished + 1:
        problems.append(f"{len(collator.batches)} batches collated for {finished} steps")
    if args.gradient_accumulation_steps != 1:
        problems.append("gradient_accumulation_steps != 1: batches and steps do not pair")
    if trainable_trl["params"] != trainable_ours["params"]:
        problems.append(f"trainable parameters differ: ours {trainable_ours}, TRL {trainable_trl}")

    records = []
    for i in range(min(finished, len(collator.batches), len(timer.ends))):
        batch = collator.batches[i]
        previous_end = timer.ends[i - 1] if i else timer.train_begin
        in_step = timer.ends[i] - timer.begins[i]
        records.append({**batch, "seconds": in_step + batch["collate_seconds"],
                        "callback_seconds": in_step,
                        "cycle_seconds": timer.ends[i] - previous_end,
                        "flops": flop_counter(batch["seq_lens"], batch["lm_positions"])["total"],
                        "loss": float(losses[i]) if i < len(losses) else None})
    warm, timed = records[:warmup], records[warmup:]
    groups = [timed[k * steps:(k + 1) * steps] for k in range(repeats)]
    complete = [summarise(g) for g in groups if len(g) == steps]
    partial = [g for g in groups if 0 < len(g) < steps]

    return {
        "config": config,
        "repeats": complete,
        "partial_repeat": summarise(partial[0]) if partial else None,
        "warmup_steps": [{k: v for k, v in r.items() if k != "seq_lens"} for r in warm],
        "peak_bytes": peak.peak_bytes,
        "baseline_bytes": baseline,
        "loaded_bytes": loaded,
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "settings_used": used,
        "precision": precision,
        "plan": {"warmup": warmup, "steps": steps, "repeats": repeats, "max_steps": max_steps,
                 "time_limit_s": time_limit},
        "finished_steps": finished,
        "stopped_early": finished < max_steps,
        "stop_reason": timer.stop_reason,
        "trainable_ours": trainable_ours,
        "trainable_trl": trainable_trl,
        "loss_positions_ours": loss_check["ours"],
        "loss_positions_trl": loss_check["trl"],
        "loss_positions_check": loss_check,
        "timed_label_positions": sum(r["label_positions"] for r in timed),
        "profile": profile,
        "problems": problems,
    }


def flop_profile(model, tokenizer, rows: list[dict], max_len: int, device):
    """(seq_lens, lm_positions -> FLOPs counter, profile summary), counted as for our loop.

    The profile comes from one forward of our own loss on this same model before
    SFTTrainer patches it (TRL's fused LM head never calls lm_head as a module, so
    hooks would miss it); the trainable parameters, hence the counted backward,
    are the same.
    """
    import functools

    import answer_loss
    import common
    import training

    examples = common.tokenize_rows(tokenizer, rows[:1], max_len, source="train.jsonl")
    batch = training.to_device(common.collate(examples, pad_id=tokenizer.pad_token_id), device)
    model.train()
    profile = workers.profile_matmuls(
        model, functools.partial(workers.loss_ours, answer_loss.AnswerLoss(model)), batch)
    return functools.partial(workers.step_flops, profile), workers.profile_summary(profile)
