"""The speed benchmark's numbers from its workers' results: rates, speed-ups, targets, bounds.

Pure functions over what bench_speed.py collects (label -> one worker's JSON
result), so results.md can be rebuilt from results.json and the arithmetic is
tested without timing anything.  Labels:
  matmul/<start|end>/<fp32|bf16>              the matmul peak of one dtype
  <model>/train/original/<method>             the original recipe (fp32, its only precision)
  <model>/train/<ours|trl>/<method>/<precision>
  <model>/train/previous/<method>             an earlier commit's worker, at fp32
  <model>/train/trl-defaults/full             TRL with its own defaults
  <model>/eval/<original|ours>, <model>/memory/<method>
"""

from __future__ import annotations

from workers import median_spread

METHODS = ("full", "lora", "qlora", "bitfit")
TRL_METHODS = ("full", "lora", "qlora")  # TRL's SFTTrainer has no BitFit
PRECISIONS = ("fp32", "bf16")

# --- The targets ----------------------------------------------------------
TARGET_TRAIN_SPEEDUP = 12.0      # against the original, each at its default precision
TARGET_TRAIN_METHODS = ("full", "lora")
TARGET_TRL_SPEEDUP = 2.0         # against TRL's SFTTrainer at its best, at the same precision
TARGET_EVAL_SPEEDUP = 25.0       # questions per second, on a fine-tuned model
TARGET_FULL_MFU = {"fp32": 0.60, "bf16": 0.50}  # full fine-tuning, of that precision's matmul peak
PREVIOUS_TOLERANCE = 0.97        # "not slower than the previous commit" within paired-repeat noise


def train_label(key: str, recipe: str, method: str, precision: str | None = None) -> str:
    """A training worker's label (the original and the previous commit have one precision)."""
    return f"{key}/train/{recipe}/{method}" + (f"/{precision}" if precision else "")


def peak_flops(workers: dict) -> dict[str, float]:
    """The matmul peak per dtype used for MFU: the higher of the start and end measurements."""
    peaks: dict[str, float] = {}
    for label, worker in workers.items():
        if label.startswith("matmul/") and "error" not in worker:
            dtype = worker["config"].get("dtype", "fp32")
            peaks[dtype] = max(peaks.get(dtype, 0.0), worker["flops_per_s"]["median"])
    return peaks


def repeat_rates(worker: dict, peaks: dict[str, float]) -> list[dict]:
    """Per-repeat s/100 examples, tokens/s, padding share and MFU against each peak."""
    return [{"s_per_100": r["s_per_100_examples"], "tokens_per_s": r["tokens_per_s"],
             "pad_share": 1 - r["real_tokens"] / r["padded_tokens"],
             **{f"mfu_{dtype}": r["flops"] / r["seconds"] / peak for dtype, peak in peaks.items()}}
            for r in worker["repeats"]]


def pair_ratios(numerators: list[float], denominators: list[float]) -> dict | None:
    """numerator/denominator per repeat pair (repeat i with repeat i), then median and spread."""
    pairs = [a / b for a, b in zip(numerators, denominators) if b]
    return median_spread(pairs) if pairs else None


def training_stats(worker: dict | None, peaks: dict[str, float]) -> dict | None:
    """Medians of one training worker's per-repeat rates, and its tokens/s per repeat."""
    if worker is None or "error" in worker or not worker.get("repeats"):
        return None
    rates = repeat_rates(worker, peaks)
    stats = {field: median_spread([r[field] for r in rates])
             for field in ("s_per_100", "tokens_per_s", "pad_share")}
    stats["mfu"] = {dtype: median_spread([r[f"mfu_{dtype}"] for r in rates]) for dtype in peaks}
    stats["peak_mb"] = worker["peak_bytes"] / 1e6
    stats["per_repeat_tokens_per_s"] = [r["tokens_per_s"] for r in rates]
    return stats


def speedup(ours: dict | None, other: dict | None) -> dict | None:
    """Ours' tokens/s over another recipe's, per repeat pair, when both were measured."""
    if not ours or not other:
        return None
    return pair_ratios(ours["per_repeat_tokens_per_s"], other["per_repeat_tokens_per_s"])


def summarise_training(workers: dict, key: str, methods: list[str], precisions: list[str],
                       default: str, peaks: dict[str, float]) -> dict:
    """Per method every recipe's rates and ours' speed-ups; plus TRL with its own defaults.

    Ours is compared with TRL at each precision, with the original recipe at each one's
    default precision (the original's is fp32, ours is `default`), and with the
    previous commit at fp32.
    """
    rows = []
    for method in methods:
        orig_method = "lora" if method == "qlora" else method  # the original never quantised
        row = {"method": method, "original_is": orig_method, "default_precision": default,
               "original": training_stats(workers.get(train_label(key, "original", orig_method)),
                                          peaks),
               "previous": training_stats(workers.get(train_label(key, "previous", method)),
                                          peaks),
               **{recipe: {p: training_stats(workers.get(train_label(key, recipe, method, p)),
                                             peaks) for p in precisions}
                  for recipe in ("ours", "ours-compiled", "trl")}}
        row["vs_trl"] = {p: speedup(row["ours"][p], row["trl"][p]) for p in precisions}
        row["compiled_vs_trl"] = {p: speedup(row["ours-compiled"][p], row["trl"][p])
                                  for p in precisions}
        row["vs_original"] = speedup(row["ours"].get(default), row["original"])
        row["vs_previous"] = speedup(row["ours"].get("fp32"), row["previous"])
        rows.append(row)
    defaults = None
    worker = workers.get(train_label(key, "trl-defaults", "full"))
    stats = training_stats(worker, peaks)
    if stats:
        full = next((r for r in rows if r["method"] == "full"), None)
        # TRL's defaults train in bf16 autocast: compare with ours at bf16 where measured
        ours_precision = "bf16" if full and full["ours"].get("bf16") else default
        ours = full["ours"].get(ours_precision) if full else None
        defaults = {"stats": stats, "settings_used": worker.get("settings_used", {}),
                    "finished_steps": worker.get("finished_steps"),
                    "stopped_early": worker.get("stopped_early"), "ours_precision": ours_precision,
                    "ours_over_it": ours["tokens_per_s"]["median"] / stats["tokens_per_s"]["median"]
                    if ours else None}
    return {"rows": rows, "trl_defaults": defaults}


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


def ours_mfu(row: dict | None, precision: str) -> float | None:
    """Ours' median MFU at a precision against that precision's matmul peak, when measured."""
    ours = (row or {}).get("ours", {}).get(precision)
    mfu = ours["mfu"].get(precision) if ours else None
    return mfu["median"] if mfu else None


def target_checks(summary: dict, main_key: str,
                  memory_key: str | None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets; met is None when not measured."""
    checks = []
    training = summary["training"].get(main_key, {"rows": []})
    rows = {r["method"]: r for r in training["rows"]}
    precisions = summary["precisions"]

    def check(label: str, ratio: dict | None, target: float) -> None:
        checks.append((label, f"{ratio['median']:.2f}x" if ratio else "not measured",
                       ratio["median"] >= target if ratio else None))

    for method in (m for m in TRL_METHODS if m in rows):  # the methods this run measured
        for precision in precisions:
            check(f"{method}: >= {TARGET_TRL_SPEEDUP:g}x TRL SFTTrainer (best settings) at "
                  f"{precision}, tokens/s", rows.get(method, {}).get("vs_trl", {}).get(precision),
                  TARGET_TRL_SPEEDUP)
    default = summary["default_precision"]
    for method in (m for m in TARGET_TRAIN_METHODS if m in rows):
        check(f"{method}: >= {TARGET_TRAIN_SPEEDUP:g}x the original's non-pad tokens per second "
              f"(ours at its default {default}, the original at its fp32)",
              rows.get(method, {}).get("vs_original"), TARGET_TRAIN_SPEEDUP)
    for method in METHODS:
        ratio = rows.get(method, {}).get("vs_previous")
        if ratio:
            checks.append((f"{method}: not slower than the previous commit (fp32)",
                           f"{ratio['median']:.2f}x", ratio["median"] >= PREVIOUS_TOLERANCE))
    for key, ev in summary["evaluation"].items():
        checks.append((f"evaluation on {key}: >= {TARGET_EVAL_SPEEDUP:g}x questions per second",
                       f"{ev['speedup']['median']:.1f}x" if ev else "not measured",
                       ev["speedup"]["median"] >= TARGET_EVAL_SPEEDUP if ev else None))
    for precision, target in TARGET_FULL_MFU.items():
        if precision not in precisions or "full" not in rows:
            continue
        mfu = ours_mfu(rows.get("full"), precision)
        checks.append((f"full fine-tuning at {precision}: MFU >= {target:.0%} of the {precision} "
                       "matmul peak", "not measured" if mfu is None else f"{mfu:.0%}",
                       None if mfu is None else mfu >= target))
    if memory_key is None:
        return checks  # the memory part was not run
    mem = {r["method"]: r for r in summary["memory"].get(memory_key, [])}
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


def missed_bounds(summary: dict, main_key: str | None) -> list[dict]:
    """For each missed speed-up target: the share of the matmul peak that meeting it would need.

    Our step's FLOPs are fixed by the model and batch, so reaching `target` times the
    other side needs our step's MFU scaled by target / measured ratio, against the peak
    of the precision our step ran at.
    """
    out = []
    for row in summary["training"].get(main_key or "", {"rows": []})["rows"]:
        against = [("trl", p, row["vs_trl"].get(p), TARGET_TRL_SPEEDUP) for p in summary["precisions"]
                   if row["method"] in TRL_METHODS]
        if row["method"] in TARGET_TRAIN_METHODS:
            against.append(("original", row["default_precision"], row.get("vs_original"),
                            TARGET_TRAIN_SPEEDUP))
        for other, precision, ratio, target in against:
            mfu = ours_mfu(row, precision)
            if ratio and mfu is not None and ratio["median"] < target:
                out.append({"method": row["method"], "against": other, "precision": precision,
                            "target": target, "ratio": ratio["median"], "mfu": mfu,
                            "need": mfu * target / ratio["median"]})
        if row["method"] != "full":
            continue
        for precision, target in TARGET_FULL_MFU.items():  # a share of the peak already
            mfu = ours_mfu(row, precision) if precision in summary["precisions"] else None
            if mfu is not None and mfu < target:
                out.append({"method": "full", "against": "peak", "precision": precision,
                            "target": target, "ratio": None, "mfu": mfu, "need": target})
    return out
