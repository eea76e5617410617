"""tuning.py: the learning-rate search on the validation split, several seeds, and evaluate.py on them."""

import argparse
import dataclasses
import json
from types import SimpleNamespace

import pytest

import common
import evaluate
import finetune
import finetune_bitfit
import finetune_lora
import scoring
import tuning
from settings import TrainSettings, option
from helpers import run_and_expect_exit, train_args


def lora_args(data_dir, out, *extra):
    return finetune_lora.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                     str(data_dir),
                                     "--output-dir", str(out), "--batch-size", "8",
                                     "--max-steps", "4", *extra])


def test_default_grid_is_the_scripts_rate_and_a_3x_step_either_way(tmp_path):
    for script in (finetune_lora, finetune_bitfit):
        rate = script.DEFAULT_LR
        rates = tuning.lr_grid(TrainSettings.from_args(script.parse_args([])))
        assert len(rates) == 3 and rates == sorted(rates) and rate in rates
        assert rates[0] < rate < rates[-1]
        assert 2.5 <= rate / rates[0] <= 3.5 and 2.5 <= rates[-1] / rate <= 3.5  # ~3x each way
    # --lr moves the grid with it
    moved = tuning.lr_grid(TrainSettings.from_args(finetune_lora.parse_args(["--lr", "1e-3"])))
    assert moved == pytest.approx([3e-4, 1e-3, 3e-3])


def test_lr_grid_gives_the_option_when_set(tmp_path):
    given = TrainSettings.from_args(lora_args(tmp_path, tmp_path / "o", "--lr-grid", "1e-4,3e-4"))
    assert tuning.lr_grid(given) == [1e-4, 3e-4]


def test_lr_grid_option_is_checked():
    with pytest.raises(SystemExit):
        lora_args("d", "o", "--lr-grid", "1e-4")
    with pytest.raises(SystemExit):
        lora_args("d", "o", "--lr-grid", "1e-4,x")
    assert lora_args("d", "o", "--lr-grid", "3e-4,1e-4").lr_grid == [1e-4, 3e-4]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """LoRA searched over the default grid, then trained with two seeds."""
    from helpers import write_split

    folder = tmp_path_factory.mktemp("tune")
    data = write_split(folder / "data")
    (data / "eval.jsonl").write_text("this file must never be read while tuning\n")
    out = folder / "out"
    finetune_lora.main(lora_args(data, out, "--tune-lr", "--seeds", "2"))
    return data, out


def test_search_scores_every_rate_on_validation_and_records_the_choice(tuned):
    data, out = tuned
    search = json.loads((out / "search" / "lora.json").read_text())
    assert search["initial_grid"] == pytest.approx([finetune_lora.DEFAULT_LR * f
                                                    for f in tuning.GRID_FACTORS])
    assert search["grid"] == sorted(search["initial_grid"] + search["widened"])
    assert search["split"] == "valid.jsonl" and search["metric"] == "valid_answer_nll"
    assert [r["lr"] for r in search["results"]] == search["grid"]
    # every question of valid.jsonl is scored, and valid_nll is their summed NLL per token
    questions = len(common.load_split(data, "valid"))
    assert len(search["answer_tokens"]) == len(search["groups"]) == questions
    for r in search["results"]:
        assert len(r["answer_nll"]) == questions and r["score"] is not None
        assert r["valid_nll"] == pytest.approx(sum(r["answer_nll"]) / sum(search["answer_tokens"]))
    best = min(search["results"], key=lambda r: r["valid_nll"])
    assert search["chosen_lr"] == best["lr"]
    assert best["nll_difference"] == 0 and best["near_tie"] is False
    for name in ("lora", "lora-seed43"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["args"]["lr"] == search["chosen_lr"]
        assert metrics["lr_search"]["chosen_lr"] == search["chosen_lr"]


def test_seeds_write_one_folder_each_with_one_run_id(tuned):
    _, out = tuned
    first = json.loads((out / "lora" / "metrics.json").read_text())
    second = json.loads((out / "lora-seed43" / "metrics.json").read_text())
    assert (first["args"]["seed"], second["args"]["seed"]) == (42, 43)
    assert first["run_id"] == second["run_id"]
    assert first["history"] != second["history"]  # a different seed trains differently
    assert not (out / "checkpoints").exists()


def test_evaluate_reports_the_mean_over_seeds(tuned, tmp_path):
    data, out = tuned
    from helpers import write_split

    fresh = write_split(tmp_path / "data")  # a readable eval.jsonl, same train/valid rows
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(fresh),
                                       "--output-dir", str(out)]))
    report = json.loads((out / "comparison.json").read_text())
    lora = next(r for r in report["rows"] if r["method"] == "lora")
    assert lora["seeds"] == 2 and lora["seed_values"] == [42, 43]
    per_seed = [scoring.summarise([json.loads(line) for line in (out / name / "predictions.jsonl")
                                  .open()])["token_f1"] for name in ("lora", "lora-seed43")]
    assert lora["token_f1"] == pytest.approx(sum(per_seed) / 2)
    assert report["lr_search"]["lora"]["chosen_lr"] == lora["lr"]
    assert (out / "lr_search.png").stat().st_size > 0


def test_a_seed_trained_with_other_settings_is_left_out(tuned, tmp_path, capsys):
    _, out = tuned
    metrics_path = out / "lora-seed43" / "metrics.json"
    original = metrics_path.read_text()
    metrics_path.write_text(json.dumps({**json.loads(original), "run_id": "something else"}))
    try:
        found = evaluate.find_methods(out, "lora")
        assert [folder.name for folder, _ in found["lora"]] == ["lora"]
        assert "other settings" in capsys.readouterr().out
    finally:
        metrics_path.write_text(original)


def test_fewer_seeds_remove_stale_seed_folders_and_resume_skips_finished(data_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    args = finetune_bitfit.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                       str(data_dir),
                                       "--output-dir", str(out), "--batch-size", "8",
                                       "--max-steps", "2", "--seeds", "2"])
    finetune_bitfit.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["bitfit", "bitfit-seed43"]
    stamp = (out / "bitfit" / "COMPLETED").read_text()
    finetune_bitfit.main(argparse.Namespace(**{**vars(args), "resume": True}))
    assert "already complete; skipped" in capsys.readouterr().out
    assert (out / "bitfit" / "COMPLETED").read_text() == stamp
    finetune_bitfit.main(argparse.Namespace(**{**vars(args), "seeds": 1}))
    assert sorted(p.name for p in out.iterdir()) == ["bitfit"]


def test_resume_reuses_a_finished_search(tuned, capsys):
    data, out = tuned
    search = (out / "search" / "lora.json").read_text()
    args = lora_args(data, out, "--tune-lr", "--seeds", "2", "--resume")
    finetune_lora.main(args)
    printed = capsys.readouterr().out
    assert "using the finished learning-rate search" in printed
    assert "learning-rate search 1/3" not in printed
    assert printed.count("already complete; skipped") == 2
    assert (out / "search" / "lora.json").read_text() == search


def diverge_on_calls(calls: set):
    """A training callback that raises steps.Diverged on the listed calls (1 = first step)."""
    import steps

    count = [0]

    def callback(step, control):
        count[0] += 1
        if count[0] in calls:
            raise steps.Diverged(f"loss nan at step {step}")
    return callback


def test_a_diverged_rate_is_recorded_and_never_chosen(data_dir, tmp_path):
    out = tmp_path / "out"
    # the first rate's first step diverges; the other two runs and the final one train on
    finetune_lora.main(lora_args(data_dir, out, "--tune-lr", "--lr-grid", "1e-3,3e-3,1e-2"),
                       callbacks=(diverge_on_calls({1}),))
    search = json.loads((out / "search" / "lora.json").read_text())
    first, *rest = search["results"]
    assert first["diverged"] is True and first["score"] is None and first["lr"] == 1e-3
    assert search["diverged"] == [1e-3]
    assert all(r["diverged"] is False and r["score"] is not None for r in rest)
    assert search["chosen_lr"] != 1e-3
    assert not (out / "checkpoints" / "lora").exists()
    assert json.loads((out / "lora" / "metrics.json").read_text())["args"]["lr"] == \
        search["chosen_lr"]
    # the chart draws it (an x on the axis) and the report lists it as diverged
    import report

    report.plot_lr_search({"lora": search}, tmp_path / "lr_search.png")
    assert (tmp_path / "lr_search.png").stat().st_size > 0
    table = report.search_table({"lr_search": {"lora": search}}, out)
    assert "<td>0.001</td><td>diverged</td>" in table


def test_a_search_where_every_rate_diverges_stops_with_one_line(data_dir, tmp_path, capsys):
    from helpers import run_and_expect_exit

    out = tmp_path / "out"
    args = lora_args(data_dir, out, "--tune-lr", "--lr-grid", "1e-3,1e-2")
    line = run_and_expect_exit(
        lambda a: finetune_lora.main(a, callbacks=(diverge_on_calls(set(range(1, 100))),)),
        args, capsys)
    assert "diverged at every rate" in line and "0.001, 0.01" in line
    assert not (out / "search").exists() and not (out / "lora").exists()


def test_a_fractional_search_budget_trains_that_share_of_an_epoch_and_search_only_stops(
        data_dir, tmp_path):
    """--search-epochs 0.5 trains half an epoch's steps per rate; --search-only trains no seed."""
    steps = {}
    for budget in ("1", "0.5"):
        out = tmp_path / budget
        finetune_lora.main(lora_args(data_dir, out, "--tune-lr", "--search-only",
                                     "--search-epochs", budget, "--lr-grid", "1e-4,1e-3"))
        search = json.loads((out / "search" / "lora.json").read_text())
        assert search["search_epochs"] == float(budget)
        assert search["budget"].startswith(f"{budget} epoch(s) per rate")
        steps[budget] = {r["steps"] for r in search["results"]}
        assert not (out / "lora").exists() and not list(out.glob("lora-seed*"))
    (full,), (half,) = steps["1"], steps["0.5"]
    assert full >= 2 and half == max(1, round(full / 2))


def test_resume_after_search_only_trains_the_seeds_at_the_reused_rate(data_dir, tmp_path,
                                                                      capsys):
    """--search-only, then the same command with --resume: the search is reused (not trained
    again) and the seeds start afresh at its rate, recorded as searched."""
    out = tmp_path / "o"
    grid = ("--tune-lr", "--lr-grid", "1e-4,1e-3")
    finetune_lora.main(lora_args(data_dir, out, *grid, "--search-only"))
    capsys.readouterr()
    finetune_lora.main(lora_args(data_dir, out, *grid, "--resume", "--seeds", "2"))
    printed = capsys.readouterr().out
    assert "using the finished learning-rate search" in printed
    assert "learning-rate search 1/" not in printed
    chosen = json.loads((out / "search" / "lora.json").read_text())["chosen_lr"]
    for folder in ("lora", "lora-seed43"):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["args"]["lr"] == chosen and metrics["lr_search"]["chosen_lr"] == chosen


def test_search_only_without_a_search_is_refused(data_dir, tmp_path):
    with pytest.raises(common.PipelineError, match="--search-only needs --tune-lr"):
        finetune_lora.main(lora_args(data_dir, tmp_path / "o", "--search-only"))


# --- The choice by validation answer NLL, widening and near ties (training stood in for) ----

# The stand-in validation split: four fact groups of two wordings, answers of uneven length.
TOKENS = [3, 5, 4, 6, 2, 7, 5, 4]
GROUPS = ["a", "a", "b", "b", "c", "c", "d", "d"]


def per_question(per_token: list[float]) -> list[float]:
    """Summed answer NLL per question from each question's NLL per token."""
    return [p * t for p, t in zip(per_token, TOKENS)]


def fake_search(monkeypatch, nll_of, score_of=lambda lr: 50.0, diverges=lambda lr: False):
    """Stand in for training and scoring: each rate's per-question NLL and key accuracy.

    nll_of(lr) gives the summed NLL per question (TOKENS answer tokens each); a rate
    for which diverges(lr) is true raises steps.Diverged.  Returns the rates
    trained, in order.
    """
    import steps

    rows = [{"prompt": f"q{i}", "completion": "a", "group": g} for i, g in enumerate(GROUPS)]
    trained = []

    def train_unsaved(settings, method, prepare, load_kwargs, callbacks=()):
        trained.append(settings.lr)
        if diverges(settings.lr):
            raise steps.Diverged(f"loss nan at lr {settings.lr:g}")
        metrics = {"valid_loss": [{"step": 1, "loss": 1.0}], "train_loss": 1.0,
                   "train_seconds": 0.0, "steps": 1, "precision": "fp32"}
        return metrics, SimpleNamespace(settings=settings, valid_rows=rows), object(), None

    monkeypatch.setattr(tuning, "train_unsaved", train_unsaved)
    monkeypatch.setattr(tuning, "validation_nll", lambda run, model, tokenizer: list(
        zip(nll_of(run.settings.lr), TOKENS)))
    monkeypatch.setattr(tuning, "validation_score", lambda run, model, tokenizer: (
        score_of(run.settings.lr), "key_accuracy", "key-answer accuracy"))
    return trained


def search_settings(tmp_path, grid: str = "1e-4,3e-4,1e-3", *extra) -> TrainSettings:
    return TrainSettings.from_args(lora_args(tmp_path / "data", tmp_path / "out", "--tune-lr",
                                             "--lr-grid", grid, *extra))


def by_rate(search: dict) -> dict[float, dict]:
    return {r["lr"]: r for r in search["results"]}


def test_the_rate_with_the_lowest_validation_nll_is_chosen_whatever_key_accuracy_says(
        monkeypatch, tmp_path):
    per_token = {1e-4: 0.9, 3e-4: 0.5, 1e-3: 0.7}
    trained = fake_search(monkeypatch, lambda lr: per_question([per_token[lr]] * 8),
                          score_of=lambda lr: {1e-4: 40.0, 3e-4: 55.0, 1e-3: 80.0}[lr])
    settings = search_settings(tmp_path)
    search = tuning.search_learning_rate(settings, "lora", None, {})
    assert trained == [1e-4, 3e-4, 1e-3]
    assert search["chosen_lr"] == 3e-4  # key accuracy prefers 1e-3: shown, not used
    assert search["metric"] == "valid_answer_nll" and "key-answer accuracy" in search["criterion"]
    rates = by_rate(search)
    assert {lr: r["valid_nll"] for lr, r in rates.items()} == pytest.approx(per_token)
    assert {lr: r["score"] for lr, r in rates.items()} == {1e-4: 40.0, 3e-4: 55.0, 1e-3: 80.0}
    assert rates[3e-4]["answer_nll"] == pytest.approx(per_question([0.5] * 8))
    assert search["answer_tokens"] == TOKENS and search["groups"] == GROUPS
    assert search["widened"] == [] and search["edge"] is False
    assert search["initial_grid"] == search["grid"] == [1e-4, 3e-4, 1e-3]
    assert json.loads((tmp_path / "out" / "search" / "lora.json").read_text()) == search


def clustered_difference(rate: list[float], chosen: list[float]) -> tuple[float, float]:
    """(difference in NLL per token, its CR1 standard error over GROUPS), written out longhand."""
    paired = [a - b for a, b in zip(rate, chosen)]
    n, mean_tokens = len(paired), sum(TOKENS) / len(TOKENS)
    difference = sum(paired) / sum(TOKENS)
    linear = [(d - difference * t) / mean_tokens for d, t in zip(paired, TOKENS)]
    centre = sum(linear) / n
    sums = {}
    for group, value in zip(GROUPS, linear):
        sums[group] = sums.get(group, 0.0) + value - centre
    g = len(sums)
    return difference, (g / (g - 1) * sum(v * v for v in sums.values()) / n ** 2) ** 0.5


def test_near_tie_is_within_two_clustered_standard_errors_of_the_chosen_rate(monkeypatch,
                                                                            tmp_path):
    chosen = per_question([0.5] * 8)
    # 1e-4 is worse by a difference that moves with the fact group: 1.75 clustered SEs (a
    # near tie), though 2.6 SEs if each question counted as independent; 1e-3 is worse by
    # nearly the same amount on every question: about 20 SEs, clearly worse.
    close = per_question([0.5 + d for d in (.15, .15, 0, 0, .13, .13, .01, .01)])
    far = per_question([0.5 + d for d in (.06, .05, .05, .04, .06, .05, .05, .04)])
    fake_search(monkeypatch, lambda lr: {1e-4: close, 3e-4: chosen, 1e-3: far}[lr])
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    rates = by_rate(search)
    assert search["chosen_lr"] == 3e-4
    assert rates[3e-4]["nll_difference"] == 0 and rates[3e-4]["nll_difference_se"] == 0
    for lr, values in ((1e-4, close), (1e-3, far)):
        difference, se = clustered_difference(values, chosen)
        assert rates[lr]["nll_difference"] == pytest.approx(difference)
        assert rates[lr]["nll_difference_se"] == pytest.approx(se)
    assert rates[1e-4]["nll_difference"] / rates[1e-4]["nll_difference_se"] == \
        pytest.approx(1.75, abs=0.01)
    assert [rates[lr]["near_tie"] for lr in (1e-4, 3e-4, 1e-3)] == [True, False, False]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_winner_at_the_edge_widens_the_grid_at_most_three_times(monkeypatch, tmp_path,
                                                                 direction):
    import math

    # the NLL keeps falling towards one end: every widening wins again
    slope = -0.05 if direction == "up" else 0.05
    trained = fake_search(monkeypatch, lambda lr: per_question([1 + slope * math.log(lr)] * 8))
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    step = (lambda lr: round(lr * 3, 12)) if direction == "up" else (lambda lr: round(lr / 3, 12))
    edge = 1e-3 if direction == "up" else 1e-4
    widened = [step(edge), step(step(edge)), step(step(step(edge)))]
    assert search["widened"] == widened and trained == [1e-4, 3e-4, 1e-3] + widened
    assert search["grid"] == sorted([1e-4, 3e-4, 1e-3] + widened)
    assert search["initial_grid"] == [1e-4, 3e-4, 1e-3]
    assert search["chosen_lr"] == widened[-1] and search["edge"] is True
    assert search["budget"].startswith("1 epoch(s) per rate, 6 rates")


def test_widening_stops_once_the_winner_is_interior(monkeypatch, tmp_path):
    import math

    # lowest at 3e-3: the first widening wins, the second (9e-3) does not
    trained = fake_search(monkeypatch, lambda lr: per_question(
        [1 + (math.log(lr) - math.log(3e-3)) ** 2] * 8))
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    assert search["widened"] == [0.003, 0.009] and trained == [1e-4, 3e-4, 1e-3, 0.003, 0.009]
    assert search["chosen_lr"] == 0.003 and search["edge"] is False


def test_widening_stops_when_the_added_rate_diverges(monkeypatch, tmp_path):
    import math

    trained = fake_search(monkeypatch, lambda lr: per_question([1 - 0.05 * math.log(lr)] * 8),
                          diverges=lambda lr: lr > 5e-3)
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    assert search["widened"] == [0.003, 0.009] and trained == [1e-4, 3e-4, 1e-3, 0.003, 0.009]
    assert search["diverged"] == [0.009] and search["chosen_lr"] == 0.003
    assert search["edge"] is False  # bounded by the rate that diverged
    diverged = by_rate(search)[0.009]
    assert diverged["diverged"] is True and diverged["valid_nll"] is None
    assert diverged["near_tie"] is False


def test_resume_reuses_a_widened_search_by_its_initial_grid(monkeypatch, tmp_path, capsys):
    import math

    fake_search(monkeypatch, lambda lr: per_question([1 - 0.05 * math.log(lr)] * 8))
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    assert search["grid"] != tuning.lr_grid(search_settings(tmp_path))
    reused = tuning.previous_search(search_settings(tmp_path, "1e-4,3e-4,1e-3", "--resume"),
                                    "lora")
    assert reused == search and "using the finished learning-rate search" in capsys.readouterr().out
    # a search of another grid is not reused, not even one of the rates it widened to
    assert tuning.previous_search(search_settings(tmp_path, "1e-4,3e-4,1e-3,3e-3"), "lora") is None
    assert tuning.previous_search(search_settings(tmp_path, ",".join(
        f"{lr:g}" for lr in search["grid"])), "lora") is None
    # a search that chose by key accuracy (written before the NLL rule) is searched again
    path = tmp_path / "out" / "search" / "lora.json"
    old = {k: v for k, v in search.items() if k not in ("initial_grid", "widened")}
    path.write_text(json.dumps({**old, "grid": [1e-4, 3e-4, 1e-3], "metric": "key_accuracy"}))
    assert tuning.previous_search(search_settings(tmp_path, "1e-4,3e-4,1e-3", "--resume"),
                                  "lora") is None
    assert "not by validation answer NLL; searching again" in capsys.readouterr().out


def test_validation_nll_scores_each_question_as_evaluate_does(data_dir):
    import torch

    import models

    device = torch.device("cpu")
    model, tokenizer, _ = models.load_model("tiny-gpt2", device)
    rows = common.load_split(data_dir, "valid")
    run = SimpleNamespace(valid_rows=rows, device=device, method="lora", precision="fp32")
    examples = common.tokenize_rows(tokenizer, rows, 10**9, label_eos=False)
    records = evaluate.evaluate_model("lora", model, tokenizer, rows, examples, 4, None,
                                      argparse.Namespace(batch_size=None), device)
    assert tuning.validation_nll(run, model, tokenizer) == [
        (r["answer_nll"], r["answer_tokens"]) for r in records]


def test_report_draws_nll_with_bars_and_old_searches_without(monkeypatch, tmp_path):
    """The chart and table of a search by NLL, and of one written before it chose by NLL."""
    import math

    import report

    fake_search(monkeypatch, lambda lr: per_question([1 - 0.05 * math.log(lr)] * 8),
                score_of=lambda lr: 60.0, diverges=lambda lr: lr > 5e-3)
    search = tuning.search_learning_rate(search_settings(tmp_path), "lora", None, {})
    # a search as written before 2026-12-05 (the published run's full.json then, abridged)
    old = {"method": "full", "model": "smollm2-135m", "grid": [1.5e-05, 5e-05, 0.00015],
           "results": [{"lr": lr, "score": score, "diverged": False, "valid_loss": loss}
                       for lr, score, loss in ((1.5e-05, 63.1, 0.4892), (5e-05, 77.4, 0.3146),
                                               (0.00015, 71.4, 0.2659))],
           "chosen_lr": 5e-05, "metric": "key_accuracy", "metric_label": "key-answer accuracy",
           "split": "valid.jsonl", "search_epochs": 1, "precision": "bf16",
           "budget": "1 epoch(s) per rate, 3 rates, seed 42", "edge": False, "diverged": []}
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.append(fig))
    report.plot_lr_search({"lora": search, "full": old}, tmp_path / "lr_search.png")
    bars = drawn[0].axes[0].containers  # one errorbar container per method, in order
    finished = [r for r in search["results"] if not r["diverged"]]
    assert list(bars[0].lines[0].get_ydata()) == [r["valid_nll"] for r in finished]
    assert bars[0].has_yerr and not bars[1].has_yerr
    assert list(bars[1].lines[0].get_ydata()) == [r["valid_loss"] for r in old["results"]]

    table = report.search_table({"lr_search": {"lora": search}}, tmp_path / "out")
    near = by_rate(search)[1e-3]
    assert (f"<td>{near['valid_nll']:.4f}</td><td>{near['nll_difference']:+.4f} &plusmn; "
            f"{near['nll_difference_se']:.4f}</td><td>no</td><td>60.0</td>") in table
    assert "<td><b>0.003 (widened)</b></td>" in table and "<td>0.009 (widened)</td>" in table
    assert "<td>0.009 (widened)</td><td>diverged</td>" in table
    assert "lowest validation answer NLL" in table
    (tmp_path / "old" / "search").mkdir(parents=True)
    (tmp_path / "old" / "search" / "full.json").write_text(json.dumps(old))
    table = report.search_table({"lr_search": {"full": old}}, tmp_path / "old")
    assert "(validation loss)" in table and "best key-answer accuracy" in table


def test_a_new_unmarked_setting_leaves_run_id_unchanged(data_dir):
    @dataclasses.dataclass(frozen=True)
    class WithMore(TrainSettings):
        colour: str = option("red", "an option that does not define the run")
        width: int = option(3, "one that does", identity=True)

    base = dict(model="tiny-gpt2", data_dir=str(data_dir), method_options={"rank": 8})
    plain = tuning.run_id(TrainSettings(**base), "lora")
    assert tuning.run_id(WithMore(**base), "lora") != plain
    assert tuning.run_id(WithMore(**base, colour="blue"), "lora") == \
        tuning.run_id(WithMore(**base), "lora")
    # Seeds and where the files go never define the run; the rate does.
    assert tuning.run_id(TrainSettings(**base, seed=7, output_dir="elsewhere"), "lora") == plain
    assert tuning.run_id(TrainSettings(**base, lr=1.0), "lora") != plain


def test_the_resume_rule_skips_finished_seeds_continues_the_interrupted_and_starts_the_rest(
        tmp_path):
    import runpaths
    from runpaths import RunPaths

    settings = TrainSettings(output_dir=str(tmp_path), seed=42, resume=True)
    done, next_seed = RunPaths(tmp_path, "lora"), RunPaths(tmp_path, "lora", "lora-seed43")
    assert tuning.resume_action(settings.replace(resume=False), done, "id", False) == "start"
    # nothing finished, no checkpoint: "continue", so start_run says there is nothing to resume
    assert tuning.resume_action(settings, done, "id", False) == "continue"
    done.run.mkdir(parents=True)
    (done.run / runpaths.COMPLETED).write_text("")
    done.metrics.write_text(json.dumps({"run_id": "id", "args": {"seed": 42}}))
    assert tuning.resume_action(settings, done, "id", False) == "skip"
    assert tuning.resume_action(settings, done, "another id", False) == "continue"
    seed43 = settings.replace(seed=43)
    assert tuning.resume_action(seed43, next_seed, "id", True) == "start"  # never begun
    done.checkpoint(3).mkdir(parents=True)
    (done.checkpoint(3) / "state.json").write_text("{}")
    assert tuning.resume_action(seed43, next_seed, "id", True) == "continue"  # interrupted


# --- bad input and misuse: one line, exit status 2, nothing lost ---------------------


def test_resume_without_a_checkpoint(data_dir, tmp_path, capsys):
    line = run_and_expect_exit(finetune.main,
                               train_args(finetune, data_dir, tmp_path, "--resume"), capsys)
    assert "no checkpoint" in line
