"""report.py: every table, chart and report.html, rendered from the files evaluate.py wrote.

Runs over a copy of the published run (results/smollm2-135m/), which holds the
per-question predictions but no model, so no test here trains or loads one.
"""

import csv
import html
import json
import re
import shutil
import subprocess
import sys

import pytest

import evaluate
import report
from helpers import ROOT, run_and_expect_exit

RESULTS = ROOT / "results" / "smollm2-135m"
RENDERED = ("comparison.md", "comparison.csv", "comparison.png", "quality_vs_cost.png",
            "lr_search.png", "report.html")


@pytest.fixture
def measured(tmp_path):
    """A copy of the published run on which evaluate.py --compare-only has just run."""
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    evaluate.main(evaluate.parse_args(["--output-dir", str(folder), "--compare-only"]))
    return folder


def test_report_py_alone_rebuilds_what_evaluate_wrote(measured):
    written = {name: (measured / name).read_bytes() for name in ("comparison.md",
                                                                 "comparison.csv")}
    for name in RENDERED:
        (measured / name).unlink()
    done = subprocess.run([sys.executable, str(ROOT / "report.py"), str(measured)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name, content in written.items():
        assert (measured / name).read_bytes() == content, name
    assert all((measured / name).stat().st_size > 0 for name in RENDERED)


def markdown_header(text: str) -> list[str]:
    """The cells of the first markdown table's header row."""
    line = next(line for line in text.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_md_csv_and_html_headers_all_come_from_the_one_column_list(measured):
    shown = [c.header for c in report.COLUMNS if c.shown]
    assert markdown_header((measured / "comparison.md").read_text()) == shown
    page = (measured / "report.html").read_text()
    table = page.split("<h2>Comparison</h2>")[1].split("</tr>")[0]
    assert [html.unescape(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table)] == shown
    with open(measured / "comparison.csv", newline="") as fh:
        header = next(csv.reader(fh))
    # the CSV holds each column's raw value under its key, an interval as its two ends
    expected = []
    for column in report.COLUMNS:
        expected.append(column.key)
        if column.interval:
            expected += [f"{column.key}_interval_low", f"{column.key}_interval_high"]
    assert header == expected
    # a column the tables leave out is one whose value every row shares
    rows = json.loads((measured / "comparison.json").read_text())["rows"]
    for column in report.COLUMNS:
        if not column.shown:
            assert len({r.get(column.key) for r in rows}) == 1, column.key


def test_every_table_shows_the_same_cells(measured):
    comparison = json.loads((measured / "comparison.json").read_text())
    markdown = (measured / "comparison.md").read_text()
    page = (measured / "report.html").read_text()
    for row in comparison["rows"]:
        cells = [" ".join(filter(None, report.cell(row, c))) for c in report.COLUMNS if c.shown]
        assert "| " + " | ".join(cells) + " |" in markdown
        assert all(f">{html.escape(report.cell(row, c)[0])}" in page
                   for c in report.COLUMNS if c.shown)


def test_the_decisions_shown_are_read_from_comparison_json(measured):
    """report.py renders the bounds and the margin it is given; it decides nothing itself."""
    comparison = json.loads((measured / "comparison.json").read_text())
    name = next(iter(comparison["best"]["methods"]))
    entry = comparison["best"]["methods"][name]
    entry.update(in_best_set=False, shown_worse_than=["an imagined rival"], lower=-12.25,
                 upper=-0.5)
    comparison["best"]["margin"] = comparison["procedure"]["margin"] = 7.0
    (measured / "comparison.json").write_text(json.dumps(comparison))
    report.render(measured)
    markdown = (measured / "comparison.md").read_text()
    section = markdown.split("## Comparisons with the best")[1].split("\n## ")[0]
    assert "within -7?" in section and "Declared margin: 7 points" in section
    assert f"| {name} |" in section and "[-12.2, -0.5]" in section
    assert "shown worse than an imagined rival" in section
    page = (measured / "report.html").read_text()
    assert "shown worse than an imagined rival" in page and "within -7?" in page


def test_a_folder_without_comparison_json_is_one_line(tmp_path, capsys):
    line = run_and_expect_exit(report.main, report.parse_args([str(tmp_path)]), capsys)
    assert "comparison.json" in line and "python evaluate.py" in line
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_help_names_both_ways_to_run_it():
    done = subprocess.run([sys.executable, str(ROOT / "report.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    assert "python report.py outputs/" in done.stdout
    assert "python report.py results/smollm2-135m" in done.stdout


def test_the_page_prints_the_plan_of_its_target_only_and_labels_an_unnamed_verdict():
    plan = {"target": "lora", "commands": {
        "full": {"seeds": "python finetune.py --seeds 9", "questions": "make all SIZE=1800"},
        "lora": {"seeds": "python finetune_lora.py --seeds 7", "questions": "make all SIZE=900"}}}
    comparison = {"outcome": "inconclusive", "plan": plan}
    assert report.plan_commands(comparison) == [
        ("lora: more seeds, keeping those trained", "python finetune_lora.py --seeds 7"),
        ("lora: a larger data set", "make all SIZE=900")]
    assert report.plan_commands({**comparison, "outcome": "recommend"}) == []
    assert report.verdict_paragraph(0, "Verdict: inconclusive.") == "<p>Verdict: inconclusive.</p>"
    assert report.verdict_paragraph(0, "Recommendation: lora & co") == (
        "<p>Recommendation: lora &amp; co</p>")
    assert report.verdict_paragraph(0, "full and lora tie").startswith("<p><b>Verdict.</b> ")
    assert report.verdict_paragraph(1, "Plan: more seeds") == "<p>Plan: more seeds</p>"
