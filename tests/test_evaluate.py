"""evaluate.py and the metrics and generation it relies on."""

import json
import math

import pytest
import torch

import common
import evaluate
import finetune
from conftest import write_split
from test_training import SCRIPTS

# --- Metrics against hand-computed values ------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert common.normalize_answer("  The capital of France is PARIS! ") == "capital of france is paris"
    assert common.normalize_answer("An apple, a day.") == "apple day"


def test_exact_match_after_normalisation():
    assert common.exact_match("the capital of France is Paris.", "The capital of France is Paris")
    assert not common.exact_match("Paris", "The capital of France is Paris.")


def test_key_match_needs_whole_words():
    assert common.key_match("The capital of France is Paris.", "Paris")
    assert common.key_match("It is 12.", "12")
    assert not common.key_match("It is 120.", "12")
    assert not common.key_match("Parisian food", "Paris")
    assert common.key_match("It is artificial intelligence.", "Artificial Intelligence")
    assert not common.key_match("anything", "")


def test_token_f1_by_hand():
    # "cat sat" vs "cat sat down": precision 2/2, recall 2/3, F1 = 0.8
    assert common.token_f1("The cat sat", "the cat sat down") == pytest.approx(0.8)
    assert common.token_f1("dog", "cat") == 0.0
    assert common.token_f1("", "") == 1.0
    assert common.token_f1("x b b", "b b c") == pytest.approx(2 / 3)  # 2 of 3 each way


def test_perplexity_is_exp_of_mean_token_loss():
    assert common.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert math.isnan(common.perplexity(0.0, 0))


def test_answer_perplexity_from_known_logits(data_dir):
    """A zeroed LM head gives uniform logits, so answer perplexity is exactly the vocabulary size."""
    model, tokenizer, _ = common.load_model("tiny-llama", torch.device("cpu"))
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    rows = common.load_split(data_dir, "eval")
    examples = common.tokenize_rows(tokenizer, rows, 256)
    nll, count = common.answer_nll(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    answer_tokens = sum(sum(1 for label in ex["labels"][1:] if label != -100) for ex in examples)
    assert count == answer_tokens  # prompt tokens are not scored
    assert common.perplexity(nll, count) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_answer_nll_scores_only_answer_tokens(data_dir):
    """answer_nll equals a by-hand sum of -log p over the answer tokens of the full logits."""
    model, tokenizer, _ = common.load_model("tiny-gpt2", torch.device("cpu"))
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
    nll, _ = common.answer_nll(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    assert nll == pytest.approx(expected, rel=1e-5)


# --- Generation --------------------------------------------------------------


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory):
    """A tiny GPT-2 fully fine-tuned until it answers its 8 training questions and stops."""
    folder = tmp_path_factory.mktemp("stop")
    data = write_split(folder / "data", n_train=8, n_eval=4)
    args = finetune.parse_args(["--model", "tiny-gpt2", "--data-dir", str(data), "--output-dir",
                                str(folder / "out"), "--batch-size", "8", "--max-steps", "150",
                                "--lr", "3e-3", "--warmup-ratio", "0"])
    finetune.main(args)
    model = evaluate.load_for_eval("full", folder / "out" / "full", "", None,
                                   torch.device("cpu"), False)
    tokenizer = common.load_tokenizer(str(folder / "out" / "full"))
    return model, tokenizer, common.load_split(data, "train")


def test_generation_stops_at_eos(stopping_model):
    model, tokenizer, rows = stopping_model
    prompts = [r["prompt"] for r in rows]
    max_new = 40  # far more than any answer needs
    answers = common.generate_answers(model, tokenizer, prompts, max_new, torch.device("cpu"))
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
    batched = common.generate_answers(model, tokenizer, prompts, 30, device, stop="\nUser:",
                                      batch_size=16)
    single = common.generate_answers(model, tokenizer, prompts, 30, device, stop="\nUser:",
                                     batch_size=1)
    assert batched == single


def test_clean_answer_cuts_at_a_new_turn():
    assert common.clean_answer(" Paris.\nUser: and Spain?", "\nUser:") == "Paris."
    assert common.clean_answer(" Paris. ", None) == "Paris."


def test_max_new_tokens_follows_the_longest_reference():
    _, tokenizer, _ = common.load_model("tiny-gpt2", torch.device("cpu"))
    short = common.max_new_tokens_for(tokenizer, [" Paris."])
    long = common.max_new_tokens_for(tokenizer, [" Paris.", " The capital of France is Paris."])
    assert short < long


# --- evaluate.py end to end ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every method trained for a few steps on tiny-gpt2."""
    folder = tmp_path_factory.mktemp("eval")
    data = write_split(folder / "data")
    for script in SCRIPTS.values():
        script.main(script.parse_args(["--model", "tiny-gpt2", "--data-dir", str(data),
                                       "--output-dir", str(folder / "out"), "--batch-size", "8",
                                       "--max-steps", "3"]))
    return data, folder / "out"


def test_evaluate_writes_every_file_with_a_row_per_method_and_base(trained):
    data, out = trained
    evaluate.main(evaluate.parse_args(["--data-dir", str(data), "--output-dir", str(out)]))
    for name in ("comparison.csv", "comparison.md", "comparison.json", "comparison.png",
                 "quality_vs_cost.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["base", "full", "lora", "qlora", "bitfit"]
    assert report["recommendation"]
    csv_lines = (out / "comparison.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and csv_lines[0].startswith("method,answer_perplexity")
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
    evaluate.main(evaluate.parse_args(["--data-dir", str(data), "--output-dir", str(out),
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


# --- The recommendation follows the numbers ----------------------------------


def table(**scores):
    """Synthetic comparison rows: method -> (key accuracy, train seconds, peak MB)."""
    rows = [{"method": "base", "key_accuracy": 20.0, "answer_perplexity": 9.0, "n": 400,
             "train_seconds": None, "peak_memory_mb": None}]
    for method, (acc, seconds, memory) in scores.items():
        rows.append({"method": method, "key_accuracy": acc, "answer_perplexity": 2.0, "n": 400,
                     "train_seconds": seconds, "peak_memory_mb": memory})
    return rows


def test_recommendation_changes_with_the_numbers():
    clear = evaluate.recommend(table(full=(80.0, 900, 3000), lora=(60.0, 300, 2000)), 2.0)
    assert "Best key-answer accuracy: full" in clear and "Recommendation: full" in clear
    close = evaluate.recommend(table(full=(80.0, 900, 3000), lora=(79.0, 300, 2000)), 2.0)
    assert "Recommendation: lora" in close and "3.0x faster" in close
    assert "smaller than the sampling noise" in close
    flipped = evaluate.recommend(table(full=(60.0, 900, 3000), lora=(80.0, 300, 2000)), 2.0)
    assert "Best key-answer accuracy: lora" in flipped and "Recommendation: lora" in flipped
    nothing = evaluate.recommend(table(full=(21.0, 900, 3000), lora=(20.5, 300, 2000)), 2.0)
    assert "Recommendation: none yet" in nothing


def test_noise_shrinks_with_more_questions():
    assert evaluate.noise_points(50, 1000) < evaluate.noise_points(50, 100)
    assert evaluate.noise_points(0, 100) > 0  # never claims zero noise
