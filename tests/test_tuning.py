"""tuning.py: the learning-rate search on the validation split, several seeds, and evaluate.py on them."""

import argparse
import json

import pytest

import common
import evaluate
import finetune_bitfit
import finetune_lora
import tuning
from settings import TrainSettings


def lora_args(data_dir, out, *extra):
    return finetune_lora.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                     str(data_dir),
                                     "--output-dir", str(out), "--batch-size", "8",
                                     "--max-steps", "4", *extra])


def test_default_grid_is_the_scripts_rate_and_a_3x_step_either_way():
    rate = finetune_lora.DEFAULT_LR
    rates = [rate * f for f in tuning.GRID_FACTORS]
    assert len(rates) == 3 and max(rates) / min(rates) >= 9
    assert min(rates) < rate < max(rates) and rate in rates


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
    _, out = tuned
    search = json.loads((out / "search" / "lora.json").read_text())
    assert search["grid"] == pytest.approx([finetune_lora.DEFAULT_LR * f
                                            for f in tuning.GRID_FACTORS])
    assert search["split"] == "valid.jsonl"
    assert [r["lr"] for r in search["results"]] == search["grid"]
    best = max(search["results"], key=lambda r: (r["score"], -r["valid_loss"]))
    assert search["chosen_lr"] == best["lr"]
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
    per_seed = [common.summarise([json.loads(line) for line in (out / name / "predictions.jsonl")
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
    """A training callback that raises training.Diverged on the listed calls (1 = first step)."""
    import training

    count = [0]

    def callback(step, control):
        count[0] += 1
        if count[0] in calls:
            raise training.Diverged(f"loss nan at step {step}")
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
    assert "0.001: diverged" in table


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


def test_search_only_without_a_search_is_refused(data_dir, tmp_path):
    with pytest.raises(common.PipelineError, match="--search-only needs --tune-lr"):
        finetune_lora.main(lora_args(data_dir, tmp_path / "o", "--search-only"))
