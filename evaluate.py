"""Evaluate the untuned base model and every fine-tuned method on held-out questions.

    python evaluate.py                        # every finished method in outputs/
    python evaluate.py --methods lora,qlora   # only these
    python evaluate.py --limit 50             # a quick look at 50 questions

Every model gets the same data (data/eval.jsonl), the same greedy decoding
(batched, stopping at EOS or at a new user turn, new tokens bounded by the
longest reference) and the same metrics:
  answer perplexity  exp of the mean loss over answer tokens only;
  exact match        prediction == reference after normalisation;
  key accuracy       the short answer appears as whole words in the prediction;
  token F1           overlap of normalised answer tokens (SQuAD's F1).
QLoRA is evaluated as it was trained: its adapter on the 4-bit NF4 base.

Writes outputs/<method>/predictions.jsonl (outputs/base/ for the untuned
model), outputs/comparison.{csv,md,json}, outputs/comparison.png and
outputs/quality_vs_cost.png, and prints a recommendation computed from the
numbers.
"""

import argparse
import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import torch

import common

METHODS = ("full", "lora", "qlora", "bitfit")  # the order of every table and plot
COLOURS = {"base": "#7f7f7f", "full": "#1f77b4", "lora": "#2ca02c", "qlora": "#9467bd",
           "bitfit": "#ff7f0e"}
MEASURES = (("answer_perplexity", "answer perplexity (lower is better)"),
            ("exact_match", "exact match %"), ("key_accuracy", "key-answer accuracy %"),
            ("token_f1", "token F1 %"), ("train_seconds", "training time (s)"),
            ("train_tokens_per_s", "training tokens/s"), ("peak_memory_mb", "peak memory (MB)"),
            ("trainable_params", "trainable parameters"))


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs", help="where the methods' folders are")
    parser.add_argument("--data-dir", default="data", help="folder with eval.jsonl, template.json")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to evaluate (default: every finished one "
                             f"of {', '.join(METHODS)} found in --output-dir)")
    parser.add_argument("--limit", type=common.positive_int, default=None,
                        help="evaluate only the first N eval questions (a quick look)")
    parser.add_argument("--batch-size", type=common.positive_int, default=32,
                        help="questions per generation batch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when present, else CPU")
    parser.add_argument("--margin", type=float, default=2.0,
                        help="quality points within which a cheaper method counts as good as the "
                             "best (default 2; widened to the sampling noise when that is larger)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the Hub to run (off by default)")
    return parser.parse_args(argv)


# --- Finding and loading what was trained ------------------------------------


def find_methods(output_dir: Path, requested: str | None) -> dict[str, dict]:
    """The finished methods' metrics, by name, in METHODS order; unfinished ones refused or flagged."""
    names = [m.strip() for m in requested.split(",")] if requested else [
        m for m in METHODS if (output_dir / m).exists()]
    found = {}
    for name in names:
        folder = output_dir / name
        if name == "base" or name not in METHODS:
            raise common.PipelineError(f"--methods: unknown method {name!r}; expected some of "
                                       f"{', '.join(METHODS)}")
        if not (folder / "COMPLETED").exists():
            message = (f"{folder} has no COMPLETED marker: its run did not finish; re-run "
                       f"{script_for(name)} (add --resume to continue from its checkpoint)")
            if requested:
                raise common.PipelineError(message)
            print(f"warning: skipping {message}")
            continue
        found[name] = common.read_json(folder / "metrics.json")
    if not found:
        raise common.PipelineError(
            f"no finished fine-tuning runs in {output_dir}/; train one first, e.g. "
            "`python finetune_lora.py` (or finetune.py, finetune_qlora.py, finetune_bitfit.py)")
    return found


def script_for(method: str) -> str:
    """The command that trains a method."""
    return "python finetune.py" if method == "full" else f"python finetune_{method}.py"


def load_for_eval(name: str, folder: Path, base_path: str, metrics: dict | None, device,
                  trust_remote_code: bool):
    """A model ready to answer: the base, a full model folder, or an adapter on its base."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    if name == "base":
        return AutoModelForCausalLM.from_pretrained(base_path, **kwargs).to(device)
    if not (folder / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    if metrics["details"].get("base_quantization") == "nf4":
        kwargs.update(common.nf4_load_kwargs(device))
        return AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs)
    return AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs).to(device)


# --- Scoring ---------------------------------------------------------------


def score(rows: list[dict], predictions: list[str]) -> list[dict]:
    """Per-question records: what was asked, expected and said, with each metric's verdict."""
    records = []
    for row, prediction in zip(rows, predictions):
        reference = row.get("answer", row["completion"].strip())
        record = {"question": row.get("question", row["prompt"]), "prompt": row["prompt"],
                  "reference": reference, "prediction": prediction,
                  "exact_match": common.exact_match(prediction, reference),
                  "token_f1": round(common.token_f1(prediction, reference), 4)}
        if row.get("key"):
            record["key"] = row["key"]
            record["key_match"] = common.key_match(prediction, row["key"])
        for field in ("category", "eval_kind", "group"):
            if row.get(field):
                record[field] = row[field]
        records.append(record)
    return records


def summarise(records: list[dict]) -> dict:
    """Exact match, key accuracy and F1 (as %) over a set of records."""
    n = len(records)
    out = {"n": n,
           "exact_match": 100 * sum(r["exact_match"] for r in records) / n,
           "token_f1": 100 * sum(r["token_f1"] for r in records) / n}
    keyed = [r for r in records if "key_match" in r]
    out["key_accuracy"] = 100 * sum(r["key_match"] for r in keyed) / len(keyed) if keyed else None
    return out


def breakdown(records: list[dict], field: str) -> dict:
    """summarise() per value of a field (category, eval_kind), when the data has it."""
    groups = defaultdict(list)
    for record in records:
        if field in record:
            groups[record[field]].append(record)
    return {value: summarise(group) for value, group in sorted(groups.items())}


def evaluate_model(name, model, tokenizer, rows, examples, max_new, stop, args, device) -> tuple:
    """Answer perplexity and generated answers for one model; returns (perplexity, records)."""
    nll, count = common.answer_nll(model, examples, tokenizer.pad_token_id, device,
                                   batch_size=args.batch_size, desc=f"{name}: perplexity")
    predictions = common.generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new,
                                          device, stop=stop, batch_size=args.batch_size,
                                          desc=f"{name}: answers")
    return common.perplexity(nll, count), score(rows, predictions)


# --- The comparison ----------------------------------------------------------


def comparison_row(name: str, ppl: float, records: list[dict], metrics: dict | None) -> dict:
    """One row of the comparison table."""
    row = {"method": name, "answer_perplexity": ppl, **summarise(records)}
    row["note"] = ""
    if metrics is None:
        row["note"] = "untuned base model"
        return row
    for field in ("train_loss", "train_seconds", "train_tokens_per_s", "peak_memory_mb",
                  "trainable_params", "trainable_percent", "size_on_disk_mb"):
        row[field] = metrics.get(field)
    if metrics["details"].get("base_quantization") == "nf4":
        row["note"] = "evaluated on its 4-bit NF4 base, as trained"
    if metrics["details"].get("added_biases"):
        row["note"] = f"{metrics['details']['added_biases']} zero-initialised biases added"
    return row


def quality_key(rows: list[dict]) -> tuple[str, str]:
    """The headline quality measure: key accuracy where the data has keys, else token F1."""
    if all(r.get("key_accuracy") is not None for r in rows):
        return "key_accuracy", "key-answer accuracy"
    return "token_f1", "token F1"


def noise_points(p: float, n: int) -> float:
    """95% half-width, in points, of the difference of two accuracies near p on n questions.

    p is kept at least half a question away from 0% and 100%, where the
    binomial variance would otherwise claim there is no noise at all.
    """
    if not n:
        return float("inf")
    p = min(max(p / 100, 0.5 / n), 1 - 0.5 / n)
    return 100 * 1.96 * math.sqrt(2 * p * (1 - p) / n)


def recommend(rows: list[dict], margin: float) -> str:
    """A recommendation computed from the table: the best quality, and the cheapest method near it."""
    key, label = quality_key(rows)
    trained = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    best = max(trained, key=lambda r: (r[key], -r["answer_perplexity"]))
    n = best["n"]
    noise = noise_points(best[key], n)
    window = max(margin, noise)
    near = [r for r in trained if best[key] - r[key] <= window]
    cheapest = min(near, key=lambda r: (r["train_seconds"], r["peak_memory_mb"]))
    lines = [f"Best {label}: {best['method']} ({best[key]:.1f}% on {n} held-out questions; "
             f"answer perplexity {best['answer_perplexity']:.2f})."]
    if base is not None:
        gain = best[key] - base[key]
        verdict = "beyond" if gain > noise else "within"
        lines.append(f"It is {gain:+.1f} points from the untuned base model ({base[key]:.1f}%), "
                     f"{verdict} the sampling noise of about ±{noise:.1f} points.")
        losers = [r["method"] for r in trained if r[key] - base[key] <= noise_points(base[key], n)]
        if losers:
            lines.append(f"Not clearly better than the untuned base: {', '.join(losers)}.")
    if base is not None and best[key] - base[key] <= noise:
        lines.append("Recommendation: none yet. No method beats the untuned base model beyond "
                     "noise on this data; train longer (--epochs) or on more data, then compare.")
    elif cheapest is best:
        lines.append(f"Recommendation: {best['method']}. No method within {window:.1f} points of it "
                     "trains faster.")
    else:
        speed = best["train_seconds"] / max(cheapest["train_seconds"], 1e-9)
        memory = best["peak_memory_mb"] - cheapest["peak_memory_mb"]
        lines.append(
            f"Recommendation: {cheapest['method']}. It is {best[key] - cheapest[key]:.1f} points "
            f"below {best['method']}, inside the {window:.1f}-point margin (the larger of "
            f"--margin {margin:g} and the sampling noise), and trains {speed:.1f}x faster"
            + (f" with {memory:.0f} MB less peak memory." if memory > 0 else
               f" though with {-memory:.0f} MB more peak memory."))
    ties = [r["method"] for r in near if r is not best]
    if ties and best[key] - min(r[key] for r in near) < noise:
        lines.append(f"The differences between {', '.join([best['method']] + ties)} are smaller "
                     "than the sampling noise: treat them as tied on quality and choose on cost.")
    return " ".join(lines)


def fmt(value, digits: int = 1) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


COLUMNS = (("method", "method", 0), ("answer_perplexity", "answer PPL", 2),
           ("exact_match", "exact match %", 1), ("key_accuracy", "key acc. %", 1),
           ("token_f1", "F1 %", 1), ("train_loss", "train loss", 3),
           ("train_seconds", "train time (s)", 0), ("train_tokens_per_s", "tokens/s", 0),
           ("peak_memory_mb", "peak mem. (MB)", 0), ("trainable_params", "trainable params", 0),
           ("trainable_percent", "trainable %", 3), ("size_on_disk_mb", "saved (MB)", 1),
           ("note", "note", 0))


def markdown_table(rows: list[dict], breakdowns: dict, recommendation: str, n: int) -> str:
    """comparison.md: the table, the per-kind and per-category tables, the recommendation."""
    out = io.StringIO()
    out.write(f"# Comparison on {n} held-out questions\n\n")
    out.write("| " + " | ".join(title for _, title, _ in COLUMNS) + " |\n")
    out.write("|" + "---|" * len(COLUMNS) + "\n")
    for row in rows:
        out.write("| " + " | ".join(fmt(row.get(k), d) for k, _, d in COLUMNS) + " |\n")
    key, label = quality_key(rows)
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
    """comparison.csv: one row per method, raw numbers."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[k for k, _, _ in COLUMNS] + ["n"],
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_comparison(rows: list[dict], path: Path) -> None:
    """One bar panel per measure, methods in the same order and colour in each."""
    plt = common._pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    names = [r["method"] for r in rows]
    colours = [COLOURS.get(n, "#333333") for n in names]
    for ax, (key, title) in zip(axes.flat, MEASURES):
        values = [r.get(key) for r in rows]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(names, heights, color=colours)
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if value is None else fmt(value, 1 if value < 100 else 0),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        if key == "trainable_params":  # spans three orders of magnitude
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fine-tuning methods compared (base = untuned model; no training cost)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_cost(rows: list[dict], path: Path) -> None:
    """Quality against training time and against peak memory: the trade-off to choose from."""
    plt = common._pyplot()
    key, label = quality_key(rows)
    trained = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, cost, xlabel in ((axes[0], "train_seconds", "training time (s)"),
                             (axes[1], "peak_memory_mb", "peak training memory (MB)")):
        for r in trained:
            ax.scatter(r[cost], r[key], s=120, color=COLOURS.get(r["method"]), zorder=3)
            ax.annotate(r["method"], (r[cost], r[key]), textcoords="offset points",
                        xytext=(6, 6))
        if base is not None:
            ax.axhline(base[key], color=COLOURS["base"], ls="--",
                       label=f"untuned base ({base[key]:.1f}%)")
            ax.legend(loc="lower right")
        ax.set(xlabel=xlabel, ylabel=f"{label} %",
               title=f"{label} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against cost: up and to the left is better")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    """Evaluate base + methods, then write predictions, tables, plots and the recommendation."""
    # Read the eval set and find the finished runs (fails fast, before any model loads)
    output_dir = Path(args.output_dir)
    template = common.load_template(args.data_dir)
    stop = common.turn_marker(template)
    rows = common.load_split(args.data_dir, "eval")[:args.limit]
    methods = find_methods(output_dir, args.methods)
    bases = {m["base_model_path"] for m in methods.values()}
    if len(bases) > 1:
        raise common.PipelineError(f"the runs in {output_dir}/ were trained from different base "
                                   f"models ({', '.join(sorted(bases))}); re-train or pick "
                                   "--methods with one base")
    base_path = bases.pop()
    device = common.pick_device(args.device)
    tokenizer = common.load_tokenizer(base_path, args.trust_remote_code)
    print(f"evaluating base + {', '.join(methods)} on {len(rows)} questions from "
          f"{Path(args.data_dir) / 'eval.jsonl'} (base model {base_path})")

    # Tokenise once: the same examples and the same decoding bound for every model
    examples = common.tokenize_rows(tokenizer, rows, 10**9, source="eval.jsonl")
    max_new = common.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])

    # Evaluate each model in turn, writing its predictions
    table, breakdowns = [], {}
    for name in ("base", *methods):
        metrics = methods.get(name)
        model = load_for_eval(name, output_dir / name, base_path, metrics, device,
                              args.trust_remote_code)
        ppl, records = evaluate_model(name, model, tokenizer, rows, examples, max_new, stop,
                                      args, device)
        del model
        common.write_jsonl(output_dir / name / "predictions.jsonl", records)
        table.append(comparison_row(name, ppl, records, metrics))
        breakdowns[name] = {"eval_kind": breakdown(records, "eval_kind"),
                            "category": breakdown(records, "category")}
        row = table[-1]
        print(f"{name:>6}: answer PPL {ppl:8.2f}  exact {row['exact_match']:5.1f}%  key "
              f"{fmt(row['key_accuracy'])}%  F1 {row['token_f1']:5.1f}%")

    # Compare and recommend
    recommendation = recommend(table, args.margin)
    common.write_text_atomic(output_dir / "comparison.csv", csv_text(table))
    common.write_text_atomic(output_dir / "comparison.md",
                             markdown_table(table, breakdowns, recommendation, len(rows)))
    common.write_json(output_dir / "comparison.json",
                      {"questions": len(rows), "max_new_tokens": max_new, "stop": stop,
                       "rows": table, "breakdowns": breakdowns,
                       "recommendation": recommendation})
    plot_comparison(table, output_dir / "comparison.png")
    plot_quality_vs_cost(table, output_dir / "quality_vs_cost.png")
    print(f"\n{recommendation}\n\nwrote {output_dir}/comparison.{{csv,md,json,png}}, "
          f"{output_dir}/quality_vs_cost.png and predictions.jsonl per method")


if __name__ == "__main__":
    common.run_main(main, parse_args())
