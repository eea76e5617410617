"""outputs/report.html: the whole comparison on one self-contained page.

evaluate.py calls write_report() after it has written comparison.json and the
charts.  The page embeds every chart as a data URI and carries its own CSS and
a few lines of JavaScript (a filter for the question table), so it opens from
disk with no network.  It holds: the recommendation, the comparison table with
95% intervals, the paired tests, the chosen learning rates, the charts, the
per-kind and per-category tables, each method's training curves, and a
browsable table of the questions on which the methods disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import common
import runpaths
import verdict

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d9dde3;
padding-bottom:4px}
.sub{color:#5a6473;margin:0 0 18px}
.verdict{background:#fff;border-left:5px solid #2ca02c;padding:14px 18px;border-radius:6px;
box-shadow:0 1px 3px #0001}
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
.scroll{max-height:640px;overflow:auto}
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


def fmt(value, digits: int = 1) -> str:
    """A table cell (HTML here, markdown in evaluate.py): numbers rounded, missing values a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def with_interval(row: dict, key: str, digits: int) -> str:
    """'68.6 <span>[64.1, 72.9]</span>'."""
    if row.get(key) is None:
        return "-"
    ci = row.get(f"{key}_ci95")
    tail = (f' <span class="ci">[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]</span>' if ci
            else "")
    return fmt(row[key], digits) + tail


def comparison_table(comparison: dict) -> str:
    """The main table: quality with intervals, then cost."""
    key = comparison["headline_metric"]
    trained = [r for r in comparison["rows"] if r["method"] != "base"]
    best = max(trained, key=lambda r: r[key])["method"] if trained else None
    head = ("<tr><th>method</th><th>seeds</th><th>learning rate</th><th>answer PPL</th>"
            "<th>exact match %</th><th>key accuracy %</th><th>token F1 %</th>"
            "<th>train time (s)</th><th>tokens/s</th><th>peak memory (MB)</th>"
            "<th>trainable params</th><th class=text>note</th></tr>")
    body = []
    for r in comparison["rows"]:
        lr = "-" if r.get("lr") is None else f"{r['lr']:.2g}"
        body.append(
            f'<tr class="{"best" if r["method"] == best else ""}"><td>{r["method"]}</td>'
            f'<td>{r.get("seeds", 1)}</td><td>{lr}</td>'
            f'<td>{with_interval(r, "answer_perplexity", 2)}</td>'
            f'<td>{with_interval(r, "exact_match", 1)}</td>'
            f'<td>{with_interval(r, "key_accuracy", 1)}</td>'
            f'<td>{with_interval(r, "token_f1", 1)}</td>'
            f'<td>{fmt(r.get("train_seconds"), 0)}</td>'
            f'<td>{fmt(r.get("train_tokens_per_s"), 0)}</td>'
            f'<td>{fmt(r.get("peak_memory_mb"), 0)}</td>'
            f'<td>{fmt(r.get("trainable_params"))}</td>'
            f'<td class=text>{html.escape(r.get("note") or "")}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>"


def pairwise_table(comparison: dict) -> str:
    """Every paired comparison: difference, adjusted interval, p and Bonferroni-adjusted p."""
    alpha = comparison.get("alpha", 0.05)
    rows = []
    for p in comparison["pairwise"]:
        significant = verdict.is_significant(p, alpha)
        winner = p["a"] if p["difference"] > 0 else p["b"]
        word = (f'<span class="ok">{winner} better</span>' if significant
                else '<span class="muted">not shown</span>')
        rows.append(f"<tr><td>{p['a']} vs {p['b']}</td><td>{p['difference']:+.1f}</td>"
                    f"<td>[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]</td>"
                    f"<td>{p['p_value']:.3g}</td><td>{p['p_adjusted']:.3g}</td>"
                    f"<td class=text>{word}</td></tr>")
    return ("<table><tr><th>comparison</th><th>difference (points)</th><th>adjusted CI</th>"
            "<th>p</th><th>p (Bonferroni)</th><th class=text>verdict</th></tr>"
            + "".join(rows) + "</table>")


def breakdown_table(comparison: dict, field: str) -> str:
    """Headline score per value of a field (eval kind, category), one row per method."""
    key = comparison["headline_metric"]
    breakdowns = comparison["breakdowns"]
    values = sorted({v for b in breakdowns.values() for v in b[field]})
    if not values:
        return "<p class=muted>not in this data</p>"
    base = breakdowns.get("base", {}).get(field, {})
    head = "".join(f"<th>{html.escape(v)} (n={base.get(v, {}).get('n', '?')})</th>"
                   for v in values)
    rows = [f"<tr><td>{name}</td>" + "".join(
        f"<td>{fmt(b[field].get(v, {}).get(key))}</td>" for v in values) + "</tr>"
        for name, b in breakdowns.items()]
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def search_table(comparison: dict, output_dir: Path) -> str:
    """The learning-rate search per method: every rate's validation score, the chosen one."""
    searches = comparison.get("lr_search") or {}
    if not searches:
        return ("<p class=muted>No search ran: each method trained at its script's rate. "
                "Run the fine-tune scripts with <code>--tune-lr</code> (or "
                "<code>make all TUNE=1</code>) to choose rates on the validation split.</p>")
    rows = []
    for name in searches:
        full = common.read_json(runpaths.search_file(output_dir, name))
        cells = ", ".join(
            f"{r['lr']:.2g}: diverged" if r.get("diverged") else
            (f"<b>{r['lr']:.2g}: {r['score']:.1f}%</b>" if r["lr"] == full["chosen_lr"]
             else f"{r['lr']:.2g}: {r['score']:.1f}%") for r in full["results"])
        rows.append(f"<tr><td>{name}</td><td>{full['chosen_lr']:.2g}</td>"
                    f"<td class=text>{cells}</td><td class=text>{html.escape(full['budget'])}"
                    "</td></tr>")
    return ("<table><tr><th>method</th><th>chosen rate</th><th class=text>validation score by "
            "rate</th><th class=text>budget</th></tr>" + "".join(rows) + "</table>")


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


def build_report(output_dir: Path, comparison: dict, all_runs: dict[str, list[list[dict]]]) -> str:
    """The page's HTML."""
    methods = [r["method"] for r in comparison["rows"] if r["method"] != "base"]
    curves = "".join(
        f"<div><h3>{m}</h3>{image(output_dir / m / 'training_metrics.png', m + ' training')}</div>"
        for m in methods)
    lr_chart = image(output_dir / "lr_search.png", "learning-rate search")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fine-tuning methods compared</title><style>{STYLE}</style></head>
<body><main>
<h1>Which fine-tuning method for this data?</h1>
<p class="sub">{comparison['questions']} held-out questions from <code>data/eval.jsonl</code>;
headline: {comparison['headline_metric'].replace('_', ' ')}; base model
<code>{html.escape(comparison['model'])}</code>.
Means over seeds; intervals: {html.escape(comparison['intervals'])}.
{html.escape(comparison['perplexity'][0].upper() + comparison['perplexity'][1:])}.</p>
<div class="verdict"><b>Verdict.</b> {html.escape(comparison['recommendation'])}</div>
<h2>Comparison</h2>{comparison_table(comparison)}
<h2>Paired tests</h2>
<p class=muted>{html.escape(verdict.describe(comparison['procedure']))}</p>{pairwise_table(comparison)}
<h2>Learning rates</h2>{search_table(comparison, output_dir)}{lr_chart}
<h2>Charts</h2>{image(output_dir / 'comparison.png', 'comparison')}
{image(output_dir / 'quality_vs_cost.png', 'quality against cost')}
<h2>By kind of held-out question</h2>{breakdown_table(comparison, 'eval_kind')}
<h2>By category</h2>{breakdown_table(comparison, 'category')}
<h2>Training curves</h2><div class="grid">{curves}</div>
<h2>Where the methods disagree</h2>{disagreement_table(all_runs)}
</main><script>{FILTER_SCRIPT}</script></body></html>
"""


def write_report(output_dir: Path, comparison: dict, all_runs: dict[str, list[list[dict]]]) -> Path:
    """Write outputs/report.html atomically; returns its path."""
    path = Path(output_dir) / "report.html"
    common.write_text_atomic(path, build_report(Path(output_dir), comparison, all_runs))
    return path
