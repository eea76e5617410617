"""The published run (results/smollm2-135m/): its verdict is rebuilt from the committed files alone.

The folder holds every compared run's per-question predictions and scores
(predictions.jsonl), its metrics.json and the searches, but no model.
"""

import json
import random
import shutil

import numpy as np

import common
import evaluate
import runpaths
import verdict
from helpers import ROOT

RESULTS = ROOT / "results" / "smollm2-135m"


def published_runs() -> dict[str, list[list[dict]]]:
    """Each compared model's per-question records, one list per seed, as evaluate.py compared them."""
    info = common.read_json(runpaths.evaluation_file(RESULTS))
    return {name: [common.read_jsonl(RESULTS / folder / "predictions.jsonl") for folder in folders]
            for name, folders in info["runs"].items()}


def test_the_published_verdict_is_rebuilt_from_the_published_files(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    evaluate.main(evaluate.parse_args(["--output-dir", str(copy), "--compare-only"]))
    rebuilt = json.loads((copy / "comparison.json").read_text())
    published = json.loads((RESULTS / "comparison.json").read_text())
    assert rebuilt == published
    assert (copy / "comparison.md").read_text() == (RESULTS / "comparison.md").read_text()


def test_the_published_decisions_do_not_depend_on_any_rng_seed():
    runs = published_runs()
    published = json.loads((RESULTS / "comparison.json").read_text())
    field = {"key_accuracy": "key_match", "token_f1": "token_f1"}[published["headline_metric"]]
    calls = []
    for seed in range(20):
        np.random.seed(seed)   # neither generator may reach a decision
        random.seed(seed)
        pairs = verdict.pairwise(runs, field, alpha=published["alpha"])
        calls.append([(p["a"], p["b"], p["significant"], p["stable"]) for p in pairs])
    assert all(call == calls[0] for call in calls)
    assert calls[0] == [(p["a"], p["b"], p["significant"], p["stable"])
                        for p in published["pairwise"]]
    assert all(stable is True for *_, stable in calls[0])


def test_the_published_comparison_counts_fact_groups():
    published = json.loads((RESULTS / "comparison.json").read_text())
    procedure = published["procedure"]
    assert procedure["questions"] == published["questions"] == 394
    assert procedure["groups"] < procedure["questions"]  # wordings of one fact are one unit
    assert all(p["n_groups"] == procedure["groups"] for p in published["pairwise"])
