"""The benchmark's workers: each configuration runs in its own Python process (bench_speed.py starts them).

    python benchmarks/bench_speed.py --worker '{"task": "train", "recipe": "ours", ...}'

Tasks: train (this project's step, or the original recipe's), eval (answering
questions), memory (tensor-level and process peak of this project's step),
matmul (the machine's fp32 or bf16 peak); TRL's trainer is in trl_runs.py, and
dispatch.py picks the task of a configuration.  This project's side never
re-implements a method: each model is prepared by its script's own prepare()
and trained by training.Trainer's step, exactly as finetune_*.py do.

Every configuration names its device ("cpu" or "cuda") and, for this project's
and TRL's training, its precision ("fp32", or "bf16" autocast with fp32
weights); the original recipe always runs in fp32, its only precision.  On
CUDA every timer reading waits for the queued kernels first (sync).
"""

from __future__ import annotations

import functools
import importlib
import random
import statistics
import sys
import time

import torch

import answer_loss
import common
import generation
import memory
import models
import training
from settings import TrainSettings

# --- The original recipe, as the original project ran it ----------------------
ORIGINAL_MAX_LENGTH = 128        # tokenizer(padding="max_length", truncation=True, max_length=128)
ORIGINAL_BATCH = 2               # per_device_train_batch_size=2
ORIGINAL_LR = 5e-5               # the Trainer's default, used for every method
ORIGINAL_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}  # alpha/dropout do not change speed
ORIGINAL_LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj"]}
ORIGINAL_NEW_TOKENS = 50         # generate(max_new_tokens=50), one question at a time

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
- **MFU** = counted FLOPs / measured step time / a matmul peak measured in the same run (the
  higher of the runs at the start and the end, so utilisation is not flattered): the fp32
  peak and the bf16 peak (2048x2048 products in that dtype) are both given, since a bf16
  autocast step runs its matrix multiplies in bf16 but the rest of the step in fp32.
- **Check**: on unpadded single examples this count agreed with
  torch.utils.flop_counter.FlopCounterMode within 1% for GPT-2 (full, LoRA, BitFit, both
  recipes) once attention is counted as the full square PyTorch computes; on a Llama model
  the linear layers agreed to 4 significant digits (FlopCounterMode counts neither its
  grouped-query attention kernel nor bitsandbytes' 4-bit matmul)."""

SCRIPTS = {"full": "finetune", "lora": "finetune_lora", "qlora": "finetune_qlora",
           "bitfit": "finetune_bitfit"}
SEED = 42


def median_spread(values: list[float]) -> dict:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def log(message: str) -> None:
    """Progress to stderr, so a worker's stdout carries only its JSON result."""
    print(message, file=sys.stderr, flush=True)


def device_of(config: dict):
    """The torch device a configuration runs on (the CPU unless it names another)."""
    return torch.device(config.get("device", "cpu"))


def sync(device) -> None:
    """Wait for the device's queued work, so a timer reading covers it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- set-up: this project's (each script's prepare) and the original's --------------


def settings_of(method: str) -> TrainSettings:
    """A method script's default settings, as its command line with no options gives them."""
    script = importlib.import_module(SCRIPTS[method])
    return TrainSettings.from_args(script.parse_args([]))


def evaluate_batch_size() -> int:
    """evaluate.py's default batch size."""
    import evaluate

    return evaluate.parse_args([]).batch_size


def family(model) -> str:
    """'gpt2' or 'llama': which naming the original's LoRA targets use."""
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def setup_ours(model_dir: str, method: str, device=None, precision: str = "fp32"):
    """Load a model and apply the method with its script's prepare(); returns (model, tokenizer, settings).

    precision is resolved ("fp32" or "bf16"): the 4-bit layers of QLoRA dequantise to it,
    as finetune_qlora.py loads them at that precision.
    """
    settings = settings_of(method)
    model, tokenizer, _ = models.load_model(model_dir, device or torch.device("cpu"),
                                            quantize_4bit=method == "qlora", precision=precision)
    model, _ = importlib.import_module(SCRIPTS[method]).prepare(model, settings)
    models.store_frozen_in_bf16(model, precision)  # as tuning.load_prepared does for a run
    return model, tokenizer, settings


def setup_original(model_dir: str, method: str, device=None):
    """Load and prepare a model as the original project did (fp32); returns (model, tokenizer, lr)."""
    from peft import LoraConfig, get_peft_model

    import finetune_bitfit

    model, tokenizer, _ = models.load_model(model_dir, device or torch.device("cpu"))
    if method == "full":
        model.requires_grad_(True)
    elif method == "bitfit":
        # Llama-style models have no biases; the original would have trained nothing.
        # Adding them (as finetune_bitfit.py does) keeps the cost comparison like for like.
        model, _ = finetune_bitfit.prepare(model, settings_of("bitfit"))
    else:  # lora; the original never quantised, so its "QLoRA" was this same recipe
        config = LoraConfig(**ORIGINAL_LORA, task_type="CAUSAL_LM",
                            target_modules=ORIGINAL_LORA_TARGETS[family(model)],
                            fan_in_fan_out=models.uses_conv1d(model))
        model = get_peft_model(model, config)
    return model, tokenizer, ORIGINAL_LR


# --- batches and loss of each recipe ---------------------------------------------


def ours_batches(tokenizer, rows, model, batch_size: int, warmup: int, steps: int):
    """(warm-up batches, timed batches) as lists of examples, from common's length-grouped epoch.

    Warm-up runs on the epoch's longest batch, so memory reaches its real peak
    (AdamW state present, longest activations).  Timed batches are evenly
    spaced quantiles of the epoch's batches by width, so a few steps carry the
    epoch's mix of lengths.
    """

    examples = common.tokenize_rows(tokenizer, rows, models.context_length(model),
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

    return {key: torch.tensor([ex[key] for ex in examples]) for key in examples[0]}


def loss_ours(answer_loss, batch: dict):
    """A training run's objective: answer-token NLL over the step's labelled tokens (for profiling)."""
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


# --- FLOP counting (see FLOPS_DOC) ------------------------------------


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
    from transformers.pytorch_utils import Conv1D

    lm = models.causal_lm(model)
    recorder = MatmulRecorder(lm.get_output_embeddings())
    handles = [module.register_forward_hook(functools.partial(recorder.hook, name))
               for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D))]
    # Frozen weights stored in bf16 (models.store_frozen_in_bf16) need the autocast of the run
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    device_type = next(model.parameters()).device.type
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
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


# --- memory accounting --------------------------------------------------------------


def tensor_bytes(obj) -> int:
    """Bytes of the tensors held by a bitsandbytes QuantState (absmax, code, nested state)."""

    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(obj, attr, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(obj, "state2", None)
    return total + (tensor_bytes(nested) if nested is not None else 0)


def memory_parts(model) -> dict:
    """Weights as stored, gradients and AdamW state, in bytes, from parameter counts and dtypes."""

    weights = grads = 0
    for param in model.parameters():  # tied weights come once
        weights += param.numel() * param.element_size()  # NF4: 2 weights per byte
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            weights += tensor_bytes(quant_state)
        if param.requires_grad:
            grads += param.numel() * param.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable, total = models.count_parameters(model)
    # AdamW keeps two moments (exp_avg, exp_avg_sq) in the parameter's dtype.
    return {"weights": weights, "gradients": grads, "adam_state": 2 * grads,
            "trainable_params": trainable, "total_params": total}


# --- the tasks ------------------------------------------------------------------------


def ours_trainer(model, method: str, settings: TrainSettings, total_steps: int, device,
                 precision: str):
    """training.Trainer for a model on the device at the precision, as training.train builds it."""
    accelerator = training.make_accelerator(device.type, precision)
    run = training.Run(method=method, settings=settings, accelerator=accelerator,
                       template={}, train_rows=[], valid_rows=[])
    return training.Trainer(run, model, total_steps)


class OriginalStep:
    """The original's optimiser step as a plain loop (its Trainer adds almost nothing per step):
    its own loss, backward, clipping at 1.0, AdamW, linear decay."""

    def __init__(self, model, lr: float, total_steps: int):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = training.linear_schedule(self.optimizer, total_steps, 0.0)

    def step(self, micro: list[dict]) -> dict:
        loss = loss_original(self.model, micro[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}


def prepared(config: dict):
    """(model, stepper, forward for profiling, warm-up batches, timed batches, collate) of a config."""
    recipe, method, device = config["recipe"], config["method"], device_of(config)
    rows = common.load_split(config["data_dir"], "train")
    compiled = config.get("compile", "off") != "off"
    # Compiling (and recording CUDA graphs) happens once per run, and per shape: a compiled
    # step's warm-up meets every timed batch once too, so the timed steps are steady ones.
    total_steps = (config["warmup"] + config["steps"] * config["repeats"]
                   + (config["steps"] if compiled else 0))
    if recipe == "ours":
        precision = models.resolve_precision(device, config.get("precision", "fp32"))
        model, tokenizer, settings = setup_ours(config["model_dir"], method, device, precision)
        warm, timed = ours_batches(tokenizer, rows, model, config["batch_size"],
                                   config["warmup"], config["steps"])
        warm = warm + (timed if compiled else [])
        settings = settings.replace(compile=config.get("compile", "off"))
        stepper = ours_trainer(model, method, settings, total_steps, device, precision)
        run = stepper.run  # the step's batch form: sync-free on CUDA or when compiled
        collate = functools.partial(training.step_batch, pad_id=tokenizer.pad_token_id,
                                    max_length=models.context_length(model),
                                    sync_free=run.sync_free, multiple=run.pad_multiple)
        forward = functools.partial(loss_ours, answer_loss.AnswerLoss(model))
    else:
        model, tokenizer, lr = setup_original(config["model_dir"], method, device)
        warm, timed = original_batches(tokenizer, rows, config["warmup"], config["steps"])
        collate, stepper = collate_original, OriginalStep(model, lr, total_steps)
        forward = functools.partial(loss_original, model)
    return model, stepper, forward, warm, timed, collate


def timed_step(stepper, examples, collate, device) -> tuple[float, dict, float]:
    """One optimiser step, timed from collating the batch to the zeroed gradients."""
    sync(device)
    started = time.perf_counter()
    batch = training.to_device(collate(examples), device)
    loss = stepper.step([batch])["loss"]
    sync(device)  # the optimiser's kernels may still be queued after the loss was read
    return time.perf_counter() - started, batch, loss


def task_train(config: dict, baseline: int) -> dict:
    """Warm up, then time `steps` optimiser steps `repeats` times for one recipe and method."""
    torch.manual_seed(SEED)
    device = device_of(config)
    model, stepper, forward, warm, timed, collate = prepared(config)
    # What this path computes, read off the model (before any timing)
    model.train()
    profile = profile_matmuls(model, forward, training.to_device(collate(timed[0][:1]), device))
    parts = memory_parts(model)
    memory.release_free_heap()
    loaded, loaded_split = memory.rss_bytes(), memory.rss_split()
    repeats = []
    with memory.PeakMemory(device) as peak:
        for examples in warm:
            seconds, _, loss = timed_step(stepper, examples, collate, device)
            log(f"    warm-up step: {seconds:.2f} s, loss {loss:.3f}")
        for r in range(config["repeats"]):
            steps = []
            for examples in timed:
                seconds, batch, loss = timed_step(stepper, examples, collate, device)
                seq_lens = batch["attention_mask"].sum(1).tolist()
                head_positions = lm_positions(config["recipe"], batch)
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
            "rss_split_loaded": loaded_split, "rss_split_end": memory.rss_split(),
            "profile": profile_summary(profile), "threads": torch.get_num_threads()}


class TensorPeak:
    """The peak of live tensor memory on one device: what torch's tensors need, not what the process holds.

    A dispatch mode sees every operation, forward and backward; each new storage
    counts until it is freed (a weak reference tells), on top of the tensors that
    exist when tracking starts.  (torch's MemTracker does this too, but its
    per-module hooks fail on frozen layers, whose outputs need no gradient.)
    """

    def __init__(self, existing, device_type: str = "cpu"):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in torch.utils._pytree.tree_leaves(out):
                    tracker.count(leaf)
                return out

        self.mode, self.seen, self.current, self.peak = Mode(), WeakIdKeyDictionary(), 0, 0
        self.device_type = device_type
        for tensor in existing:
            self.count(tensor)

    def count(self, tensor) -> None:
        """Add a tensor's storage, once, until it is freed."""
        import weakref

        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.free, size)

    def free(self, size: int) -> None:
        self.current -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def task_memory(config: dict, baseline: int) -> dict:
    """Peak memory of this project's step: what torch's tensors need, and the process's RSS.

    TensorPeak follows every tensor storage (weights, gradients, optimiser state,
    activations, temporaries); RSS adds the libraries, the allocator's slack and
    any memory-mapped file.  The warm-up steps run the epoch's longest batch (the
    first allocates AdamW's state).
    """
    torch.manual_seed(SEED)
    device = device_of(config)
    model, stepper, _, warm, timed, collate = prepared({**config, "recipe": "ours"})
    parts = memory_parts(model)
    model.train()
    existing = [*model.parameters(), *model.buffers()]
    with memory.PeakMemory(device) as peak, TensorPeak(existing, device.type) as tensors:
        for examples in warm + timed:
            seconds, _, loss = timed_step(stepper, examples, collate, device)
            log(f"    step: {seconds:.2f} s (tracked), loss {loss:.3f}")
    log(f"    tensor peak {tensors.peak / 1e6:.0f} MB, process peak {peak.peak_bytes / 1e6:.0f} MB")
    return {"config": config, "tensor_peak_bytes": tensors.peak, "peak_bytes": peak.peak_bytes,
            "baseline_bytes": baseline, "memory_parts": parts,
            "threads": torch.get_num_threads()}


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


def answers_original(model, tokenizer, prompts: list[str], device) -> list[str]:
    """The original evaluation: one question at a time, 50 new tokens, greedy, no stop string."""

    answers = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
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

    device = device_of(config)
    model, tokenizer, _ = models.load_model(config["model_dir"], device)
    model.eval()
    rows = common.load_split(config["data_dir"], "eval")
    prompts = [r["prompt"] for r in rows[:config["questions"]]]
    if config["recipe"] == "original":
        answer = functools.partial(answers_original, model, tokenizer, device=device)
        bound = ORIGINAL_NEW_TOKENS
    else:
        # As evaluate.py does: the bound from every eval reference, its batch size, its stop
        bound = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
        answer = functools.partial(generation.generate_answers, model, tokenizer,
                                   max_new_tokens=bound, device=device,
                                   stop=common.turn_marker(common.load_template(config["data_dir"])),
                                   batch_size=evaluate_batch_size(),
                                   precision=models.resolve_precision(
                                       device, config.get("precision", "fp32")))
    memory.release_free_heap()
    loaded = memory.rss_bytes()
    counter = ForwardCounter(model)
    repeats = []
    with memory.PeakMemory(device) as peak:
        started = time.perf_counter()
        answer(prompts[:1] if config["recipe"] == "original" else prompts[:8])
        sync(device)
        log(f"    warm-up: {time.perf_counter() - started:.2f} s")
        for r in range(config["repeats"]):
            counter.calls = 0
            started = time.perf_counter()
            answers = answer(prompts)
            sync(device)
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


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def task_matmul(config: dict, baseline: int) -> dict:
    """The matmul rate in config["dtype"] (fp32 or bf16): median over several n x n products after a warm-up."""

    n, device, name = config["size"], device_of(config), config.get("dtype", "fp32")
    dtype = MATMUL_DTYPES[name]
    torch.manual_seed(0)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    inner = config.get("inner", 1)  # products per reading: >1 on a GPU hides launch and sync
    times = []
    for _ in range(config["runs"]):
        sync(device)
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - started)
    rates = [2 * n ** 3 * inner / t for t in times]
    log(f"    {n}x{n} {name} matmul on {device.type}: median "
        f"{statistics.median(rates) / 1e9:.1f} GFLOP/s over {len(rates)} runs, "
        f"{torch.get_num_threads()} threads")
    return {"config": config, "flops_per_s": median_spread(rates),
            "threads": torch.get_num_threads()}
