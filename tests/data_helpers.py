"""Helpers the data-stage tests share: test_format_dataset.py and test_split_dataset.py.

Reading and writing rows, running format_dataset and split_dataset in-process or as
a user would, the split's disjointness checks, and the leak check that looks for a
held-out fact stated in training.  pyproject.toml puts this folder on pytest's
pythonpath, so the tests import it by name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import common
import format_dataset
import split_dataset
from common import normalize_question

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# Rows in and out, and running the stages
# -----------------------------------------------------------------------------


def write_lines(path: Path, rows) -> Path:
    """Write dicts as JSON lines (the test's own writer, independent of common)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    """Read a JSONL file written by the pipeline."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def format_file(tmp_path: Path, source, *extra: str, out: str = "out") -> Path:
    """Run format_dataset on an input into tmp_path/out; return the formatted file."""
    formatted = tmp_path / out / "formatted.jsonl"
    format_dataset.main(format_dataset.parse_args(
        ["--input", str(source), "--output", str(formatted), *extra]))
    return formatted


def format_rows(tmp_path: Path, source, *extra: str) -> list[dict]:
    """Run format_dataset on a file into tmp_path/out and return the formatted rows."""
    return read_lines(format_file(tmp_path, source, *extra))


def run_split(formatted: Path, out_dir: Path, *extra: str) -> tuple[list, list, list, dict]:
    """Run split_dataset and return train, valid and eval rows and the report."""
    split_dataset.main(split_dataset.parse_args(
        ["--input", str(formatted), "--output-dir", str(out_dir), *extra]))
    return (read_lines(out_dir / "train.jsonl"), read_lines(out_dir / "valid.jsonl"),
            read_lines(out_dir / "eval.jsonl"),
            json.loads((out_dir / "split_report.json").read_text(encoding="utf-8")))


def expect_exit_2(main, args, capsys) -> str:
    """Run main through common.run_main, check exit status 2 and return the one error line."""
    with pytest.raises(SystemExit) as exc:
        common.run_main(main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def cli(script, *args, cwd=REPO):
    """Run a script as a user would; return (exit status, stderr)."""
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


# -----------------------------------------------------------------------------
# Made-up rows and the split's checks
# -----------------------------------------------------------------------------

USER_ROWS = [{"user": f"What is item number {i}?", "assistant": f"Item {i} is thing {i}."}
             for i in range(20)]
def fact_rows(n_facts: int = 30, wordings: int = 3, categories=("capital", "element", "author")):
    """Generated-style rows: several wordings per fact, facts spread over categories."""
    rows = []
    for fact in range(n_facts):
        category = categories[fact % len(categories)]
        for wording in range(wordings):
            rows.append({"question": f"Wording {wording} of question {fact}?",
                         "answer": f"The answer to {fact} is A{fact}.", "key": f"A{fact}",
                         "category": category, "fact_id": f"{category}-{fact:03d}"})
    return rows


def no_overlap(*files: list[dict]) -> bool:
    """True when no question is in two of the files after normalisation."""
    sets = [{normalize_question(row["question"]) for row in rows} for rows in files]
    return sum(map(len, sets)) == len(set().union(*sets))


def groups_of(rows: list[dict], kind: str | None = None) -> set[str]:
    """The groups of rows, or of rows of one eval_kind."""
    return {row["group"] for row in rows if kind is None or row.get("eval_kind") == kind}


def check_disjoint(train: list[dict], valid: list[dict], evaluation: list[dict]) -> None:
    """No question in two files, no held-out group elsewhere, no group in both valid and eval."""
    assert no_overlap(train, valid, evaluation)
    for held, others in ((valid, (train,)), (evaluation, (train, valid))):
        for kind in ("unseen_fact", "unseen_question"):
            assert not groups_of(held, kind) & set().union(*map(groups_of, others))
    if any("fact_id" in row for row in valid + evaluation):
        assert not groups_of(valid) & groups_of(evaluation)


# -----------------------------------------------------------------------------
# The leak check: is a held-out fact stated in training?
#
# A trained row gives a held-out fact away if it shares the fact's group, or if its
# answer states the same fact the other way round ("Addis Ababa is the capital of
# Ethiopia." while "What is the capital of Ethiopia?" is held out).  test_split_dataset.py
# checks the check itself on made-up rows before trusting it on the default split.
# -----------------------------------------------------------------------------

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

