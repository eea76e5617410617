"""Tests for format_dataset.py: every accepted input, keys given or derived, and bad inputs.

Inputs: .jsonl, .json and .csv files (CSV dialects and broken quoting), Parquet,
save_to_disk folders and Hugging Face Hub dataset ids (offline: the local cache or a
fast one-line error).  Every bad input exits with status 2, one line naming the
file, line or row and field, and writes nothing.

Run from the repository root:  .venv/bin/python -m pytest tests/test_format_dataset.py -q
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

import common
import scoring
import format_dataset
import generate_dataset
import models
from common import normalize_question
from data_helpers import (REPO, USER_ROWS, cli, expect_exit_2, format_file, format_rows,
                          read_lines, write_lines)

datasets.disable_progress_bars()  # the tests' own writes; stderr must hold only errors


def expect_error(tmp_path: Path, source, capsys, *extra: str) -> str:
    """Run through common.run_main: exit 2, one error line, and nothing written."""
    out_dir = tmp_path / "bad-out"
    args = format_dataset.parse_args(["--input", str(source), "--output",
                                      str(out_dir / "formatted.jsonl"), *extra])
    err = expect_exit_2(format_dataset.main, args, capsys)
    assert not out_dir.exists()
    return err


# -----------------------------------------------------------------------------
# .jsonl, .json and .csv files
# -----------------------------------------------------------------------------


def test_original_user_assistant_format(tmp_path, capsys):
    """The original dataset.jsonl format: duplicates dropped and counted, keys derived.

    test_split_dataset.py splits the same rows."""
    rows = USER_ROWS + [USER_ROWS[0], USER_ROWS[1], USER_ROWS[0],
                        {"user": "  What is   item number 3? ", "assistant": "Item 3 is thing 3."},
                        {"user": "   ", "assistant": "nothing asked"},
                        # Same question up to case and punctuation, other answer: same group.
                        {"user": "what is ITEM number 5", "assistant": "Another answer."}]
    source = write_lines(tmp_path / "dataset.jsonl", rows)
    formatted = format_rows(tmp_path, source)
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


def test_csv_input_with_quoted_fields(tmp_path):
    """CSV with capitalised headers, a quoted comma and a line break inside a field."""
    source = tmp_path / "qa.csv"
    with open(source, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Question", "Answer"])
        writer.writerow(["Where is Paris, roughly?", "In France."])
        writer.writerow(["A question\nover two lines?", "Yes."])
        writer.writerow(["Last one?", "Line five of the file."])
    formatted = format_rows(tmp_path, source)
    assert [row["question"] for row in formatted] == [
        "Where is Paris, roughly?", "A question over two lines?", "Last one?"]
    # Line numbers count physical lines, so a later bad row is reported where it is.
    with open(source, "a", encoding="utf-8", newline="") as fh:
        fh.write("only a question\n")
    with pytest.raises(common.PipelineError, match=r"qa\.csv, line 6: missing field 'answer'"):
        format_rows(tmp_path, source)


def test_json_list_input(tmp_path):
    """A .json file holding a list of objects, with instruction/output columns and a number."""
    source = tmp_path / "qa.json"
    source.write_text(json.dumps([{"instruction": "How many legs has a cat?", "output": 4},
                                  {"instruction": "Name a colour.", "output": "Blue."}]),
                      encoding="utf-8")
    formatted = format_rows(tmp_path, source)
    assert [(row["question"], row["answer"]) for row in formatted] == [
        ("How many legs has a cat?", "4"), ("Name a colour.", "Blue.")]


def test_named_fields(tmp_path):
    """--question-field/--answer-field choose columns that detection would not know."""
    source = write_lines(tmp_path / "de.jsonl", [{"Frage": "Wie heisst du?", "Antwort": "Anna."},
                                                 {"Frage": "Wo wohnst du?", "Antwort": "Bern."}])
    formatted = format_rows(tmp_path, source, "--question-field", "frage",
                           "--answer-field", "Antwort")
    assert formatted[1]["question"] == "Wo wohnst du?" and formatted[1]["answer"] == "Bern."
    with pytest.raises(common.PipelineError, match="Frage, Antwort"):
        format_rows(tmp_path, source, "--question-field", "q", "--answer-field", "a")


def test_template_recorded_and_checked(tmp_path, capsys):
    """Custom templates are applied and recorded with the source checksum; bad ones refused."""
    source = write_lines(tmp_path / "qa.jsonl", [{"question": "Q {x}?", "answer": "A."}])
    formatted = format_rows(tmp_path, source, "--prompt-template", "Q: {question}\nA:",
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
# The same rows give the same output whatever the format
# -----------------------------------------------------------------------------

# The same rows in every format: a given key, a missing key (derived), an exact duplicate,
# a row without an answer (dropped as empty) and carried-through extra fields.
ROWS = [
    {"question": "What is the capital of France?", "answer": "The capital is Paris.",
     "key": "Paris", "category": "capital"},
    {"question": "What is the currency of Japan?", "answer": "The currency of Japan is the Yen.",
     "key": None, "category": "money"},
    {"question": "Where is Lima, roughly?", "answer": "In Peru; on the coast.",
     "key": "Peru", "category": "capital"},
    {"question": "What is the capital of France?", "answer": "The capital is Paris.",
     "key": "Paris", "category": "capital"},
    {"question": "Unanswered?", "answer": None, "key": None, "category": "none"},
]



def write_jsonl(path: Path, rows) -> Path:
    """JSON lines: a missing key left out of its row, another missing value empty."""
    path.write_text("".join(json.dumps({k: "" if v is None else v for k, v in row.items()
                                        if (k, v) != ("key", None)}) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows, delimiter: str = ",") -> Path:
    """A CSV file with a header; a missing value is an empty cell."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(["" if value is None else value for value in row.values()])
    return path


def write_parquet(path: Path, rows) -> Path:
    """A Parquet file written by datasets; a missing value is null."""
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path



def test_same_rows_same_output_from_every_format(tmp_path, capsys):
    """jsonl, csv, ;-csv, parquet and save_to_disk inputs give byte-identical formatted rows."""
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    sources = {"jsonl": write_jsonl(tmp_path / "qa.jsonl", ROWS),
               "csv": write_csv(tmp_path / "qa.csv", ROWS),
               "semicolon": write_csv(tmp_path / "semi.csv", ROWS, ";"),
               "parquet": write_parquet(tmp_path / "qa.parquet", ROWS),
               "saved": saved}
    outputs = {name: format_file(tmp_path, source, out=name).read_bytes()
               for name, source in sources.items()}
    assert len(set(outputs.values())) == 1, outputs
    rows = read_lines(tmp_path / "jsonl" / "formatted.jsonl")
    assert [(row["key"], row["key_source"]) for row in rows] == [
        ("Paris", "given"), ("Yen", "derived"), ("Peru", "given")]
    assert [row["category"] for row in rows] == ["capital", "money", "capital"]
    out = capsys.readouterr().out
    assert out.count("dropped 1 rows empty after whitespace normalisation and 1 exact") == 5
    assert "(';'-separated CSV;" in out and "(Parquet;" in out and "(JSONL;" in out
    # template.json records what was read: a checksum of the file or folder.
    template = json.loads((tmp_path / "parquet" / "template.json").read_text(encoding="utf-8"))
    assert template["source"] == str(sources["parquet"])
    assert template["source_sha256"] == common.file_sha256(sources["parquet"])
    template = json.loads((tmp_path / "saved" / "template.json").read_text(encoding="utf-8"))
    assert len(template["source_sha256"]) == 64


# -----------------------------------------------------------------------------
# Parquet
# -----------------------------------------------------------------------------


def test_parquet_numbers_detection_and_named_fields(tmp_path, capsys):
    """Numbers become text (a whole float as an integer: pandas stores an int column with gaps
    as floats), columns are detected as for any file, --question-field works."""
    source = write_parquet(tmp_path / "qa.parquet", [
        {"Instruction": "How many legs has a cat?", "Output": 4, "note": "x"},
        {"Instruction": "What is half of 5?", "Output": 2.5, "note": "y"}])
    rows = read_lines(format_file(tmp_path, source))
    assert [(row["question"], row["answer"]) for row in rows] == [
        ("How many legs has a cat?", "4"), ("What is half of 5?", "2.5")]
    assert "question column 'instruction', answer column 'output'" in capsys.readouterr().out
    rows = read_lines(format_file(tmp_path, source, "--question-field", "note",
                                 "--answer-field", "instruction"))
    assert rows[0]["question"] == "x"
    err = expect_error(tmp_path, source, capsys, "--question-field", "q", "--answer-field", "a")
    assert "qa.parquet: column(s) q, a not found; the file has columns: Instruction, Output, " \
           "note" in err


def test_parquet_bad_inputs_name_the_row(tmp_path, capsys):
    """A bad value names the 1-based row and field; unknown columns and broken files are clear."""
    source = write_parquet(tmp_path / "lists.parquet", [
        {"question": ["Q1?"], "answer": "A."}, {"question": ["Q2?", "Q3?"], "answer": "B."}])
    err = expect_error(tmp_path, source, capsys)
    assert "lists.parquet, row 1: field 'question' is a list; expected text" in err
    source = write_parquet(tmp_path / "flags.parquet", [
        {"question": "Q1?", "answer": "A."}, {"question": "Q2?", "answer": None},
        {"question": "Q3?", "answer": "C."}])
    rows = read_lines(format_file(tmp_path, source))
    assert [row["question"] for row in rows] == ["Q1?", "Q3?"]  # the null answer is dropped
    source = write_parquet(tmp_path / "cols.parquet", [{"text": "x", "label": 1}])
    assert "cols.parquet: no question/answer columns found" in expect_error(
        tmp_path, source, capsys)
    source = tmp_path / "broken.parquet"
    source.write_text("question,answer\nQ?,A.\n", encoding="utf-8")
    assert "broken.parquet: not a readable Parquet file" in expect_error(
        tmp_path, source, capsys)
    empty = write_parquet(tmp_path / "empty.parquet", [{"question": "Q?", "answer": "A."}])
    datasets.Dataset.from_parquet(str(empty)).select([]).to_parquet(str(empty))
    assert "empty.parquet: no rows" in expect_error(tmp_path, empty, capsys)
    assert "--split applies to Hub dataset ids and save_to_disk folders, not to a .parquet" \
        in expect_error(tmp_path, empty, capsys, "--split", "test")


# -----------------------------------------------------------------------------
# save_to_disk folders
# -----------------------------------------------------------------------------


def test_save_to_disk_dataset_dict_and_split(tmp_path, capsys):
    """A DatasetDict folder reads --split (default train); a missing split lists the splits."""
    folder = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"user": "Train question?", "assistant": "T."}]),
        "test": datasets.Dataset.from_list([{"user": "Test question?", "assistant": "E."},
                                            {"user": "Fine?", "assistant": "Fine."},
                                            {"user": "", "assistant": "x"}]),
    }).save_to_disk(str(folder))
    assert read_lines(format_file(tmp_path, folder))[0]["question"] == "Train question?"
    rows = read_lines(format_file(tmp_path, folder, "--split", "test"))
    assert [(row["question"], row["answer"]) for row in rows] == [
        ("Test question?", "E."), ("Fine?", "Fine.")]
    out = capsys.readouterr().out
    assert "(save_to_disk folder, split 'test';" in out
    template = json.loads((tmp_path / "out" / "template.json").read_text(encoding="utf-8"))
    assert template["source_split"] == "test"
    err = expect_error(tmp_path, folder, capsys, "--split", "validation")
    assert "dict: no split 'validation'; the folder has splits: train, test; choose one " \
           "with --split" in err

    only_test = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"question": "Q?",
                                                               "answer": "A."}])}
                         ).save_to_disk(str(only_test))
    assert "no split 'train'; the folder has splits: test" in expect_error(
        tmp_path, only_test, capsys)


def test_save_to_disk_single_dataset_and_bad_folders(tmp_path, capsys):
    """A Dataset folder needs no --split (and refuses one); other folders are explained."""
    folder = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": "Q?", "completion": None},  # empty: dropped
                                {"prompt": "Q2?", "completion": True}]
                               ).save_to_disk(str(folder))
    err = expect_error(tmp_path, folder, capsys)
    assert "single, row 2: field 'completion' is a bool; expected text or a number" in err
    datasets.Dataset.from_list([{"prompt": "Q?", "completion": "A."}]
                               ).save_to_disk(str(folder))
    assert read_lines(format_file(tmp_path, folder))[0]["completion"] == " A."
    assert "holds a single Dataset" in expect_error(tmp_path, folder, capsys, "--split", "train")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "qa.jsonl").write_text('{"question": "Q?", "answer": "A."}\n', encoding="utf-8")
    assert "plain: not a folder written by datasets' save_to_disk" in expect_error(
        tmp_path, plain, capsys)


# -----------------------------------------------------------------------------
# Hub dataset ids
# -----------------------------------------------------------------------------

OFFLINE_MESSAGE = ("the Hugging Face Hub is not reachable ({reason}) and this dataset is not "
                   "in the local datasets cache; give a local file instead: .jsonl, .json, "
                   ".csv, .parquet or a save_to_disk folder")


def test_hub_id_offline_fails_fast_with_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 and an uncached Hub id: exit 2 within seconds, one line, no output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "format_dataset.py"), "--input",
                             "no-such-org/no-such-set", "--output",
                             str(tmp_path / "out" / "f.jsonl")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("error: no-such-org/no-such-set: " + OFFLINE_MESSAGE.format(
        reason="offline mode is set") + "\n")
    assert elapsed < 20, elapsed
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_without_offline_flag(tmp_path, capsys, monkeypatch):
    """No offline flag but no answer from the Hub: the same line, without the retry loop."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    err = expect_error(tmp_path, "some-org/some_set.v2", capsys, "--split", "test")
    assert time.monotonic() - started < 20
    assert err == "error: some-org/some_set.v2: " + OFFLINE_MESSAGE.format(
        reason="no answer within 3 s")


def test_hub_like_names_that_are_local(tmp_path, capsys, monkeypatch):
    """A missing file with a data suffix, or under an existing folder, is a missing file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("data/qa_pairs.jsonl", "data/typo", "other/qa.parquet"):
        assert not format_dataset.is_hub_id(name)
        assert f"error: {name}: file not found" in expect_error(tmp_path, name, capsys)
    assert format_dataset.is_hub_id("HuggingFaceH4/no_robots")
    assert not format_dataset.is_hub_id("a/b/c") and not format_dataset.is_hub_id("name")


def fake_hub_cache(tmp_path: Path, rows) -> Path:
    """A datasets cache holding 'testorg/qa_set' as load_dataset leaves a Hub dataset there.

    Built by loading a local Parquet file into a scratch cache and moving the result to
    the place (org___name/default/0.0.0/<hash>) and file name (<name>-<split>.arrow) the
    packaged 'cache' module reads offline; this follows datasets' on-disk layout.
    """
    scratch = tmp_path / "scratch"
    parquet = write_parquet(tmp_path / "hub.parquet", rows)
    datasets.load_dataset("parquet", data_files={"train": str(parquet)},
                          cache_dir=str(scratch))
    built = next(path.parent for path in scratch.rglob("dataset_info.json"))
    cache = tmp_path / "hf-datasets-cache"
    target = cache / "testorg___qa_set" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(built, target, ignore=shutil.ignore_patterns("*.lock"))
    (target / "parquet-train.arrow").rename(target / "qa_set-train.arrow")
    return cache


def test_hub_id_offline_from_the_local_cache(tmp_path, capsys, monkeypatch):
    """Offline, a Hub dataset already in the datasets cache loads from there."""
    cache = fake_hub_cache(tmp_path, ROWS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    formatted = format_file(tmp_path, "testorg/qa_set", out="hub")
    reference = format_file(tmp_path, write_jsonl(tmp_path / "qa.jsonl", ROWS), out="jsonl")
    assert formatted.read_bytes() == reference.read_bytes()
    out = capsys.readouterr().out
    assert "(Hub dataset, split 'train', from the local cache;" in out
    template = json.loads((tmp_path / "hub" / "template.json").read_text(encoding="utf-8"))
    assert template["source"] == "testorg/qa_set" and template["source_split"] == "train"
    assert template["source_fingerprint"]
    err = expect_error(tmp_path, "testorg/qa_set", capsys, "--split", "test")
    assert err.startswith("error: testorg/qa_set: --split test: Unknown split") and \
        "train" in err


# -----------------------------------------------------------------------------
# CSV dialects and broken quoting
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter, shown", [(";", "';'"), ("\t", "'\\t'"), ("|", "'|'"),
                                              (",", "','")])
def test_csv_delimiter_detected_from_the_header(tmp_path, capsys, delimiter, shown):
    """;, tab and | separated files read like comma-separated ones; the summary says which."""
    rows = [{"Question": "Where is Paris, roughly?", "Answer": "In France; north."},
            {"Question": "Say | or tab\there?", "Answer": "Yes, both."}]
    source = write_csv(tmp_path / "qa.csv", rows, delimiter)
    formatted = read_lines(format_file(tmp_path, source))
    assert [(row["question"], row["answer"]) for row in formatted] == [
        ("Where is Paris, roughly?", "In France; north."), ("Say | or tab here?", "Yes, both.")]
    assert f"({shown}-separated CSV; question column 'question'" in capsys.readouterr().out


def test_csv_semicolon_row_with_too_many_fields(tmp_path, capsys):
    """The field-count error names the sniffed delimiter."""
    source = tmp_path / "semi.csv"
    source.write_text("question;answer\nQ?;A.\nQ2?;A;B\n", encoding="utf-8")
    err = expect_error(tmp_path, source, capsys)
    assert "semi.csv, line 3: 3 fields but the header has 2; quote values that contain " \
           "semicolons" in err


def test_csv_unterminated_quote_names_its_line(tmp_path, capsys):
    """An open quote on line 2 is reported there, not as a file with one column."""
    source = tmp_path / "open.csv"
    source.write_text('question,answer\n"What is this?,Yes.\nNext?,No.\n', encoding="utf-8")
    err = expect_error(tmp_path, source, capsys)
    assert err.startswith('error: ') and "open.csv, line 2: unterminated quote" in err
    assert 'the " that opens a field on this line is never closed' in err
    # The open quote of a later field, after a closed multi-line one, is found on its line.
    source.write_text('question,answer\nQ1?,A1.\n"Two\nlines?",A2.\nQ3?,"open\nQ4?,A4.\n',
                      encoding="utf-8")
    assert "open.csv, line 5: unterminated quote" in expect_error(tmp_path, source, capsys)
    # Quotes inside an unquoted field and doubled quotes inside a quoted one are fine.
    source.write_text('question,answer\nSay "hi"?,"He said ""hi""."\n', encoding="utf-8")
    rows = read_lines(format_file(tmp_path, source))
    assert (rows[0]["question"], rows[0]["answer"]) == ('Say "hi"?', 'He said "hi".')
    source.write_text('"question,answer\nQ?,A.\n', encoding="utf-8")
    assert "open.csv, line 1: unterminated quote" in expect_error(tmp_path, source, capsys)


# -----------------------------------------------------------------------------
# Keys: given, or derived from the answer
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
    formatted = format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    assert [(row["key"], row["key_source"]) for row in formatted] == [
        ("0 degrees Celsius", "derived"), ("yen", "given"), ("Paris", "derived"),
        ("212 degrees", "derived")]
    out = capsys.readouterr().out
    assert "keys: 1 given, 3 derived" in out
    assert out.count("  derived: ") == 3 and "-> '212 degrees'" in out

    formatted = format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows), "--no-derive-keys")
    assert [row.get("key_source") for row in formatted] == [None, "given", None, None]
    assert "key" not in formatted[0]
    template = json.loads((tmp_path / "out" / "template.json").read_text(encoding="utf-8"))
    assert template["key_field"] == "key" and template["derive_keys"] is False


def test_key_field_option(tmp_path, capsys):
    """--key-field names a key column detection would not know; a missing one is an error."""
    source = tmp_path / "qa.csv"
    source.write_text("Q,A,Short\nCapital of Peru?,The capital of Peru is Lima.,Lima\n"
                      "Capital of Chile?,It is Santiago.,\n", encoding="utf-8")
    formatted = format_rows(tmp_path, source, "--question-field", "Q", "--answer-field", "A",
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
    qa = tmp_path / "qa_pairs.jsonl"
    generate_dataset.main(generate_dataset.parse_args(["--output", str(qa), "--size", "120"]))
    source = read_lines(qa)
    formatted = format_rows(tmp_path, qa)
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
    formatted = format_rows(tmp_path, write_lines(tmp_path / "qa.jsonl", rows))
    assert [row["group"] for row in formatted] == ["g/1", "f/2", "what is c"]


# Public-style rows and the key derive_key makes of each, written out by hand.  The first
# six are keys the old derivation got wrong: "our solar system", "has eight", "than",
# "thing", "equals 4", "No, most".
PUBLIC_STYLE_KEYS = [
    ("What is the largest planet?",
     "Jupiter is the largest planet in our solar system.", "Jupiter"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight"),
    ("Which is bigger, the Sun or the Moon?", "The Sun is bigger than the Moon.",
     "The Sun is bigger than the Moon"),
    ("What is item 7?", "Item 7 is thing 7.", "thing 7"),
    ("What is 2 + 2?", "2 + 2 equals 4.", "4"),
    ("Do all birds fly?", "No, most birds fly but penguins cannot.", "No"),
    # trivia
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Rome"),
    ("Who wrote Romeo and Juliet?",
     "William Shakespeare wrote Romeo and Juliet.", "William Shakespeare"),
    ("Who painted the Mona Lisa?",
     "The Mona Lisa was painted by Leonardo da Vinci.", "Leonardo da Vinci"),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.", "Nile"),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest.", "Pacific"),
    ("In which year did World War II end?", "World War II ended in 1945.", "1945"),
    ("What is the currency of the United Kingdom?",
     "The currency of the United Kingdom is the pound sterling.", "pound sterling"),
    ("What is the tallest mountain on Earth?",
     "Mount Everest is the tallest mountain on Earth.", "Mount Everest"),
    # science
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Au"),
    ("What gas do plants absorb from the air?",
     "Plants absorb carbon dioxide from the air.", "carbon dioxide"),
    ("What is the boiling point of water?",
     "Water boils at 100 degrees Celsius.", "100 degrees Celsius"),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones.", "206"),
    ("What planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Mars"),
    ("What is the speed of light?",
     "The speed of light is about 300,000 kilometres per second.", "300,000 kilometres per second"),
    ("What is the SI unit of energy?", "The SI unit of energy is the joule.", "joule"),
    ("How many chambers does the human heart have?", "The human heart has four chambers.", "four"),
    # arithmetic
    ("What is 12 times 12?", "12 times 12 is 144.", "144"),
    ("What is 100 divided by 4?", "100 divided by 4 equals 25.", "25"),
    ("What is 15 minus 20?", "15 minus 20 is -5.", "-5"),
    ("What is 7 plus 8?", "The answer is 15.", "15"),
    ("What is half of 9?", "Half of 9 is 4.5.", "4.5"),
    # unit conversion
    ("How many metres are in a kilometre?", "There are 1000 metres in a kilometre.", "1000"),
    ("How many centimetres are in 2 metres?", "2 metres is 200 centimetres.", "200"),
    ("What is 0 degrees Celsius in Fahrenheit?",
     "0 degrees Celsius is 32 degrees Fahrenheit.", "32"),
    ("How many grams are in 3 kilograms?", "3 kilograms equals 3000 grams.", "3000"),
    ("How many minutes are in 2 hours?", "There are 120 minutes in 2 hours.", "120"),
    # small talk
    ("Hello!", "Hello! How can I help you today?", "I help you today"),
    ("Can you help me?", "Yes, I can help you.", "Yes"),
    ("Are you a human?", "No, I am an AI assistant.", "No"),
    ("Thank you!", "You are welcome!", "welcome"),
    # definitions
    ("What is photosynthesis?",
     "Photosynthesis is the process by which plants turn light into food.",
     "plants turn light into food"),
    ("What does a thermometer measure?", "A thermometer measures temperature.", "temperature"),
    ("What is a noun?", "A noun is a word that names a person, place or thing.", "person, place"),
    ("What is the plural of mouse?", "The plural of mouse is mice.", "mice"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "cold"),
]


@pytest.mark.parametrize("question, answer, key", PUBLIC_STYLE_KEYS)
def test_derived_key_is_the_answer_part(question, answer, key):
    """The derived key is the expected one, lies in the answer, and the answer satisfies it."""
    assert format_dataset.derive_key(question, answer) == key
    assert key in answer
    assert scoring.key_match(answer, key, question)


def test_public_style_file_gets_its_derived_keys(tmp_path, capsys):
    """A file of the public-style rows, without a key column: the keys written and counted."""
    rows = [{"question": question, "answer": answer} for question, answer, _ in PUBLIC_STYLE_KEYS]
    formatted = format_rows(tmp_path, write_lines(tmp_path / "public.jsonl", rows))
    assert [(row["key"], row["key_source"]) for row in formatted] == [
        (key, "derived") for _, _, key in PUBLIC_STYLE_KEYS]
    out = capsys.readouterr().out
    assert "keys: 0 given, 41 derived" in out
    assert "'What is the largest planet?' -> 'Jupiter'" in out


# -----------------------------------------------------------------------------
# Bad inputs exit 2 and write nothing
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



def test_formatting_before_generating_names_the_command(tmp_path):
    """No input file yet: the error names the step that writes it, and nothing is written."""
    status, err = cli("format_dataset.py", "--input", str(tmp_path / "qa_pairs.jsonl"),
                      "--output", str(tmp_path / "formatted.jsonl"))
    assert status == 2 and "python generate_dataset.py" in err
    assert list(tmp_path.iterdir()) == []
