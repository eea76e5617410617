"""Evaluate the untuned base model and every fine-tuned method on held-out questions.

    python evaluate.py                        # score what changed; compare every finished method
    python evaluate.py --methods lora         # re-score only LoRA (if it changed)
    python evaluate.py --force                # re-score everything
    python evaluate.py --limit 50             # a quick look at 50 questions

The everyday loop: edit finetune_lora.py, run it, run evaluate.py.  Each
run's predictions are kept with a fingerprint of what produced them (its
weights and metrics, the eval rows, the template, the decoding settings and
the scoring code's version); only runs whose fingerprint changed are scored
again, and the comparison is rebuilt from every finished method plus base.

Every model gets the same data (data/eval.jsonl), the same greedy decoding
(batched, stopping at EOS or at a new user turn, new tokens bounded by the
longest reference) and the same metrics:
  answer perplexity  exp of the mean loss over the answer's own tokens; the EOS
                     token is not scored (the untuned base was never taught it);
  exact match        prediction == reference after normalisation;
  key accuracy       the key (the short answer) appears as whole words in the
                     prediction, not merely inside an echo of the question;
  token F1           overlap of normalised answer tokens (SQuAD's F1).
QLoRA is evaluated as it was trained: its adapter on the 4-bit NF4 base.

A method trained with several seeds (outputs/<method>/ plus
outputs/<method>-seed<N>/, made by --seeds) is reported as the mean over its
seeds, with 95% intervals over questions and seeds; every pair of methods, and
each method against the base, is compared with a paired test (see verdict.py).

Writes outputs/<run>/predictions.jsonl (outputs/base/ for the untuned model),
outputs/comparison.{csv,md,json}, outputs/comparison.png,
outputs/quality_vs_cost.png, outputs/lr_search.png (when --tune-lr ran),
outputs/report.html (everything on one page that opens from disk), and prints
a recommendation computed from the paired tests.
"""

import argparse
import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import torch

import answer_loss
import common
import generation
import models
import runpaths
import settings
import report
import verdict
from report import fmt

METHODS = ("full", "lora", "qlora", "bitfit")  # the order of every table and plot
COLOURS = {"base": "#7f7f7f", "full": "#1f77b4", "lora": "#2ca02c", "qlora": "#9467bd",
           "bitfit": "#ff7f0e"}
QUALITY = ("answer_perplexity", "exact_match", "key_accuracy", "token_f1")
MEASURES = (("answer_perplexity", "answer perplexity (lower is better)"),
            ("exact_match", "exact match %"), ("key_accuracy", "key-answer accuracy %"),
            ("token_f1", "token F1 %"), ("train_seconds", "training time (s)"),
            ("train_tokens_per_s", "training tokens/s"), ("peak_memory_mb", "peak memory (MB)"),
            ("trainable_params", "trainable parameters"))
COST_FIELDS = ("train_loss", "train_seconds", "train_tokens_per_s", "peak_memory_mb",
               "trainable_params", "trainable_percent", "size_on_disk_mb")
# Bump when scoring, decoding or metric code changes what a run's predictions hold: every
# saved prediction file then counts as stale and is scored again.
SCORING_VERSION = "2026-12-04.1"
# Taken from the first seed's run: the same for every seed, or (peak memory) measured in a
# process that had loaded nothing before it but the discarded learning-rate search models.
SAME_FOR_EVERY_SEED = ("trainable_params", "trainable_percent", "size_on_disk_mb",
                       "peak_memory_mb")
PERPLEXITY_NOTE = ("answer perplexity: exp of the mean negative log-likelihood of the reference "
                   "answer's tokens given the prompt; the EOS token is not counted, for every "
                   "model alike")


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs", help="where the methods' folders are")
    parser.add_argument("--data-dir", default="data", help="folder with eval.jsonl, template.json")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to re-score when they changed (default: "
                             f"any of {', '.join(METHODS)}); the comparison always covers every "
                             "finished method whose predictions are up to date, plus base")
    parser.add_argument("--force", action="store_true",
                        help="re-score every run, even those whose predictions are up to date")
    parser.add_argument("--limit", type=settings.positive_int, default=None,
                        help="evaluate only the first N eval questions (a quick look)")
    parser.add_argument("--batch-size", type=settings.positive_int, default=64,
                        help="questions per generation batch (default 64: on 2 CPU cores "
                             "1.3-1.5x the questions per second of 32, the same answers)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when present, else CPU")
    parser.add_argument("--precision", default=models.DEFAULT_PRECISION,
                        choices=list(models.PRECISIONS),
                        help="auto: bf16 autocast where the hardware computes bf16 natively "
                             "(CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32; fp32 "
                             "gives exactly the answers of an fp32 evaluation, bf16 insists "
                             "(answers may differ where two tokens nearly tie); default "
                             f"{models.DEFAULT_PRECISION}")
    parser.add_argument("--alpha", type=float, default=verdict.ALPHA,
                        help="family-wise significance level of the paired comparisons, "
                             "Bonferroni-adjusted (default 0.05)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the Hub to run (off by default)")
    parser.add_argument("--compare-only", action="store_true",
                        help="score nothing: rebuild the verdict, tables, charts and report from "
                             "the per-question predictions already in --output-dir (e.g. "
                             "results/smollm2-135m, which holds no model); needs no model or data")
    parser.add_argument("--publish", metavar="DIR", default=None,
                        help="copy what --compare-only reads (evaluation.json, each compared "
                             "run's predictions.jsonl and metrics.json, search/) from "
                             "--output-dir to DIR, without the weights, and stop")
    return parser.parse_args(argv)


# --- Finding and loading what was trained ------------------------------------


def seed_folders(output_dir: Path, method: str, primary: dict) -> list[Path]:
    """A method's extra seed runs: outputs/<method>-seed<N>/ with the primary run's settings."""
    folders = []
    for folder in sorted(output_dir.glob(f"{method}-seed*"),
                         key=lambda f: int(re.sub(r"\D", "", f.name.rsplit("-seed", 1)[1]) or 0)):
        if not re.fullmatch(rf"{method}-seed\d+", folder.name):
            continue
        if not runpaths.is_complete(folder):
            print(f"warning: skipping {folder}: no COMPLETED marker (its run did not finish)")
            continue
        metrics = common.read_json(folder / "metrics.json")
        if metrics.get("run_id") != primary.get("run_id"):
            print(f"warning: skipping {folder}: trained with other settings than "
                  f"{output_dir / method} (re-run {script_for(method)} --seeds N)")
            continue
        folders.append(folder)
    return folders


def requested_methods(requested: str | None) -> list[str]:
    """--methods as a list of known method names (all of them when not given)."""
    if not requested:
        return list(METHODS)
    names = [m.strip() for m in requested.split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise common.PipelineError(f"--methods: unknown method {name!r}; expected some of "
                                       f"{', '.join(METHODS)}")
    return names


def find_methods(output_dir: Path, requested: str | None) -> dict[str, list[tuple[Path, dict]]]:
    """The finished methods' runs (folder, metrics), one per seed, by name, in METHODS order.

    Every finished method is found; one named in requested must be finished.
    """
    wanted = requested_methods(requested) if requested else []
    names = [m for m in METHODS if (output_dir / m).exists() or m in wanted]
    found = {}
    for name in names:
        folder = output_dir / name
        holder = runpaths.live_holder(runpaths.lock_file(output_dir, name))
        if holder is not None:  # its runs are being written: read none of them half-way
            print(f"warning: skipping {name}: a run is writing it now "
                  f"({runpaths.describe(holder)}); evaluate again when it has finished")
            continue
        if not runpaths.is_complete(folder):
            message = (f"{folder} has no COMPLETED marker: its run did not finish; re-run "
                       f"{script_for(name)} (add --resume to continue from its checkpoint)")
            if name in wanted:
                raise common.PipelineError(message)
            print(f"warning: skipping {message}")
            continue
        primary = common.read_json(folder / "metrics.json")
        found[name] = [(folder, primary)] + [
            (extra, common.read_json(extra / "metrics.json"))
            for extra in seed_folders(output_dir, name, primary)]
    if not found:
        raise common.PipelineError(
            f"no finished fine-tuning runs in {output_dir}/; train one first, e.g. "
            "`python finetune_lora.py` (or finetune.py, finetune_qlora.py, finetune_bitfit.py)")
    return found


def script_for(method: str) -> str:
    """The command that trains a method."""
    return "python finetune.py" if method == "full" else f"python finetune_{method}.py"


def load_for_eval(name: str, folder: Path, base_path: str, metrics: dict | None, device,
                  trust_remote_code: bool, precision: str = "fp32"):
    """A model ready to answer: the base, a full model folder, or an adapter on its base.

    A LoRA adapter on an unquantised base is merged into it (W + B·A once), so each
    forward runs one matmul a layer instead of two; QLoRA keeps its adapter on the 4-bit
    base, as it was trained, whose 4-bit layers dequantise to the precision's dtype.
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    if name == "base":
        return AutoModelForCausalLM.from_pretrained(base_path, **kwargs).to(device)
    if not (folder / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    if metrics["details"].get("base_quantization") == "nf4":
        kwargs.update(models.nf4_load_kwargs(device, precision))
        return AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs)
    model = AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    return model.merge_and_unload()


# --- Fingerprints: score again only what changed ------------------------------

PREDICTIONS = runpaths.PREDICTIONS
FINGERPRINT = runpaths.FINGERPRINT
MODEL_FILES = ("*.safetensors", "config.json", "adapter_config.json", "metrics.json")


def folder_digest(folder: Path) -> str:
    """Checksum of a model folder's weights, configuration and metrics (what produced a run)."""
    digest = hashlib.sha256()
    files = sorted({path for pattern in MODEL_FILES for path in Path(folder).glob(pattern)})
    for path in files:
        digest.update(path.name.encode() + b"\0" + common.file_sha256(path).encode())
    return digest.hexdigest()


def fingerprint(model_folder: Path, rows: list[dict], template: dict, decoding: dict) -> str:
    """What a run's predictions depend on: model files, eval rows, template, decoding, scorer."""
    blob = json.dumps({"model": folder_digest(model_folder), "rows": rows, "template": template,
                       "decoding": decoding, "scoring": SCORING_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_records(folder: Path, expected: str) -> list[dict] | None:
    """A run's saved predictions, if they were made with this fingerprint; else None."""
    marker, predictions = folder / FINGERPRINT, folder / PREDICTIONS
    if not (marker.exists() and predictions.exists()):
        return None
    if common.read_json(marker).get("fingerprint") != expected:
        return None
    return common.read_jsonl(predictions)


def save_records(folder: Path, records: list[dict], value: str) -> None:
    """Write a run's predictions, then (last) the fingerprint that vouches for them."""
    (folder / FINGERPRINT).unlink(missing_ok=True)
    try:
        # Atomic: on a failed write the previous predictions.jsonl stays whole (and, with
        # no fingerprint, is scored again next time).
        common.write_jsonl(folder / PREDICTIONS, records)
        common.write_json(folder / FINGERPRINT, {"fingerprint": value,
                                                 "scoring_version": SCORING_VERSION})
    except OSError as exc:
        raise common.write_failed(folder / PREDICTIONS, exc) from None


# --- Scoring -----------------------------------------------------------------


def evaluate_model(name, model, tokenizer, rows, examples, max_new, stop, args,
                   device, precision: str = "fp32") -> list[dict]:
    """One model's per-question records: generated answer, verdicts, answer NLL and token count.

    precision: "fp32", or "bf16" for bf16 autocast (models.resolve_precision of --precision).
    """
    nll = answer_loss.answer_nll_by_example(model, examples, tokenizer.pad_token_id, device,
                                       batch_size=args.batch_size, desc=f"{name}: perplexity",
                                       precision=precision)
    predictions = generation.generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new,
                                          device, stop=stop, batch_size=args.batch_size,
                                          desc=f"{name}: answers", precision=precision)
    records = common.score_rows(rows, predictions)
    for record, (total, count) in zip(records, nll):
        record["answer_nll"], record["answer_tokens"] = round(total, 6), count
    return records


def run_perplexity(records: list[dict]) -> float:
    """Answer perplexity of one run's records."""
    return common.perplexity(sum(r["answer_nll"] for r in records),
                             sum(r["answer_tokens"] for r in records))


def mean_summary(runs: list[list[dict]]) -> dict:
    """summarise() of each seed's records, averaged over seeds."""
    summaries = [common.summarise(records) for records in runs]
    out = {"n": summaries[0]["n"], "keyed": summaries[0]["keyed"]}
    for key in ("exact_match", "token_f1", "key_accuracy"):
        values = [s[key] for s in summaries]
        out[key] = None if values[0] is None else sum(values) / len(values)
    return out


def breakdown(runs: list[list[dict]], field: str) -> dict:
    """mean_summary() per value of a field (category, eval_kind), when the data has it."""
    values = sorted({r[field] for r in runs[0] if field in r})
    return {value: mean_summary([[r for r in records if r.get(field) == value]
                                 for records in runs]) for value in values}


# --- The comparison ----------------------------------------------------------


def comparison_row(name: str, runs: list[list[dict]], metrics: list[dict] | None) -> dict:
    """One row of the comparison table: means over seeds (intervals are added later)."""
    ppl = [run_perplexity(records) for records in runs]
    row = {"method": name, "seeds": len(runs), "answer_perplexity": sum(ppl) / len(ppl),
           **mean_summary(runs), "note": ""}
    if metrics is None:
        row["note"] = "untuned base model"
        row["lr"] = None
        return row
    row["lr"] = metrics[0]["args"]["lr"]
    row["lr_source"] = ("search on the validation split" if metrics[0].get("lr_search")
                        else "fixed (--lr or the script's default)")
    row["seed_values"] = [m["args"]["seed"] for m in metrics]
    for field in COST_FIELDS:
        values = [m.get(field) for m in metrics if m.get(field) is not None]
        if field in SAME_FOR_EVERY_SEED:
            row[field] = values[0] if values else None
        else:
            row[field] = sum(values) / len(values) if values else None
    details = metrics[0]["details"]
    if details.get("base_quantization") == "nf4":
        row["note"] = "evaluated on its 4-bit NF4 base, as trained"
    if details.get("added_biases"):
        row["note"] = f"{details['added_biases']} zero-initialised biases added"
    return row


def add_intervals(table: list[dict], all_runs: dict[str, list[list[dict]]]) -> None:
    """Add <metric>_ci95 to each row: clustered t intervals with a seed component (verdict.py)."""
    fields = {"exact_match": "exact_match", "token_f1": "token_f1"}
    if common.quality_key(table)[0] == "key_accuracy":
        fields["key_accuracy"] = "key_match"
    tokens = np.array([r["answer_tokens"] for r in next(iter(all_runs.values()))[0]], dtype=float)
    nll = {name: np.array([[r["answer_nll"] for r in records] for records in runs])
           for name, runs in all_runs.items()}
    intervals = verdict.method_intervals(all_runs, nll, tokens, list(fields.values()))
    for row in table:
        found = intervals[row["method"]]
        for field, record_field in fields.items():
            row[f"{field}_ci95"] = found[record_field]
        row["answer_perplexity_ci95"] = found["answer_perplexity"]


def with_ci(row: dict, key: str, digits: int) -> str:
    """'68.6 [64.1, 72.9]': a mean with its 95% interval."""
    if row.get(key) is None:
        return "-"
    ci = row.get(f"{key}_ci95")
    return fmt(row[key], digits) + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


COLUMNS = (("method", "method", 0), ("seeds", "seeds", 0), ("lr", "lr", None),
           ("answer_perplexity", "answer PPL [95% CI]", 2),
           ("exact_match", "exact match % [95% CI]", 1), ("key_accuracy", "key acc. % [95% CI]", 1),
           ("token_f1", "F1 % [95% CI]", 1), ("train_loss", "train loss", 3),
           ("train_seconds", "train time (s)", 0), ("train_tokens_per_s", "tokens/s", 0),
           ("peak_memory_mb", "peak mem. (MB)", 0), ("trainable_params", "trainable params", 0),
           ("trainable_percent", "trainable %", 3), ("size_on_disk_mb", "saved (MB)", 1),
           ("note", "note", 0))


def cell(row: dict, key: str, digits) -> str:
    """One markdown cell."""
    if key in QUALITY:
        return with_ci(row, key, digits)
    if key == "lr":
        return "-" if row.get("lr") is None else f"{row['lr']:.2g}"
    return fmt(row.get(key), digits)


def pairwise_table(pairs: list[dict], label: str) -> str:
    """The paired comparisons as a markdown table."""
    out = io.StringIO()
    out.write(f"| a | b | {label} a - b (points) | adjusted CI | p | p (Bonferroni) | verdict |\n"
              "|---|---|---|---|---|---|---|\n")
    for p in pairs:
        significant = p["significant"]
        word = ("a better" if p["difference"] > 0 else "b better") if significant else "not shown"
        out.write(f"| {p['a']} | {p['b']} | {p['difference']:+.1f} | "
                  f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] | {p['p_value']:.3g} | "
                  f"{p['p_adjusted']:.3g} | {word} |\n")
    return out.getvalue()


def markdown_table(rows: list[dict], breakdowns: dict, pairs: list[dict], recommendation: str,
                   n: int, procedure: str) -> str:
    """comparison.md: the table, the paired tests, per-kind and per-category tables, the verdict."""
    out = io.StringIO()
    out.write(f"# Comparison on {n} held-out questions\n\n")
    out.write("Means over seeds; 95% t intervals, clustered by fact group, with each method's "
              f"seed-to-seed variation. {PERPLEXITY_NOTE[0].upper() + PERPLEXITY_NOTE[1:]}.\n\n")
    out.write("| " + " | ".join(title for _, title, _ in COLUMNS) + " |\n")
    out.write("|" + "---|" * len(COLUMNS) + "\n")
    for row in rows:
        out.write("| " + " | ".join(cell(row, k, d) for k, _, d in COLUMNS) + " |\n")
    key, _, label = common.quality_key(rows)
    out.write(f"\n## Paired comparisons ({label})\n\n{procedure}\n\n"
              + pairwise_table(pairs, label))
    for field, title in (("eval_kind", "eval kind"), ("category", "category")):
        values = sorted({v for b in breakdowns.values() for v in b[field]})
        if not values:
            continue
        out.write(f"\n## {label} (%) by {title}\n\n| method | "
                  + " | ".join(f"{v} (n={breakdowns['base'][field].get(v, {}).get('n', '?')})"
                               for v in values) + " |\n")
        out.write("|" + "---|" * (len(values) + 1) + "\n")
        for row in rows:
            cells = [fmt(breakdowns[row["method"]][field].get(v, {}).get(key)) for v in values]
            out.write(f"| {row['method']} | " + " | ".join(cells) + " |\n")
    out.write(f"\n## Recommendation\n\n{recommendation}\n")
    return out.getvalue()


def csv_text(rows: list[dict]) -> str:
    """comparison.csv: one row per method, raw numbers and interval ends."""
    fields = ["method", "seeds", "lr"]
    for key in QUALITY:
        fields += [key, f"{key}_ci95_low", f"{key}_ci95_high"]
    fields += [k for k in COST_FIELDS] + ["n", "note"]
    flat = []
    for row in rows:
        item = dict(row)
        for key in QUALITY:
            low, high = row.get(f"{key}_ci95") or (None, None)
            item[f"{key}_ci95_low"], item[f"{key}_ci95_high"] = low, high
        flat.append(item)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def plot_comparison(rows: list[dict], path: Path) -> None:
    """One bar panel per measure, methods in the same order and colour; 95% intervals as bars."""
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    names = [r["method"] for r in rows]
    colours = [COLOURS.get(n, "#333333") for n in names]
    for ax, (key, title) in zip(axes.flat, MEASURES):
        values = [r.get(key) for r in rows]
        heights = [v if v is not None else 0 for v in values]
        errors = None
        if all(r.get(f"{key}_ci95") for r in rows):
            errors = np.array([[h - r[f"{key}_ci95"][0], r[f"{key}_ci95"][1] - h]
                               for h, r in zip(heights, rows)]).T.clip(min=0)
        bars = ax.bar(names, heights, color=colours, yerr=errors, capsize=4,
                      error_kw={"elinewidth": 1})
        for bar, value, row in zip(bars, values, rows):
            top = max(bar.get_height(), (row.get(f"{key}_ci95") or [0, 0])[1])
            ax.annotate("n/a" if value is None else fmt(value, 1 if value < 100 else 0),
                        (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        if key == "trainable_params":  # spans three orders of magnitude
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    seeds = max(r.get("seeds", 1) for r in rows)
    fig.suptitle("Fine-tuning methods compared (base = untuned model; no training cost)"
                 + (f"; means over {seeds} seeds, 95% intervals" if seeds > 1 else
                    "; 95% intervals over questions"))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_cost(rows: list[dict], path: Path) -> None:
    """Quality against training time and against peak memory: the trade-off to choose from."""
    plt = common.pyplot()
    key, _, label = common.quality_key(rows)
    trained = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, cost, xlabel in ((axes[0], "train_seconds", "training time (s)"),
                             (axes[1], "peak_memory_mb", "peak training memory (MB)")):
        for r in trained:
            ci = r.get(f"{key}_ci95")
            yerr = [[r[key] - ci[0]], [ci[1] - r[key]]] if ci else None
            ax.errorbar(r[cost], r[key], yerr=yerr, fmt="o", ms=10, capsize=4,
                        color=COLOURS.get(r["method"]), zorder=3)
            ax.annotate(r["method"], (r[cost], r[key]), textcoords="offset points",
                        xytext=(8, 6))
        if base is not None:
            ax.axhline(base[key], color=COLOURS["base"], ls="--",
                       label=f"untuned base ({base[key]:.1f}%)")
            ax.legend(loc="lower right")
        ax.set(xlabel=xlabel, ylabel=f"{label} %",
               title=f"{label} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against cost: up and to the left is better (bars: 95% intervals)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_searches(output_dir: Path, methods) -> dict[str, dict]:
    """The learning-rate searches (outputs/search/<method>.json) of the methods compared."""
    found = {}
    for name in methods:
        path = runpaths.search_file(output_dir, name)
        if path.exists():
            found[name] = common.read_json(path)
    return found


def plot_lr_search(searches: dict[str, dict], path: Path) -> None:
    """Validation score against learning rate, one line per method, the chosen rate marked."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    label = "validation score"
    for name, search in searches.items():
        results = [r for r in search["results"] if not r.get("diverged")]
        label = search["metric_label"]
        xs, ys = [r["lr"] for r in results], [r["score"] for r in results]
        ax.plot(xs, ys, "o-", color=COLOURS.get(name),
                label=f"{name} (chose {search['chosen_lr']:.2g})")
        # A diverged rate has no score: an x on the axis, where no curve can hide it.
        diverged = [r["lr"] for r in search["results"] if r.get("diverged")]
        if diverged:
            ax.scatter(diverged, [0] * len(diverged), marker="x", s=80, clip_on=False,
                       color=COLOURS.get(name), label=f"{name}: diverged", zorder=3)
        chosen = next(r for r in results if r["lr"] == search["chosen_lr"])
        ax.scatter([chosen["lr"]], [chosen["score"]], s=160, facecolors="none",
                   edgecolors=COLOURS.get(name), linewidths=2, zorder=3)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"{label} % (validation split)",
           title="Learning-rate search: each rate scored on data/valid.jsonl")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    """Evaluate base + methods, then write predictions, tables, plots and the recommendation."""
    if args.publish:
        publish(Path(args.output_dir), Path(args.publish))
        return
    if args.compare_only:
        compare(Path(args.output_dir), args.alpha)
        return
    # Read the eval set and find the finished runs (fails fast, before any model loads)
    output_dir = Path(args.output_dir)
    template = common.load_template(args.data_dir)
    stop = common.turn_marker(template)
    rows = common.load_split(args.data_dir, "eval")[:args.limit]
    methods = find_methods(output_dir, args.methods)
    bases = {m["base_model_path"] for runs in methods.values() for _, m in runs}
    if len(bases) > 1:
        raise common.PipelineError(f"the runs in {output_dir}/ were trained from different base "
                                   f"models ({', '.join(sorted(bases))}); re-train or pick "
                                   "--methods with one base")
    base_path = bases.pop()
    device = models.pick_device(args.device)
    precision = models.resolve_precision(device, args.precision)
    tokenizer = models.load_tokenizer(base_path, args.trust_remote_code)
    seeds = {name: len(runs) for name, runs in methods.items()}
    listing = ", ".join(f"{m} ({n} seed{'s' * (n > 1)})" for m, n in seeds.items())
    print(f"evaluating base + {listing} at {precision} on {len(rows)} questions from "
          f"{Path(args.data_dir) / 'eval.jsonl'} (base model {base_path})")

    # Tokenise once: the same examples and the same decoding bound for every model
    examples = common.tokenize_rows(tokenizer, rows, 10**9, source="eval.jsonl", label_eos=False)
    max_new = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])

    # Score each run whose predictions are missing or stale; reuse the others
    decoding = {"max_new_tokens": max_new, "stop": stop, "greedy": True,
                "eos_token_id": tokenizer.eos_token_id,
                # fp32 predictions made before --precision existed stay valid: same answers
                **({"precision": precision} if precision != "fp32" else {})}
    rescore = set(requested_methods(args.methods)) | {"base"}
    compared: dict[str, list[tuple[Path, dict]]] = {}  # per model: its up-to-date runs
    for name, runs in {"base": [(output_dir / "base", None)], **methods}.items():
        for folder, metrics in runs:
            value = fingerprint(Path(base_path) if name == "base" else folder, rows, template,
                                decoding)
            records = None if args.force else cached_records(folder, value)
            if records is not None:
                print(f"{folder.name:>14}: unchanged since it was last scored; predictions reused")
            elif name not in rescore:
                print(f"warning: {folder} changed since it was last scored and is not in "
                      f"--methods; left out of the comparison (run evaluate.py --methods {name})")
                continue
            else:
                model = load_for_eval(name, folder, base_path, metrics, device,
                                      args.trust_remote_code, precision)
                records = evaluate_model(folder.name, model, tokenizer, rows, examples, max_new,
                                         stop, args, device, precision)
                del model
                folder.mkdir(parents=True, exist_ok=True)
                save_records(folder, records, value)
                summary = common.summarise(records)
                print(f"{folder.name:>14}: answer PPL {run_perplexity(records):8.2f}  exact "
                      f"{summary['exact_match']:5.1f}%  key {fmt(summary['key_accuracy'])}%  "
                      f"F1 {summary['token_f1']:5.1f}%")
            compared.setdefault(name, []).append((folder, metrics))
    trained = [runs for name, runs in compared.items() if name != "base"]
    if not trained:
        raise common.PipelineError("no fine-tuned method has up-to-date predictions to compare; "
                                   "run evaluate.py without --methods")
    # What the comparison needs besides the per-run files, so it can be rebuilt from them alone
    common.write_json(output_dir / EVALUATION, {
        "model": trained[0][0][1]["model"], "base_model_path": base_path,
        "questions": len(rows), "max_new_tokens": max_new, "stop": stop, "precision": precision,
        "runs": {name: [folder.name for folder, _ in runs] for name, runs in compared.items()}})
    compare(output_dir, args.alpha)


# --- The comparison, from files alone -------------------------------------------

EVALUATION = "evaluation.json"  # which runs were compared, and the decoding they were scored with


def compare(output_dir: Path, alpha: float) -> dict:
    """Build the verdict, tables, charts and report from the saved per-run files alone.

    Reads <output-dir>/evaluation.json, each compared run's predictions.jsonl and
    metrics.json, and search/<method>.json; needs no model, tokenizer or data.
    """
    output_dir = Path(output_dir)
    info_path = output_dir / EVALUATION
    if not info_path.exists():
        raise common.PipelineError("no evaluation to compare: run `python evaluate.py` first",
                                   info_path)
    info = common.read_json(info_path)
    all_runs: dict[str, list[list[dict]]] = {}
    trained: dict[str, list[dict]] = {}
    for name, folders in info["runs"].items():
        for folder in (output_dir / f for f in folders):
            predictions = folder / runpaths.PREDICTIONS
            if not predictions.exists():
                raise common.PipelineError(f"{runpaths.PREDICTIONS} is missing; re-run "
                                           "`python evaluate.py`", folder)
            all_runs.setdefault(name, []).append(common.read_jsonl(predictions))
            if name != "base":
                trained.setdefault(name, []).append(common.read_json(folder / "metrics.json"))

    # Means, intervals, paired tests, and the recommendation that follows from them
    table = [comparison_row(name, runs, trained.get(name)) for name, runs in all_runs.items()]
    add_intervals(table, all_runs)
    key, record_key, label = common.quality_key(table)
    pairs = verdict.pairwise(all_runs, record_key, alpha=alpha)
    for pair in pairs:
        pair["metric"] = key
    recommendation = verdict.recommend(table, pairs, key, label, alpha)
    breakdowns = {name: {"eval_kind": breakdown(runs, "eval_kind"),
                         "category": breakdown(runs, "category")}
                  for name, runs in all_runs.items()}
    searches = read_searches(output_dir, trained)
    procedure = verdict.procedure(
        alpha, len(pairs), max(p["n_questions"] for p in pairs),
        max(p["n_groups"] for p in pairs),
        {name: len(runs) for name, runs in all_runs.items()}, key)

    # Write the tables, the plots and comparison.json
    common.write_text_atomic(output_dir / "comparison.csv", csv_text(table))
    common.write_text_atomic(output_dir / "comparison.md",
                             markdown_table(table, breakdowns, pairs, recommendation,
                                            info["questions"], verdict.describe(procedure)))
    comparison = {
        "model": info["model"], "base_model_path": info["base_model_path"],
        "questions": info["questions"], "max_new_tokens": info["max_new_tokens"],
        "stop": info["stop"], "precision": info.get("precision", "fp32"),
        "headline_metric": key, "headline_label": label, "alpha": alpha,
        "perplexity": PERPLEXITY_NOTE,
        "intervals": "95% t intervals, cluster-robust over fact groups plus seed variance; "
                     "see verdict.py",
        "procedure": procedure, "rows": table, "pairwise": pairs, "breakdowns": breakdowns,
        "lr_search": {name: {k: s[k] for k in ("grid", "chosen_lr", "metric", "budget")}
                      for name, s in searches.items()},
        "recommendation": recommendation}
    common.write_json(output_dir / "comparison.json", comparison)
    plot_comparison(table, output_dir / "comparison.png")
    plot_quality_vs_cost(table, output_dir / "quality_vs_cost.png")
    if searches:
        plot_lr_search(searches, output_dir / "lr_search.png")
    else:
        (output_dir / "lr_search.png").unlink(missing_ok=True)  # never show a stale search
    report.write_report(output_dir, comparison, all_runs)
    print(f"\n{recommendation}\n\nwrote {output_dir}/comparison.{{csv,md,json,png}}, "
          f"{output_dir}/quality_vs_cost.png"
          + (f", {output_dir}/lr_search.png" if searches else "")
          + f", {output_dir}/report.html")
    return comparison


def publish(output_dir: Path, target: Path) -> None:
    """Copy what compare() reads (no weights) to target, e.g. results/<model>/."""
    import shutil

    output_dir, target = Path(output_dir), Path(target)
    info = common.read_json(output_dir / EVALUATION)
    with common.staged_dir(target) as tmp:
        shutil.copy2(output_dir / EVALUATION, tmp / EVALUATION)
        for name, folders in info["runs"].items():
            for folder in folders:
                (tmp / folder).mkdir()
                for file in (runpaths.PREDICTIONS, "metrics.json", "training_metrics.png"):
                    if (output_dir / folder / file).exists():
                        shutil.copy2(output_dir / folder / file, tmp / folder / file)
        searches = output_dir / "search"
        if searches.is_dir():
            shutil.copytree(searches, tmp / "search")
    print(f"published the per-question scores and run records of {output_dir}/ to {target}/; "
          f"`python evaluate.py --compare-only --output-dir {target}` rebuilds the verdict")

if __name__ == "__main__":
    common.run_main(main, parse_args())
