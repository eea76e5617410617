"""Tests for the data stage: format_dataset.py and split_dataset.py.

Run from the repository root:  .venv/bin/python -m pytest tests/test_data_stage.py -q
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

import common
import format_dataset
import split_dataset
from common import normalize_question


# -----------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------


def write_lines(path: Path, rows) -> Path:
    """Write dicts as JSON lines (the test's own writer, independent of common)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    """Read a JSONL file written by the pipeline."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def run_format(tmp_path: Path, source: Path, *extra: str) -> list[dict]:
    """Run format_dataset on a file into tmp_path/out and return the formatted rows."""
    out = tmp_path / "out" / "formatted.jsonl"
    format_dataset.main(format_dataset.parse_args(
        ["--input", str(source), "--output", str(out), *extra]))
    return read_lines(out)


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
    assert err.startswith("error: ") and "\n" not in err
    return err


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


USER_ROWS = [{"user": f"What is item number {i}?", "assistant": f"Item {i} is thing {i}."}
             for i in range(20)]


# -----------------------------------------------------------------------------
# format_dataset.py: accepted inputs
# -----------------------------------------------------------------------------


def test_original_user_assistant_format(tmp_path, capsys):
    """The original dataset.jsonl format: duplicates dropped and counted; split has no overlap."""
    rows = USER_ROWS + [USER_ROWS[0], USER_ROWS[1], USER_ROWS[0],
                        {"user": "  What is   item number 3? ", "assistant": "Item 3 is thing 3."},
                        {"user": "   ", "assistant": "nothing asked"},
                        # Same question up to case and punctuation, other answer: same group.
                        {"user": "what is ITEM number 5", "assistant": "Another answer."}]
    source = write_lines(tmp_path / "dataset.jsonl", rows)
    formatted = run_format(tmp_path, source)
    out = capsys.readouterr().out
    assert "4 exact duplicates" in out and "dropped 1 rows empty" in out
    assert len(formatted) == 21
    first = formatted[0]
    assert first["prompt"] == "User: What is item number 0?\nAssistant:"
    assert first["completion"] == " Item 0 is thing 0."
    assert first["group"] == normalize_question("What is item number 0?")
    assert "fact_id" not in first
    # No key column: each row's key is derived from what its answer adds to the question.
    assert (first["key"], first["key_source"]) == ("thing 0", "derived")
    assert {row["key_source"] for row in formatted} == {"derived"}
    assert formatted[-1]["key"] == "Another answer"
    assert "keys: 0 given, 21 derived" in out and "'What is item number 0?' -> 'thing 0'" in out

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


def test_csv_input_with_quoted_fields(tmp_path):
    """CSV with capitalised headers, a quoted comma and a line break inside a field."""
    source = tmp_path / "qa.csv"
    with open(source, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Question", "Answer"])
        writer.writerow(["Where is Paris, roughly?", "In France."])
        writer.writerow(["A question\nover two lines?", "Yes."])
        writer.writerow(["Last one?", "Line five of the file."])
    formatted = run_format(tmp_path, source)
    assert [row["question"] for row in formatted] == [
        "Where is Paris, roughly?", "A question over two lines?", "Last one?"]
    # Line numbers count physical lines, so a later bad row is reported where it is.
    with open(source, "a", encoding="utf-8", newline="") as fh:
        fh.write("only a question\n")
    with pytest.raises(common.PipelineError, match=r"qa\.csv, line 6: missing field 'answer'"):
        run_format(tmp_path, source)


def test_json_list_input(tmp_path):
    """A .json file holding a list of objects, with instruction/output columns and a number."""
    source = tmp_path / "qa.json"
    source.write_text(json.dumps([{"instruction": "How many legs has a cat?", "output": 4},
                                  {"instruction": "Name a colour.", "output": "Blue."}]),
                      encoding="utf-8")
    formatted = run_format(tmp_path, source)
    assert [(row["question"], row["answer"]) for row in formatted] == [
        ("How many legs has a cat?", "4"), ("Name a colour.", "Blue.")]


def test_named_fields(tmp_path):
    """--question-field/--answer-field choose columns that detection would not know."""
    source = write_lines(tmp_path / "de.jsonl", [{"Frage": "Wie heisst du?", "Antwort": "Anna."},
                                                 {"Frage": "Wo wohnst du?", "Antwort": "Bern."}])
    formatted = run_format(tmp_path, source, "--question-field", "frage",
                           "--answer-field", "Antwort")
    assert formatted[1]["question"] == "Wo wohnst du?" and formatted[1]["answer"] == "Bern."
    with pytest.raises(common.PipelineError, match="Frage, Antwort"):
        run_format(tmp_path, source, "--question-field", "q", "--answer-field", "a")


def test_template_recorded_and_checked(tmp_path, capsys):
    """Custom templates are applied and recorded with the source checksum; bad ones refused."""
    source = write_lines(tmp_path / "qa.jsonl", [{"question": "Q {x}?", "answer": "A."}])
    formatted = run_format(tmp_path, source, "--prompt-template", "Q: {question}\nA:",
                           "--completion-template", " {answer}</s>")
    assert formatted[0]["prompt"] == "Q: Q {x}?\nA:"
    assert formatted[0]["completion"] == " A.</s>"
    template = json.loads((tmp_path / "out" / "template.json").read_text(encoding="utf-8"))
    assert template["prompt_template"] == "Q: {question}\nA:"
    assert template["completion_template"] == " {answer}</s>"
    assert template["source"] == str(source)
    assert template["source_sha256"] == common.file_sha256(source)

    for option, value in (("--prompt-template", "no placeholder"),
                          ("--prompt-template", "{question} {answer}"),
                          ("--completion-template", "no placeholder")):
        args = format_dataset.parse_args(["--input", str(source), "--output",
                                          str(tmp_path / "bad" / "f.jsonl"), option, value])
        expect_exit_2(format_dataset.main, args, capsys)
    assert not (tmp_path / "bad").exists()


# -----------------------------------------------------------------------------
# format_dataset.py: keys (given, or derived from the answer)
# -----------------------------------------------------------------------------

DERIVED_KEYS = [
    ("What is the freezing point of water?", "The freezing point of water is 0 degrees Celsius.",
     "0 degrees Celsius"),
    ("What is the currency of Japan?", "The currency of Japan is the Yen.", "Yen"),
    ("What is the capital of France?", "Paris", "Paris"),
    # "Fahrenheit" is in the question and "at" is a stopword: [boils], [212 degrees].
    ("What is the boiling point of water in Fahrenheit?",
     "Water boils at 212 degrees Fahrenheit.", "212 degrees"),
    ("How cold can it get at the South Pole?", "It can drop to -80 degrees.", "-80 degrees"),
    ("What is 9 divided by 2?", "9 divided by 2 is 4.5.", "4.5"),
    ("What is 4 minus 8?", "4 minus 8 is -4.", "-4"),  # "-4" is not the question's "4"
    ("How warm is the body?", "About 37°C (inside).", "About 37°C (inside)"),
    ("What is the capital of France?", "The capital of France.", "The capital of France"),
]


@pytest.mark.parametrize("question, answer, key", DERIVED_KEYS)
def test_derive_key(question, answer, key):
    """The longest run of answer words the question lacks, with its end punctuation trimmed."""
    assert format_dataset.derive_key(question, answer) == key
    assert key in answer


def test_derived_keys_written_and_reported(tmp_path, capsys):
    """Rows without a key get a derived one; a key column wins where a row has a value."""
    rows = [{"question": q, "answer": a} for q, a, _ in DERIVED_KEYS[:4]]
    rows[1]["key"] = "yen"  # given for one row only: the others are derived
    formatted = run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    assert [(row["key"], row["key_source"]) for row in formatted] == [
        ("0 degrees Celsius", "derived"), ("yen", "given"), ("Paris", "derived"),
        ("212 degrees", "derived")]
    out = capsys.readouterr().out
    assert "keys: 1 given, 3 derived" in out
    assert out.count("  derived: ") == 3 and "-> '212 degrees'" in out

    formatted = run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows), "--no-derive-keys")
    assert [row.get("key_source") for row in formatted] == [None, "given", None, None]
    assert "key" not in formatted[0]
    template = json.loads((tmp_path / "out" / "template.json").read_text(encoding="utf-8"))
    assert template["key_field"] == "key" and template["derive_keys"] is False


def test_key_field_option(tmp_path, capsys):
    """--key-field names a key column detection would not know; a missing one is an error."""
    source = tmp_path / "qa.csv"
    source.write_text("Q,A,Short\nCapital of Peru?,The capital of Peru is Lima.,Lima\n"
                      "Capital of Chile?,It is Santiago.,\n", encoding="utf-8")
    formatted = run_format(tmp_path, source, "--question-field", "Q", "--answer-field", "A",
                           "--key-field", "short")
    assert [(row["key"], row["key_source"]) for row in formatted] == [
        ("Lima", "given"), ("Santiago", "derived")]
    args = format_dataset.parse_args(["--input", str(source), "--output",
                                      str(tmp_path / "bad" / "f.jsonl"), "--question-field", "q",
                                      "--answer-field", "a", "--key-field", "k"])
    err = expect_exit_2(format_dataset.main, args, capsys)
    assert "--key-field column k not found" in err and "Q, A, Short" in err
    assert not (tmp_path / "bad").exists()


def test_generated_rows_keep_their_keys_and_groups(tmp_path):
    """Generated data: given keys kept, fact_group carried through and used as the group."""
    generate_dataset = pytest.importorskip("generate_dataset")
    qa = tmp_path / "qa_pairs.jsonl"
    generate_dataset.main(generate_dataset.parse_args(["--output", str(qa), "--size", "120"]))
    source = read_lines(qa)
    formatted = run_format(tmp_path, qa)
    assert len(formatted) == len(source)
    for before, after in zip(source, formatted):
        assert (after["key"], after["key_source"]) == (before["key"], "given")
        assert after["fact_group"] == after["group"] == before["fact_group"]
        assert after["fact_id"] == before["fact_id"]


def test_group_falls_back_to_fact_id_then_question(tmp_path):
    """group is fact_group, else fact_id, else the normalised question."""
    rows = [{"question": "A?", "answer": "1.", "fact_id": "f/1", "fact_group": "g/1"},
            {"question": "B?", "answer": "2.", "fact_id": "f/2"},
            {"question": "What, is C?", "answer": "3."}]
    formatted = run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    assert [row["group"] for row in formatted] == ["g/1", "f/2", "what is c"]


# -----------------------------------------------------------------------------
# format_dataset.py: bad inputs exit 2 and write nothing
# -----------------------------------------------------------------------------

BAD_INPUTS = {
    "malformed_json": ("bad.jsonl", b'{"question": "Q?", "answer": "A."}\n{"question": "Q2?"\n',
                       [r"bad\.jsonl, line 2: malformed JSON"]),
    "no_known_columns": ("bad.jsonl", b'{"text": "x", "label": "y"}\n',
                         [r"expected one of the pairs question/answer; user/assistant",
                          r"the file has columns: text, label"]),
    "row_missing_column": ("bad.jsonl", b'{"question": "Q?", "answer": "A."}\n'
                                        b'{"question": "Q2?"}\n',
                           [r"bad\.jsonl, line 2: missing field 'answer'"]),
    "list_value": ("bad.jsonl", b'{"question": ["Q?"], "answer": "A."}\n',
                   [r"line 1: field 'question' is a list; expected text"]),
    "not_utf8": ("bad.csv", b"question,answer\nCaf\xe9?,Yes.\n",
                 [r"bad\.csv, line 2: not valid UTF-8"]),
    "empty_file": ("bad.jsonl", b"\n  \n", [r"bad\.jsonl: the file is empty"]),
    "all_rows_empty": ("bad.json", b'[{"question": " ", "answer": "A."}, '
                                   b'{"question": "Q?", "answer": ""}]',
                       [r"bad\.json: all rows are empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    """Each bad input: one error line naming file (and line), exit 2, old output untouched."""
    name, content, patterns = BAD_INPUTS[case]
    source = tmp_path / name
    source.write_bytes(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "formatted.jsonl"
    previous.write_text('{"prompt": "old"}\n', encoding="utf-8")
    args = format_dataset.parse_args(["--input", str(source), "--output", str(previous)])
    err = expect_exit_2(format_dataset.main, args, capsys)
    for pattern in patterns:
        assert re.search(pattern, err), err
    assert previous.read_text(encoding="utf-8") == '{"prompt": "old"}\n'
    assert sorted(p.name for p in out_dir.iterdir()) == ["formatted.jsonl"]


def test_cli_exit_status(tmp_path):
    """Run as a script: a bad file gives exit status 2 and one line on stderr."""
    source = tmp_path / "bad.jsonl"
    source.write_text("not json\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(REPO / "format_dataset.py"), "--input",
                             str(source), "--output", str(tmp_path / "f.jsonl")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "line 1" in result.stderr
    assert not (tmp_path / "f.jsonl").exists() and not (tmp_path / "template.json").exists()


# -----------------------------------------------------------------------------
# split_dataset.py
# -----------------------------------------------------------------------------


@pytest.fixture
def formatted_facts(tmp_path) -> Path:
    """Formatted generated-style data: 30 facts x 3 wordings, plus one single-wording fact."""
    rows = fact_rows() + [{"question": "Lonely question?", "answer": "Lonely answer.",
                           "category": "capital", "fact_id": "capital-999"}]
    run_format(tmp_path, write_lines(tmp_path / "qa_pairs.jsonl", rows))
    return tmp_path / "out" / "formatted.jsonl"


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
    formatted = run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
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
    run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
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
    run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
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
    run_format(tmp_path, write_lines(tmp_path / "one.jsonl", [{"user": "Hi?", "assistant": "Hi."}]))
    args = split_dataset.parse_args(["--input", str(tmp_path / "out" / "formatted.jsonl"),
                                     "--output-dir", str(tmp_path / "split")])
    err = expect_exit_2(split_dataset.main, args, capsys)
    assert "would be empty" in err and "--eval-fraction" in err and "--valid-share" in err
    assert not (tmp_path / "split").exists()
    # Two questions: one for eval, one kept for training, none left for validation.
    run_format(tmp_path, write_lines(tmp_path / "two.jsonl", [
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


def test_valid_split_of_user_questions(tmp_path):
    """User questions: valid takes --valid-share of the training side's question groups."""
    rows = [{"question": f"Question number {i}?", "answer": f"Answer {i}."} for i in range(50)]
    run_format(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
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



# -----------------------------------------------------------------------------
# End to end with generate_dataset.py
# -----------------------------------------------------------------------------


def test_generate_format_split_end_to_end(tmp_path):
    """generate + format + split twice: byte-identical files and no question on both sides."""
    if not (REPO / "generate_dataset.py").exists():
        pytest.skip("generate_dataset.py not written yet")
    generate_dataset = pytest.importorskip("generate_dataset")
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
