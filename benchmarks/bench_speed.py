"""Speed and memory: the original project's recipe against this project's, on one machine, in one run.

    python benchmarks/bench_speed.py                  # about 13 minutes on 2 idle cores (estimated)
    python benchmarks/bench_speed.py --smollm2        # plus training speed on smollm2-135m (~8 min more)
    python benchmarks/bench_speed.py --quick          # tiny sizes: checks that everything runs
    python benchmarks/bench_speed.py --data-dir /path/to/data --repeats 5
    python benchmarks/bench_speed.py --data-dir data --eval-model outputs/full   # a tuned model's eval

Measures, each configuration in its own Python process so that one's peak
memory and warm caches never pollute another's:
  training   the original recipe (Trainer-equivalent loop, every example padded
             to 128 tokens, batch 2, labels = input ids, logits over the whole
             vocabulary everywhere) against this project's loop (common.answer_loss,
             batch 16 padded to its longest, length-grouped batches), for full
             fine-tuning, LoRA, QLoRA and BitFit: seconds per 100 examples,
             non-pad tokens per second, model-FLOP utilisation, peak memory;
  evaluation the original's one question at a time with 50 free-running new
             tokens against common.generate_answers (batched, stopping, bounded by
             common.max_new_tokens_for): questions per second, peak memory; on the
             distilgpt2-shaped model (random weights never stop early, so this
             isolates batching and the bound) and on smollm2-135m untuned, or on a
             fine-tuned model given with --eval-model, whose answers stop;
  peak       the fp32 matrix-multiply rate of this machine (2048x2048, median);
  memory     peak memory of this project's full / LoRA / QLoRA / BitFit on
             smollm2-135m with the same batches, split into weights, gradients,
             AdamW state and activations.
The training comparison uses a distilgpt2-shaped model with random weights (the
arithmetic is the same as distilgpt2's) and the smollm2-135m tokenizer, so token
lengths are realistic; --smollm2 repeats it on smollm2-135m.
Every configuration is warmed up, then timed --repeats times; tables give
medians with [min-max], and speed-ups are computed per repeat pair, then the
median taken.  Writes benchmarks/results.md and results.json (--output).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# --- The original recipe, as the original project ran it ----------------------
ORIGINAL_MAX_LENGTH = 128        # tokenizer(padding="max_length", truncation=True, max_length=128)
ORIGINAL_BATCH = 2               # per_device_train_batch_size=2
ORIGINAL_LR = 5e-5               # the Trainer's default, used for every method
ORIGINAL_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}  # alpha/dropout do not change speed
ORIGINAL_LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj"]}
ORIGINAL_NEW_TOKENS = 50         # generate(max_new_tokens=50), one question at a time

# --- The models -----------------------------------------------------------------
# distilgpt2's shape (82 M parameters); random weights cost the same arithmetic.
DISTILGPT2_SHAPE = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024,
                    "vocab_size": 50257}
QUICK_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024, "vocab_size": 50257}
TOKENIZER_PRESET = "smollm2-135m"  # realistic token lengths; its ids are all < 50257
METHODS = ("full", "lora", "qlora", "bitfit")
SEED = 42

# --- The issue's targets ----------------------------------------------------------
TARGET_TRAIN_SPEEDUP = 7.0       # full and LoRA, per training example
TARGET_EVAL_SPEEDUP = 20.0       # questions per second
TARGET_FULL_MFU = 0.60           # of the measured fp32 matmul peak

FLOPS_DOC = """\
- **Useful tokens** are the non-pad tokens. Padding is computed by a path but never counted.
- **Forward**: 2 FLOPs per multiply-accumulate. Every linear layer (attention and MLP
  projections, LoRA's A and B) costs 2 x in x out per useful token. Attention scores (QK^T)
  and the weighted sum of values (AV) cost 2 x 2 x d_attn per (query, key) pair, counting only
  causal pairs between real tokens: n(n+1)/2 pairs per sequence of n real tokens, per layer.
  The LM head costs 2 x d_model x vocab at each position where the path computes it *and*
  the position holds a real token: this project computes it only at labelled (answer)
  positions; the original at all 128 positions, of which only the real tokens count.
- **Backward** = activation gradients + weight gradients. A linear layer's activation
  gradient (same cost as its forward) is counted only where autograd needs it, that is where
  the layer's input requires a gradient; its weight gradient (same cost again) only when
  that weight trains. Both are read off the real model by forward hooks (input.requires_grad,
  weight.requires_grad), so frozen weights add no weight-gradient work and a frozen first
  layer adds no input gradient. Attention's backward is 2x its forward (both operands are
  activations).
- **Not counted**: embedding look-ups, norms, activation functions, softmax, dropout, bias
  gradients, the optimiser step and NF4 dequantisation. They take real time but are not
  matrix multiplies, so they lower the utilisation.
- **MFU** = counted FLOPs / measured step time / the fp32 matmul peak measured in the same run
  (the higher of the runs at the start and the end, so utilisation is not flattered).
- **Check**: on unpadded single examples this count agreed with
  torch.utils.flop_counter.FlopCounterMode within 1% for GPT-2 (full, LoRA, BitFit, both
  recipes) once attention is counted as the full square PyTorch computes; on a Llama model
  the linear layers agreed to 4 significant digits (FlopCounterMode counts neither its
  grouped-query attention kernel nor bitsandbytes' 4-bit matmul)."""


# =============================================================================
# Small shared helpers
# =============================================================================


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_split() -> dict:
    """Resident memory split into anonymous and file-backed pages, in bytes (/proc/self/status)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if line.startswith("Rss"))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def median_spread(values: list[float]) -> dict:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def log(message: str) -> None:
    """Progress to stderr, so a worker's stdout carries only its JSON result."""
    print(message, file=sys.stderr, flush=True)


# =============================================================================
# Worker: model set-up, exactly as the scripts do it
# =============================================================================


def family(model) -> str:
    """'gpt2' or 'llama': which naming the original's LoRA targets use."""
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def setup_ours(model_dir: str, method: str):
    """Load and prepare a model as finetune*.py do; returns (model, tokenizer, learning rate)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import common
    import finetune
    import finetune_bitfit
    import finetune_lora

    device = torch.device("cpu")
    model, tokenizer, _ = common.load_model(model_dir, device, quantize_4bit=method == "qlora")
    if method == "full":
        model.requires_grad_(True)
        return model, tokenizer, finetune.parse_args([]).lr
    if method == "bitfit":
        finetune_bitfit.add_missing_biases(model)
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith("bias")
        return model, tokenizer, finetune_bitfit.parse_args([]).lr
    # LoRA and QLoRA: the scripts' own defaults (r=16, alpha=32, dropout 0.05, all-linear)
    args = finetune_lora.parse_args([])
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        task_type="CAUSAL_LM",
                        target_modules=common.target_modules(args.target_modules),
                        fan_in_fan_out=common.uses_conv1d(model))
    return get_peft_model(model, config), tokenizer, args.lr


def setup_original(model_dir: str, method: str):
    """Load and prepare a model as the original project did; returns (model, tokenizer, lr)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import common
    import finetune_bitfit

    model, tokenizer, _ = common.load_model(model_dir, torch.device("cpu"))
    if method == "full":
        model.requires_grad_(True)
    elif method == "bitfit":
        # Llama-style models have no biases; the original would have trained nothing.
        # Adding them (as finetune_bitfit.py does) keeps the cost comparison like for like.
        finetune_bitfit.add_missing_biases(model)
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith("bias")
    else:  # lora; the original never quantised, so its "QLoRA" was this same recipe
        config = LoraConfig(**ORIGINAL_LORA, task_type="CAUSAL_LM",
                            target_modules=ORIGINAL_LORA_TARGETS[family(model)],
                            fan_in_fan_out=common.uses_conv1d(model))
        model = get_peft_model(model, config)
    return model, tokenizer, ORIGINAL_LR


# =============================================================================
# Worker: batches and loss of each recipe
# =============================================================================


def ours_batches(tokenizer, rows, model, batch_size: int, warmup: int, steps: int):
    """(warm-up batches, timed batches) as lists of examples, from common's length-grouped epoch.

    Warm-up runs on the epoch's longest batch, so memory reaches its real peak
    (AdamW state present, longest activations).  Timed batches are evenly
    spaced quantiles of the epoch's batches by width, so a few steps carry the
    epoch's mix of lengths.
    """
    import common

    examples = common.tokenize_rows(tokenizer, rows, common.context_length(model),
                                    source="train.jsonl")
    lengths = [len(ex["input_ids"]) for ex in examples]
    epoch = common.length_grouped_batches(lengths, batch_size, SEED, 0)
    full = [b for b in epoch if len(b) == batch_size] or epoch  # the last batch may be short
    by_width = sorted(full, key=lambda b: (max(lengths[i] for i in b), sum(lengths[i] for i in b)))
    timed = [by_width[int((k + 0.5) * len(by_width) / steps)] for k in range(steps)]
    warm = [by_width[-1]] * warmup
    return ([[examples[i] for i in b] for b in warm], [[examples[i] for i in b] for b in timed])


def original_batches(tokenizer, rows, warmup: int, steps: int):
    """(warm-up, timed) batches of the original: prompt+answer padded to 128, labels = input ids.

    The original set labels to a copy of input_ids, so with pad == EOS the pad
    positions stay in the loss (we do the same; nothing is masked to -100).
    """
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)  # the Trainer's shuffled sampler
    needed = (warmup + steps) * ORIGINAL_BATCH
    order = (order * (needed // len(order) + 1))[:needed]
    texts = [rows[i]["prompt"] + rows[i]["completion"] for i in order]
    enc = tokenizer(texts, padding="max_length", truncation=True,
                    max_length=ORIGINAL_MAX_LENGTH)
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": list(ids)}
                for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    batches = [examples[i:i + ORIGINAL_BATCH] for i in range(0, needed, ORIGINAL_BATCH)]
    return batches[:warmup], batches[warmup:]


def collate_original(examples: list[dict]) -> dict:
    """The Trainer's default collator: stack already-padded rows."""
    import torch

    return {key: torch.tensor([ex[key] for ex in examples]) for key in examples[0]}


def loss_ours(answer_loss, batch: dict):
    """common.train_and_save's objective: answer-token NLL over the step's labelled tokens.

    answer_loss is the common.AnswerLoss wrapped around the model, as the loop builds it.
    """
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    nll, _ = answer_loss(**batch)
    return nll / n_labels


def loss_original(model, batch: dict):
    """The original objective: the model's own loss over full logits at every position."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss


def lm_positions(recipe: str, batch: dict) -> int:
    """Positions where the LM head is computed on a real token (see FLOPS_DOC)."""
    if recipe == "ours":
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["attention_mask"].sum())


# =============================================================================
# Worker: FLOP counting
# =============================================================================


class MatmulRecorder:
    """Forward hooks noting each linear layer's size and which of its gradients autograd needs."""

    def __init__(self, head):
        self.head, self.layers, self.head_info = head, {}, None

    def hook(self, name, module, inputs, output):
        """Record (MACs per token, input needs grad, weight trains) for one layer."""
        weight = module.weight
        if hasattr(module, "in_features"):  # nn.Linear and bitsandbytes' Linear4bit
            macs = module.in_features * module.out_features
        else:  # GPT-2's Conv1D: weight is (in, out)
            macs = weight.shape[0] * weight.shape[1]
        info = {"macs": macs, "input_grad": bool(inputs[0].requires_grad),
                "weight_grad": bool(weight.requires_grad)}
        if module is self.head:
            self.head_info = info
        else:
            self.layers[name] = info


def profile_matmuls(model, forward, batch) -> dict:
    """Run forward(batch) once with hooks on model's layers; return what step_flops needs."""
    import torch
    from transformers.pytorch_utils import Conv1D

    import common

    lm = common._causal_lm(model)
    recorder = MatmulRecorder(lm.get_output_embeddings())
    handles = [module.register_forward_hook(functools.partial(recorder.hook, name))
               for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D))]
    try:
        forward(batch)  # the graph is dropped unused
    finally:
        for handle in handles:
            handle.remove()
    config = lm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": recorder.layers, "head": recorder.head_info,
            "n_layers": config.num_hidden_layers, "d_attn": heads * head_dim}


def profile_summary(profile: dict) -> dict:
    """The profile in a few numbers, for results.json."""
    layers = profile["layers"].values()
    return {"n_layers": profile["n_layers"], "d_attn": profile["d_attn"], "head": profile["head"],
            "linear_layers": len(layers), "macs_per_token": sum(i["macs"] for i in layers),
            "layers_with_input_grad": sum(i["input_grad"] for i in layers),
            "layers_with_weight_grad": sum(i["weight_grad"] for i in layers)}


def step_flops(profile: dict, seq_lens: list[int], head_positions: int) -> dict:
    """Counted forward and backward FLOPs of one step (see FLOPS_DOC)."""
    tokens = sum(seq_lens)
    fwd = bwd = 0.0
    for info in profile["layers"].values():
        per_token = 2 * info["macs"]
        fwd += per_token * tokens
        bwd += per_token * tokens * (info["input_grad"] + info["weight_grad"])
    head = profile["head"]
    fwd += 2 * head["macs"] * head_positions
    bwd += 2 * head["macs"] * head_positions * (head["input_grad"] + head["weight_grad"])
    pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    attention = 2 * 2 * profile["d_attn"] * pairs * profile["n_layers"]
    return {"forward": fwd + attention, "backward": bwd + 2 * attention,
            "total": fwd + bwd + 3 * attention}


# =============================================================================
# Worker: memory accounting
# =============================================================================


def tensor_bytes(obj) -> int:
    """Bytes of the tensors held by a bitsandbytes QuantState (absmax, code, nested state)."""
    import torch

    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(obj, attr, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(obj, "state2", None)
    return total + (tensor_bytes(nested) if nested is not None else 0)


def memory_parts(model) -> dict:
    """Weights as stored, gradients and AdamW state, in bytes, from parameter counts and dtypes."""
    import common

    weights = grads = 0
    for param in model.parameters():  # tied weights come once
        weights += param.numel() * param.element_size()  # NF4: 2 weights per byte
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            weights += tensor_bytes(quant_state)
        if param.requires_grad:
            grads += param.numel() * param.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable, total = common.count_parameters(model)
    # AdamW keeps two moments (exp_avg, exp_avg_sq) in the parameter's dtype.
    return {"weights": weights, "gradients": grads, "adam_state": 2 * grads,
            "trainable_params": trainable, "total_params": total}


# =============================================================================
# Worker: the tasks
# =============================================================================


def train_step(target, params, optimizer, scheduler, examples, collate, loss_fn,
               run=None) -> tuple:
    """One timed optimiser step; returns (seconds, batch, loss).

    Ours (run given) is common.train_step itself, the project's real step.  The
    original's is the Trainer's step as a plain loop: its own loss, backward,
    clipping at 1.0, AdamW, schedule.
    """
    import torch

    import common

    started = time.perf_counter()
    batch = collate(examples)
    if run is not None:
        value = common.train_step(run, target, [batch], params, optimizer, scheduler)["loss"]
    else:
        loss = loss_fn(target, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
    return time.perf_counter() - started, batch, value


def task_train(config: dict, baseline: int) -> dict:
    """Warm up, then time `steps` optimiser steps `repeats` times for one recipe and method."""
    import torch

    import common

    torch.manual_seed(SEED)
    recipe, method = config["recipe"], config["method"]
    if recipe == "ours":
        model, tokenizer, lr = setup_ours(config["model_dir"], method)
    else:
        model, tokenizer, lr = setup_original(config["model_dir"], method)
    rows = common.load_split(config["data_dir"], "train")
    if recipe == "ours":
        warm, timed = ours_batches(tokenizer, rows, model, config["batch_size"],
                                   config["warmup"], config["steps"])
        collate = functools.partial(common.collate, pad_id=tokenizer.pad_token_id)
        loss_fn, target = loss_ours, common.AnswerLoss(model)
    else:
        warm, timed = original_batches(tokenizer, rows, config["warmup"], config["steps"])
        collate, loss_fn, target = collate_original, loss_original, model

    # What this path computes, read off the model (before any timing)
    model.train()
    profile = profile_matmuls(model, functools.partial(loss_fn, target), collate(timed[0][:1]))
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = len(warm) + config["steps"] * config["repeats"]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Ours warms the rate up over 5% of steps (train_and_save); the Trainer decays linearly.
    scheduler = common.linear_schedule(optimizer, total_steps, 0.05 if recipe == "ours" else 0.0)
    parts = memory_parts(model)
    # What common.train_step reads of the run: clipping norm, device, process count.
    run = argparse.Namespace(args=argparse.Namespace(max_grad_norm=1.0),
                             device=torch.device("cpu"), world=1) if recipe == "ours" else None
    common.release_free_heap()
    loaded, loaded_split = rss_bytes(), rss_split()

    repeats = []
    with common.PeakMemory(torch.device("cpu")) as peak:
        for examples in warm:
            seconds, _, loss = train_step(target, params, optimizer, scheduler, examples,
                                          collate, loss_fn, run)
            log(f"    warm-up step: {seconds:.2f} s, loss {loss:.3f}")
        for r in range(config["repeats"]):
            steps = []
            for examples in timed:
                seconds, batch, loss = train_step(target, params, optimizer, scheduler,
                                                  examples, collate, loss_fn, run)
                seq_lens = batch["attention_mask"].sum(1).tolist()
                head_positions = lm_positions(recipe, batch)
                steps.append({"seconds": seconds, "examples": len(examples),
                              "real_tokens": sum(seq_lens),
                              "padded_tokens": int(batch["attention_mask"].numel()),
                              "lm_positions": head_positions,
                              "flops": step_flops(profile, seq_lens, head_positions)["total"],
                              "loss": loss})
            repeats.append(summarise_steps(steps))
            last = repeats[-1]
            log(f"    repeat {r + 1}/{config['repeats']}: {last['seconds']:.2f} s for "
                f"{last['examples']} examples ({last['s_per_100_examples']:.1f} s/100 ex, "
                f"{last['tokens_per_s']:.0f} tok/s)")
    return {"config": config, "repeats": repeats, "peak_bytes": peak.peak_bytes,
            "baseline_bytes": baseline, "loaded_bytes": loaded, "memory_parts": parts,
            "rss_split_loaded": loaded_split, "rss_split_end": rss_split(),
            "profile": profile_summary(profile), "threads": torch.get_num_threads()}


def summarise_steps(steps: list[dict]) -> dict:
    """One repeat's totals and rates from its steps."""
    seconds = sum(s["seconds"] for s in steps)
    examples = sum(s["examples"] for s in steps)
    real = sum(s["real_tokens"] for s in steps)
    return {"seconds": seconds, "examples": examples, "real_tokens": real,
            "padded_tokens": sum(s["padded_tokens"] for s in steps),
            "lm_positions": sum(s["lm_positions"] for s in steps),
            "flops": sum(s["flops"] for s in steps),
            "s_per_100_examples": 100 * seconds / examples, "tokens_per_s": real / seconds,
            "step_seconds": [s["seconds"] for s in steps], "losses": [s["loss"] for s in steps]}


class ForwardCounter:
    """Counts the model's forward passes (one per generated token per batch)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        """Count one call."""
        self.calls += 1


def answers_original(model, tokenizer, prompts: list[str]) -> list[str]:
    """The original evaluation: one question at a time, 50 new tokens, greedy, no stop string."""
    import torch

    answers = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            # The original decoded 50 free-running tokens per question; min_new_tokens
            # keeps a model that would emit EOS early doing that same work.
            out = model.generate(**enc, max_new_tokens=ORIGINAL_NEW_TOKENS,
                                 min_new_tokens=ORIGINAL_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True))
    return answers


def task_eval(config: dict, baseline: int) -> dict:
    """Warm up, then time answering the same questions `repeats` times with one recipe."""
    import torch

    import common
    import evaluate

    device = torch.device("cpu")
    model, tokenizer, _ = common.load_model(config["model_dir"], device)
    model.eval()
    rows = common.load_split(config["data_dir"], "eval")
    prompts = [r["prompt"] for r in rows[:config["questions"]]]
    if config["recipe"] == "original":
        answer = functools.partial(answers_original, model, tokenizer)
        bound = ORIGINAL_NEW_TOKENS
    else:
        # As evaluate.py does: the bound from every eval reference, its batch size, its stop
        bound = common.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
        answer = functools.partial(common.generate_answers, model, tokenizer,
                                   max_new_tokens=bound, device=device,
                                   stop=common.turn_marker(common.load_template(config["data_dir"])),
                                   batch_size=evaluate.parse_args([]).batch_size)
    common.release_free_heap()
    loaded = rss_bytes()
    counter = ForwardCounter(model)
    repeats = []
    with common.PeakMemory(device) as peak:
        started = time.perf_counter()
        answer(prompts[:1] if config["recipe"] == "original" else prompts[:8])
        log(f"    warm-up: {time.perf_counter() - started:.2f} s")
        for r in range(config["repeats"]):
            counter.calls = 0
            started = time.perf_counter()
            answers = answer(prompts)
            seconds = time.perf_counter() - started
            repeats.append({"seconds": seconds, "questions": len(prompts),
                            "questions_per_s": len(prompts) / seconds,
                            "forward_passes": counter.calls,
                            "mean_answer_chars": sum(map(len, answers)) / len(answers)})
            log(f"    repeat {r + 1}/{config['repeats']}: {seconds:.2f} s for {len(prompts)} "
                f"questions ({len(prompts) / seconds:.2f} q/s, {counter.calls} forward passes)")
    return {"config": config, "repeats": repeats, "max_new_tokens": bound,
            "peak_bytes": peak.peak_bytes, "baseline_bytes": baseline, "loaded_bytes": loaded,
            "threads": torch.get_num_threads()}


def task_matmul(config: dict, baseline: int) -> dict:
    """The fp32 matmul rate: median over several n x n products after a warm-up."""
    import torch

    n = config["size"]
    torch.manual_seed(0)
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(config["runs"]):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - started)
    rates = [2 * n ** 3 / t for t in times]
    log(f"    {n}x{n} fp32 matmul: median {statistics.median(rates) / 1e9:.1f} GFLOP/s "
        f"over {len(rates)} runs, {torch.get_num_threads()} threads")
    return {"config": config, "flops_per_s": median_spread(rates),
            "threads": torch.get_num_threads()}


TASKS = {"train": task_train, "eval": task_eval, "matmul": task_matmul}


def worker_main(config_json: str) -> None:
    """Run one configuration; print its result as one JSON line on stdout."""
    import warnings

    config = json.loads(config_json)
    real_stdout = sys.stdout
    # peft calls a transformers API deprecated for v6; the warning says nothing about speed.
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.redirect_stdout(sys.stderr):  # library prints must not mix with the JSON
        # Import every library before the baseline, so each configuration's
        # baseline holds the same code and the rest is the model and training.
        import torch

        if config.get("threads"):
            torch.set_num_threads(config["threads"])
        import transformers  # noqa: F401
        import peft  # noqa: F401
        with contextlib.suppress(ImportError):
            import bitsandbytes  # noqa: F401
        import common  # noqa: F401

        common.release_free_heap()
        result = TASKS[config["task"]](config, rss_bytes())
    real_stdout.write(json.dumps(result) + "\n")


# =============================================================================
# Parent: data, model and plan
# =============================================================================


def make_data(folder: Path, size: int) -> Path:
    """Generate, format and split a data set with the project's own scripts."""
    py = sys.executable
    folder.mkdir(parents=True, exist_ok=True)
    for cmd in ([py, "generate_dataset.py", "--size", str(size), "--output",
                 str(folder / "qa_pairs.jsonl")],
                [py, "format_dataset.py", "--input", str(folder / "qa_pairs.jsonl"),
                 "--output", str(folder / "formatted.jsonl")],
                [py, "split_dataset.py", "--input", str(folder / "formatted.jsonl"),
                 "--output-dir", str(folder)]):
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder


def build_gpt2_shaped(folder: Path, shape: dict) -> Path:
    """Save a randomly initialised GPT-2 of the given shape with the smollm2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.utils import logging as hf_logging

    import common

    hf_logging.disable_progress_bar()
    tokenizer = common.load_tokenizer(common.resolve_model(TOKENIZER_PRESET))
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if len(tokenizer) > shape["vocab_size"]:  # smollm2's 49,152 ids fit GPT-2's 50,257
        raise common.PipelineError(f"the {TOKENIZER_PRESET} tokenizer has ids beyond the "
                                   f"model's vocabulary of {shape['vocab_size']}")
    # The tokenizer's special ids, so generate() stops and pads as it would with it.
    config = GPT2Config(**shape, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings_from(args) -> dict:
    """The run's sizes: the options, or tiny ones with --quick."""
    shared = {"batch_size": args.batch_size, "threads": args.threads}
    if args.quick:
        # The real-model section reuses the tiny model unless one is named.
        return {**shared, "shape": QUICK_SHAPE, "repeats": 1, "steps": 1, "steps_original": 2,
                "warmup": 1, "questions": 4, "data_size": 300, "matmul_size": 512,
                "matmul_runs": 5, "matmul_end": False, "real_model": args.real_model}
    return {**shared, "shape": DISTILGPT2_SHAPE, "repeats": args.repeats, "steps": args.steps,
            "steps_original": args.steps_original, "warmup": args.warmup,
            "questions": args.eval_questions, "data_size": args.data_size,
            "matmul_size": 2048, "matmul_runs": 10, "matmul_end": True,
            "real_model": args.real_model or "smollm2-135m"}


def eval_configs(s: dict, key: str, model_dir: str, data_dir: str) -> list[tuple[str, dict]]:
    """Both evaluation paths on one model."""
    return [(f"{key}/eval/{recipe}",
             {"task": "eval", "recipe": recipe, "model_dir": model_dir, "data_dir": data_dir,
              "questions": s["questions"], "repeats": s["repeats"], "threads": s["threads"]})
            for recipe in ("original", "ours")]


def build_plan(s: dict, methods: list[str], models: dict[str, str], data_dir: str,
               real: tuple[str, str] | None,
               tuned: tuple[str, str] | None) -> list[tuple[str, dict]]:
    """The workers to run, in order: (label, config).  Original and ours alternate per method.

    models get the whole comparison; real the memory table (and an evaluation
    unless a tuned model is given); tuned an evaluation.
    """
    matmul = {"task": "matmul", "size": s["matmul_size"], "runs": s["matmul_runs"],
              "threads": s["threads"]}
    plan = [("matmul/start", matmul)]
    for key, model_dir in models.items():
        base = {"task": "train", "model_dir": model_dir, "data_dir": data_dir,
                "repeats": s["repeats"], "warmup": s["warmup"], "threads": s["threads"]}
        for method in methods:
            if method != "qlora":  # the original's "QLoRA" is its LoRA run (it never quantised)
                plan.append((f"{key}/train/original/{method}",
                             {**base, "recipe": "original", "method": method,
                              "steps": s["steps_original"], "batch_size": ORIGINAL_BATCH}))
            plan.append((f"{key}/train/ours/{method}",
                         {**base, "recipe": "ours", "method": method, "steps": s["steps"],
                          "batch_size": s["batch_size"]}))
        plan += eval_configs(s, key, model_dir, data_dir)
    if real is not None and real[0] not in models:
        # Memory only: the longest batch twice (AdamW state, then the real peak), one timed step
        key, model_dir = real
        memory = {"task": "train", "recipe": "ours", "model_dir": model_dir,
                  "data_dir": data_dir, "steps": 1, "repeats": 1, "warmup": 2,
                  "batch_size": s["batch_size"], "threads": s["threads"]}
        for method in methods:
            plan.append((f"{key}/train/ours/{method}", {**memory, "method": method}))
        if tuned is None:  # a pretrained model's answers stop at least sometimes
            plan += eval_configs(s, key, model_dir, data_dir)
    if tuned is not None:  # a fine-tuned model stops after its answer, as in evaluate.py
        plan += eval_configs(s, *tuned, data_dir)
    if s["matmul_end"]:
        plan.append(("matmul/end", matmul))
    return plan


def run_worker(label: str, config: dict, index: int, count: int) -> dict:
    """Run one configuration in a fresh Python process; its JSON result, or an error record."""
    log(f"[{index}/{count}] {label}")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(config)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        log(f"    FAILED (exit {proc.returncode}) after {wall:.0f} s")
        return {"config": config, "error": f"exit status {proc.returncode}", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    log(f"    done in {wall:.0f} s")
    return result


# =============================================================================
# Parent: summary
# =============================================================================


def peak_flops(workers: dict) -> float:
    """The matmul peak used for MFU: the higher of the start and end measurements."""
    rates = [w["flops_per_s"]["median"] for k, w in workers.items()
             if k.startswith("matmul/") and "error" not in w]
    return max(rates) if rates else float("nan")


def repeat_rates(worker: dict, peak: float) -> list[dict]:
    """Per-repeat s/100 examples, tokens/s and MFU of one training worker."""
    return [{"s_per_100": r["s_per_100_examples"], "tokens_per_s": r["tokens_per_s"],
             "mfu": r["flops"] / r["seconds"] / peak,
             "pad_share": 1 - r["real_tokens"] / r["padded_tokens"]} for r in worker["repeats"]]


def pair_ratios(numerators: list[float], denominators: list[float]) -> dict | None:
    """numerator/denominator per repeat pair (repeat i with repeat i), then median and spread."""
    pairs = [a / b for a, b in zip(numerators, denominators) if b]
    return median_spread(pairs) if pairs else None


def summarise_training(workers: dict, key: str, methods: list[str], peak: float) -> list[dict]:
    """One row per method: both recipes' rates, the speed-up and the peak memory."""
    rows = []
    for method in methods:
        ours = workers.get(f"{key}/train/ours/{method}")
        orig_method = "lora" if method == "qlora" else method
        orig = workers.get(f"{key}/train/original/{orig_method}")
        row = {"method": method, "original_is": orig_method}
        for name, worker in (("original", orig), ("ours", ours)):
            if worker is None or "error" in worker:
                row[name] = None
                continue
            rates = repeat_rates(worker, peak)
            row[name] = {field: median_spread([r[field] for r in rates])
                         for field in ("s_per_100", "tokens_per_s", "mfu", "pad_share")}
            row[name]["peak_mb"] = worker["peak_bytes"] / 1e6
            row[name]["per_repeat_s_per_100"] = [r["s_per_100"] for r in rates]
        if row["original"] and row["ours"]:
            row["speedup"] = pair_ratios(row["original"]["per_repeat_s_per_100"],
                                         row["ours"]["per_repeat_s_per_100"])
        rows.append(row)
    return rows


def summarise_eval(workers: dict, key: str) -> dict | None:
    """Questions per second of both recipes and the per-pair speed-up."""
    orig, ours = workers.get(f"{key}/eval/original"), workers.get(f"{key}/eval/ours")
    if not orig or not ours or "error" in orig or "error" in ours:
        return None
    out = {}
    for name, worker in (("original", orig), ("ours", ours)):
        qps = [r["questions_per_s"] for r in worker["repeats"]]
        out[name] = {"questions_per_s": median_spread(qps), "per_repeat": qps,
                     "peak_mb": worker["peak_bytes"] / 1e6,
                     "max_new_tokens": worker["max_new_tokens"],
                     "forward_passes_per_question":
                         worker["repeats"][0]["forward_passes"] / worker["repeats"][0]["questions"]}
    out["speedup"] = pair_ratios(out["ours"]["per_repeat"], out["original"]["per_repeat"])
    out["questions"] = orig["repeats"][0]["questions"]
    return out


def summarise_memory(workers: dict, key: str, methods: list[str]) -> list[dict]:
    """Peak memory per method split into weights, gradients, AdamW state and the rest."""
    rows = []
    for method in methods:
        worker = workers.get(f"{key}/train/ours/{method}")
        if not worker or "error" in worker:
            continue
        parts = worker["memory_parts"]
        above = worker["peak_bytes"] - worker["baseline_bytes"]
        split = {"weights": parts["weights"], "gradients": parts["gradients"],
                 "adam_state": parts["adam_state"]}
        # Whatever the peak holds beyond the process baseline and the three above:
        # activations kept for backward, plus temporaries and allocator slack.
        split["activations_other"] = above - sum(split.values())
        # Of that, what was already resident before the first step (data, tokenizer, caches).
        at_start = worker["loaded_bytes"] - worker["baseline_bytes"] - parts["weights"]
        rows.append({"method": method, "peak_mb": worker["peak_bytes"] / 1e6,
                     "file_backed_at_start_mb": worker["rss_split_loaded"].get("RssFile", 0) / 1e6,
                     "other_at_start_mb": at_start / 1e6, "warmup": worker["config"]["warmup"],
                     "baseline_mb": worker["baseline_bytes"] / 1e6, "above_mb": above / 1e6,
                     "total_params": parts["total_params"],
                     "trainable_params": parts["trainable_params"],
                     "bytes_per_param": worker["peak_bytes"] / parts["total_params"],
                     "above_bytes_per_param": above / parts["total_params"],
                     "parts_mb": {k: v / 1e6 for k, v in split.items()},
                     "dominant": max(split, key=split.get)})
    return rows


def target_checks(summary: dict, main_key: str, memory_key: str | None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets."""
    checks = []
    rows = {r["method"]: r for r in summary["training"].get(main_key, [])}
    for method in ("full", "lora"):
        sp = rows.get(method, {}).get("speedup")
        checks.append((f"{method}: >= {TARGET_TRAIN_SPEEDUP:g}x faster per training example",
                       f"{sp['median']:.1f}x" if sp else "not measured",
                       sp["median"] >= TARGET_TRAIN_SPEEDUP if sp else None))
    for key, ev in summary["evaluation"].items():
        checks.append((f"evaluation on {key}: >= {TARGET_EVAL_SPEEDUP:g}x questions per second",
                       f"{ev['speedup']['median']:.1f}x" if ev else "not measured",
                       ev["speedup"]["median"] >= TARGET_EVAL_SPEEDUP if ev else None))
    full = rows.get("full", {}).get("ours")
    mfu = full["mfu"]["median"] if full else float("nan")
    checks.append((f"full fine-tuning: MFU >= {TARGET_FULL_MFU:.0%} of the matmul peak",
                   f"{mfu:.0%}" if mfu == mfu else "not measured",
                   mfu >= TARGET_FULL_MFU if mfu == mfu else None))
    mem = {r["method"]: r["peak_mb"] for r in summary["memory"].get(memory_key or "", [])}
    if {"full", "lora", "qlora"} <= mem.keys():
        checks.append((f"memory on {memory_key}: QLoRA < LoRA < full",
                       f"{mem['qlora']:.0f} < {mem['lora']:.0f} < {mem['full']:.0f} MB",
                       mem["qlora"] < mem["lora"] < mem["full"]))
    if not checks[-1][0].startswith("memory"):
        checks.append(("memory: QLoRA < LoRA < full", "not measured", None))
    return checks


# =============================================================================
# Parent: the report
# =============================================================================


def fmt(stat: dict | None, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    """'median [min-max]' of a median_spread dict."""
    if not stat or stat["median"] != stat["median"]:  # missing, or NaN (no matmul peak)
        return "n/a"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    if stat["n"] == 1:
        return f"{med:{spec}}{unit}"
    return f"{med:{spec}}{unit} [{lo:{spec}}-{hi:{spec}}]"


def cpu_times() -> tuple[int, int]:
    """(all, idle) CPU time so far, summed over cores, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy over a short wait while none of ours runs: other work on the machine."""
    total0, idle0 = cpu_times()
    time.sleep(seconds)
    total1, idle1 = cpu_times()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def megabytes(value: float | None) -> str:
    """A table cell for an amount in MB, or n/a."""
    return "n/a" if value is None else f"{value:.0f}"


def hardware() -> dict:
    """CPU model, core count and library versions (torch threads come from the workers)."""
    import importlib.metadata as md

    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return {"cpu": model, "cores": os.cpu_count(), "versions": versions,
            "niceness": os.nice(0), "cpu_busy_start": cpu_busy()}


def training_table(rows: list[dict]) -> list[str]:
    """Markdown: per method, both recipes side by side."""
    out = ["| method | original s/100 ex | ours s/100 ex | speed-up | original tok/s | "
           "ours tok/s | original MFU | ours MFU | original peak MB | ours peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o, u = row["original"] or {}, row["ours"] or {}
        label = row["method"] + (" (original = its LoRA)" if row["original_is"] != row["method"] else "")
        out.append(f"| {label} | {fmt(o.get('s_per_100'))} | {fmt(u.get('s_per_100'))} | "
                   f"{fmt(row.get('speedup'), '.1f', unit='x')} | "
                   f"{fmt(o.get('tokens_per_s'), '.0f')} | {fmt(u.get('tokens_per_s'), '.0f')} | "
                   f"{fmt(o.get('mfu'), '.0f', 100, '%')} | {fmt(u.get('mfu'), '.0f', 100, '%')} | "
                   f"{megabytes(o.get('peak_mb'))} | {megabytes(u.get('peak_mb'))} |")
    pads = [(r["method"], r["original"]["pad_share"]["median"], r["ours"]["pad_share"]["median"])
            for r in rows if r["original"] and r["ours"]]
    if pads:
        out.append("")
        out.append("Share of computed token positions that are padding (original / ours): "
                   + "; ".join(f"{m} {a:.0%} / {b:.0%}" for m, a, b in pads) + ".")
    return out


def eval_table(ev: dict) -> list[str]:
    """Markdown: questions per second of both evaluation paths."""
    o, u = ev["original"], ev["ours"]
    return ["| path | questions/s | new-token bound | forward passes per question | peak MB |",
            "|---|---|---|---|---|",
            f"| original: one at a time, {ORIGINAL_NEW_TOKENS} free-running tokens | "
            f"{fmt(o['questions_per_s'], '.2f')} | {o['max_new_tokens']} | "
            f"{o['forward_passes_per_question']:.1f} | {o['peak_mb']:.0f} |",
            f"| ours: common.generate_answers, batched, stopping | "
            f"{fmt(u['questions_per_s'], '.2f')} | {u['max_new_tokens']} | "
            f"{u['forward_passes_per_question']:.2f} | {u['peak_mb']:.0f} |",
            "", f"Speed-up (questions/s, per repeat pair): **{fmt(ev['speedup'], '.1f', unit='x')}** "
                f"on the same {ev['questions']} questions."]


DOMINANT_NAMES = {"weights": "weights", "gradients": "gradients", "adam_state": "AdamW state",
                  "activations_other": "activations & other"}


def memory_table(rows: list[dict]) -> list[str]:
    """Markdown: peak memory and its parts per method."""
    out = ["| method | peak MB | above baseline MB | bytes/param (peak) | bytes/param (above baseline) "
           "| weights MB | gradients MB | AdamW MB | activations & other MB | of which before step 1 MB "
           "| dominant |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parts_mb"]
        out.append(f"| {r['method']} | {r['peak_mb']:.0f} | {r['above_mb']:.0f} | "
                   f"{r['bytes_per_param']:.1f} | {r['above_bytes_per_param']:.1f} | "
                   f"{p['weights']:.0f} | {p['gradients']:.0f} | {p['adam_state']:.0f} | "
                   f"{p['activations_other']:.0f} | {r['other_at_start_mb']:.0f} | "
                   f"{DOMINANT_NAMES[r['dominant']]} |")
    if rows:
        out += ["", f"Process baseline (libraries imported, no model): {rows[0]['baseline_mb']:.0f} MB. "
                f"Parameters: {rows[0]['total_params']:,} (4-bit weights counted unpacked). "
                "File-backed resident pages before the first step: "
                + ", ".join(f"{r['method']} {r['file_backed_at_start_mb']:.0f} MB" for r in rows)
                + "."]
    return out


def contention_warning(hw: dict) -> list[str]:
    """A warning line when other work was running: shared cores make timings meaningless."""
    busy = max(hw["cpu_busy_start"], hw["cpu_busy_end"])
    if busy < 0.2:
        return []
    return ["", f"**Warning: other work kept {busy:.0%} of the CPU busy before or after this run "
                "(sampled while none of it ran); the timings are unreliable.**"]


def render(report: dict) -> str:
    """The whole results.md, from the measurements only."""
    hw, s, summary = report["hardware"], report["settings"], report["summary"]
    threads = sorted({w.get("threads") for w in report["workers"].values() if w.get("threads")})
    lines = ["# Speed and memory: original recipe vs this project", "",
             f"- Command: `{report['command']}`",
             f"- Date: {report['date']} (took {report['wall_s'] / 60:.1f} min)",
             f"- CPU: {hw['cpu']}, {hw['cores']} cores; torch threads {threads}; niceness "
             f"{hw['niceness']}; CPU busy with other work: {hw['cpu_busy_start']:.0%} just "
             f"before the run, {hw['cpu_busy_end']:.0%} just after",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items()),
             f"- Data: {report['data']}",
             f"- Sizes: {s['repeats']} repeats; per repeat {s['steps_original']} steps of "
             f"{ORIGINAL_BATCH} (original) and {s['steps']} steps of {s['batch_size']} (ours), "
             f"after {s['warmup']} warm-up steps; {s['questions']} evaluation questions; "
             f"torch threads {s['threads'] or 'default'}.",
             *contention_warning(hw),
             "", "Values are medians with [min-max] over repeats; speed-ups are computed per "
                 "repeat pair (repeat i of each recipe), then the median taken.", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in summary["targets"]:
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no' if met is False else 'n/a'} |")
    lines += ["", "## Matrix-multiply peak", "",
              f"fp32 {s['matmul_size']}x{s['matmul_size']} matmul, median of {s['matmul_runs']}: "
              + ("; ".join(f"{k.split('/')[1]} of run {fmt(w['flops_per_s'], '.1f', 1e-9, ' GFLOP/s')}"
                           for k, w in report["workers"].items()
                           if k.startswith("matmul/") and "error" not in w) or "not measured")
              + f". MFU below uses {summary['peak_flops'] / 1e9:.1f} GFLOP/s.", ""]
    for key, rows in summary["training"].items():
        lines += [f"## Training: {key}", ""] + training_table(rows) + [""]
    for key, ev in summary["evaluation"].items():
        lines += [f"## Evaluation: {key}", ""] + (eval_table(ev) if ev else ["not measured"]) + [""]
    for key, rows in summary["memory"].items():
        warmup = rows[0]["warmup"] if rows else 0
        lines += [f"## Memory: {key}, this project's recipe, the same batches", "",
                  f"Batch {s['batch_size']}; the peak covers {warmup} warm-up step(s) on the "
                  "epoch's longest batch (the first allocates AdamW's state) and the timed steps. "
                  "Weights, gradients and AdamW state are computed from parameter counts and "
                  "dtypes; activations & other = peak - baseline - those three.", ""]
        lines += memory_table(rows) + [""]
    lines += ["## What is compared", "",
              f"- Original: a plain loop equivalent to its Trainer run (the Trainer adds almost "
              f"nothing per step): prompt + answer tokenised with padding to {ORIGINAL_MAX_LENGTH} "
              f"and truncation, batch {ORIGINAL_BATCH}, labels = a copy of input_ids with the "
              "pads left in (pad is EOS, as in the original), `model(**batch, labels=...).loss` "
              "over full-vocabulary logits, AdamW, clipping at 1.0, linear decay. LoRA r=8 on "
              "c_attn (q/k/v_proj on Llama). The original never quantised: its QLoRA row is its "
              "LoRA run. Its BitFit trains every *bias with the same recipe.",
              "- Ours: common.train_and_save's step (collate to the longest, answer_loss with the "
              f"LM head at labelled positions only, AdamW, clipping at 1.0) at batch "
              f"{s['batch_size']} on length-grouped batches; each method set up as its "
              "finetune_*.py script does. Timed batches are evenly spaced quantiles (by width) of "
              "the epoch's batches; warm-up runs the longest batch.",
              "- Evaluation: the same questions; the original generates greedily one question at "
              f"a time, always {ORIGINAL_NEW_TOKENS} new tokens (min_new_tokens = max_new_tokens, "
              "as its free-running decoding did); ours is "
              "common.generate_answers with evaluate.py's batch size, stop string and "
              "common.max_new_tokens_for bound over all eval references. A batch ends when its "
              "last answer stops. A model with random weights never stops early, and an untuned "
              "model often rambles to the bound, so there the speed-up comes from batching and "
              "the bound; a fine-tuned model (--eval-model) stops after its answer.",
              "- Peak memory is the process's resident set (sampled every 10 ms by "
              "common.PeakMemory) over warm-up and timed steps; freed heap is returned to the "
              "OS after loading. The baseline is measured after importing torch, transformers, "
              "peft and bitsandbytes, before the model loads.", "",
              "## How FLOPs are counted", "", FLOPS_DOC, ""]
    failed = [k for k, w in report["workers"].items() if "error" in w]
    if failed:
        lines += ["## Failed configurations", ""] + [f"- {k}" for k in failed] + [""]
    return "\n".join(lines)


# =============================================================================
# Main
# =============================================================================


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--repeats", type=int, default=3,
        help="timed repeats per configuration (default 3: medians and a spread)")
    add("--steps", type=int, default=3,
        help="this project's timed steps per repeat, batch 16 (default 3: ~3 s each here)")
    add("--steps-original", type=int, default=6,
        help="the original's timed steps per repeat, batch 2 (default 6: ~3 s each for full "
             "fine-tuning here, so both sides time 10-20 s per repeat)")
    add("--warmup", type=int, default=2,
        help="untimed steps first (default 2: the first allocates AdamW's state, the second "
             "reaches the steady peak)")
    add("--batch-size", type=int, default=16, help="this project's batch (default 16, its default)")
    add("--eval-questions", type=int, default=32,
        help="questions both evaluation paths answer (default 32: one batch of ours)")
    add("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora,bitfit")
    add("--smollm2", action="store_true",
        help="also run the training comparison on smollm2-135m (adds roughly 8 minutes, "
             "estimated: the original recipe's steps on it take several seconds each)")
    add("--real-model", default=None,
        help="pretrained model (preset, folder or .gguf) for the memory table and, unless "
             "--eval-model is given, a second evaluation (default smollm2-135m; with --quick "
             "the tiny model; 'none' to skip both)")
    add("--eval-model", default=None,
        help="a fine-tuned full-model folder (e.g. outputs/full or outputs/bitfit from a finished "
             "run, trained on data like --data-dir's) for the second evaluation: its answers "
             "stop after the answer, as in evaluate.py, where an untuned model often rambles to "
             "the bound (default: evaluate --real-model untuned)")
    add("--threads", type=int, default=None,
        help="torch threads in every worker (default: torch's own choice, all cores)")
    add("--data-dir", default=None,
        help="folder with train.jsonl, eval.jsonl, template.json (default: generate one with "
             "--data-size rows into a temporary folder)")
    add("--data-size", type=int, default=1300, help="rows to generate when no --data-dir")
    add("--quick", action="store_true",
        help="tiny model, one repeat, one or two steps: checks the code in a minute or two")
    add("--output", default=None,
        help="markdown report, with the same name .json beside it (default "
             "benchmarks/results.md; with --quick benchmarks/results-quick.md, so a smoke check "
             "never overwrites real results)")
    add("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "steps_original", "warmup", "batch_size", "eval_questions",
                 "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_model and not (Path(args.eval_model) / "config.json").exists():
        parser.error(f"--eval-model {args.eval_model}: not a model folder (no config.json); "
                     "adapters (outputs/lora, outputs/qlora) need their base, give a full model")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: expected some of {', '.join(METHODS)}")
    return args


def main(args) -> None:
    """Prepare data and model, run every configuration in its own process, write the report."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here needs the network; never wait on it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import common

    started, s = time.time(), settings_from(args)
    report = {"command": "python " + shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "hardware": hardware(), "settings": s}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        tmp = Path(tmp)
        # Data and models: generated here, identical for every configuration
        if args.data_dir:
            data_dir = Path(args.data_dir).resolve()
            report["data"] = f"{data_dir} (given)"
        else:
            log(f"generating {s['data_size']} rows with the project's data scripts ...")
            data_dir = make_data(tmp / "data", s["data_size"])
            report["data"] = f"generate_dataset.py --size {s['data_size']}, formatted and split"
        n_train = len(common.load_split(data_dir, "train"))
        n_eval = len(common.load_split(data_dir, "eval"))
        report["data"] += f": {n_train} train, {n_eval} eval rows"
        main_key = "gpt2-tiny-shape" if args.quick else "distilgpt2-shape"
        log(f"building the {main_key} model (random weights, {TOKENIZER_PRESET} tokenizer) ...")
        models = {main_key: str(build_gpt2_shaped(tmp / "model", s["shape"]))}
        if args.smollm2:
            models["smollm2-135m"] = common.resolve_model("smollm2-135m")
        tuned = None
        if args.eval_model:
            tuned = (f"tuned-{Path(args.eval_model).name}", str(Path(args.eval_model).resolve()))
        real = None
        if s["real_model"] is None:
            real = (main_key, models[main_key])
        elif s["real_model"] != "none":
            try:
                real = (Path(s["real_model"]).name, common.resolve_model(s["real_model"]))
            except common.PipelineError as exc:  # the rest of the benchmark still stands
                log(f"skipping the memory table on {s['real_model']}: {exc}")

        # Every configuration in its own process
        plan = build_plan(s, args.methods, models, str(data_dir), real, tuned)
        workers = {}
        for i, (label, config) in enumerate(plan, start=1):
            workers[label] = run_worker(label, config, i, len(plan))
            log(f"    elapsed {(time.time() - started) / 60:.1f} min")

    # Summary and report
    report["hardware"]["cpu_busy_end"] = cpu_busy()
    report["workers"] = workers
    peak = peak_flops(workers)
    memory_key = real[0] if real else None
    eval_keys = [k for k in (*models, memory_key, tuned[0] if tuned else None)
                 if k and any(label.startswith(f"{k}/eval/") for label in workers)]
    eval_keys = list(dict.fromkeys(eval_keys))
    summary = {"peak_flops": peak,
               "training": {k: summarise_training(workers, k, args.methods, peak) for k in models},
               "evaluation": {k: summarise_eval(workers, k) for k in eval_keys},
               "memory": {memory_key: summarise_memory(workers, memory_key, args.methods)}
               if memory_key else {}}
    summary["targets"] = target_checks(summary, main_key, memory_key)
    report["summary"], report["wall_s"] = summary, time.time() - started
    output = Path(args.output or Path(__file__).parent / (
        "results-quick.md" if args.quick else "results.md"))
    common.write_text_atomic(output, render(report) + "\n")
    common.write_json(output.with_suffix(".json"), report)
    log(f"wrote {output} and {output.with_suffix('.json')} in {report['wall_s'] / 60:.1f} min")
    for target, measured, met in summary["targets"]:
        log(f"  {'MET ' if met else 'n/a ' if met is None else 'MISS'} {target}: {measured}")
    if any("error" in w for w in workers.values()):
        sys.exit(1)  # the report is written; say that part of it is missing


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker is not None:
        worker_main(cli.worker)
    else:
        import common

        common.run_main(main, cli)
