"""The published run (results/smollm2-135m/): its verdict is rebuilt from the committed files alone.

The folder holds every compared run's per-question predictions and scores
(packed in one compare.PUBLISHED file), its metrics.json and the searches, but no model.
"""

import json
import random
import shutil

import numpy as np
import pytest

import common
import compare
import evaluate
import runpaths
import verdict
from helpers import ROOT

RESULTS = ROOT / "results" / "smollm2-135m"


def published_runs() -> dict[str, list[list[dict]]]:
    """Each compared model's per-question records, one list per seed, as evaluate.py compared them."""
    return compare.compared_runs(RESULTS)[1]


METHODS_RESULTS = ROOT / "results" / "smollm2-135m-methods"  # all eleven methods, 3 seeds


@pytest.mark.parametrize("folder", [RESULTS, METHODS_RESULTS], ids=["four", "eleven"])
def test_the_published_verdict_is_rebuilt_from_the_published_files(tmp_path, folder):
    copy = tmp_path / "results"
    shutil.copytree(folder, copy)
    evaluate.main(evaluate.parse_args(["--output-dir", str(copy), "--compare-only"]))
    rebuilt = json.loads((copy / "comparison.json").read_text())
    published = json.loads((folder / "comparison.json").read_text())
    assert rebuilt == published
    assert (copy / "comparison.md").read_text() == (folder / "comparison.md").read_text()
    assert (copy / "comparison.csv").read_text() == (folder / "comparison.csv").read_text()


@pytest.mark.parametrize("folder", [RESULTS, METHODS_RESULTS], ids=["four", "eleven"])
def test_the_published_folder_holds_what_the_readme_and_the_rebuild_use(folder):
    """Scores and run records, the rendered tables and charts; no weights, no HTML, no curves."""
    tracked = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
               and not p.name == "report.html"}  # rendered here by other tests; git ignores it
    assert {"evaluation.json", compare.PUBLISHED, "comparison.json", "comparison.md",
            "comparison.csv", "comparison.png", "quality_vs_cost.png", "lr_search.png",
            "report.png"} <= tracked
    if folder == RESULTS:  # the eleven-method run used the same split (make data), kept here once
        assert "split_report.json" in tracked
    assert not any(p.endswith((".html", ".safetensors", "predictions.jsonl",
                               "training_metrics.png")) for p in tracked)
    assert sum((folder / p).stat().st_size for p in tracked) < 3 * 2**20


def test_the_eleven_method_run_says_what_the_readme_reports_of_it():
    """Inconclusive at 3 seeds; prompt tuning and PiSSA shown worse; every method forgot,
    full least and LoRA more than full (its own pair clears zero, the family does not);
    QLoRA flagged for forgetting more than full, with which it ties."""
    found = json.loads((METHODS_RESULTS / "comparison.json").read_text())
    assert found["outcome"] == "inconclusive" and found["recommended"] is None
    assert len(found["pairwise"]) == 55 + 11  # every pair of the eleven, and each against base
    shown_worse = {m for m, e in found["best"]["methods"].items() if not e["in_best_set"]}
    assert shown_worse == {"prompt", "pissa"}
    forgot = found["forgetting"]
    change = {m: e["change"] for m, e in forgot["methods"].items()}
    assert all(e["interval"][0] > 0 for e in forgot["methods"].values())
    assert min(change, key=change.get) == "full" and change["lora"] > change["full"]
    pair = next(p for p in forgot["pairs"] if {p["a"], p["b"]} == {"full", "lora"})
    assert pair["forgets_more"] is None and pair["lower"] < 0 < pair["upper"]
    assert {"method": "qlora", "than": "full"} in [
        {k: f[k] for k in ("method", "than")} for f in forgot["flags"]]


def first_seeds(runs: dict, k: int = 3) -> dict:
    """The runs as first published, before the plan's seeds were added: k seeds a method."""
    return {name: seeds[:k] for name, seeds in runs.items()}


def test_at_three_seeds_the_run_was_inconclusive_and_printed_the_plan_that_was_run():
    """Seeds 42-44 only, the rigorous command's own run: nothing is shown within the 5-point
    margin, no method is shown worse, and the plan asks for 5-6 seeds; the published folder
    holds the seeds that plan added (run to a count fixed in advance)."""
    runs = published_runs()
    first = first_seeds(runs)
    best = verdict.compare_with_best(verdict.estimate(first, "key_match"))
    assert best["best_set"] == ["full", "lora", "qlora", "bitfit"]
    assert not any(entry["clears_margin"] for entry in best["methods"].values())
    assert all(entry["base"]["helps"] for entry in best["methods"].values())
    info = common.read_json(runpaths.evaluation_file(RESULTS))
    rows = [compare.comparison_row(n, r, None if n == "base" else [
        common.read_json(RESULTS / f / "metrics.json") for f in info["runs"][n][:3]])
        for n, r in first.items()]
    plan = verdict.settle_plan(verdict.estimate(first, "key_match"), best, verdict.cost_order(rows))
    seeds = {c["method"]: c["seeds"]["seeds"] for c in plan["considered"] if c.get("seeds")}
    assert seeds and max(seeds.values()) <= 6
    assert min(len(r) for n, r in runs.items() if n != "base") >= max(seeds.values())


def test_the_published_comparison_records_the_margin_the_best_set_and_the_plan():
    published = json.loads((RESULTS / "comparison.json").read_text())
    best = published["best"]
    assert published["margin"] == best["margin"] == published["procedure"]["margin"]
    for entry in best["methods"].values():
        assert {"gap", "lower", "upper", "in_best_set", "clears_margin", "base"} <= set(entry)
    assert published["outcome"] in ("recommend", "inconclusive", "none")
    if published["outcome"] == "inconclusive":
        assert published["plan"]["considered"] and published["plan"]["commands"]


def test_the_published_decisions_do_not_depend_on_any_rng_seed():
    runs = published_runs()
    published = json.loads((RESULTS / "comparison.json").read_text())
    calls = []
    for seed in range(5):
        np.random.seed(seed)   # neither generator may reach a decision
        random.seed(seed)
        calls.append(verdict.compare_with_best(verdict.estimate(runs, "key_match"), alpha=published["alpha"],
                                               margin=published["margin"]))
    assert all(call == calls[0] for call in calls)
    assert calls[0]["best_set"] == published["best"]["best_set"]


def test_the_published_comparison_counts_fact_groups():
    published = json.loads((RESULTS / "comparison.json").read_text())
    procedure = published["procedure"]
    assert procedure["questions"] == published["questions"] == 394
    assert procedure["groups"] < procedure["questions"]  # wordings of one fact are one unit
    assert all(p["n_groups"] == procedure["groups"] for p in published["pairwise"])


def test_the_margin_is_declared_on_the_command_line_and_recorded(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    evaluate.main(evaluate.parse_args(["--output-dir", str(copy), "--compare-only",
                                       "--margin", "30"]))
    rebuilt = json.loads((copy / "comparison.json").read_text())
    assert rebuilt["margin"] == rebuilt["best"]["margin"] == 30
    assert rebuilt["outcome"] == "recommend"  # a margin this wide is cleared
    assert "within the declared margin of 30 points" in rebuilt["recommendation"]


def test_the_plan_commands_add_seeds_where_the_runs_were_trained():
    info = common.read_json(runpaths.evaluation_file(RESULTS))
    trained = {name: [common.read_json(RESULTS / folder / "metrics.json") for folder in folders]
               for name, folders in info["runs"].items() if name != "base"}
    plan = {"target": "qlora", "considered": [
        {"method": "qlora", "reachable": True, "with": ["full"],
         "seeds": {"seeds": 7, "runs": 8}, "questions": {"factor": 2, "seeds": 4, "runs": 32}}]}
    commands = compare.plan_commands(RESULTS, info, trained, plan)["qlora"]
    args = trained["qlora"][0]["args"]
    # results/ holds no weights: the seeds go where metrics.json says the runs were trained
    assert commands["seeds"].startswith(
        f"python finetune_qlora.py --model {info['model']} --lr {args['lr']:g} --epochs 2 "
        f"--precision {args['precision']} --data-dir {args['data_dir']} --output-dir "
        f"{args['output_dir']} --seeds 7 --resume && python finetune.py ")
    assert commands["seeds"].endswith(f"python evaluate.py --data-dir {args['data_dir']} "
                                      f"--output-dir {args['output_dir']}")
    rows = (trained["qlora"][0]["train_examples"] + trained["qlora"][0]["valid_examples"]
            + info["questions"])
    assert commands["questions"] == (f"make all MODEL={info['model']} SIZE={2 * rows} SEEDS=4 "
                                     "TUNE=1 DATA=data/larger OUT=outputs/larger")


def test_a_folder_published_before_the_probe_shows_forgetting_as_not_measured():
    """results/smollm2-135m/ holds no probe scores: its verdict is rebuilt as before, and the
    forgetting columns say not measured instead of inventing a figure."""
    published = json.loads((RESULTS / "comparison.json").read_text())
    assert published["forgetting"]["measured"] is False
    assert compare.read_published_probes(RESULTS) is None
    assert all(row["forgetting"] is None for row in published["rows"])
    assert "Forgetting was not measured" in published["recommendation"]
    assert "Forgetting: not measured" in (RESULTS / "comparison.md").read_text()
