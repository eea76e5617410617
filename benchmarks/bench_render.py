"""benchmarks/results.md from the speed benchmark's report (bench_speed.py measures, this renders).

Everything shown is read from the report: the workers' measurements and
bench_summary's numbers computed from them.
"""

from __future__ import annotations

from bench_summary import TRL_METHODS, missed_bounds
from workers import FLOPS_DOC, ORIGINAL_BATCH, ORIGINAL_MAX_LENGTH, ORIGINAL_NEW_TOKENS


def fmt(stat: dict | None, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    """'median [min-max]' of a median_spread dict."""
    if not stat or stat["median"] != stat["median"]:  # missing, or NaN (no matmul peak)
        return "n/a"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    if stat["n"] == 1:
        return f"{med:{spec}}{unit}"
    return f"{med:{spec}}{unit} [{lo:{spec}}-{hi:{spec}}]"


def megabytes(value: float | None) -> str:
    """A table cell for an amount in MB, or n/a."""
    return "n/a" if value is None else f"{value:.0f}"


def tokens_cell(stats: dict | None) -> str:
    """A table cell for a run's non-pad tokens per second, or n/a."""
    return fmt((stats or {}).get("tokens_per_s"), ".0f")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def speed_table(training: dict, precisions: list[str]) -> list[str]:
    """Markdown: per method every recipe's non-pad tokens per second and ours' speed-ups."""
    rows = training["rows"]
    default = rows[0]["default_precision"] if rows else "fp32"
    with_previous = any(r["previous"] for r in rows)
    compiled = [p for p in precisions if any(r.get("ours-compiled", {}).get(p) for r in rows)]
    header = (["method", "original tok/s (fp32)"] + [f"TRL {p} tok/s" for p in precisions]
              + [f"ours {p} tok/s" for p in precisions]
              + [f"ours / TRL at {p}" for p in precisions]
              + [f"ours compiled {p} tok/s" for p in compiled]
              + [f"compiled / TRL at {p}" for p in compiled]
              + [f"ours ({default}) / original (fp32)"]
              + (["previous commit tok/s (fp32)", "ours / previous (fp32)"] if with_previous else []))
    out = []
    for row in rows:
        label = row["method"] + (" (original = its LoRA)" if row["original_is"] != row["method"]
                                 else "")
        cells = ([label, tokens_cell(row["original"])]
                 + [tokens_cell(row["trl"][p]) for p in precisions]
                 + [tokens_cell(row["ours"][p]) for p in precisions]
                 + [fmt(row["vs_trl"][p], ".2f", unit="x") for p in precisions]
                 + [tokens_cell(row.get("ours-compiled", {}).get(p)) for p in compiled]
                 + [fmt(row.get("compiled_vs_trl", {}).get(p), ".2f", unit="x") for p in compiled]
                 + [fmt(row["vs_original"], ".2f", unit="x")])
        if with_previous:
            cells += [tokens_cell(row["previous"]), fmt(row["vs_previous"], ".2f", unit="x")]
        out.append(cells)
    return table(header, out)


def utilisation_table(training: dict, precisions: list[str], peaks: dict[str, float]) -> list[str]:
    """Markdown: per method, recipe and precision the step's time, MFU against each peak, memory."""
    header = (["method", "recipe", "precision", "s/100 ex"]
              + [f"MFU of the {dtype} peak" for dtype in peaks] + ["peak MB", "padding"])
    out = []
    for row in training["rows"]:
        runs = [("original", "fp32", row["original"])]
        runs += [("TRL", p, row["trl"][p]) for p in precisions if row["method"] in TRL_METHODS]
        runs += [("ours", p, row["ours"][p]) for p in precisions]
        runs += [("ours compiled", p, row.get("ours-compiled", {}).get(p)) for p in precisions]
        for recipe, precision, stats in runs:
            if not stats:
                continue
            out.append([row["method"] if recipe == "original" else "", recipe, precision,
                        fmt(stats["s_per_100"])]
                       + [fmt(stats["mfu"].get(dtype), ".0f", 100, "%") for dtype in peaks]
                       + [megabytes(stats["peak_mb"]), fmt(stats["pad_share"], ".0f", 100, "%")])
    return table(header, out)


def trl_defaults_line(defaults: dict | None) -> list[str]:
    """One sentence on TRL with its own defaults, against ours."""
    if not defaults:
        return []
    used = defaults["settings_used"]
    shown = ", ".join(f"{k}={used[k]}" for k in ("bf16", "gradient_checkpointing",
                                                   "train_sampling_strategy", "optim") if k in used)
    ratio = defaults["ours_over_it"]
    return ["", f"TRL with its defaults (full fine-tuning; {shown}): "
                f"{fmt(defaults['stats']['tokens_per_s'], '.0f')} tok/s over "
                f"{defaults['stats']['tokens_per_s']['n']} timed step(s) after a warm-up"
                f"{' (stopped at the time limit)' if defaults['stopped_early'] else ''}; ours at "
                f"{defaults['ours_precision']} is "
                + ("n/a" if ratio is None else f"{ratio:.1f}x") + " that."]


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
    for b in missed_bounds(summary, main_key):
        if b["against"] == "peak":
            out.append(f"- {b['method']} at {b['precision']}: the target is {b['need']:.0%} of "
                       f"the measured {b['precision']} matmul peak; it runs at {b['mfu']:.0%}.")
            continue
        other = "TRL at the same precision" if b["against"] == "trl" else "the original"
        out.append(f"- {b['method']}: {b['target']:g}x {other} would need our {b['precision']} "
                   f"step at {b['need']:.0%} of the measured {b['precision']} matmul peak, doing "
                   f"the same arithmetic; it runs at {b['mfu']:.0%} ({b['ratio']:.2f}x now).")
    if not out:
        return []
    return ["", "### What bounds the missed training targets", "",
            "Our step's FLOPs are fixed by the model and batch (the same loss positions as TRL's); "
            "time is the only lever left:", "", *out, "",
            "Where the rest of our step's time goes: benchmarks/profile.md "
            "(python benchmarks/profile_step.py)."]


def peak_lines(report: dict) -> list[str]:
    """The matrix-multiply section: each dtype's peak at the start and end of the run."""
    s, peaks = report["settings"], report["summary"]["peak_flops"]
    if "training" not in s["parts"]:
        return [""]  # measured only for the training part's utilisation
    lines = ["", "## Matrix-multiply peak", ""]
    for dtype in s["precisions"]:
        runs = [f"{label.split('/')[1]} of run {fmt(w['flops_per_s'], '.1f', 1e-9, ' GFLOP/s')}"
                for label, w in report["workers"].items()
                if label.startswith("matmul/") and "error" not in w
                and w["config"].get("dtype", "fp32") == dtype]
        used = f" MFU against it uses {peaks[dtype] / 1e9:.1f} GFLOP/s." if dtype in peaks else ""
        per = " (each reading 50 products)" if s["device"] == "cuda" else ""
        lines.append(f"- {dtype} {s['matmul_size']}x{s['matmul_size']} matmul on "
                     f"{s['device']}{per}, median of {s['matmul_runs']}: "
                     + ("; ".join(runs) or "not measured") + "." + used)
    return lines + [""]


def compared_lines(s: dict) -> list[str]:
    """The 'What is compared' section."""
    return [
        "## What is compared", "",
        f"- Original: a plain loop equivalent to its Trainer run (the Trainer adds almost "
        f"nothing per step), in fp32 (its only precision): prompt + answer tokenised with "
        f"padding to {ORIGINAL_MAX_LENGTH} and truncation, batch {ORIGINAL_BATCH}, labels = a "
        "copy of input_ids with the pads left in (pad is EOS, as in the original), "
        "`model(**batch, labels=...).loss` over full-vocabulary logits, AdamW, clipping at 1.0, "
        "linear decay. LoRA r=8 on c_attn (q/k/v_proj on Llama). The original never quantised: "
        "its QLoRA row is its LoRA run. Its BitFit trains every *bias with the same recipe.",
        "- Ours: training.Trainer's step (collate to the longest, the answer-only loss with "
        f"the LM head at labelled positions only, AdamW, clipping at 1.0) at batch "
        f"{s['batch_size']} on length-grouped batches; each model prepared by its "
        "finetune_*.py script's own prepare(). Timed batches are evenly spaced quantiles "
        "(by width) of the epoch's batches; warm-up runs the longest batch. At each of "
        f"{', '.join(s['precisions'])}: bf16 is accelerate's bf16 autocast over fp32 weights "
        "(models.autocast_dtype; QLoRA's 4-bit layers dequantise to bf16), as "
        f"--precision bf16 trains; the default (--precision auto) is {s['default_precision']} "
        "here, so that is what the original is compared with.",
        "- Previous commit (with --compare-ref): the same worker of that commit, run from a "
        "checkout of it on the same model, rows and batches, alternating with ours, at fp32.",
        "- TRL: trl.SFTTrainer (trl_runs.py) on the same model, prepared by the same "
        "prepare(), the same rows and batch size, at its best settings at each precision: "
        "bf16=True (with use_cpu=True on a CPU: the same accelerate autocast as ours) or fp32, "
        "no gradient checkpointing, completion-only loss, length-grouped batches; its own "
        "sampler picks the batches, so tokens per second is compared. Its QLoRA is the same "
        "NF4 model with the same adapters, kept in fp32 as ours.",
        "- Evaluation: the same questions; the original generates greedily one question at "
        f"a time in fp32, always {ORIGINAL_NEW_TOKENS} new tokens (min_new_tokens = "
        "max_new_tokens, as its free-running decoding did); ours is "
        "generation.generate_answers at evaluate.py's default precision "
        f"({s['default_precision']} here), batch size, stop string and "
        "generation.max_new_tokens_for bound over all eval references; each answer leaves the "
        "batch when it ends. A model with random weights never stops early, and an untuned "
        "model often rambles to the bound, so there the speed-up comes from batching and "
        "the bound; a fine-tuned model (--eval-model) stops after its answer.",
        "- Peak memory is the process's resident set (sampled every 10 ms by "
        "memory.PeakMemory; on CUDA torch's max_memory_allocated) over warm-up and timed "
        "steps; freed heap is returned to the OS after loading. The baseline is measured "
        "after importing torch, transformers, peft and bitsandbytes, before the model loads.", "",
        "## How FLOPs are counted", "", FLOPS_DOC, ""]


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
             *([f"- GPU: {hw['gpu']}"] if hw.get("gpu") else []),
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items()),
             f"- Data: {report['data']}",
             f"- Device {s['device']}; precisions {', '.join(s['precisions'])} (the default, "
             f"--precision auto, is {s['default_precision']} here); parts: {', '.join(s['parts'])}",
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
    lines += peak_lines(report)
    for key, training in summary["training"].items():
        lines += [f"## Training: {key}", "", *speed_table(training, s["precisions"]), "",
                  "Per run: seconds per 100 examples, model-FLOP utilisation against each "
                  "measured matmul peak, peak memory, and the share of computed token positions "
                  "that are padding.", "",
                  *utilisation_table(training, s["precisions"], summary["peak_flops"]),
                  *trl_defaults_line(training["trl_defaults"]), ""]
    for key, ev in summary["evaluation"].items():
        lines += [f"## Evaluation: {key}", ""] + (eval_table(ev) if ev else ["not measured"]) + [""]
    for key, rows in summary["memory"].items():
        warmup = rows[0]["warmup"] if rows else 0
        lines += [f"## Memory: {key}, this project's recipe at its default precision "
                  f"({s['default_precision']}), the same batches", "",
                  f"Batch {s['batch_size']}; the peak covers {warmup} warm-up step(s) on the "
                  "epoch's longest batch (the first allocates AdamW's state) and one more step.", ""]
        lines += memory_table(rows) + [""]
    lines += compared_lines(s)
    failed = [k for k, w in report["workers"].items() if "error" in w]
    if failed:
        lines += ["## Failed configurations", ""] + [f"- {k}" for k in failed] + [""]
    return "\n".join(lines)

