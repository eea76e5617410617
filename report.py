"""Render the comparison that compare.py built: tables, charts and one HTML page.

    python report.py outputs/                  # after `python evaluate.py`
    python report.py results/smollm2-135m      # the published run, no model needed

Reads <dir>/comparison.json (the numbers, intervals, paired tests and the
recommendation), <dir>/evaluation.json (which runs were compared), each
compared run's per-question records (read by compare.compared_runs), each
method's training_metrics.png where the folder has it, and search/<method>.json;
computes nothing that decides anything.  Writes
comparison.md, comparison.csv, comparison.png, quality_vs_cost.png,
learned_vs_forgot.png (when forgetting was measured), lr_search.png (when a
learning-rate search ran) and report.html, a page that embeds every chart and
opens from disk with no network.

The markdown table, the CSV and the HTML table are all built from COLUMNS, so
they show the same measures in the same order.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common
import compare
import runpaths
import verdict

# One colour per method in every chart (the four's as before; LoRA's relatives in greens
# and teals beside LoRA's green, the others apart).
COLOURS = {"base": "#7f7f7f", "full": "#1f77b4", "lora": "#2ca02c", "qlora": "#9467bd",
           "bitfit": "#ff7f0e", "dora": "#17becf", "rslora": "#98df8a", "pissa": "#1b5e20",
           "loraplus": "#bcbd22", "lokr": "#8c564b", "ia3": "#e377c2", "prompt": "#d62728"}
# Past this many methods a chart names them in a legend or in panels of its own, not beside
# each point, where the names would overlap.
CROWDED = 5
LEARNED_VS_FORGOT = "learned_vs_forgot.png"
MEASURES = (("answer_perplexity", "answer perplexity (lower is better)"),
            ("exact_match", "exact match %"), ("key_accuracy", "key-answer accuracy %"),
            ("token_f1", "token F1 %"), ("train_seconds", "training time (s)"),
            ("train_tokens_per_s", "training tokens/s"), ("peak_memory_mb", "peak memory (MB)"),
            ("trainable_params", "trainable parameters"))


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default="outputs",
                        help="folder holding comparison.json (default outputs)")
    return parser.parse_args(argv)


# --- Reading what evaluate.py wrote --------------------------------------------


def read_comparison(output_dir: Path) -> dict:
    """comparison.json, or a one-line error saying how to make it."""
    path = runpaths.comparison_file(output_dir)
    if not path.exists():
        raise common.PipelineError("no comparison to render: run `python evaluate.py` (or "
                                   "`python evaluate.py --compare-only`) first", path)
    return common.read_json(path)


# --- The one column list: comparison.md, comparison.csv and report.html ---------


@dataclass(frozen=True)
class Column:
    """One column of the comparison table; every table format is built from COLUMNS."""
    key: str              # the row's field in comparison.json, and the CSV header
    header: str           # the markdown and HTML header
    digits: int = 0       # decimals shown in the tables (the CSV keeps the raw number)
    interval: bool = False  # shown as 'mean [low, high]'; the CSV adds <key>_interval_low/_high
    shown: bool = True    # False: in the CSV only (the same on every row; the title says it)
    spread: bool = False  # a cost: shown as 'mean (min-max over seeds)' where seeds differ


COLUMNS = (
    Column("method", "method"), Column("seeds", "seeds"), Column("lr", "lr"),
    Column("answer_perplexity", "answer PPL [95% CI]", 2, interval=True),
    Column("exact_match", "exact match % [95% CI]", 1, interval=True),
    Column("key_accuracy", "key acc. % [95% CI]", 1, interval=True),
    Column("token_f1", "F1 % [95% CI]", 1, interval=True),
    Column("forgetting", "forgetting, nats/token [95% CI]", 3, interval=True),
    Column("probe_ppl_ratio", "probe PPL ratio [95% CI]", 3, interval=True),
    Column("train_loss", "train loss", 3),
    Column("train_seconds", "train time (s) (seed range)", spread=True),
    Column("train_tokens_per_s", "tokens/s"),
    Column("peak_memory_mb", "peak mem. (MB) (seed range)", spread=True),
    Column("trainable_params", "trainable params"), Column("trainable_percent", "trainable %", 3),
    Column("size_on_disk_mb", "saved (MB)", 1), Column("n", "questions", shown=False),
    Column("note", "note"))
SHOWN = tuple(c for c in COLUMNS if c.shown)


def fmt(value, digits: int = 1) -> str:
    """A table cell: numbers rounded, missing values a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cell(row: dict, column: Column) -> tuple[str, str]:
    """A table cell as (value, interval); the interval is '' when the column or row has none."""
    value = row.get(column.key)
    if column.key == "lr":  # a rate reads best in significant figures
        return ("-" if value is None else f"{value:.2g}"), ""
    if column.spread and value is not None:
        low, high = row.get(f"{column.key}_range") or (None, None)
        spread = (f"({fmt(float(low), column.digits)}-{fmt(float(high), column.digits)})"
                  if low is not None and round(low) != round(high) else "")
        return fmt(value, column.digits), spread
    if value is None or not column.interval:
        return fmt(value, column.digits), ""
    ci, digits = row.get(f"{column.key}_interval"), column.digits
    return fmt(value, digits), (f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def csv_fields() -> list[str]:
    """comparison.csv's header: every column's key, an interval column's two ends after it."""
    fields = []
    for column in COLUMNS:
        fields.append(column.key)
        if column.interval:
            fields += [f"{column.key}_interval_low", f"{column.key}_interval_high"]
    return fields


def csv_text(rows: list[dict]) -> str:
    """comparison.csv: one row per method, raw numbers and interval ends."""
    flat = []
    for row in rows:
        item = dict(row)
        for column in COLUMNS:
            if column.interval:
                low, high = row.get(f"{column.key}_interval") or (None, None)
                item[f"{column.key}_interval_low"], item[f"{column.key}_interval_high"] = low, high
        flat.append(item)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_fields(), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def best_rows(comparison: dict) -> tuple[list[str], list[list[str]]]:
    """The comparisons with the best as (headers, cells): one row per trained method."""
    best, label = comparison["best"], comparison["headline_label"]
    margin = best["margin"]
    headers = ["method", "seeds", f"{label} %", "gap to the best of the others (points)",
               "simultaneous bounds", f"within -{margin:g}?", "verdict",
               "against base (lower bound)"]
    rows = []
    for name, entry in best["methods"].items():
        low, high = entry["lower"], entry["upper"]
        if entry["in_best_set"]:
            word = "best set"
        else:
            word = "shown worse than " + ", ".join(entry["shown_worse_than"])
        gate = entry["base"]
        against = ("-" if gate is None else f"{gate['difference']:+.1f} "
                   f"({'unknown' if gate['lower'] is None else format(gate['lower'], '+.1f')})"
                   + ("" if gate["helps"] else ", not shown better"))
        rows.append([name, str(entry["seeds"]), f"{entry['mean']:.1f}", f"{entry['gap']:+.1f}",
                     f"[{'?' if low is None else format(low, '+.1f')}, "
                     f"{'?' if high is None else format(high, '+.1f')}]",
                     "yes" if entry["clears_margin"] else "no", word, against])
    return headers, rows


def difference_rows(comparison: dict) -> tuple[list[str], list[list[str]]]:
    """Each pair's estimate a - b with its standard error and df, as (headers, cells)."""
    headers = ["a", "b", f"{comparison['headline_label']} a - b (points)", "SE", "df"]
    rows = [[p["a"], p["b"], f"{p['difference']:+.1f}",
             "?" if p["se"] is None else f"{p['se']:.2f}",
             "inf" if p["df"] is None else f"{p['df']:.0f}"] for p in comparison["pairwise"]]
    return headers, rows


def verdict_lines(comparison: dict) -> list[str]:
    """The recommendation as its statements, one paragraph each (the text joined, if no lines)."""
    return comparison.get("recommendation_lines") or [comparison["recommendation"]]


def plan_commands(comparison: dict) -> list[tuple[str, str]]:
    """(what it settles, command) for each option of an inconclusive verdict's plan that
    settles its target, the method with the cheapest option (the verdict's text points
    here); every other method's commands stay in comparison.json, which with eleven
    methods would otherwise print nine pairs of commands a screen long each."""
    plan = comparison.get("plan") or {}
    if comparison.get("outcome") != "inconclusive":
        return []
    words = {"seeds": "more seeds, keeping those trained", "questions": "a larger data set"}
    commands = plan.get("commands") or {}
    chosen = [plan["target"]] if plan.get("target") in commands else list(commands)
    return [(f"{method}: {words[kind]}", command)
            for method in chosen for kind, command in commands[method].items()]


def verdict_paragraph(index: int, line: str) -> str:
    """One statement of the verdict as HTML, the first labelled unless it names itself."""
    label = index == 0 and not line.startswith(("Verdict", "Recommendation"))
    return f"<p>{'<b>Verdict.</b> ' if label else ''}{html.escape(line)}</p>"


def markdown_grid(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return ("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
            + "".join("| " + " | ".join(row) + " |\n" for row in rows))


def html_grid(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def breakdown_rows(comparison: dict, field: str) -> tuple[list[str], list[tuple[str, list]]]:
    """Headline score per value of a field (eval kind, category): (headers, (method, cells))."""
    key, breakdowns = comparison["headline_metric"], comparison["breakdowns"]
    values = sorted({v for b in breakdowns.values() for v in b[field]})
    base = breakdowns.get("base", {}).get(field, {})
    headers = [f"{v} (n={base.get(v, {}).get('n', '?')})" for v in values]
    rows = [(r["method"], [fmt(breakdowns[r["method"]][field].get(v, {}).get(key))
                           for v in values]) for r in comparison["rows"]]
    return headers, rows


BREAKDOWNS = (("eval_kind", "eval kind"), ("category", "category"))


def forgetting_note(comparison: dict) -> str:
    """One paragraph on what the forgetting columns measure, or why they are empty."""
    found = comparison.get("forgetting") or {}
    if not found.get("measured"):
        return f"Forgetting: not measured; {found.get('note', compare.NO_PROBE)}."
    probe = found["probe"]
    return (f"Forgetting: each model's mean NLL per token on {probe['documents']} documents of "
            f"general English prose ({probe['file']}, {probe['tokens']:,} tokens, at most "
            f"{probe['max_tokens']} a document) minus the base's "
            f"({found['base_nats_per_token']:.3f} nats); positive means it forgot. Intervals "
            "clustered by document, with the seed-to-seed variation; the PPL ratio is "
            "exp(change). It does not change the recommendation.")


# --- comparison.md -------------------------------------------------------------


def markdown_table(comparison: dict) -> str:
    """comparison.md: the table, the paired tests, per-kind and per-category tables, the verdict."""
    rows, label = comparison["rows"], comparison["headline_label"]
    note = comparison["perplexity"]
    out = io.StringIO()
    out.write(f"# Comparison on {comparison['questions']} held-out questions\n\n")
    out.write("Means over seeds; 95% t intervals, clustered by fact group, with each method's "
              f"seed-to-seed variation. {note[0].upper() + note[1:]}.\n\n")
    out.write("| " + " | ".join(c.header for c in SHOWN) + " |\n")
    out.write("|" + "---|" * len(SHOWN) + "\n")
    for row in rows:
        out.write("| " + " | ".join(" ".join(filter(None, cell(row, c))) for c in SHOWN)
                  + " |\n")
    out.write(f"\n{forgetting_note(comparison)}\n")
    out.write(f"\n## Comparisons with the best ({label})\n\n"
              f"{verdict.procedure_text(comparison['procedure'])}\n\n"
              + markdown_grid(*best_rows(comparison))
              + "\nThe estimates each bound rests on (a - b, standard error, degrees of "
                "freedom; no decision is read from this table alone):\n\n"
              + markdown_grid(*difference_rows(comparison)))
    for field, title in BREAKDOWNS:
        headers, cells = breakdown_rows(comparison, field)
        if not headers:
            continue
        out.write(f"\n## {label} (%) by {title}\n\n| method | " + " | ".join(headers) + " |\n")
        out.write("|" + "---|" * (len(headers) + 1) + "\n")
        for method, values in cells:
            out.write(f"| {method} | " + " | ".join(values) + " |\n")
    out.write("\n## Recommendation\n\n" + "\n\n".join(verdict_lines(comparison)) + "\n")
    commands = plan_commands(comparison)
    if commands:
        out.write("\n## Plan\n\n" + "".join(f"- {what}:\n\n  ```sh\n  {command}\n  ```\n"
                                             for what, command in commands))
    return out.getvalue()


# --- Charts --------------------------------------------------------------------


def save_figure(fig, path: Path) -> None:
    """Save a chart atomically (a reader sees the old PNG or the new one), then close it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        common.pyplot().close(fig)


def base_legend(ax) -> None:
    """A legend for the untuned base's line alone, where the methods are named beside their
    points; none when the chart has no base line."""
    handles, labels = ax.get_legend_handles_labels()
    kept = [(h, t) for h, t in zip(handles, labels) if t.startswith("untuned")]
    if kept:
        ax.legend(*zip(*kept), loc="lower right")


def plot_comparison(rows: list[dict], path: Path) -> None:
    """One bar panel per measure, methods in the same order and colour; 95% intervals as bars."""
    plt = common.pyplot()
    names = [r["method"] for r in rows]
    crowded = len(names) > CROWDED
    fig, axes = plt.subplots(2, 4, figsize=(20 if crowded else 16, 8 if crowded else 7),
                             constrained_layout=True)
    colours = [COLOURS.get(n, "#333333") for n in names]
    for ax, (key, title) in zip(axes.flat, MEASURES):
        values = [r.get(key) for r in rows]
        heights = [v if v is not None else 0 for v in values]
        errors = None
        if all(r.get(f"{key}_interval") for r in rows):
            errors = np.array([[h - r[f"{key}_interval"][0], r[f"{key}_interval"][1] - h]
                               for h, r in zip(heights, rows)]).T.clip(min=0)
        bars = ax.bar(names, heights, color=colours, yerr=errors, capsize=4,
                      error_kw={"elinewidth": 1})
        for bar, value, row in zip(bars, values, rows):
            top = max(bar.get_height(), (row.get(f"{key}_interval") or [0, 0])[1])
            ax.annotate("n/a" if value is None else fmt(value, 1 if value < 100 else 0),
                        (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom",
                        fontsize=6 if crowded else 8, rotation=90 if crowded else 0)
        if key == "trainable_params":  # spans three orders of magnitude
            ax.set_yscale("log")
        if crowded:
            ax.tick_params(axis="x", labelrotation=60, labelsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    seeds = max(r.get("seeds", 1) for r in rows)
    fig.suptitle("Fine-tuning methods compared (base = untuned model; no training cost)"
                 + (f"; means over {seeds} seeds, 95% intervals" if seeds > 1 else
                    "; 95% intervals over questions"))
    save_figure(fig, path)


def plot_quality_vs_cost(comparison: dict, path: Path) -> None:
    """Quality against training time and against peak memory: the trade-off to choose from."""
    plt = common.pyplot()
    rows, key = comparison["rows"], comparison["headline_metric"]
    label = comparison["headline_label"]
    trained = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    fig, axes = plt.subplots(1, 2, figsize=(14 if len(trained) > CROWDED else 12, 4.5),
                             layout="constrained")
    for ax, cost, xlabel in ((axes[0], "train_seconds", "training time (s)"),
                             (axes[1], "peak_memory_mb", "peak training memory (MB)")):
        for r in trained:
            ci = r.get(f"{key}_interval")
            yerr = [[r[key] - ci[0]], [ci[1] - r[key]]] if ci else None
            ax.errorbar(r[cost], r[key], yerr=yerr, fmt="o", ms=10, capsize=4,
                        color=COLOURS.get(r["method"]), zorder=3, label=r["method"])
            if len(trained) <= CROWDED:
                ax.annotate(r["method"], (r[cost], r[key]), textcoords="offset points",
                            xytext=(8, 6))
        if base is not None:
            ax.axhline(base[key], color=COLOURS["base"], ls="--",
                       label=f"untuned base ({base[key]:.1f}%)")
        if len(trained) > CROWDED:  # names in one legend beside both panels, not on the points
            handles, labels = ax.get_legend_handles_labels()
            legend = dict(zip(labels, handles))
        else:
            base_legend(ax)
        ax.set(xlabel=xlabel, ylabel=f"{label} %",
               title=f"{label} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    if len(trained) > CROWDED:
        fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=9)
    fig.suptitle("Quality against cost: up and to the left is better (bars: 95% intervals)")
    save_figure(fig, path)


def plot_learned_vs_forgot(comparison: dict, path: Path) -> None:
    """What each method learned (headline gain over the base) against what it forgot (its NLL
    change on the general-text probe), 95% intervals on both axes, one model at a time."""
    plt = common.pyplot()
    found, label = comparison["forgetting"], comparison["headline_label"]
    fig, ax = plt.subplots(figsize=(9 if len(found["methods"]) > CROWDED else 7.5, 5),
                           layout="constrained")
    for name, entry in found["methods"].items():
        learned = entry.get("learned")
        if learned is None:
            continue
        x, y = entry["change"], learned["gain"]
        xerr = ([[x - entry["interval"][0]], [entry["interval"][1] - x]]
                if entry["interval"] else None)
        yerr = ([[y - learned["interval"][0]], [learned["interval"][1] - y]]
                if None not in learned["interval"] else None)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=9, capsize=4,
                    color=COLOURS.get(name, "#333333"), zorder=3, label=name)
        if len(found["methods"]) <= CROWDED:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(8, 6))
    ax.axvline(0, color=COLOURS["base"], ls="--", label="untuned base (no change)")
    ax.set(xlabel=f"forgot: NLL change on {found['probe']['file']} (nats per token; "
                  "right is worse)",
           ylabel=f"learned: {label} gain over the base (points)")
    fig.suptitle("What each method learned against what it forgot: up and to the left is "
                 "better\n(bars: 95% intervals, clustered by fact group and by probe document)")
    ax.grid(alpha=0.3)
    if len(found["methods"]) > CROWDED:  # the names in a legend beside the chart
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=9)
    else:
        base_legend(ax)
    save_figure(fig, path)


def plot_lr_search(searches: dict[str, dict], path: Path) -> None:
    """Validation answer NLL against learning rate, one line per method, the chosen rate marked.

    Bars: +-1.96 SE of each rate's paired difference to the chosen rate (none at the
    chosen rate itself), so a bar reaching the chosen rate's level marks a rate the
    split cannot tell from it.  A search written before the choice was made by NLL has
    no valid_nll: its validation loss (also a mean NLL per answer token, from training)
    is drawn, without bars.
    """
    plt = common.pyplot()
    crowded = len(searches) > CROWDED  # one panel per method, where one would hold a tangle
    if crowded:
        columns = 4
        fig, grid = plt.subplots(math.ceil(len(searches) / columns), columns, squeeze=False,
                                 figsize=(4.2 * columns, 3.4 * math.ceil(len(searches) / columns)),
                                 constrained_layout=True)
        for spare in grid.flat[len(searches):]:
            spare.set_visible(False)
        panels = dict(zip(searches, grid.flat))
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        panels = dict.fromkeys(searches, ax)
    for name, search in searches.items():
        ax = panels[name]
        results = [r for r in search["results"] if not r.get("diverged")]
        field = ("valid_nll" if all(r.get("valid_nll") is not None for r in results)
                 else "valid_loss")
        xs, ys = [r["lr"] for r in results], [r[field] for r in results]
        errors = ([1.96 * (r.get("nll_difference_se") or 0.0) for r in results]
                  if field == "valid_nll" else None)
        ax.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, color=COLOURS.get(name),
                    label=f"{name} (chose {search['chosen_lr']:.2g})"
                          + ("" if field == "valid_nll" else "; validation loss, no bars"))
        # A diverged rate has no NLL: an x on the top edge, where no curve can hide it (a
        # line, not a scatter: a line on the x axis's transform still widens the x range).
        diverged = [r["lr"] for r in search["results"] if r.get("diverged")]
        if diverged:
            ax.plot(diverged, [1] * len(diverged), "x", ms=9, mew=2, clip_on=False,
                    transform=ax.get_xaxis_transform(), color=COLOURS.get(name),
                    label=f"{name}: diverged", zorder=3)
        chosen = next(r for r in results if r["lr"] == search["chosen_lr"])
        ax.scatter([chosen["lr"]], [chosen[field]], s=160, facecolors="none",
                   edgecolors=COLOURS.get(name), linewidths=2, zorder=3)
    title = ("Learning-rate search on data/valid.jsonl\n(bars: \u00b11.96 SE of the "
             "paired difference to the chosen rate, circled)")
    for ax in {id(a): a for a in panels.values()}.values():
        ax.set_xscale("log")
        ax.set(xlabel="learning rate",
               ylabel="validation answer NLL per token" + ("" if crowded else
                                                           " (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8 if crowded else None)
    if crowded:
        fig.suptitle(title.replace("\n", " ") + "; lower is better")
    else:
        ax.set_title(title)
    save_figure(fig, path)


# --- report.html ---------------------------------------------------------------

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d9dde3;
padding-bottom:4px}
.sub{color:#5a6473;margin:0 0 18px}
.verdict{background:#fff;border-left:5px solid #2ca02c;padding:14px 18px;border-radius:6px;
box-shadow:0 1px 3px #0001}.verdict p{margin:0 0 8px}.verdict p:last-child{margin:0}
pre{white-space:pre-wrap;word-break:break-all;background:#fff;padding:8px 12px;border-radius:4px;
font-size:12.5px}
table{border-collapse:collapse;background:#fff;font-size:13.5px;box-shadow:0 1px 3px #0001;
margin:6px 0}
th,td{padding:5px 9px;border-bottom:1px solid #e6e8ec;text-align:right;vertical-align:top}
th{background:#eef1f5;position:sticky;top:0}
td:first-child,th:first-child,.text{text-align:left}
tr.best td{font-weight:600}
.ok{color:#17803d}.bad{color:#b3261e}.muted{color:#8a93a0}
td .ci{display:block;font-size:11.5px;color:#8a93a0;white-space:nowrap}
img{max-width:100%;background:#fff;border-radius:6px;box-shadow:0 1px 3px #0001;margin:6px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:14px}
input,select{font:inherit;padding:4px 8px;margin:0 8px 8px 0}
.scroll{max-height:640px;overflow:auto}.wide{overflow-x:auto}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
"""

FILTER_SCRIPT = """
function filterRows(){const q=document.getElementById('q').value.toLowerCase();
const c=document.getElementById('cat').value;let shown=0;
document.querySelectorAll('#disagree tbody tr').forEach(r=>{
const hit=r.textContent.toLowerCase().includes(q)&&(!c||r.dataset.cat===c);
r.style.display=hit?'':'none';shown+=hit;});
document.getElementById('count').textContent=shown;}
"""



def image(path: Path, alt: str) -> str:
    """An <img> with the PNG embedded as a data URI (empty when the file is missing)."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_cell(row: dict, column: Column) -> str:
    """One <td> of the comparison table: cell()'s text, the interval on its own small line."""
    value, ci = cell(row, column)
    text = html.escape(value) + (f' <span class="ci">{ci}</span>' if ci else "")
    return f"<td class=text>{text}</td>" if column.key == "note" else f"<td>{text}</td>"


def comparison_table(comparison: dict) -> str:
    """The main table, the columns of comparison.md; the best trained method in bold."""
    key = comparison["headline_metric"]
    trained = [r for r in comparison["rows"] if r["method"] != "base"]
    best = max(trained, key=lambda r: r[key])["method"] if trained else None
    head = "".join(f"<th class=text>{html.escape(c.header)}</th>" if c.key == "note" else
                   f"<th>{html.escape(c.header)}</th>" for c in SHOWN)
    body = "".join(f'<tr class="{"best" if r["method"] == best else ""}">'
                   + "".join(html_cell(r, c) for c in SHOWN) + "</tr>"
                   for r in comparison["rows"])
    return f"<table><tr>{head}</tr>{body}</table>"


def breakdown_table(comparison: dict, field: str) -> str:
    """Headline score per value of a field (eval kind, category), one row per method."""
    headers, rows = breakdown_rows(comparison, field)
    if not headers:
        return "<p class=muted>not in this data</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr><td>{method}</td>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                   for method, values in rows)
    return f"<table><tr><th>method</th>{head}</tr>{body}</table>"


def search_table(comparison: dict, output_dir: Path) -> str:
    """The learning-rate search per method, one row per rate, the chosen rate in bold.

    Each rate's validation answer NLL, its paired difference to the chosen rate +- its
    standard error, whether it is a near tie (within 2 SE), and the key accuracy (shown,
    not used to choose); the last column says what chose and at what budget.  A search
    written before the choice was made by NLL has no valid_nll: its validation loss is
    shown in that column, marked, with no difference and no near tie.
    """
    searches = comparison.get("lr_search") or {}
    if not searches:
        return ("<p class=muted>No search ran: each method trained at its script's rate. "
                "Run the fine-tune scripts with <code>--tune-lr</code> (or "
                "<code>make all TUNE=1</code>) to choose rates on the validation split.</p>")
    found = compare.read_searches(output_dir, searches)
    label = next((s.get("score_label") or s.get("metric_label") for s in found.values()),
                 "validation score")
    rows = []
    for name, full in found.items():
        results, widened = full["results"], set(full.get("widened") or [])
        criterion = ("lowest validation answer NLL" if full.get("metric") == "valid_answer_nll"
                     else f"best {full.get('metric_label', full.get('metric'))}")
        about = (f"{criterion}; {full['budget']}"
                 + ("; still at the edge of the grid" if full.get("edge") else ""))
        for number, r in enumerate(results):
            chosen = r["lr"] == full["chosen_lr"]
            se = r.get("nll_difference_se")
            tie = "chosen" if chosen else {True: "yes", False: "no"}.get(r.get("near_tie"), "-")
            if r.get("diverged"):
                cells = ["diverged", "-", "-", "-"]
            elif r.get("valid_nll") is None:
                cells = [f'{r["valid_loss"]:.4f} <span class=muted>(validation loss)</span>',
                         "-", tie, f"{r['score']:.1f}"]
            else:
                difference = ("0" if chosen else f"{r['nll_difference']:+.4f}"
                              + ("" if se is None else f" &plusmn; {se:.4f}"))
                cells = [f"{r['valid_nll']:.4f}", difference, tie, f"{r['score']:.1f}"]
            rate = f"{r['lr']:.2g}" + (" (widened)" if r["lr"] in widened else "")
            # the method and its budget span its rates; bold cell by cell, so they stay plain
            head = f"<td rowspan={len(results)}>{name}</td>" if number == 0 else ""
            tail = (f"<td class=text rowspan={len(results)}>{html.escape(about)}</td>"
                    if number == 0 else "")
            rows.append("<tr>" + head + "".join(f"<td><b>{c}</b></td>" if chosen else
                                                f"<td>{c}</td>" for c in [rate, *cells])
                        + tail + "</tr>")
    return ("<table><tr><th>method</th><th>rate</th><th>validation answer NLL</th>"
            "<th>vs chosen &plusmn; SE</th><th>near tie (2 SE)</th>"
            f"<th>{html.escape(label)} %</th><th class=text>chosen by; budget</th></tr>"
            + "".join(rows) + "</table>")


def verdict_of(record: dict) -> bool:
    """A question's headline verdict: the key matched, or (no key) F1 at least 0.5."""
    if record.get("key_match") is not None:
        return record["key_match"]
    return record["token_f1"] >= 0.5


def disagreements(all_runs: dict[str, list[list[dict]]]) -> list[dict]:
    """Questions on which the methods' first-seed verdicts differ, with every answer."""
    names = list(all_runs)
    first = {name: runs[0] for name, runs in all_runs.items()}
    out = []
    for i, record in enumerate(first[names[0]]):
        answers = {name: first[name][i] for name in names}
        verdicts = {name: verdict_of(r) for name, r in answers.items()}
        if len(set(verdicts.values())) > 1:
            out.append({"record": record, "answers": answers, "verdicts": verdicts})
    return out


def disagreement_table(all_runs: dict[str, list[list[dict]]]) -> str:
    """The browsable question table (filter by text and category)."""
    names = list(all_runs)
    items = disagreements(all_runs)
    categories = sorted({i["record"].get("category", "") for i in items} - {""})
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>'
                      for c in categories)
    head = "".join(f"<th class=text>{n}</th>" for n in names)
    rows = []
    for item in items:
        record = item["record"]
        cells = "".join(
            f'<td class=text><span class="{"ok" if item["verdicts"][n] else "bad"}">'
            f'{"&#10003;" if item["verdicts"][n] else "&#10007;"}</span> '
            f'{html.escape(item["answers"][n]["prediction"])}</td>' for n in names)
        rows.append(f'<tr data-cat="{html.escape(record.get("category", ""))}">'
                    f'<td class=text>{html.escape(record["question"])}</td>'
                    f'<td class=text>{html.escape(record["reference"])}'
                    f'<br><span class=muted>key: {html.escape(record.get("key", "-"))}</span></td>'
                    f"{cells}</tr>")
    total = len(next(iter(all_runs.values()))[0])
    return (f"<p>{len(items)} of {total} questions get different verdicts from different models "
            "(first seed of each method). <input id=q placeholder='filter: question, answer…' "
            "oninput=filterRows()><select id=cat onchange=filterRows()>"
            f"<option value=''>every category</option>{options}</select>"
            f"showing <span id=count>{len(items)}</span></p>"
            f"<div class=scroll><table id=disagree><thead><tr><th class=text>question</th>"
            f"<th class=text>reference</th>{head}</tr></thead><tbody>{''.join(rows)}"
            "</tbody></table></div>")


def build_report(output_dir: Path, comparison: dict, all_runs: dict[str, list[list[dict]]],
                 folders: dict[str, list[str]]) -> str:
    """The page's HTML."""
    plots = {m: image(runpaths.RunPaths(output_dir, m, names[0]).training_plot, m + " training")
             for m, names in folders.items() if m != "base"}
    # A published folder keeps no curves (evaluate.py --publish): say so, not empty headings.
    curves = ('<div class="grid">' + "".join(f"<div><h3>{m}</h3>{img}</div>"
                                             for m, img in plots.items() if img) + "</div>"
              if any(plots.values()) else
              "<p>Not kept in this folder: each run's curve is training_metrics.png in the "
              "run's own folder where it was trained.</p>")
    lr_chart = image(output_dir / "lr_search.png", "learning-rate search")
    note = comparison["perplexity"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fine-tuning methods compared</title><style>{STYLE}</style></head>
<body><main>
<h1>Which fine-tuning method for this data?</h1>
<p class="sub">{comparison['questions']} held-out questions from <code>data/eval.jsonl</code>;
headline: {html.escape(comparison['headline_label'])}; base model
<code>{html.escape(comparison['model'])}</code>.
Means over seeds; intervals: {html.escape(comparison['intervals'])}.
{html.escape(note[0].upper() + note[1:])}.</p>
<div class="verdict">{''.join(verdict_paragraph(i, line)
                              for i, line in enumerate(verdict_lines(comparison)))}</div>
{''.join(f"<p class=muted>Plan, {html.escape(what)}:</p><pre>{html.escape(command)}</pre>"
         for what, command in plan_commands(comparison))}
<h2>Comparison</h2><div class="wide">{comparison_table(comparison)}</div>
<h2>Comparisons with the best</h2>
<p class=muted>{html.escape(verdict.procedure_text(comparison['procedure']))}</p>
{html_grid(*best_rows(comparison))}
<p class=muted>The estimates each bound rests on:</p>{html_grid(*difference_rows(comparison))}
<h2>Learning rates</h2>{search_table(comparison, output_dir)}{lr_chart}
<h2>Charts</h2>{image(output_dir / 'comparison.png', 'comparison')}
{image(output_dir / 'quality_vs_cost.png', 'quality against cost')}
<h2>What each method learned and what it forgot</h2>
<p class=muted>{html.escape(forgetting_note(comparison))}</p>
{image(output_dir / LEARNED_VS_FORGOT, 'learned against forgot')}
<h2>By kind of held-out question</h2>{breakdown_table(comparison, 'eval_kind')}
<h2>By category</h2>{breakdown_table(comparison, 'category')}
<h2>Training curves</h2>{curves}
<h2>Where the methods disagree</h2>{disagreement_table(all_runs)}
</main><script>{FILTER_SCRIPT}</script></body></html>
"""


# --- Everything, from the files ----------------------------------------------------


def render(output_dir: str | Path) -> list[Path]:
    """Write every table, chart and report.html from the files in output_dir; returns them."""
    output_dir = Path(output_dir)
    comparison = read_comparison(output_dir)
    info, all_runs = compare.compared_runs(output_dir)
    searches = compare.read_searches(output_dir, comparison.get("lr_search") or {})
    written = [output_dir / name for name in ("comparison.md", "comparison.csv", "comparison.png",
                                              "quality_vs_cost.png")]
    common.write_text_atomic(written[0], markdown_table(comparison))
    common.write_text_atomic(written[1], csv_text(comparison["rows"]))
    plot_comparison(comparison["rows"], written[2])
    plot_quality_vs_cost(comparison, written[3])
    if (comparison.get("forgetting") or {}).get("measured"):
        plot_learned_vs_forgot(comparison, output_dir / LEARNED_VS_FORGOT)
        written.append(output_dir / LEARNED_VS_FORGOT)
    else:
        (output_dir / LEARNED_VS_FORGOT).unlink(missing_ok=True)  # never show a stale chart
    if searches:
        plot_lr_search(searches, output_dir / "lr_search.png")
        written.append(output_dir / "lr_search.png")
    else:
        (output_dir / "lr_search.png").unlink(missing_ok=True)  # never show a stale search
    page = build_report(output_dir, comparison, all_runs, info["runs"])
    common.write_text_atomic(output_dir / "report.html", page)
    return written + [output_dir / "report.html"]


def main(args):
    """Render the comparison in args.output_dir and say what was written."""
    written = render(Path(args.output_dir))
    print(f"rendered {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    common.run_main(main, parse_args())
