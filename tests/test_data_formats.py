"""Tests for format_dataset.py's inputs beyond .jsonl/.json: CSV dialects, Parquet,
save_to_disk folders and Hugging Face Hub dataset ids (offline: the local cache or a
fast one-line error).

Run from the repository root:  .venv/bin/python -m pytest tests/test_data_formats.py -q
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

import common
import format_dataset
import models

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # the tests' own writes; stderr must hold only errors

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


def read_lines(path: Path) -> list[dict]:
    """Read a JSONL file written by the pipeline."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def run_format(tmp_path: Path, source, *extra: str, out: str = "out") -> Path:
    """Run format_dataset on an input into tmp_path/out; return the formatted file."""
    formatted = tmp_path / out / "formatted.jsonl"
    format_dataset.main(format_dataset.parse_args(
        ["--input", str(source), "--output", str(formatted), *extra]))
    return formatted


def expect_error(tmp_path: Path, source, capsys, *extra: str) -> str:
    """Run through common.run_main: exit 2, one error line, and nothing written."""
    out_dir = tmp_path / "bad-out"
    args = format_dataset.parse_args(["--input", str(source), "--output",
                                      str(out_dir / "formatted.jsonl"), *extra])
    with pytest.raises(SystemExit) as exc:
        common.run_main(format_dataset.main, args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out_dir.exists()
    return err


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


# -----------------------------------------------------------------------------
# The same rows give the same output whatever the format
# -----------------------------------------------------------------------------


def test_same_rows_same_output_from_every_format(tmp_path, capsys):
    """jsonl, csv, ;-csv, parquet and save_to_disk inputs give byte-identical formatted rows."""
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    sources = {"jsonl": write_jsonl(tmp_path / "qa.jsonl", ROWS),
               "csv": write_csv(tmp_path / "qa.csv", ROWS),
               "semicolon": write_csv(tmp_path / "semi.csv", ROWS, ";"),
               "parquet": write_parquet(tmp_path / "qa.parquet", ROWS),
               "saved": saved}
    outputs = {name: run_format(tmp_path, source, out=name).read_bytes()
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
    rows = read_lines(run_format(tmp_path, source))
    assert [(row["question"], row["answer"]) for row in rows] == [
        ("How many legs has a cat?", "4"), ("What is half of 5?", "2.5")]
    assert "question column 'instruction', answer column 'output'" in capsys.readouterr().out
    rows = read_lines(run_format(tmp_path, source, "--question-field", "note",
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
    rows = read_lines(run_format(tmp_path, source))
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
    assert read_lines(run_format(tmp_path, folder))[0]["question"] == "Train question?"
    rows = read_lines(run_format(tmp_path, folder, "--split", "test"))
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
    assert read_lines(run_format(tmp_path, folder))[0]["completion"] == " A."
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
    formatted = run_format(tmp_path, "testorg/qa_set", out="hub")
    reference = run_format(tmp_path, write_jsonl(tmp_path / "qa.jsonl", ROWS), out="jsonl")
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
    formatted = read_lines(run_format(tmp_path, source))
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
    rows = read_lines(run_format(tmp_path, source))
    assert (rows[0]["question"], rows[0]["answer"]) == ('Say "hi"?', 'He said "hi".')
    source.write_text('"question,answer\nQ?,A.\n', encoding="utf-8")
    assert "open.csv, line 1: unterminated quote" in expect_error(tmp_path, source, capsys)
