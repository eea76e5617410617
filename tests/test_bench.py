"""benchmarks/bench.py: its plan and arithmetic on made-up results, and one real --quick-sized run.

The summary tests write the workers' results by hand, so every ratio has a known answer;
the last test runs the entry point itself on a 2-layer model, which times nothing that
is checked: it checks that every configuration ran and the report says so.
"""

import json

import pytest

import bench
import bench_workers
import models
from helpers import write_split


def train_worker(tokens_per_s: list[float], peak_mb: float = 2000) -> dict:
    """A training worker whose repeats each take one second, padded to twice their tokens."""
    return {"peak_bytes": peak_mb * 1e6, "repeats": [
        {"s_per_100_examples": 10.0, "tokens_per_s": t, "real_tokens": t, "padded_tokens": 2 * t}
        for t in tokens_per_s]}


def made_up_workers() -> dict:
    key = "m-shape"
    return {
        f"{key}/train/original/full": train_worker([20, 20]),
        f"{key}/train/original/lora": train_worker([10, 40]),
        f"{key}/train/ours/full/fp32": train_worker([300, 300]),
        f"{key}/train/ours/full/bf16": train_worker([1000, 1200]),
        f"{key}/train/trl/full/fp32": train_worker([100, 150]),
        f"{key}/train/trl/full/bf16": {**train_worker([400, 400]), "problems": ["a mismatch"]},
        f"{key}/train/ours/qlora/bf16": train_worker([100, 100]),
        f"{key}/train/ours/lora/fp32": {"error": "exit status 1"},
    }


def summary_of(workers, methods=("full", "lora", "qlora"), default="bf16") -> dict:
    return bench.summarise_training(workers, "m-shape", list(methods), ["fp32", "bf16"], default)


def test_ours_is_compared_with_trl_at_equal_precision_and_with_the_original_at_its_default():
    full = summary_of(made_up_workers())["rows"][0]
    assert full["vs_trl"]["fp32"] == {"median": 2.5, "min": 2.0, "max": 3.0, "n": 2}
    assert full["vs_trl"]["bf16"] == {"median": 2.75, "min": 2.5, "max": 3.0, "n": 2}
    assert full["vs_original"] == {"median": 55.0, "min": 50.0, "max": 60.0, "n": 2}  # bf16/fp32
    assert full["ours"]["bf16"]["pad_share"]["median"] == 0.5
    assert full["ours"]["bf16"]["peak_mb"] == 2000
    assert full["trl"]["bf16"]["problems"] == ["a mismatch"]


def test_with_fp32_as_the_default_the_original_is_compared_with_ours_at_fp32():
    full = summary_of(made_up_workers(), default="fp32")["rows"][0]
    assert full["vs_original"]["median"] == 15.0


def test_qlora_is_compared_with_the_originals_lora_which_never_quantised():
    qlora = summary_of(made_up_workers())["rows"][2]
    assert qlora["original_is"] == "lora"
    assert qlora["vs_original"] == {"median": 6.25, "min": 2.5, "max": 10.0, "n": 2}


def test_a_failed_or_missing_worker_leaves_its_ratios_unmeasured():
    lora = summary_of(made_up_workers())["rows"][1]
    assert lora["ours"]["fp32"] is None and lora["vs_trl"] == {"fp32": None, "bf16": None}
    assert lora["vs_original"] is None  # ours at bf16 was never run


def test_evaluation_speedup_is_per_repeat_pair():
    workers = {"m/eval/original": {"questions_per_s": [0.5, 0.25], "peak_bytes": 1e9},
               "m/eval/ours": {"questions_per_s": [10.0, 10.0], "peak_bytes": 2e9}}
    ev = bench.summarise_eval(workers, "m")
    assert ev["speedup"] == {"median": 30.0, "min": 20.0, "max": 40.0, "n": 2}
    assert ev["ours"]["peak_mb"] == 2000
    assert bench.summarise_eval({**workers, "m/eval/ours": {"error": "exit status 1"}}, "m") is None


def test_the_report_shows_both_precisions_side_by_side_and_what_failed():
    training = summary_of(made_up_workers())
    speed = "\n".join(bench.speed_table(training, ["fp32", "bf16"]))
    assert "| full | 20 [20-20] | 125 [100-150] | 400 [400-400] | 300 [300-300] | 1100 [1000-1200] " \
           "| 2.50x [2.00-3.00] | 2.75x [2.50-3.00] | 55.00x [50.00-60.00] |" in speed
    assert "| qlora (original = its LoRA) | 25 [10-40] |" in speed
    detail = "\n".join(bench.detail_table(training, ["fp32", "bf16"]))
    assert "| full | trl | bf16 | 10.0 [10.0-10.0] | 50% [50%-50%] | 2000 | a mismatch |" in detail


def settings(**changes) -> dict:
    return {"methods": ["full", "qlora", "bitfit"], "precisions": ["fp32", "bf16"],
            "default_precision": "bf16", "parts": ["training", "evaluation"], "trl": True,
            "device": "cpu", "repeats": 3, "warmup": 2, "steps": 3, "steps_original": 6,
            "batch_size": 16, "questions": 64, "eval_repeats": 2, **changes}


def test_the_plan_runs_ours_and_trl_at_each_precision_and_the_original_once():
    plan = dict(bench.build_plan(settings(), {"a-shape": "A", "b-shape": "B"}, "data",
                                 ("tuned", "T")))
    a = [label for label in plan if label.startswith("a-shape/train/")]
    assert a == ["a-shape/train/original/full", "a-shape/train/ours/full/fp32",
                 "a-shape/train/trl/full/fp32", "a-shape/train/ours/full/bf16",
                 "a-shape/train/trl/full/bf16", "a-shape/train/ours/qlora/fp32",
                 "a-shape/train/trl/qlora/fp32", "a-shape/train/ours/qlora/bf16",
                 "a-shape/train/trl/qlora/bf16", "a-shape/train/original/bitfit",
                 "a-shape/train/ours/bitfit/fp32", "a-shape/train/ours/bitfit/bf16"]
    assert plan["a-shape/train/original/full"]["batch_size"] == bench.ORIGINAL_BATCH
    assert plan["a-shape/train/original/full"]["steps"] == 6
    assert plan["a-shape/train/trl/qlora/bf16"]["task"] == "trl"
    evals = [label for label in plan if "/eval/" in label]  # the first model and the tuned one
    assert evals == ["a-shape/eval/original", "a-shape/eval/ours", "tuned/eval/original",
                     "tuned/eval/ours"]
    assert plan["tuned/eval/ours"]["precision"] == "bf16"
    assert plan["tuned/eval/original"]["precision"] == "fp32"


def test_without_trl_and_with_only_evaluation_nothing_else_is_planned():
    no_trl = bench.build_plan(settings(trl=False), {"a": "A"}, "data", None)
    assert not any("/trl/" in label for label, _ in no_trl)
    only_eval = bench.build_plan(settings(parts=["evaluation"]), {"a": "A"}, "data", None)
    assert [label for label, _ in only_eval] == ["a/eval/original", "a/eval/ours"]


@pytest.mark.parametrize("argv", [["--shape", "gpt3"], ["--precisions", "fp16"],
                                  ["--methods", "full,adapter"], ["--steps", "0"]])
def test_unknown_choices_and_empty_sizes_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.parametrize("argv, name", [([], "results.md"), (["--quick"], "results-quick.md"),
                                        (["--device", "cuda", "--only", "training"],
                                         "results-cuda-training.md")])
def test_only_the_whole_cpu_run_writes_the_published_name(argv, name):
    assert bench.default_output(bench.parse_args(argv)).name == name


def test_the_original_pads_every_example_to_128_and_keeps_pad_in_the_loss(tmp_path):
    tokenizer = models.load_tokenizer(models.resolve_model("tiny-gpt2"))
    rows = [{"prompt": "Q: 1?", "completion": " A: 1."}] * 3
    warm, timed = bench_workers.original_batches(tokenizer, rows, warmup=1, steps=2)
    assert len(warm) == 1 and len(timed) == 2 and all(len(b) == 2 for b in warm + timed)
    batch = bench_workers.collate_original(timed[0])
    assert batch["input_ids"].shape == (2, bench_workers.ORIGINAL_MAX_LENGTH)
    assert bench_workers.ORIGINAL_MAX_LENGTH == 128  # the original's padding="max_length"
    assert (batch["labels"] == batch["input_ids"]).all()


def test_evaluation_workers_answer_every_question(tmp_path):
    data = write_split(tmp_path / "data")
    base = {"task": "eval", "model_dir": models.resolve_model("tiny-gpt2"),
            "data_dir": str(data), "questions": 1, "repeats": 1, "device": "cpu",
            "precision": "fp32"}
    for recipe in ("original", "ours"):
        result = bench_workers.run({**base, "recipe": recipe})
        assert len(result["questions_per_s"]) == 1 and result["questions_per_s"][0] > 0


def test_the_entry_point_runs_a_worker_and_writes_its_report(tmp_path):
    # QLoRA alone: one worker process (the original's run for it is its LoRA, not asked for)
    data = write_split(tmp_path / "data")
    output = tmp_path / "report.md"
    bench.main(bench.parse_args([
        "--quick", "--only", "training", "--methods", "qlora", "--precisions", "fp32",
        "--no-trl", "--data-dir", str(data), "--tokenizer", models.resolve_model("tiny-gpt2"),
        "--output", str(output)]))
    report = json.loads(output.with_suffix(".json").read_text())
    assert list(report["workers"]) == ["gpt2-tiny-shape/train/ours/qlora/fp32"]
    worker = report["workers"]["gpt2-tiny-shape/train/ours/qlora/fp32"]
    assert len(worker["repeats"]) == 1 and worker["repeats"][0]["examples"] == 16
    row = report["summary"]["training"]["gpt2-tiny-shape"]["rows"][0]
    assert row["ours"]["fp32"]["tokens_per_s"]["n"] == 1 and row["original"] is None
    text = output.read_text()
    assert "| qlora (original = its LoRA) | n/a | n/a |" in text and "Not measured" not in text


def test_a_failed_worker_is_an_error_record_not_an_exception():
    result = bench.run_worker("broken", {"task": "train", "recipe": "ours", "device": "cpu"})
    assert result["error"] == "exit status 1"
