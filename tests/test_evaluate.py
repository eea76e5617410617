"""evaluate.py and the answer loss and generation it relies on (text metrics: test_scoring.py)."""

import json
import errno
import os

import numpy as np
import pytest
import scipy.stats
import torch

import answer_loss
import common
import generation
import models
import runpaths
import evaluate
import scoring
import finetune
from helpers import write_split
from helpers import FOUR, SCRIPTS
from helpers import run_and_expect_exit, write_lock

# --- Answer perplexity from a model -----------------------------------------


def test_answer_perplexity_from_known_logits(data_dir):
    """A zeroed LM head gives uniform logits, so answer perplexity is exactly the vocabulary size."""
    model, tokenizer, _ = models.load_model("tiny-llama", torch.device("cpu"))
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    rows = common.load_split(data_dir, "eval")
    examples = common.tokenize_rows(tokenizer, rows, 256)
    nll, count = answer_loss.answer_nll(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    answer_tokens = sum(sum(1 for label in ex["labels"][1:] if label != -100) for ex in examples)
    assert count == answer_tokens  # prompt tokens are not scored
    assert scoring.perplexity(nll, count) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_scoring_leaves_eos_out_and_counts_per_example(data_dir):
    """Evaluation scores the answer's own tokens: one label fewer per example than training."""
    model, tokenizer, _ = models.load_model("tiny-gpt2", torch.device("cpu"))
    rows = common.load_split(data_dir, "eval")[:4]
    trained = common.tokenize_rows(tokenizer, rows, 256)
    scored = common.tokenize_rows(tokenizer, rows, 256, label_eos=False)
    for a, b in zip(trained, scored):
        assert a["input_ids"] == b["input_ids"]
        assert a["labels"][-1] == tokenizer.eos_token_id and b["labels"][-1] == -100
        assert a["labels"][:-1] == b["labels"][:-1]
    per_example = answer_loss.answer_nll_by_example(model, scored, tokenizer.pad_token_id,
                                               torch.device("cpu"), batch_size=3)
    total, count = answer_loss.answer_nll(model, scored, tokenizer.pad_token_id, torch.device("cpu"))
    assert sum(n for n, _ in per_example) == pytest.approx(total, rel=1e-5)
    assert sum(c for _, c in per_example) == count
    for (nll, n), ex in zip(per_example, scored):
        alone, alone_n = answer_loss.answer_nll(model, [ex], tokenizer.pad_token_id,
                                           torch.device("cpu"))
        assert n == alone_n and nll == pytest.approx(alone, rel=1e-5)


def test_answer_nll_scores_only_answer_tokens(data_dir):
    """answer_nll equals a by-hand sum of -log p over the answer tokens of the full logits."""
    model, tokenizer, _ = models.load_model("tiny-gpt2", torch.device("cpu"))
    rows = common.load_split(data_dir, "eval")[:3]
    examples = common.tokenize_rows(tokenizer, rows, 256)
    expected = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        for pos in range(1, len(ex["labels"])):
            if ex["labels"][pos] != -100:
                expected -= logprobs[pos - 1, ex["labels"][pos]].item()
    nll, _ = answer_loss.answer_nll(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    assert nll == pytest.approx(expected, rel=1e-5)


# --- Generation --------------------------------------------------------------


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory):
    """A tiny GPT-2 fully fine-tuned until it answers its 8 training questions and stops."""
    folder = tmp_path_factory.mktemp("stop")
    data = write_split(folder / "data", n_train=8, n_eval=4)
    args = finetune.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                str(data), "--output-dir",
                                str(folder / "out"), "--batch-size", "8", "--max-steps", "150",
                                "--lr", "3e-3", "--warmup-ratio", "0"])
    finetune.main(args)
    model = evaluate.load_for_eval("full", folder / "out" / "full", "", None,
                                   torch.device("cpu"), False)
    tokenizer = models.load_tokenizer(str(folder / "out" / "full"))
    return model, tokenizer, common.load_split(data, "train")


def test_generation_stops_at_eos(stopping_model):
    model, tokenizer, rows = stopping_model
    prompts = [r["prompt"] for r in rows]
    max_new = 40  # far more than any answer needs
    answers = generation.generate_answers(model, tokenizer, prompts, max_new, torch.device("cpu"))
    assert answers == [r["answer"] for r in rows]
    # and it stopped: EOS right after the answer, well inside the bound
    ids = torch.tensor([common.prompt_ids(tokenizer, prompts[0])])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < max_new


def test_batched_generation_equals_one_at_a_time(stopping_model):
    model, tokenizer, rows = stopping_model
    prompts = [r["prompt"] for r in rows] + ["User: What is 9 plus 9?\nAssistant:",
                                             "User: Hello there, who are you?\nAssistant:"]
    device = torch.device("cpu")
    batched = generation.generate_answers(model, tokenizer, prompts, 30, device, stop="\nUser:",
                                      batch_size=16)
    single = generation.generate_answers(model, tokenizer, prompts, 30, device, stop="\nUser:",
                                     batch_size=1)
    assert batched == single


def test_rows_leaving_the_batch_give_generates_answers(stopping_model):
    """greedy_rows drops finished rows from the batch; the answers are generate()'s, row by row.

    The prompts mix answers that stop at once (trained questions) with ones that run to
    the bound or into a new turn (unseen questions), so rows leave at different steps.
    """
    model, tokenizer, rows = stopping_model
    prompts = [r["prompt"] for r in rows] + ["User: What is 9 plus 9?\nAssistant:",
                                             "User: Hello there, who are you?\nAssistant:",
                                             "User: Hi\nAssistant:"]
    device = torch.device("cpu")
    for stop in ("\nUser:", None):
        sizes = batch_sizes_seen(model)
        shrinking = generation.generate_answers(model, tokenizer, prompts, 30, device, stop=stop,
                                                batch_size=16)
        sizes.remove()
        # one batch of all prompts; it shrinks step by step and ends smaller than it began
        assert sizes.seen[0] == len(prompts)
        assert sizes.seen == sorted(sizes.seen, reverse=True) and sizes.seen[-1] < len(prompts)
        whole = generation.generate_answers(model, tokenizer, prompts, 30, device, stop=stop,
                                            batch_size=16, shrink=False)
        assert shrinking == whole
    llama, llama_tokenizer, _ = models.load_model("tiny-llama", device)
    shrinking = generation.generate_answers(llama, llama_tokenizer, prompts, 12, device,
                                            stop="\nUser:", batch_size=16)
    whole = generation.generate_answers(llama, llama_tokenizer, prompts, 12, device,
                                        stop="\nUser:", batch_size=16, shrink=False)
    assert shrinking == whole


class batch_sizes_seen:
    """Records the batch size of every forward call of model until remove()."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.seen.append(ids.shape[0])

    def remove(self):
        self.handle.remove()


def test_clean_answer_cuts_at_a_new_turn():
    assert generation.clean_answer(" Paris.\nUser: and Spain?", "\nUser:") == "Paris."
    assert generation.clean_answer(" Paris. ", None) == "Paris."


def test_max_new_tokens_is_1_5x_the_longest_reference():
    """The bound leaves room for the longest reference and half again, plus EOS."""
    _, tokenizer, _ = models.load_model("tiny-gpt2", torch.device("cpu"))
    references = [" Paris.", " The capital of France is Paris, on the Seine."]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    assert longest > 4  # long enough for 1.5x to differ from a fixed margin
    bound = generation.max_new_tokens_for(tokenizer, references)
    assert int(1.5 * longest) <= bound <= int(1.5 * longest) + 2
    assert generation.max_new_tokens_for(tokenizer, references[:1]) < bound


# --- evaluate.py end to end ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every method trained for a few steps on tiny-gpt2."""
    folder = tmp_path_factory.mktemp("eval")
    data = write_split(folder / "data")
    for script in FOUR:
        script.main(script.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                                       str(data),
                                       "--output-dir", str(folder / "out"), "--batch-size", "8",
                                       "--max-steps", "3"]))
    return data, folder / "out"


def test_evaluate_writes_every_file_with_a_row_per_method_and_base(trained):
    data, out = trained
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data), "--output-dir",
                                       str(out)]))
    for name in ("comparison.csv", "comparison.md", "comparison.json", "comparison.png",
                 "quality_vs_cost.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["base", "full", "lora", "qlora", "bitfit"]
    assert report["recommendation"]
    csv_lines = (out / "comparison.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and csv_lines[0].startswith("method,seeds,lr,answer_perplexity")
    n_eval = len(common.load_split(data, "eval"))
    for name in ("base", "full", "lora", "qlora", "bitfit"):
        records = [json.loads(line) for line in (out / name / "predictions.jsonl").open()]
        assert len(records) == n_eval
        assert {"question", "prompt", "reference", "prediction", "exact_match", "key_match",
                "token_f1"} <= set(records[0])
    qlora = next(r for r in report["rows"] if r["method"] == "qlora")
    assert "4-bit" in qlora["note"]
    # base is never taken for a trained method, even with predictions in its folder
    assert list(evaluate.find_methods(out, None)) == ["full", "lora", "qlora", "bitfit"]


def test_evaluate_limit_and_method_selection(trained, tmp_path):
    data, out = trained
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data), "--output-dir",
                                       str(out),
                                       "--methods", "lora", "--limit", "3"]))
    report = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["base", "lora"]
    assert report["questions"] == 3


def test_unfinished_run_is_skipped_or_refused(trained, tmp_path, capsys):
    data, out = trained
    (out / "lora" / "COMPLETED").rename(out / "lora" / "COMPLETED.bak")
    try:
        found = evaluate.find_methods(out, None)
        assert "lora" not in found and "full" in found
        assert "no COMPLETED marker" in capsys.readouterr().out
        with pytest.raises(common.PipelineError, match="did not finish"):
            evaluate.find_methods(out, "lora")
    finally:
        (out / "lora" / "COMPLETED.bak").rename(out / "lora" / "COMPLETED")


def test_no_trained_methods_is_a_clear_error(tmp_path):
    (tmp_path / "out" / "base").mkdir(parents=True)
    with pytest.raises(common.PipelineError, match="no finished fine-tuning runs"):
        evaluate.find_methods(tmp_path / "out", None)


def test_evaluate_scores_answers_it_controls(tmp_path, monkeypatch):
    """With the generated answers fixed, every number in comparison.json follows by hand."""
    data, out = write_split(tmp_path / "data"), tmp_path / "out"
    for name in ("full", "lora"):
        SCRIPTS[name].main(SCRIPTS[name].parse_args([
            "--device", "cpu", "--model", "tiny-gpt2", "--data-dir", str(data),
            "--output-dir", str(out),
            "--batch-size", "8", "--max-steps", "1"]))
    rows = common.load_split(data, "eval")
    # base answers nothing right; full answers every question; lora the first half only
    answers = {"base": ["I do not know."] * len(rows),
               "full": [r["answer"] for r in rows],
               "lora": [r["answer"] if i < len(rows) // 2 else "No idea." for i, r in
                        enumerate(rows)]}
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new, device, stop=None, batch_size=32,
                      desc=None, precision="fp32"):
        name = desc.split(":")[0]
        calls.append(name)
        return list(answers[name][:len(prompts)])

    monkeypatch.setattr(generation, "generate_answers", fake_generate)
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data), "--output-dir",
                                       str(out),
                                       "--methods", "full,lora"]))
    assert calls == ["base", "full", "lora"]
    report = json.loads((out / "comparison.json").read_text())
    rows_by = {r["method"]: r for r in report["rows"]}
    half = 100 * (len(rows) // 2) / len(rows)
    assert rows_by["base"]["key_accuracy"] == 0 and rows_by["base"]["exact_match"] == 0
    assert rows_by["full"]["key_accuracy"] == 100 and rows_by["full"]["exact_match"] == 100
    assert rows_by["full"]["token_f1"] == 100
    assert rows_by["lora"]["key_accuracy"] == pytest.approx(half)
    assert rows_by["full"]["key_accuracy_interval"] == [100, 100]
    low, high = rows_by["lora"]["key_accuracy_interval"]
    assert low < half < high
    pairs = {(p["a"], p["b"]): p for p in report["pairwise"]}
    assert set(pairs) == {("full", "lora"), ("full", "base"), ("lora", "base")}
    # full vs base: every question differs by exactly 1, so the standard error is 0
    assert pairs[("full", "base")]["se"] == 0
    assert pairs[("full", "base")]["difference"] == 100
    # lora vs base: per-question differences 1 (first half) and 0, one question a group:
    # a one-sample t bound with n - 1 degrees of freedom, one-sided at alpha_base / 2 methods
    n = len(rows)
    diffs = np.array([1.0] * (n // 2) + [0.0] * (n - n // 2))
    se = diffs.std(ddof=1) / np.sqrt(n)
    assert pairs[("lora", "base")]["se"] == pytest.approx(100 * se)
    best = report["best"]
    gate = best["methods"]["lora"]["base"]
    assert gate["lower"] == pytest.approx(100 * (diffs.mean() - scipy.stats.t.ppf(
        1 - best["alpha_base"] / 2, n - 1) * se))
    assert report["procedure"]["groups"] == n and report["margin"] == 5.0
    assert best["best_set"] == ["full"] and best["methods"]["lora"]["shown_worse_than"] == ["full"]
    assert report["outcome"] == "recommend" and report["recommended"] == "full"
    assert "Recommendation: full" in report["recommendation"]
    for field in ("seeds", "lr", "key_accuracy_interval", "exact_match_interval", "token_f1_interval",
                  "answer_perplexity_interval"):
        assert field in rows_by["lora"], field


def test_batched_generation_equals_one_at_a_time_on_a_llama_model():
    """Left padding on a Llama-style model (rotary positions) gives generate()'s greedy answers
    for each prompt alone, unpadded."""
    model, tokenizer, _ = models.load_model("tiny-llama", torch.device("cpu"))
    prompts = [f"User: {q}\nAssistant:" for q in (
        "What is 2 plus 2?", "Hi", "What is the capital of the country to the north of Spain?",
        "What is 9 plus 9?", "Name a colour.")]
    device = torch.device("cpu")
    batched = generation.generate_answers(model, tokenizer, prompts, 12, device, batch_size=5)
    alone = []
    for prompt in prompts:
        ids = torch.tensor([common.prompt_ids(tokenizer, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=1, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        alone.append(generation.clean_answer(text, None))
    assert batched == alone
    assert len({len(common.prompt_ids(tokenizer, p)) for p in prompts}) > 1  # padding happened


# --- bad input and misuse: one line, exit status 2, nothing lost ---------------------


def test_evaluate_with_no_trained_methods(data_dir, tmp_path, capsys):
    args = evaluate.parse_args(["--device", "cpu", "--data-dir", str(data_dir), "--output-dir",
                                str(tmp_path)])
    line = run_and_expect_exit(evaluate.main, args, capsys)
    assert "no finished fine-tuning runs" in line and "finetune_lora.py" in line


def test_evaluate_skips_a_method_being_written(tmp_path, capsys, sleeper):
    for name in ("full", "lora"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"run_id": name}))
        (tmp_path / name / runpaths.COMPLETED).write_text("done\n")
    write_lock(tmp_path, "lora", sleeper.pid)
    found = evaluate.find_methods(tmp_path, None)
    assert list(found) == ["full"]
    out = capsys.readouterr().out
    assert "skipping lora" in out and f"pid {sleeper.pid}" in out


def test_a_full_disk_while_writing_predictions_keeps_the_previous_ones(tmp_path, monkeypatch):
    evaluate.save_records(tmp_path, [{"prediction": "4"}], "old")
    before = (tmp_path / runpaths.PREDICTIONS).read_text()

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(common, "write_text_atomic", full)
    with pytest.raises(common.PipelineError) as caught:
        evaluate.save_records(tmp_path, [{"prediction": "5"}], "new")
    assert str(tmp_path / runpaths.PREDICTIONS) in str(caught.value)
    assert "MB free" in str(caught.value)
    assert (tmp_path / runpaths.PREDICTIONS).read_text() == before
    assert not (tmp_path / runpaths.FINGERPRINT).exists()  # so they are scored again
