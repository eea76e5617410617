"""Tests for split_dataset.py: held-out groups, no question on two sides, and no leak.

Made-up facts and user questions check the rules one at a time; the default dataset
(generate -> format -> split, seed 42, 1200 rows), built once, checks that no training
or validation row gives away an evaluation row of kind "unseen_fact": neither through a
shared fact group nor through an answer that states the same fact the other way round.

Run from the repository root:  .venv/bin/python -m pytest tests/test_split_dataset.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import format_dataset
import generate_dataset
import split_dataset
from common import normalize_question
from data_helpers import (USER_ROWS, check_disjoint, cli, expect_exit_2, fact_rows,
                          fact_signature, format_rows, frame_words, groups_of, leaks,
                          read_lines, run_split, write_lines)


@pytest.fixture
def formatted_facts(tmp_path) -> Path:
    """Formatted generated-style data: 30 facts x 3 wordings, plus one single-wording fact."""
    rows = fact_rows() + [{"question": "Lonely question?", "answer": "Lonely answer.",
                           "category": "capital", "fact_id": "capital-999"}]
    format_rows(tmp_path, write_lines(tmp_path / "qa_pairs.jsonl", rows))
    return tmp_path / "out" / "formatted.jsonl"


@pytest.fixture(scope="module")
def default_split(tmp_path_factory) -> dict[str, list[dict]]:
    """generate -> format -> split with every default (seed 42, 1200 rows), built once."""
    folder = tmp_path_factory.mktemp("default-split")
    generate_dataset.main(generate_dataset.parse_args(
        ["--output", str(folder / "qa_pairs.jsonl")]))
    format_dataset.main(format_dataset.parse_args(
        ["--input", str(folder / "qa_pairs.jsonl"), "--output", str(folder / "formatted.jsonl")]))
    split_dataset.main(split_dataset.parse_args(
        ["--input", str(folder / "formatted.jsonl"), "--output-dir", str(folder)]))
    splits = {name: read_lines(folder / f"{name}.jsonl") for name in ("train", "valid", "eval")}
    splits["report"] = json.loads((folder / "split_report.json").read_text(encoding="utf-8"))
    return splits


# -----------------------------------------------------------------------------
# User questions: split by normalised question
# -----------------------------------------------------------------------------


def test_user_questions_split(tmp_path):
    """The original dataset.jsonl format, formatted: no overlap, the same question on one side."""
    rows = USER_ROWS + [USER_ROWS[0], USER_ROWS[1], USER_ROWS[0],
                        {"user": "  What is   item number 3? ", "assistant": "Item 3 is thing 3."},
                        {"user": "   ", "assistant": "nothing asked"},
                        # Same question up to case and punctuation, other answer: same group.
                        {"user": "what is ITEM number 5", "assistant": "Another answer."}]
    assert len(format_rows(tmp_path, write_lines(tmp_path / "dataset.jsonl", rows))) == 21
    train, valid, evaluation, report = run_split(tmp_path / "out" / "formatted.jsonl",
                                                 tmp_path / "split")
    check_disjoint(train, valid, evaluation)
    # a held-out file asks each question once: a second answer to it there is dropped
    assert len(train) + len(valid) + len(evaluation) + report["duplicates_removed"] == 21
    assert {row["eval_kind"] for row in evaluation + valid} == {"unseen_question"}
    assert report["overlap_after_normalisation"] == 0
    assert report["groups"]["questions"] == 20
    assert report["eval_rows"] == 4  # 0.2 of 20 question groups
    assert report["valid_rows"] == 3  # 0.2 of the 16 groups left
    sides = {side for side, rows_ in (("train", train), ("valid", valid), ("eval", evaluation))
             for row in rows_ if normalize_question(row["question"]) == "what is item number 5"}
    assert len(sides) == 1


def test_valid_split_of_user_questions(tmp_path):
    """User questions: valid takes --valid-share of the training side's question groups."""
    rows = [{"question": f"Question number {i}?", "answer": f"Answer {i}."} for i in range(50)]
    format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    formatted = tmp_path / "out" / "formatted.jsonl"
    train, valid, evaluation, report = run_split(formatted, tmp_path / "a")
    check_disjoint(train, valid, evaluation)
    assert (len(train), len(valid), len(evaluation)) == (32, 8, 10)  # 0.2 of 50; 0.2 of 40
    assert report["valid_by_kind"] == {"unseen_question": 8}
    assert report["overlaps"]["questions"] == dict.fromkeys(
        ("train_valid", "train_eval", "valid_eval"), 0)
    _, valid_b, _, _ = run_split(formatted, tmp_path / "b", "--valid-share", "0.25")
    assert len(valid_b) == 10
    run_split(formatted, tmp_path / "c")
    assert (tmp_path / "a" / "valid.jsonl").read_bytes() == (
        tmp_path / "c" / "valid.jsonl").read_bytes()


def test_eval_set_empty_after_deduplication(tmp_path):
    """One question asked five times: nothing is left to evaluate on, one line, no eval.jsonl."""
    rows = [{"question": "What is AI?", "answer": "Artificial intelligence."}] * 5
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status, err = cli("format_dataset.py", "--input", str(tmp_path / "in.jsonl"), "--output",
                      str(tmp_path / "data" / "formatted.jsonl"))
    assert status == 0
    status, err = cli("split_dataset.py", "--input", str(tmp_path / "data" / "formatted.jsonl"),
                      "--output-dir", str(tmp_path / "data"))
    assert status == 2 and "error:" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "eval.jsonl").exists()


# -----------------------------------------------------------------------------
# Generated facts: split by fact group
# -----------------------------------------------------------------------------


def test_fact_split(formatted_facts, tmp_path):
    """Held-out groups wholly in eval or valid; every other fact lends one wording to one."""
    train, valid, evaluation, report = run_split(formatted_facts, tmp_path / "split",
                                                 "--valid-share", "0.1")
    check_disjoint(train, valid, evaluation)
    assert {row["eval_kind"] for row in evaluation} == {"unseen_fact", "unseen_wording"}
    assert {row["eval_kind"] for row in valid} == {"unseen_fact", "unseen_wording"}
    assert all("eval_kind" not in row for row in train)
    assert set(valid[0]) == set(evaluation[0])  # valid rows look like eval rows
    by_fact: dict[str, dict[str, list[dict]]] = {}
    for name, rows in (("train", train), ("valid", valid), ("eval", evaluation)):
        for row in rows:
            by_fact.setdefault(row["fact_id"], {}).setdefault(name, []).append(row)
    held = {name: {fid for fid, sides in by_fact.items() if name in sides
                   and sides[name][0]["eval_kind"] == "unseen_fact"} for name in ("eval", "valid")}
    assert len(held["eval"]) == 3  # 0.1 of 31 facts, rounded
    assert len(held["valid"]) == 1  # 0.1 of the 3 groups reserved for valid, at least one
    for name, fids in held.items():
        for fid in fids:
            assert set(by_fact[fid]) == {name} and len(by_fact[fid][name]) == 3
    # Each category keeps facts in training, and the held-out ones come from different ones.
    assert {row["category"] for row in train} == {"capital", "element", "author"}
    assert len({fid.split("-")[0] for fid in held["eval"]}) == 3
    lent = {"eval": 0, "valid": 0}
    for fid, sides in by_fact.items():
        if fid in held["eval"] | held["valid"] or fid == "capital-999":
            continue
        assert len(sides["train"]) == 2 and len(sides) == 2, fid
        (name,) = set(sides) - {"train"}
        assert len(sides[name]) == 1 and sides[name][0]["eval_kind"] == "unseen_wording"
        lent[name] += 1
    assert set(by_fact["capital-999"]) == {"train"}
    assert lent["valid"] in (1, 2) and lent["eval"] + lent["valid"] == 30 - 4
    assert len(train) + len(valid) + len(evaluation) == 91
    assert report["eval_by_kind"] == {"unseen_fact": 9, "unseen_wording": lent["eval"]}
    assert report["valid_by_kind"] == {"unseen_fact": 3, "unseen_wording": lent["valid"]}
    assert report["held_out_fact_groups"] == {"eval": 3, "valid": 1}
    assert report["groups"]["facts"] == 31 and report["overlap_after_normalisation"] == 0
    assert sum(report["categories"]["eval"].values()) == report["eval_rows"]
    assert sum(report["categories"]["valid"].values()) == report["valid_rows"]


def test_fact_groups_held_out_whole(tmp_path):
    """Facts sharing a fact_group (a fact and its reverse) are held out together, never split."""
    rows = []
    for pair in range(12):
        for side in ("capital", "capital_of"):
            for wording in range(3):
                rows.append({"question": f"{side} question {wording} about country {pair}?",
                             "answer": f"{side} answer {pair}.", "key": f"K{pair}{side}",
                             "category": "geography", "fact_id": f"{side}/{pair}",
                             "fact_group": f"geography/country{pair}"})
    formatted = format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    assert formatted[0]["group"] == "geography/country0"
    assert formatted[0]["fact_group"] == "geography/country0"
    for seed in range(5):
        train, valid, evaluation, report = run_split(
            tmp_path / "out" / "formatted.jsonl", tmp_path / f"s{seed}", "--seed", str(seed),
            "--holdout-facts", "0.25", "--valid-share", "0.3")
        check_disjoint(train, valid, evaluation)
        for name, held_rows in (("eval", evaluation), ("valid", valid)):
            held = groups_of(held_rows, "unseen_fact")
            assert held and report["held_out_fact_groups"][name] == len(held)
            # Both facts of the group, every wording, on that side only.
            assert all(sum(row["group"] == group for row in held_rows) == 6 for group in held)
        assert report["overlaps"]["groups"] == dict.fromkeys(
            ("train_valid", "train_eval", "valid_eval"), 0)


def test_shared_wording_stays_in_training(tmp_path):
    """A wording several facts share is never lent to eval or valid: the facts lend another."""
    rows = fact_rows(n_facts=6, categories=("capital",))
    for row in rows:  # every fact's wording 0 becomes the same question
        if row["question"].startswith("Wording 0"):
            row["question"] = "Which one is it?"
    format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    train, valid, evaluation, report = run_split(tmp_path / "out" / "formatted.jsonl",
                                                 tmp_path / "split", "--holdout-facts", "0")
    check_disjoint(train, valid, evaluation)
    assert sum(row["question"] == "Which one is it?" for row in train) == 6
    assert (len(train), len(valid), len(evaluation)) == (12, 1, 5)
    assert report["moved_for_overlap"] == report["duplicates_removed"] == 0
    assert report["overlap_after_normalisation"] == 0


def test_held_out_facts_sharing_a_wording(tmp_path):
    """Facts sharing a wording: dropped if the other is trained, deduplicated if both held out.

    Moving a held-out fact's row to training would put that fact in training.
    """
    wordings = {("a", "a1"): ["Shared question?", "Only a1?"], ("a", "a2"): ["A2 one?", "A2 two?"],
                ("b", "b1"): ["shared  QUESTION", "Only b1?"], ("b", "b2"): ["B2 one?", "B2 two?"]}
    rows = [{"question": question, "answer": f"Answer {fid}.", "category": cat, "fact_id": fid}
            for (cat, fid), questions in wordings.items() for question in questions]
    format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    seen = set()
    for seed in range(12):
        train, valid, evaluation, report = run_split(
            tmp_path / "out" / "formatted.jsonl", tmp_path / f"s{seed}", "--seed", str(seed),
            "--holdout-facts", "0.5", "--eval-fraction", "0")
        check_disjoint(train, valid, evaluation)
        questions = [normalize_question(row["question"]) for row in evaluation + valid]
        assert len(questions) == len(set(questions))
        assert (report["train_rows"] + report["valid_rows"] + report["eval_rows"]
                + report["duplicates_removed"] + report["dropped_for_overlap"]) == 8
        seen.update(key for key in ("dropped_for_overlap", "duplicates_removed") if report[key])
    assert seen == {"dropped_for_overlap", "duplicates_removed"}


def test_split_is_deterministic(formatted_facts, tmp_path):
    """The same seed gives byte-identical files; another seed gives another split."""
    outputs = {}
    for name, seed in (("a", "42"), ("b", "42"), ("c", "7")):
        run_split(formatted_facts, tmp_path / name, "--seed", seed)
        outputs[name] = [(tmp_path / name / f).read_bytes() for f in (
            "train.jsonl", "valid.jsonl", "eval.jsonl", "split_report.json")]
    assert outputs["a"] == outputs["b"]
    assert outputs["a"][1] != outputs["c"][1] and outputs["a"][2] != outputs["c"][2]


def test_split_errors_write_nothing(tmp_path, capsys):
    """Missing input names the command to run; a one-row file cannot make both sets."""
    args = split_dataset.parse_args(["--input", str(tmp_path / "none.jsonl"),
                                     "--output-dir", str(tmp_path / "split")])
    assert "run `python format_dataset.py` first" in expect_exit_2(split_dataset.main, args,
                                                                   capsys)
    format_rows(tmp_path, write_lines(tmp_path / "one.jsonl",
                                      [{"user": "Hi?", "assistant": "Hi."}]))
    args = split_dataset.parse_args(["--input", str(tmp_path / "out" / "formatted.jsonl"),
                                     "--output-dir", str(tmp_path / "split")])
    err = expect_exit_2(split_dataset.main, args, capsys)
    assert "would be empty" in err and "--eval-fraction" in err and "--valid-share" in err
    assert not (tmp_path / "split").exists()
    # Two questions: one for eval, one kept for training, none left for validation.
    format_rows(tmp_path, write_lines(tmp_path / "two.jsonl", [
        {"user": "Hi?", "assistant": "Hi."}, {"user": "Bye?", "assistant": "Bye."}]))
    err = expect_exit_2(split_dataset.main, args, capsys)
    assert "the valid set would be empty" in err
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("share", ["0", "1", "1.5", "-0.1"])
def test_valid_share_must_be_between_0_and_1(share, capsys):
    """--valid-share 0 would leave nothing to tune on, 1 nothing to train on: usage error."""
    with pytest.raises(SystemExit) as exc:
        split_dataset.parse_args(["--valid-share", share])
    assert exc.value.code == 2
    assert "--valid-share" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# No held-out fact is stated in training (data_helpers.leaks)
# -----------------------------------------------------------------------------


def test_checker_finds_a_reverse_fact():
    """The check itself: a reverse capital fact in training is a leak, another country is not."""
    held = [{"question": "What is the capital of Ethiopia?", "key": "Addis Ababa",
             "answer": "The capital of Ethiopia is Addis Ababa.", "group": "capital/ethiopia"}]
    reverse = {"question": "Addis Ababa is the capital of which country?", "key": "Ethiopia",
               "answer": "Addis Ababa is the capital of Ethiopia.", "group": "capital_of/addis"}
    other = {"question": "What is the capital of Kenya?", "key": "Nairobi",
             "answer": "The capital of Kenya is Nairobi.", "group": "capital/kenya"}
    assert leaks([reverse, other], held, frame=set()) == [
        ("What is the capital of Ethiopia?", "Addis Ababa is the capital of Ethiopia.")]
    assert leaks([other], held, frame=set()) == []


def test_checker_finds_a_restated_sum():
    """A question with no subject word is checked by its numbers: a synthetic reverse
    subtraction in training states the held-out "5 plus 9"; another sum with 14 does not."""
    held = [{"question": "What do you get if you add 5 to 9?", "key": "14",
             "answer": "5 plus 9 equals 14.", "group": "arithmetic/5_9"}]
    reverse = {"question": "What is 14 minus 5?", "key": "9", "answer": "14 minus 5 equals 9.",
               "group": "arithmetic/synthetic"}
    other = {"question": "What is 7 plus 7?", "key": "14", "answer": "7 plus 7 equals 14.",
             "group": "arithmetic/7_7"}
    assert leaks([reverse, other], held, frame=set()) == [
        ("What do you get if you add 5 to 9?", "14 minus 5 equals 9.")]
    tonnes = [{"question": "Convert 7 tonnes to kilograms.", "key": "7000",
               "answer": "7 tonnes is 7000 kilograms.", "group": "unit/7_tonnes"}]
    back = {"question": "How many tonnes is 7000 kilograms?", "key": "7",
            "answer": "7000 kilograms is 7 tonnes.", "group": "unit/synthetic"}
    metres = {"question": "How many millimetres are in 7 metres?", "key": "7000",
              "answer": "7 metres is 7000 millimetres.", "group": "unit/7_metres"}
    assert leaks([back, metres], tonnes, frame=set()) == [(tonnes[0]["question"], back["answer"])]
    plural = [{"question": "Give the plural of the word box.", "key": "boxes",
               "answer": "The plural of box is boxes.", "group": "language/box"}]
    stated = {"question": "What is the singular of boxes?", "key": "box",
              "answer": "The singular of boxes is box.", "group": "language/synthetic"}
    assert leaks([stated, other], plural, frame={"plural", "word"}) == [
        (plural[0]["question"], stated["answer"])]


@pytest.mark.parametrize("trained", [("train",), ("train", "valid")])
def test_no_unseen_fact_is_stated_in_training(default_split, trained):
    """No train (or valid) row shares an unseen fact's group or states it the other way round."""
    rows = [row for name in trained for row in default_split[name]]
    everything = [row for name in ("train", "valid", "eval") for row in default_split[name]]
    held_out = [row for row in default_split["eval"] if row["eval_kind"] == "unseen_fact"]
    assert len(held_out) > 50
    frame = frame_words(everything)
    assert all(fact_signature(row, frame)[1] for row in held_out)  # the check sees every row
    assert leaks(rows, held_out, frame) == []


def test_no_valid_unseen_fact_is_stated_in_training(default_split):
    """The facts held out for validation are as unseen in training as eval's are."""
    everything = [row for name in ("train", "valid", "eval") for row in default_split[name]]
    held_out = [row for row in default_split["valid"] if row["eval_kind"] == "unseen_fact"]
    assert held_out
    assert leaks(default_split["train"], held_out, frame_words(everything)) == []


def test_held_out_counts(default_split):
    """The split report's counts match the files: whole groups held out in eval and valid."""
    report = default_split["report"]
    for name in ("valid", "eval"):
        groups = {row["group"] for row in default_split[name] if row["eval_kind"] == "unseen_fact"}
        assert report["held_out_fact_groups"][name] == len(groups) > 0
    assert report["overlaps"] == {"questions": dict.fromkeys(
        ("train_valid", "train_eval", "valid_eval"), 0), "groups": dict.fromkeys(
        ("train_valid", "train_eval", "valid_eval"), 0)}


# -----------------------------------------------------------------------------
# End to end with generate_dataset.py and format_dataset.py
# -----------------------------------------------------------------------------


def test_generate_format_split_end_to_end(tmp_path):
    """generate + format + split twice: byte-identical files and no question on both sides."""
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        qa = run_dir / "qa_pairs.jsonl"
        generate_dataset.main(generate_dataset.parse_args(
            ["--output", str(qa), "--size", "300", "--seed", "42"]))
        format_dataset.main(format_dataset.parse_args(
            ["--input", str(qa), "--output", str(run_dir / "formatted.jsonl")]))
        train, valid, evaluation, report = run_split(run_dir / "formatted.jsonl", run_dir)
        check_disjoint(train, valid, evaluation)
        assert report["overlap_after_normalisation"] == 0
        assert set(report["eval_by_kind"]) == {"unseen_fact", "unseen_wording"}
        assert set(report["valid_by_kind"]) == {"unseen_fact", "unseen_wording"}
        runs.append({f: (run_dir / f).read_bytes() for f in (
            "qa_pairs.jsonl", "formatted.jsonl", "train.jsonl", "valid.jsonl", "eval.jsonl")})
    assert runs[0] == runs[1]
