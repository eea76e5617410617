"""The everyday loop: re-run one method, re-score only it, see everything in report.html."""

import json
import math
import re

import pytest

import common
import compare
import evaluate
import forgetting
import finetune_lora
from helpers import write_split
from helpers import FOUR

TRAIN = ["--device", "cpu", "--model", "tiny-gpt2", "--batch-size", "8", "--max-steps", "3"]


def train_all(data, out):
    for script in FOUR:
        script.main(script.parse_args([*TRAIN, "--data-dir", str(data), "--output-dir", str(out)]))


def snapshot(out) -> dict:
    """Every run's predictions file: its bytes and modification time."""
    return {path.parent.name: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(out.glob("*/predictions.jsonl"))}


def run_evaluate(data, out, *extra):
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data), "--output-dir",
                                       str(out),
                                       *extra]))
    return json.loads((out / "comparison.json").read_text())


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Every method trained on tiny-gpt2 and evaluated once."""
    folder = tmp_path_factory.mktemp("loop")
    data = write_split(folder / "data")
    out = folder / "out"
    train_all(data, out)
    run_evaluate(data, out)
    return data, out


def test_nothing_changed_nothing_rescored(scored, capsys):
    data, out = scored
    before = snapshot(out)
    report = run_evaluate(data, out)
    assert snapshot(out) == before
    assert capsys.readouterr().out.count("predictions reused") == 5
    assert [r["method"] for r in report["rows"]] == ["base", "full", "lora", "qlora", "bitfit"]


def test_rerunning_one_method_rescores_only_it(scored, capsys):
    data, out = scored
    before = snapshot(out)
    finetune_lora.main(finetune_lora.parse_args([*TRAIN, "--data-dir", str(data), "--output-dir",
                                                 str(out), "--lr", "5e-3"]))
    capsys.readouterr()
    report = run_evaluate(data, out)
    after = snapshot(out)
    assert after["lora"][1] != before["lora"][1]  # rewritten
    for name in ("base", "full", "qlora", "bitfit"):
        assert after[name] == before[name], name  # untouched, byte for byte and in time
    printed = capsys.readouterr().out
    assert printed.count("predictions reused") == 4
    assert re.search(r"^\s+lora: answer PPL", printed, re.M)
    assert [r["method"] for r in report["rows"]] == ["base", "full", "lora", "qlora", "bitfit"]
    assert next(r for r in report["rows"] if r["method"] == "lora")["lr"] == 5e-3


def test_methods_limits_what_is_rescored_not_what_is_compared(scored, capsys):
    data, out = scored
    before = snapshot(out)
    report = run_evaluate(data, out, "--methods", "lora")
    assert snapshot(out) == before
    assert [r["method"] for r in report["rows"]] == ["base", "full", "lora", "qlora", "bitfit"]


def test_a_changed_method_outside_methods_is_left_out_with_a_warning(scored, capsys):
    data, out = scored
    metrics = out / "bitfit" / "metrics.json"
    original = metrics.read_text()
    metrics.write_text(original.replace('"method"', '"method" ', 1))  # same content, new bytes
    try:
        report = run_evaluate(data, out, "--methods", "lora")
        assert "bitfit" not in [r["method"] for r in report["rows"]]
        assert "changed since it was last scored" in capsys.readouterr().out
    finally:
        metrics.write_text(original)


def test_force_and_a_new_scoring_version_rescore_everything(scored, monkeypatch, capsys):
    data, out = scored
    before = snapshot(out)
    run_evaluate(data, out, "--force")
    forced = snapshot(out)
    assert all(forced[name][1] != before[name][1] for name in before)
    assert all(forced[name][0] == before[name][0] for name in before)  # same answers again
    monkeypatch.setattr(evaluate, "SCORING_VERSION", "test-only")
    capsys.readouterr()
    run_evaluate(data, out)
    assert "predictions reused" not in capsys.readouterr().out


def test_other_eval_rows_or_limit_rescore(scored, capsys):
    data, out = scored
    run_evaluate(data, out, "--limit", "5")
    assert "predictions reused" not in capsys.readouterr().out
    run_evaluate(data, out)  # back to every question: scored again, not mixed with 5
    report = json.loads((out / "comparison.json").read_text())
    assert report["questions"] == 12
    assert all(len((out / n / "predictions.jsonl").read_text().splitlines()) == 12
               for n in ("base", "full", "lora", "qlora", "bitfit"))


# --- report.html --------------------------------------------------------------


def test_report_is_one_self_contained_page_with_everything(scored):
    data, out = scored
    report = run_evaluate(data, out)
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    # nothing is fetched: no external source, stylesheet or script
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # the charts (comparison, quality against cost, learned against forgot) and each
    # method's training curves are embedded
    assert page.count("data:image/png;base64,") == 3 + 4
    assert "What each method learned and what it forgot" in page
    assert report["recommendation"].split(".")[0] in page
    for row in report["rows"]:
        assert f"<td>{row['method']}</td>" in page
    for pair in report["pairwise"]:
        assert f"<td>{pair['a']}</td><td>{pair['b']}</td><td>{pair['difference']:+.1f}</td>" \
            in page
    assert "Comparisons with the best" in page
    for name, entry in report["best"]["methods"].items():
        assert f"<td>{name}</td><td>{entry['seeds']}</td>" in page
    assert "No search ran" in page  # these runs used their scripts' rates
    assert "By category" in page and "By kind of held-out question" in page
    assert "Not kept in this folder" not in page


def test_report_lists_exactly_the_questions_where_methods_disagree(scored):
    data, out = scored
    run_evaluate(data, out)
    runs = {n: [json.loads(l) for l in (out / n / "predictions.jsonl").open()]
            for n in ("base", "full", "lora", "qlora", "bitfit")}
    expected = [i for i in range(12)
                if len({runs[n][i]["key_match"] for n in runs}) > 1]
    page = (out / "report.html").read_text()
    body = page.split('<table id=disagree>')[1].split("</table>")[0]
    assert body.count("<tr data-cat=") == len(expected)
    assert f"{len(expected)} of 12 questions get different verdicts" in page


# --- forgetting: the general-text probe ----------------------------------------------


def probe_files(out) -> dict:
    """Every run's probe.json: its bytes and modification time."""
    return {path.parent.name: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(out.glob("*/probe.json"))}


def test_every_model_is_scored_on_the_probe_and_compared_with_the_base(scored):
    data, out = scored
    report = run_evaluate(data, out)
    assert sorted(probe_files(out)) == ["base", "bitfit", "full", "lora", "qlora"]
    found = report["forgetting"]
    assert found["measured"] and found["probe"]["documents"] == 200
    assert found["probe"]["max_tokens"] == forgetting.MAX_TOKENS  # under half of 256
    assert found["probe"]["sha256"] == common.file_sha256(forgetting.PROBE)
    assert set(found["methods"]) == {"full", "lora", "qlora", "bitfit"}
    assert len(found["pairs"]) == 6 and found["not_measured"] == []
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["base"]["forgetting"] is None
    for name, entry in found["methods"].items():
        assert rows[name]["forgetting"] == entry["change"]
        assert rows[name]["probe_ppl_ratio"] == pytest.approx(math.exp(entry["change"]))
        low, high = rows[name]["forgetting_interval"]
        assert low < entry["change"] < high
        assert entry["learned"]["gain"] == pytest.approx(
            rows[name]["key_accuracy"] - rows["base"]["key_accuracy"])
    assert "Forgetting (change in NLL per token on 200 documents" in report["recommendation"]
    assert (out / "learned_vs_forgot.png").stat().st_size > 0


def test_another_probe_rescores_the_probe_alone(scored, tmp_path, capsys):
    data, out = scored
    predictions, probes = snapshot(out), probe_files(out)
    shorter = tmp_path / "probe.jsonl"
    shorter.write_text("".join(forgetting.PROBE.read_text().splitlines(True)[:30]))
    capsys.readouterr()
    report = run_evaluate(data, out, "--probe", str(shorter))
    assert capsys.readouterr().out.count("predictions reused; scoring the probe") == 5
    assert snapshot(out) == predictions  # the answers were not scored again
    assert all(probe_files(out)[n][1] != probes[n][1] for n in probes)
    assert report["forgetting"]["probe"]["documents"] == 30
    run_evaluate(data, out)  # back to the shipped probe: scored again, not mixed with 30
    assert json.loads((out / "lora" / "probe.json").read_text())["probe"]["documents"] == 200


def test_no_probe_shows_forgetting_as_not_measured_and_keeps_the_verdict(scored, capsys):
    data, out = scored
    measured = run_evaluate(data, out)
    probes = probe_files(out)
    report = run_evaluate(data, out, "--no-probe")
    assert not report["forgetting"]["measured"] and report["outcome"] == measured["outcome"]
    assert all(r["forgetting"] is None for r in report["rows"])
    assert "Forgetting was not measured" in report["recommendation"]
    assert not (out / "learned_vs_forgot.png").exists()
    assert "Forgetting: not measured" in (out / "comparison.md").read_text()
    assert probe_files(out) == probes  # kept for the next evaluation with the probe
    capsys.readouterr()
    again = run_evaluate(data, out)
    assert again["forgetting"] == measured["forgetting"]
    assert "scoring the probe" not in capsys.readouterr().out


def without_paths(comparison: dict) -> dict:
    """comparison.json minus what names the folder it was written in."""
    return {k: v for k, v in comparison.items() if k != "base_model_path"}


def test_published_scores_rebuild_the_same_verdict_without_models(scored, tmp_path):
    data, out = scored
    report = run_evaluate(data, out)
    published = tmp_path / "results" / "tiny"
    evaluate.main(evaluate.parse_args(["--output-dir", str(out), "--publish", str(published)]))
    assert not list(published.rglob("*.safetensors"))  # per-question scores, no weights
    assert (published / "evaluation.json").exists()
    assert (published / compare.PUBLISHED).exists() and not list(published.rglob("*.jsonl"))
    assert compare.compared_runs(published) == compare.compared_runs(out)  # every record, packed
    evaluate.main(evaluate.parse_args(["--output-dir", str(published), "--compare-only"]))
    rebuilt = json.loads((published / "comparison.json").read_text())
    assert without_paths(rebuilt) == without_paths(report)
    assert rebuilt["forgetting"]["measured"]  # the probe's figures travel in the packed file
    assert not list(published.rglob("probe.json"))
    assert (published / "learned_vs_forgot.png").exists()
    assert (published / "comparison.md").read_text() == (out / "comparison.md").read_text()
    page = (published / "report.html").read_text()
    curves = page.split("<h2>Training curves</h2>")[1].split("<h2>")[0]
    assert "<h3>" not in curves and "Not kept in this folder" in curves  # no empty headings


def test_compare_only_alpha_reaches_every_statement(scored, tmp_path):
    data, out = scored
    run_evaluate(data, out)
    evaluate.main(evaluate.parse_args(["--output-dir", str(out), "--compare-only",
                                       "--alpha", "0.2"]))
    report = json.loads((out / "comparison.json").read_text())
    assert report["alpha"] == 0.2 and report["procedure"]["alpha"] == 0.2
    assert report["best"]["alpha"] == 0.2 and report["best"]["alpha_base"] == pytest.approx(0.04)
    assert "all statements hold together at 80%" in (out / "comparison.md").read_text()
    assert "all statements hold together at 80%" in (out / "report.html").read_text()


def test_compare_only_without_an_evaluation_is_one_line(tmp_path, capsys):
    from helpers import run_and_expect_exit

    line = run_and_expect_exit(evaluate.main, evaluate.parse_args(
        ["--output-dir", str(tmp_path), "--compare-only"]), capsys)
    assert "evaluation.json" in line and "python evaluate.py" in line


def test_keys_on_only_some_rows_give_key_accuracy_on_those(tmp_path):
    data = write_split(tmp_path / "data")
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    for row in rows[::3]:
        del row["key"]  # a key column with blank cells, kept blank (--no-derive-keys)
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    finetune_lora.main(finetune_lora.parse_args([*TRAIN, "--data-dir", str(data),
                                                 "--output-dir", str(out)]))
    report = run_evaluate(data, out)
    keyed = sum(1 for r in rows if r.get("key"))
    assert report["headline_metric"] == "key_accuracy"
    assert f"({keyed} of {len(rows)} questions have keys)" in report["headline_label"]
    assert f"{keyed} of {len(rows)} questions have keys" in report["recommendation"]
    assert all(p["n_questions"] == keyed for p in report["pairwise"])
