"""One configuration of bench.py in this process, its result printed as one JSON line.

    python benchmarks/bench_workers.py '{"task": "train", "recipe": "ours", ...}'

Tasks: train (this project's step, each model prepared by its script's prepare() and
stepped by steps.Trainer as finetune_*.py do, or the original recipe's), trl (TRL's
SFTTrainer at its best settings on the same prepared model, rows and batch) and eval (the
original's one question at a time, or generation.generate_answers as evaluate.py calls
it).  A step is timed from collating its batch to the zeroed gradients; on CUDA every
timer reading waits for the queued kernels first (sync).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import batches  # noqa: E402
import common  # noqa: E402
import generation  # noqa: E402
import memory  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import steps  # noqa: E402
from settings import TrainSettings  # noqa: E402

# --- The original recipe, as the original project ran it ----------------------
ORIGINAL_MAX_LENGTH = 128        # tokenizer(padding="max_length", truncation=True, max_length=128)
ORIGINAL_BATCH = 2               # per_device_train_batch_size=2
ORIGINAL_LR = 5e-5               # the Trainer's default, used for every method
ORIGINAL_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}  # alpha/dropout do not change speed
ORIGINAL_LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj"]}
ORIGINAL_NEW_TOKENS = 50         # generate(max_new_tokens=50), one question at a time

SCRIPTS = {"full": "finetune", "lora": "finetune_lora", "qlora": "finetune_qlora",
           "bitfit": "finetune_bitfit"}
SEED = 42


def log(message: str) -> None:
    """Progress to stderr, so stdout carries only the JSON result."""
    print(message, file=sys.stderr, flush=True)


def sync(device) -> None:
    """Wait for the device's queued work, so a timer reading covers it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Random-weight models in named shapes: the arithmetic of real ones, nothing to download ---
# The smollm2-135m preset's tokenizer's 49,152 ids fit every vocabulary below.
TOKENIZER_PRESET = "smollm2-135m"

# Rope scaling (Llama 3.x) is left out: it changes neither memory nor time per step.
LLAMA3 = {"family": "llama", "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5}
SHAPES = {
    # GPT-2 family
    "distilgpt2": {"family": "gpt2", "n_layer": 6, "n_embd": 768, "n_head": 12,
                   "n_positions": 1024, "vocab_size": 50257},                     # 82 M
    "gpt2-tiny": {"family": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2,
                  "n_positions": 1024, "vocab_size": 50257},                      # --quick
    # Llama family
    "smollm2-135m": {"family": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "vocab_size": 49152, "max_position_embeddings": 8192,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-3.2-1b": {**LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "tie_word_embeddings": True},
    "llama-3.1-8b": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "tie_word_embeddings": False},
    # stand-ins for a CPU rehearsal: the same families, small
    "tiny-llama-shape": {"family": "llama", "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 49152,
                         "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
SHAPES["tiny-llama-untied"] = {**SHAPES["tiny-llama-shape"], "tie_word_embeddings": False}


def default_tokenizer() -> str:
    """The smollm2-135m preset's folder, converted once if needed: only its tokenizer is read."""
    return str(models.resolve_model(TOKENIZER_PRESET))


def shape_config(shape: str, tokenizer):
    """The transformers config of a named shape, with the tokenizer's special ids."""
    from transformers import GPT2Config, LlamaConfig

    sizes = dict(SHAPES[shape])
    family = sizes.pop("family")
    if len(tokenizer) > sizes["vocab_size"]:
        raise SystemExit(f"the tokenizer's {len(tokenizer)} ids do not fit {shape}'s vocabulary")
    make = GPT2Config if family == "gpt2" else LlamaConfig
    return make(**sizes, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_shape(shape: str, tokenizer_dir: str, folder: Path) -> Path:
    """Save a random-weight model (seed 0, fp32) of the shape with the tokenizer, once."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if (folder / "config.json").exists():
        return folder
    hf_logging.disable_progress_bar()
    tokenizer = models.load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape_config(shape, tokenizer), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- Set-up: this project's (each script's prepare) and the original's --------------


def settings_of(method: str) -> TrainSettings:
    """A method script's default settings, as its command line with no options gives them."""
    return TrainSettings.from_args(importlib.import_module(SCRIPTS[method]).parse_args([]))


def setup_ours(model_dir: str, method: str, device, precision: str):
    """(model, tokenizer, settings): loaded and prepared as a run of the method's script does."""
    torch.manual_seed(SEED)  # the same LoRA initialisation for ours and TRL
    settings = settings_of(method)
    model, tokenizer, _ = models.load_model(model_dir, device, quantize_4bit=method == "qlora",
                                            precision=precision)
    model, _ = importlib.import_module(SCRIPTS[method]).prepare(model, settings)
    models.store_frozen_in_bf16(model, precision)  # as tuning.load_prepared does for a run
    return model, tokenizer, settings


def setup_original(model_dir: str, method: str, device):
    """(model, tokenizer) loaded and prepared as the original project did (fp32)."""
    from peft import LoraConfig, get_peft_model

    import finetune_bitfit

    model, tokenizer, _ = models.load_model(model_dir, device)
    if method == "full":
        model.requires_grad_(True)
    elif method == "bitfit":
        # Llama-style models have no biases; the original would have trained nothing.
        # Adding them (as finetune_bitfit.py does) keeps the cost comparison like for like.
        model, _ = finetune_bitfit.prepare(model, settings_of("bitfit"))
    else:  # lora; the original never quantised, so its "QLoRA" was this same recipe
        family = "gpt2" if model.config.model_type == "gpt2" else "llama"
        model = get_peft_model(model, LoraConfig(
            **ORIGINAL_LORA, task_type="CAUSAL_LM", target_modules=ORIGINAL_LORA_TARGETS[family],
            fan_in_fan_out=models.uses_conv1d(model)))
    return model, tokenizer


def ours_batches(tokenizer, rows, model, batch_size: int, warmup: int, steps: int):
    """(warm-up, timed) batches from common's length-grouped epoch: warm-up on its longest (the
    real peak), timed on evenly spaced quantiles by width (the epoch's mix of lengths)."""
    examples = common.tokenize_rows(tokenizer, rows, models.context_length(model),
                                    source="train.jsonl")
    lengths = [len(ex["input_ids"]) for ex in examples]
    epoch = common.length_grouped_batches(lengths, batch_size, SEED, 0)
    full = [b for b in epoch if len(b) == batch_size] or epoch  # the last batch may be short
    by_width = sorted(full, key=lambda b: (max(lengths[i] for i in b), sum(lengths[i] for i in b)))
    timed = [by_width[int((k + 0.5) * len(by_width) / steps)] for k in range(steps)]
    return ([[examples[i] for i in by_width[-1]]] * warmup,
            [[examples[i] for i in b] for b in timed])


def original_batches(tokenizer, rows, warmup: int, steps: int):
    """(warm-up, timed) batches of the original: prompt+answer padded to 128, labels = a copy of
    input_ids, so with pad == EOS the pad positions stay in the loss, as they did there."""
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)  # the Trainer's shuffled sampler
    needed = (warmup + steps) * ORIGINAL_BATCH
    order = (order * (needed // len(order) + 1))[:needed]
    enc = tokenizer([rows[i]["prompt"] + rows[i]["completion"] for i in order],
                    padding="max_length", truncation=True, max_length=ORIGINAL_MAX_LENGTH)
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": list(ids)}
                for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    batches = [examples[i:i + ORIGINAL_BATCH] for i in range(0, needed, ORIGINAL_BATCH)]
    return batches[:warmup], batches[warmup:]


def collate_original(examples: list[dict]) -> dict:
    """The Trainer's default collator: stack already-padded rows."""
    return {key: torch.tensor([ex[key] for ex in examples]) for key in examples[0]}


class OriginalStep:
    """The original's step as a plain loop (its Trainer adds almost nothing): full logits' loss,
    backward, clipping at 1.0, AdamW, linear decay."""

    def __init__(self, model, total_steps: int):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=ORIGINAL_LR, weight_decay=0.0)
        self.scheduler = steps.linear_schedule(self.optimizer, total_steps, 0.0)

    def step(self, micro: list[dict]) -> dict:
        batch = micro[0]
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}


def prepared(config: dict, device):
    """(stepper, warm-up batches, timed batches, collate) of a training configuration."""
    rows = common.load_split(config["data_dir"], "train")
    total_steps = config["warmup"] + config["steps"] * config["repeats"]
    if config["recipe"] == "original":
        model, tokenizer = setup_original(config["model_dir"], config["method"], device)
        warm, timed = original_batches(tokenizer, rows, config["warmup"], config["steps"])
        return OriginalStep(model, total_steps), warm, timed, collate_original
    precision = models.resolve_precision(device, config["precision"])
    model, tokenizer, settings = setup_ours(config["model_dir"], config["method"], device,
                                            precision)
    warm, timed = ours_batches(tokenizer, rows, model, config["batch_size"], config["warmup"],
                               config["steps"])
    accelerator = runs.make_accelerator(device.type, precision)
    run = runs.Run(config["method"], settings, accelerator, config["model_dir"], {}, [], [])
    collate = functools.partial(batches.step_batch, pad_id=tokenizer.pad_token_id,
                                max_length=models.context_length(model),
                                sync_free=run.sync_free, multiple=run.pad_multiple)
    return steps.Trainer(run, model, total_steps), warm, timed, collate


def summarise_steps(steps: list[dict]) -> dict:
    """One repeat's totals and rates from its steps."""
    seconds, examples, real = (sum(s[k] for s in steps) for k in ("seconds", "examples",
                                                                   "real_tokens"))
    return {"seconds": seconds, "examples": examples, "real_tokens": real,
            "padded_tokens": sum(s["padded_tokens"] for s in steps),
            "s_per_100_examples": 100 * seconds / examples, "tokens_per_s": real / seconds,
            "losses": [s["loss"] for s in steps]}


def task_train(config: dict, device) -> dict:
    """Warm up, then time `steps` optimiser steps `repeats` times for one recipe and method."""
    torch.manual_seed(SEED)
    stepper, warm, timed, collate = prepared(config, device)
    memory.release_free_heap()
    done = []
    with memory.PeakMemory(device) as peak:
        for examples in warm + timed * config["repeats"]:
            sync(device)
            started = time.perf_counter()
            batch = batches.to_device(collate(examples), device)
            loss = stepper.step([batch])["loss"]
            sync(device)  # the optimiser's kernels may still be queued after the loss was read
            done.append({"seconds": time.perf_counter() - started, "examples": len(examples),
                         "real_tokens": int(batch["attention_mask"].sum()),
                         "padded_tokens": int(batch["attention_mask"].numel()), "loss": loss})
    steps = done[len(warm):]
    n = config["steps"]
    return {"config": config, "peak_bytes": peak.peak_bytes,
            "repeats": [summarise_steps(steps[k:k + n]) for k in range(0, len(steps), n)]}


# --- TRL's SFTTrainer --------------------------------------------------------------


def sft_config(output_dir: str, max_steps: int, batch_size: int, lr: float, max_length: int,
               precision: str, device_type: str):
    """TRL at its best, matching our loop: the same batch, loss positions, rate and precision."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        # bf16 is autocast over fp32 weights (accelerate's, as ours); checkpointing only
        # costs time when memory is plentiful
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=False,
        use_cpu=device_type == "cpu",  # else bf16=True refuses to construct on a CPU
        # prompt-completion rows, loss on the completion (+EOS) only, as ours
        completion_only_loss=True, packing=False, padding_free=False, max_length=max_length,
        train_sampling_strategy="group_by_length", dataloader_num_workers=0,
        dataloader_pin_memory=False,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=SEED,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True)


def step_timer(device):
    """A TrainerCallback noting when each optimiser step begins and ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())

    return StepTimer()


class RecordingCollator:
    """Wraps TRL's collator: per batch, in order, its tokens and how long collating took."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        started = time.perf_counter()
        batch = self.inner(examples)
        self.batches.append({"examples": len(examples),
                             "real_tokens": int(batch["attention_mask"].sum()),
                             "padded_tokens": int(batch["input_ids"].numel()),
                             "collate_seconds": time.perf_counter() - started})
        return batch

    def __getattr__(self, name):  # anything else the Trainer asks of the collator
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def task_trl(config: dict, device) -> dict:
    """TRL's SFTTrainer on our prepared model; a step runs from collating to zeroed gradients."""
    from datasets import Dataset
    from datasets.utils.tqdm import disable_progress_bars
    from trl import SFTTrainer

    class QuietSFTTrainer(SFTTrainer):
        def _send_telemetry(self):  # no Hub ping on a thread during timing
            return None

    method = config["method"]
    precision = models.resolve_precision(device, config["precision"])
    warmup, steps, repeats = config["warmup"], config["steps"], config["repeats"]
    disable_progress_bars()
    model, tokenizer, settings = setup_ours(config["model_dir"], method, device, precision)
    ours_trainable, max_len = models.count_parameters(model)[0], models.context_length(model)
    rows = common.load_split(config["data_dir"], "train")
    ours_labels = sum(sum(label != -100 for label in ex["labels"]) for ex in
                      common.tokenize_rows(tokenizer, rows, max_len, source="train.jsonl"))
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
        args = sft_config(output_dir, warmup + steps * repeats, config["batch_size"],
                          settings.lr, max_len, precision, device.type)
        timer = step_timer(device)
        trainer = QuietSFTTrainer(model=model, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[timer])
        if method == "qlora":
            # SFTTrainer casts a quantised model's adapters to bf16; ours train them in fp32
            for param in trainer.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        trl_labels = sum(sum(label != -100 for label in ex["labels"]) if "labels" in ex
                         else sum(ex["completion_mask"]) for ex in trainer.train_dataset)
        collator = trainer.data_collator = RecordingCollator(trainer.data_collator)
        memory.release_free_heap()
        with memory.PeakMemory(device) as peak:
            trainer.train()
    finished = trainer.state.global_step
    trl_trainable = models.count_parameters(trainer.model)[0]  # TRL must train what we train
    problems = [f"{what}: ours {a}, TRL {b}" for what, a, b in (
        ("trainable parameters", ours_trainable, trl_trainable),
        ("loss positions", ours_labels, trl_labels)) if a != b]
    records = [{**batch, "seconds": end - begin + batch["collate_seconds"], "loss": None}
               for batch, begin, end in zip(collator.batches, timer.begins, timer.ends)][:finished]
    timed = records[warmup:]
    return {"config": config, "peak_bytes": peak.peak_bytes, "finished_steps": finished,
            "repeats": [summarise_steps(timed[k:k + steps])
                        for k in range(0, len(timed) - steps + 1, steps)],
            "problems": problems}


# --- Evaluation --------------------------------------------------------------------


def answers_original(model, tokenizer, prompts: list[str], device) -> list[str]:
    """The original evaluation: one question at a time, 50 new tokens, greedy, no stop string."""
    answers = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():  # min_new_tokens: a model that would stop early does the same work
            out = model.generate(**enc, max_new_tokens=ORIGINAL_NEW_TOKENS,
                                 min_new_tokens=ORIGINAL_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True))
    return answers


def task_eval(config: dict, device) -> dict:
    """Warm up, then time answering the same questions `repeats` times with one recipe."""
    import evaluate

    model, tokenizer, _ = models.load_model(config["model_dir"], device)
    model.eval()
    rows = common.load_split(config["data_dir"], "eval")
    prompts = [r["prompt"] for r in rows[:config["questions"]]]
    if config["recipe"] == "original":
        answer = functools.partial(answers_original, model, tokenizer, device=device)
    else:  # as evaluate.py: the bound from every eval reference, its batch size, its stop
        answer = functools.partial(
            generation.generate_answers, model, tokenizer, device=device,
            max_new_tokens=generation.max_new_tokens_for(tokenizer,
                                                         [r["completion"] for r in rows]),
            stop=common.turn_marker(common.load_template(config["data_dir"])),
            batch_size=evaluate.parse_args([]).batch_size,
            precision=models.resolve_precision(device, config["precision"]))
    repeats = []
    with memory.PeakMemory(device) as peak:
        answer(prompts[:1] if config["recipe"] == "original" else prompts[:8])  # warm-up
        for _ in range(config["repeats"]):
            sync(device)
            started = time.perf_counter()
            answer(prompts)
            sync(device)
            repeats.append(len(prompts) / (time.perf_counter() - started))
    return {"config": config, "peak_bytes": peak.peak_bytes, "questions_per_s": repeats}


TASKS = {"train": task_train, "trl": task_trl, "eval": task_eval}


def run(config: dict) -> dict:
    """Run one configuration on its device, library prints kept off stdout."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # peft's, about transformers 6
    with contextlib.redirect_stdout(sys.stderr):
        return TASKS[config["task"]](config, torch.device(config["device"]))


if __name__ == "__main__":
    print(json.dumps(common.finite(run(json.loads(sys.argv[1]))), allow_nan=False))
