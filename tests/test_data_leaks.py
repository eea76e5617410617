"""No held-out fact may be stated in training: the default dataset, end to end.

Builds the default dataset (generate -> format -> split, seed 42, 1200 rows) once
and checks that no training or validation row gives away an evaluation row of kind
"unseen_fact": neither through a shared fact group nor through an answer that
states the same fact the other way round ("Addis Ababa is the capital of
Ethiopia." while "What is the capital of Ethiopia?" is held out).

Run from the repository root:  .venv/bin/python -m pytest tests/test_data_leaks.py -q
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

import format_dataset
import generate_dataset
import split_dataset

STOPWORDS = frozenset("the a an is are was were of in on to it its and or for that this be by "
                      "as at with which what who where when how does do did from into than "
                      "there their about name give tell".split())
# A question word is part of the sentence frame, not the subject, when questions holding it
# have this many different keys ("capital", "currency", "times", "planet", "body").
FRAME_KEYS = 5


def words(text: str) -> list[str]:
    """Lower-case words and numbers of a text."""
    return re.findall(r"\w+", text.lower())


def has_words(text: str, phrase: str) -> bool:
    """phrase occurs in text as whole words, case-insensitively."""
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def frame_words(rows: list[dict]) -> set[str]:
    """Question words shared by questions with FRAME_KEYS or more different keys."""
    keys = defaultdict(set)
    for row in rows:
        for word in set(words(row["question"])):
            keys[word].add(row["key"].lower())
    return {word for word, found in keys.items() if len(found) >= FRAME_KEYS}


def subject_words(row: dict, frame: set[str]) -> set[str]:
    """The eval question's content words (len >= 4, not a stopword, frame word or key word)."""
    return {word for word in words(row["question"]) if len(word) >= 4
            and word not in STOPWORDS | frame | set(words(row["key"]))}


# Words of an arithmetic answer that say how, not what: "5 plus 9 equals 14." states its
# numbers only, whichever operation restates it.
OPERATIONS = frozenset("plus minus times divided multiplied equals".split())


def units(answer: str) -> set[str]:
    """An answer's words other than numbers, stopwords and operations: its units ("tonnes")."""
    return {word for word in words(answer)
            if not word.isdigit() and word not in STOPWORDS | OPERATIONS}


def numbers(text: str) -> set[str]:
    """The numbers a text holds."""
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def short_words(row: dict, frame: set[str]) -> set[str]:
    """The question's other content words (len >= 3): "box" in "Give the plural of box."."""
    return {word for word in words(row["question"]) if len(word) >= 3 and not word.isdigit()
            and word not in STOPWORDS | frame | set(words(row["key"]))}


def fact_signature(row: dict, frame: set[str]) -> tuple[str, set[str]]:
    """How a trained answer would state a held-out fact: its subject words, else its
    numbers (the question's and the key's: "5 plus 9" is {5, 9, 14}), else its other words."""
    if subject_words(row, frame):
        return "subject", subject_words(row, frame)
    if numbers(row["question"]):
        return "numbers", numbers(row["question"]) | numbers(row["key"])
    return "words", short_words(row, frame)


def leaks(trained: list[dict], held_out: list[dict], frame: set[str]) -> list[tuple[str, str]]:
    """(held-out question, trained answer) pairs where the answer states the held-out fact.

    A trained row gives a held-out fact away if it shares the fact's group, or if its
    answer holds the fact's key and: a subject word of its question (for a capital: the
    capital's name and the country's); for a question without one, all the fact's
    numbers ("14 minus 5 equals 9." states "What is 5 plus 9?"; a conversion also needs
    one of its units), or else all its other words ("boxes" and "box").
    """
    found = []
    groups = {row["group"] for row in trained}
    for row in held_out:
        if row["group"] in groups:
            found.append((row["question"], f"group {row['group']} in training"))
        kind, signature = fact_signature(row, frame)
        if not signature:
            raise ValueError(f"the check cannot see the held-out row {row['question']!r}")
        for other in trained:
            answer = other["answer"]
            if not has_words(answer, row["key"]):
                continue
            if kind == "subject":
                stated = bool(signature & set(words(answer)))
            elif kind == "numbers":  # and the same units, where the fact has any
                stated = signature <= numbers(answer) and (
                    not units(row["answer"]) or bool(units(row["answer"]) & units(answer)))
            else:
                stated = signature <= set(words(answer))
            if stated:
                found.append((row["question"], answer))
    return found


def read_lines(path: Path) -> list[dict]:
    """Read a JSONL file written by the pipeline."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


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


def test_reverse_twins_share_a_group():
    """Every fact and its restatement the other way round have one fact_group."""
    pool = {fact.fact_id: fact for facts in generate_dataset.fact_pool().values()
            for fact in facts}
    twins = [("geography/capital/ethiopia", "geography/capital_of/addis_ababa"),
             ("science/symbol/zinc", "science/element_of_symbol/zn"),
             ("science/symbol/beryllium", "science/element_of_symbol/be"),
             ("language/opposite/hot", "language/opposite/cold"),
             ("arithmetic/add/5_7", "arithmetic/subtract/12_5"),
             ("arithmetic/add/5_7", "arithmetic/subtract/12_7")]
    for one, other in twins:
        assert pool[one].group == pool[other].group, (one, other)
    assert pool["geography/capital/ethiopia"].group == "geography/ethiopia"
    assert pool["language/opposite/long"].group != pool["language/opposite/tall"].group


def test_held_out_counts(default_split):
    """The split report's counts match the files: whole groups held out in eval and valid."""
    report = default_split["report"]
    for name in ("valid", "eval"):
        groups = {row["group"] for row in default_split[name] if row["eval_kind"] == "unseen_fact"}
        assert report["held_out_fact_groups"][name] == len(groups) > 0
    assert report["overlaps"] == {"questions": dict.fromkeys(
        ("train_valid", "train_eval", "valid_eval"), 0), "groups": dict.fromkeys(
        ("train_valid", "train_eval", "valid_eval"), 0)}
