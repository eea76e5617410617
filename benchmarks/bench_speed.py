"""Speed and memory: this project against the original recipe, TRL's SFTTrainer and an earlier commit, in one run.

    python benchmarks/bench_speed.py                  # about 25 minutes on 2 idle cores
    python benchmarks/bench_speed.py --quick          # tiny sizes: checks that everything runs
    python benchmarks/bench_speed.py --compare-ref HEAD~1        # also the previous commit's step
    python benchmarks/bench_speed.py --data-dir data --eval-model outputs/full   # a tuned model's eval
    python benchmarks/bench_speed.py --smollm2        # plus training speed on smollm2-135m

Each configuration runs in its own Python process (workers.py), so that one's
peak memory and warm caches never pollute another's:
  training   the original recipe (Trainer-equivalent loop, every example padded
             to 128 tokens, batch 2, labels = input ids, logits over the whole
             vocabulary everywhere), this project's (training.Trainer's step,
             batch 16 padded to its longest, length-grouped batches, the LM head
             at answer positions only; each model prepared by its script's
             prepare()), TRL's SFTTrainer at its best CPU settings and with its
             defaults (trl_runs.py; pip install --no-deps -r
             benchmarks/requirements.txt), and with --compare-ref the same worker
             of an earlier commit: non-pad tokens per second, seconds per 100
             examples, model-FLOP utilisation, peak memory;
  evaluation the original's one question at a time with 50 free-running new
             tokens against generation.generate_answers (batched, stopping):
             questions per second, peak memory, on the distilgpt2-shaped model and
             on smollm2-135m untuned, or on a fine-tuned model (--eval-model);
  peak       the fp32 matrix-multiply rate of this machine (2048x2048, median);
  memory     this project's full / LoRA / QLoRA / BitFit on smollm2-135m with the
             same batches: the process's peak beside what torch's tensors needed
             (MemTracker), by kind.
The training comparison uses a distilgpt2-shaped model with random weights (the
arithmetic is the same as distilgpt2's) and the smollm2-135m tokenizer, so token
lengths are realistic.  Every configuration is warmed up, then timed --repeats
times; tables give medians with [min-max], and ratios are computed per repeat
pair, then the median taken.  Writes benchmarks/results.md and results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers import (FLOPS_DOC, ORIGINAL_BATCH, ORIGINAL_MAX_LENGTH,  # noqa: E402
                     ORIGINAL_NEW_TOKENS, log, median_spread, worker_main)

# --- The models -----------------------------------------------------------------
# distilgpt2's shape (82 M parameters); random weights cost the same arithmetic.
DISTILGPT2_SHAPE = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024,
                    "vocab_size": 50257}
QUICK_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024, "vocab_size": 50257}
TOKENIZER_PRESET = "smollm2-135m"  # realistic token lengths; its ids are all < 50257
METHODS = ("full", "lora", "qlora", "bitfit")

TRL_METHODS = ("full", "lora", "qlora")  # TRL's SFTTrainer has no BitFit

# --- The issue's targets ----------------------------------------------------------
TARGET_TRAIN_SPEEDUP = 10.0      # full and LoRA against the original, non-pad tokens per second
TARGET_TRL_SPEEDUP = 3.0         # full, LoRA, QLoRA against TRL's SFTTrainer at its best on a CPU
TARGET_EVAL_SPEEDUP = 25.0       # questions per second, on a fine-tuned model
TARGET_FULL_MFU = 0.60           # of the measured fp32 matmul peak


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
    import models

    hf_logging.disable_progress_bar()
    tokenizer = models.load_tokenizer(models.resolve_model(TOKENIZER_PRESET))
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
    shared = {"batch_size": args.batch_size, "threads": args.threads,
              "eval_repeats": 1 if args.quick else args.eval_repeats,
              "trl": args.trl and trl_available(), "trl_defaults_limit": args.trl_defaults_limit}
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
              "questions": s["questions"], "repeats": s["eval_repeats"],
              "threads": s["threads"]})
            for recipe in ("original", "ours")]


def trl_available() -> bool:
    """Whether TRL is installed (pip install --no-deps -r benchmarks/requirements.txt)."""
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def build_plan(s: dict, methods: list[str], models: dict[str, str], data_dir: str,
               real: tuple[str, str] | None, tuned: tuple[str, str] | None,
               previous: str | None = None) -> list[tuple[str, dict]]:
    """The workers to run, in order: (label, config).  The recipes alternate per method.

    models get the whole comparison (the original recipe, ours, the previous
    commit's code when given, TRL); real the memory table (and an evaluation
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
            ours = {**base, "recipe": "ours", "method": method, "steps": s["steps"],
                    "batch_size": s["batch_size"]}
            plan.append((f"{key}/train/ours/{method}", ours))
            if previous:  # the same worker of the previous commit, from its own checkout
                plan.append((f"{key}/train/previous/{method}", {**ours, "root": previous}))
            if s["trl"] and method in TRL_METHODS:
                plan.append((f"{key}/train/trl/{method}", {**ours, "task": "trl", "preset": "best"}))
        if s["trl"] and "full" in methods:  # what a newcomer gets: one capped run
            plan.append((f"{key}/train/trl-defaults/full",
                         {**base, "task": "trl", "preset": "defaults", "method": "full",
                          "warmup": 1, "steps": 1, "repeats": 1, "batch_size": s["batch_size"],
                          "time_limit_s": s["trl_defaults_limit"]}))
        plan += eval_configs(s, key, model_dir, data_dir)
    if real is not None:
        # Memory: the longest batch twice (AdamW state, then the real peak), one more step
        key, model_dir = real
        memory = {"task": "memory", "model_dir": model_dir, "data_dir": data_dir, "steps": 1,
                  "repeats": 1, "warmup": 2, "batch_size": s["batch_size"],
                  "threads": s["threads"]}
        for method in methods:
            plan.append((f"{key}/memory/{method}", {**memory, "method": method}))
        if tuned is None and key not in models:  # a pretrained model's answers stop sometimes
            plan += eval_configs(s, key, model_dir, data_dir)
    if tuned is not None:  # a fine-tuned model stops after its answer, as in evaluate.py
        plan += eval_configs(s, *tuned, data_dir)
    if s["matmul_end"]:
        plan.append(("matmul/end", matmul))
    return plan


def checkout(rev: str, folder: Path) -> Path:
    """A detached git worktree of rev (removed again at the end of the run)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), rev], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def run_worker(label: str, config: dict, index: int, count: int) -> dict:
    """Run one configuration in a fresh Python process; its JSON result, or an error record."""
    log(f"[{index}/{count}] {label}")
    started = time.perf_counter()
    root = Path(config.get("root", ROOT))  # another commit's checkout runs its own worker
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_speed.py"), "--worker",
                           json.dumps(config)], cwd=root, stdout=subprocess.PIPE, text=True)
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


def training_stats(worker: dict | None, peak: float) -> dict | None:
    """Medians of one training worker's per-repeat rates, and the rates themselves."""
    if worker is None or "error" in worker or not worker.get("repeats"):
        return None
    rates = repeat_rates(worker, peak)
    stats = {field: median_spread([r[field] for r in rates])
             for field in ("s_per_100", "tokens_per_s", "mfu", "pad_share")}
    stats["peak_mb"] = worker["peak_bytes"] / 1e6
    stats["per_repeat_tokens_per_s"] = [r["tokens_per_s"] for r in rates]
    return stats


def summarise_training(workers: dict, key: str, methods: list[str], peak: float) -> list[dict]:
    """One row per method: every recipe's rates and ours' speed-up over each, per repeat pair."""
    rows = []
    for method in methods:
        orig_method = "lora" if method == "qlora" else method
        row = {"method": method, "original_is": orig_method,
               "original": training_stats(workers.get(f"{key}/train/original/{orig_method}"), peak)}
        for recipe in ("ours", "previous", "trl"):
            row[recipe] = training_stats(workers.get(f"{key}/train/{recipe}/{method}"), peak)
        for other in ("original", "previous", "trl"):
            if row["ours"] and row[other]:
                row[f"vs_{other}"] = pair_ratios(row["ours"]["per_repeat_tokens_per_s"],
                                                 row[other]["per_repeat_tokens_per_s"])
        rows.append(row)
    defaults = training_stats(workers.get(f"{key}/train/trl-defaults/full"), peak)
    if defaults:
        worker = workers[f"{key}/train/trl-defaults/full"]
        rows.append({"method": "full", "trl_defaults": defaults,
                     "settings_used": worker.get("settings_used", {}),
                     "finished_steps": worker.get("finished_steps"),
                     "stopped_early": worker.get("stopped_early")})
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
    """Per method: the process's peak (RSS) and what torch's tensors needed at their peak, by kind."""
    rows = []
    for method in methods:
        worker = workers.get(f"{key}/memory/{method}")
        if not worker or "error" in worker:
            continue
        parts, tensor_peak = worker["memory_parts"], worker["tensor_peak_bytes"]
        fixed = {"weights": parts["weights"], "gradients": parts["gradients"],
                 "adam_state": parts["adam_state"]}
        rows.append({"method": method, "peak_mb": worker["peak_bytes"] / 1e6,
                     "baseline_mb": worker["baseline_bytes"] / 1e6,
                     "above_mb": (worker["peak_bytes"] - worker["baseline_bytes"]) / 1e6,
                     "tensor_mb": {"total": tensor_peak / 1e6,
                                   **{k: v / 1e6 for k, v in fixed.items()},
                                   "rest": (tensor_peak - sum(fixed.values())) / 1e6},
                     "total_params": parts["total_params"],
                     "trainable_params": parts["trainable_params"],
                     "weights_mb": parts["weights"] / 1e6,
                     "warmup": worker["config"]["warmup"]})
    return rows


def target_checks(summary: dict, main_key: str, memory_key: str | None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets."""
    checks = []
    rows = {r["method"]: r for r in summary["training"].get(main_key, []) if "ours" in r}

    def check(label: str, ratio: dict | None, target: float) -> None:
        checks.append((label, f"{ratio['median']:.2f}x" if ratio else "not measured",
                       ratio["median"] >= target if ratio else None))

    for method in ("full", "lora"):
        check(f"{method}: >= {TARGET_TRAIN_SPEEDUP:g}x the original's non-pad tokens per second",
              rows.get(method, {}).get("vs_original"), TARGET_TRAIN_SPEEDUP)
    for method in TRL_METHODS:
        check(f"{method}: >= {TARGET_TRL_SPEEDUP:g}x TRL SFTTrainer (best CPU settings), tokens/s",
              rows.get(method, {}).get("vs_trl"), TARGET_TRL_SPEEDUP)
    for method in METHODS:
        ratio = rows.get(method, {}).get("vs_previous")
        if ratio:
            checks.append((f"{method}: not slower than the previous commit", f"{ratio['median']:.2f}x",
                           ratio["median"] >= 0.97))  # within 3%: the noise of paired repeats
    for key, ev in summary["evaluation"].items():
        checks.append((f"evaluation on {key}: >= {TARGET_EVAL_SPEEDUP:g}x questions per second",
                       f"{ev['speedup']['median']:.1f}x" if ev else "not measured",
                       ev["speedup"]["median"] >= TARGET_EVAL_SPEEDUP if ev else None))
    full = rows.get("full", {}).get("ours")
    mfu = full["mfu"]["median"] if full else float("nan")
    checks.append((f"full fine-tuning: MFU >= {TARGET_FULL_MFU:.0%} of the matmul peak",
                   f"{mfu:.0%}" if mfu == mfu else "not measured",
                   mfu >= TARGET_FULL_MFU if mfu == mfu else None))
    mem = {r["method"]: r for r in summary["memory"].get(memory_key or "", [])}
    if {"full", "lora", "qlora"} <= mem.keys():
        rss = {m: mem[m]["peak_mb"] for m in mem}
        tensor = {m: mem[m]["tensor_mb"].get("total", float("nan")) for m in mem}
        for name, values in (("process RSS", rss), ("torch tensors", tensor)):
            checks.append((f"memory on {memory_key} ({name}): QLoRA < LoRA < full",
                           f"{values['qlora']:.0f} < {values['lora']:.0f} < {values['full']:.0f} MB",
                           values["qlora"] < values["lora"] < values["full"]))
    else:
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
    """Markdown: per method, every recipe's non-pad tokens per second and ours' speed-ups."""
    out = ["| method | original tok/s | TRL tok/s | previous commit tok/s | ours tok/s | "
           "ours / original | ours / TRL | ours / previous | ours s/100 ex | ours MFU | "
           "ours peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "ours" not in row:
            continue
        o, t, p, u = (row[k] or {} for k in ("original", "trl", "previous", "ours"))
        label = row["method"] + (" (original = its LoRA)" if row["original_is"] != row["method"] else "")
        out.append(f"| {label} | {fmt(o.get('tokens_per_s'), '.0f')} | "
                   f"{fmt(t.get('tokens_per_s'), '.0f')} | {fmt(p.get('tokens_per_s'), '.0f')} | "
                   f"{fmt(u.get('tokens_per_s'), '.0f')} | "
                   + " | ".join(fmt(row.get(f"vs_{k}"), ".2f", unit="x")
                                for k in ("original", "trl", "previous"))
                   + f" | {fmt(u.get('s_per_100'))} | {fmt(u.get('mfu'), '.0f', 100, '%')} | "
                   f"{megabytes(u.get('peak_mb'))} |")
    pads = [(r["method"], *(r[k]["pad_share"]["median"] if r.get(k) else None
                            for k in ("original", "trl", "ours")))
            for r in rows if "ours" in r]
    out += ["", "Share of computed token positions that are padding (original / TRL / ours): "
            + "; ".join(f"{m} " + " / ".join("n/a" if v is None else f"{v:.0%}" for v in vals)
                        for m, *vals in pads) + "."]
    for row in rows:
        if "trl_defaults" in row:
            d, used = row["trl_defaults"], row["settings_used"]
            ours = next((r["ours"] for r in rows if r.get("ours") and r["method"] == "full"), None)
            ratio = (ours["tokens_per_s"]["median"] / d["tokens_per_s"]["median"]
                     if ours else float("nan"))
            shown = ", ".join(f"{k}={used[k]}" for k in ("bf16", "gradient_checkpointing",
                                                           "train_sampling_strategy", "optim")
                              if k in used)
            out += ["", f"TRL with its defaults (full fine-tuning; {shown}): "
                        f"{fmt(d['tokens_per_s'], '.0f')} tok/s over {row['finished_steps']} timed "
                        f"step(s){' (stopped at the time limit)' if row['stopped_early'] else ''}; "
                        f"ours is {ratio:.1f}x that."]
    return out


def eval_table(ev: dict) -> list[str]:
    """Markdown: questions per second of both evaluation paths."""
    o, u = ev["original"], ev["ours"]
    return ["| path | questions/s | new-token bound | forward passes per question | peak MB |",
            "|---|---|---|---|---|",
            f"| original: one at a time, {ORIGINAL_NEW_TOKENS} free-running tokens | "
            f"{fmt(o['questions_per_s'], '.2f')} | {o['max_new_tokens']} | "
            f"{o['forward_passes_per_question']:.1f} | {o['peak_mb']:.0f} |",
            f"| ours: generation.generate_answers, batched, stopping | "
            f"{fmt(u['questions_per_s'], '.2f')} | {u['max_new_tokens']} | "
            f"{u['forward_passes_per_question']:.2f} | {u['peak_mb']:.0f} |",
            "", f"Speed-up (questions/s, per repeat pair): **{fmt(ev['speedup'], '.1f', unit='x')}** "
                f"on the same {ev['questions']} questions."]


def memory_table(rows: list[dict]) -> list[str]:
    """Markdown: the process peak beside what torch's tensors needed at their peak."""
    out = ["| method | process peak MB (RSS) | above baseline MB | torch tensors at peak MB | "
           "weights MB | gradients MB | AdamW state MB | rest MB (activations, temporaries) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tensor_mb"]
        out.append(f"| {r['method']} | {r['peak_mb']:.0f} | {r['above_mb']:.0f} | "
                   f"{t['total']:.0f} | {t['weights']:.0f} | {t['gradients']:.0f} | "
                   f"{t['adam_state']:.0f} | {t['rest']:.0f} |")
    if rows:
        out += ["", f"Process baseline (libraries imported, no model): {rows[0]['baseline_mb']:.0f} MB. "
                f"Parameters: {rows[0]['total_params']:,} (4-bit weights counted unpacked). "
                "The tensor peak follows every tensor storage through torch's dispatcher "
                "(workers.TensorPeak). Weights (as stored: NF4 packs two per byte), gradients "
                "and AdamW's two moments are computed from the parameters; the rest is "
                "activations kept for the backward pass and temporaries at the peak, "
                "including gradients not yet freed."]
    return out


def contention_warning(hw: dict) -> list[str]:
    """A warning line when other work was running: shared cores make timings meaningless."""
    busy = max(hw["cpu_busy_start"], hw["cpu_busy_end"])
    if busy < 0.2:
        return []
    return ["", f"**Warning: other work kept {busy:.0%} of the CPU busy before or after this run "
                "(sampled while none of it ran); the timings are unreliable.**"]


def bounds(summary: dict, main_key: str | None) -> list[str]:
    """For each missed speed-up target: the share of the matmul peak that meeting it would need."""
    out = []
    for row in summary["training"].get(main_key or "", []):
        ours = row.get("ours")
        if not ours or ours["mfu"]["median"] != ours["mfu"]["median"]:
            continue
        mfu = ours["mfu"]["median"]
        for other, target in (("original", TARGET_TRAIN_SPEEDUP), ("trl", TARGET_TRL_SPEEDUP)):
            ratio = row.get(f"vs_{other}")
            if ratio and ratio["median"] < target:
                need = mfu * target / ratio["median"]
                out.append(f"- {row['method']}: {target:g}x {'TRL' if other == 'trl' else 'the original'} "
                           f"would need our step at {need:.0%} of the measured fp32 matmul peak, "
                           f"doing the same arithmetic; it runs at {mfu:.0%}.")
    if not out:
        return []
    return ["", "### What bounds the missed training targets", "",
            "Our step's FLOPs are fixed by the model and batch (the same loss positions as TRL's); "
            "time is the only lever left:", "", *out, "",
            "Where the rest of our step's time goes: benchmarks/profile.md "
            "(python benchmarks/profile_step.py)."]


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
             f"after {s['warmup']} warm-up steps; {s['questions']} evaluation questions, "
             f"{s['eval_repeats']} timed repeats; "
             f"torch threads {s['threads'] or 'default'}.",
             *contention_warning(hw),
             *([f"- Previous commit: {report['previous']}"] if report.get("previous") else []),
             "", "Values are medians with [min-max] over repeats; speed-ups are computed per "
                 "repeat pair (repeat i of each recipe), then the median taken.", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in summary["targets"]:
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no' if met is False else 'n/a'} |")
    lines += bounds(summary, report.get("main_key"))
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
                  "epoch's longest batch (the first allocates AdamW's state) and one more step.", ""]
        lines += memory_table(rows) + [""]
    lines += ["## What is compared", "",
              f"- Original: a plain loop equivalent to its Trainer run (the Trainer adds almost "
              f"nothing per step): prompt + answer tokenised with padding to {ORIGINAL_MAX_LENGTH} "
              f"and truncation, batch {ORIGINAL_BATCH}, labels = a copy of input_ids with the "
              "pads left in (pad is EOS, as in the original), `model(**batch, labels=...).loss` "
              "over full-vocabulary logits, AdamW, clipping at 1.0, linear decay. LoRA r=8 on "
              "c_attn (q/k/v_proj on Llama). The original never quantised: its QLoRA row is its "
              "LoRA run. Its BitFit trains every *bias with the same recipe.",
              "- Ours: training.Trainer's step (collate to the longest, the answer-only loss with "
              f"the LM head at labelled positions only, AdamW, clipping at 1.0) at batch "
              f"{s['batch_size']} on length-grouped batches; each model prepared by its "
              "finetune_*.py script's own prepare(). Timed batches are evenly spaced quantiles "
              "(by width) of the epoch's batches; warm-up runs the longest batch.",
              "- Previous commit (with --compare-ref): the same worker of that commit, run from a "
              "checkout of it on the same model, rows and batches, alternating with ours.",
              "- TRL: trl.SFTTrainer (trl_runs.py) on the same model, prepared by the same "
              "prepare(), the same rows and batch size, at its best CPU settings: fp32, no "
              "gradient checkpointing, completion-only loss, length-grouped batches; its own "
              "sampler picks the batches, so tokens per second is compared. Its QLoRA is the same "
              "NF4 model with the same adapters.",
              "- Evaluation: the same questions; the original generates greedily one question at "
              f"a time, always {ORIGINAL_NEW_TOKENS} new tokens (min_new_tokens = max_new_tokens, "
              "as its free-running decoding did); ours is "
              "generation.generate_answers with evaluate.py's batch size, stop string and "
              "generation.max_new_tokens_for bound over all eval references; each answer leaves the "
              "batch when it ends. A model with random weights never stops early, and an untuned "
              "model often rambles to the bound, so there the speed-up comes from batching and "
              "the bound; a fine-tuned model (--eval-model) stops after its answer.",
              "- Peak memory is the process's resident set (sampled every 10 ms by "
              "memory.PeakMemory) over warm-up and timed steps; freed heap is returned to the "
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
    add("--eval-questions", type=int, default=64,
        help="questions both evaluation paths answer (default 64: one batch of evaluate.py's)")
    add("--eval-repeats", type=int, default=2,
        help="timed repeats of each evaluation (default 2: the original answers one question "
             "in 2-4 s, so each repeat of it takes minutes)")
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
    add("--compare-ref", default=None, metavar="REV",
        help="also time the training step of this git commit (e.g. HEAD~1), checked out in a "
             "temporary worktree, side by side with this one")
    add("--no-trl", dest="trl", action="store_false",
        help="skip TRL's SFTTrainer (it runs when installed: "
             "pip install --no-deps -r benchmarks/requirements.txt)")
    add("--trl-defaults-limit", type=int, default=300,
        help="seconds allowed to TRL with its defaults (default 300; on a CPU it is very slow)")
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
                 "eval_repeats", "threads"):
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
    import models

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
        train_models = {main_key: str(build_gpt2_shaped(tmp / "model", s["shape"]))}
        if args.smollm2:
            train_models["smollm2-135m"] = models.resolve_model("smollm2-135m")
        tuned = None
        if args.eval_model:
            tuned = (f"tuned-{Path(args.eval_model).name}", str(Path(args.eval_model).resolve()))
        real = None
        if s["real_model"] is None:
            real = (main_key, train_models[main_key])
        elif s["real_model"] != "none":
            try:
                real = (Path(s["real_model"]).name, models.resolve_model(s["real_model"]))
            except common.PipelineError as exc:  # the rest of the benchmark still stands
                log(f"skipping the memory table on {s['real_model']}: {exc}")

        previous = None
        if args.compare_ref:
            previous = checkout(args.compare_ref, tmp / "previous")
            report["previous"] = f"{args.compare_ref} = " + subprocess.run(
                ["git", "log", "-1", "--format=%h %s", args.compare_ref], cwd=ROOT,
                capture_output=True, text=True, check=True).stdout.strip()
        if not s["trl"] and args.trl:
            log("TRL is not installed: pip install --no-deps -r benchmarks/requirements.txt")

        # Every configuration in its own process
        plan = build_plan(s, args.methods, train_models, str(data_dir), real, tuned,
                          str(previous) if previous else None)
        workers = {}
        for i, (label, config) in enumerate(plan, start=1):
            workers[label] = run_worker(label, config, i, len(plan))
            log(f"    elapsed {(time.time() - started) / 60:.1f} min")

        if previous:
            subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT,
                           check=False)

    # Summary and report
    report["hardware"]["cpu_busy_end"] = cpu_busy()
    report["workers"] = workers
    peak = peak_flops(workers)
    memory_key = real[0] if real else None
    eval_keys = [k for k in (*train_models, memory_key, tuned[0] if tuned else None)
                 if k and any(label.startswith(f"{k}/eval/") for label in workers)]
    eval_keys = list(dict.fromkeys(eval_keys))
    summary = {"peak_flops": peak,
               "training": {k: summarise_training(workers, k, args.methods, peak)
                            for k in train_models},
               "evaluation": {k: summarise_eval(workers, k) for k in eval_keys},
               "memory": {memory_key: summarise_memory(workers, memory_key, args.methods)}
               if memory_key else {}}
    summary["targets"] = target_checks(summary, main_key, memory_key)
    report["summary"], report["wall_s"] = summary, time.time() - started
    report["main_key"] = main_key
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
