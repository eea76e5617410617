"""Turn a question-answer file into prompt/completion rows with one fixed template.

Run from the repository root:

    python format_dataset.py                      # data/qa_pairs.jsonl -> data/formatted.jsonl
    python format_dataset.py --input my_data.csv  # a file of your own (formats below)
    python format_dataset.py --input org/name --split train   # a Hugging Face Hub dataset

--input takes a .jsonl file (one JSON object per line), a .json file (a list of
objects), a .csv file (header row; the delimiter , ; tab or | is detected from the
header), a .parquet file, a folder written by `datasets`' save_to_disk (a
DatasetDict folder takes --split), or a Hub dataset id `org/name` (with --split;
offline it works only for a dataset already in the local `datasets` cache). The
last three are read through the `datasets` library. Errors name the file and the
line (.jsonl, .csv), item (.json) or row (the rest) and the field.

Writes data/formatted.jsonl and data/template.json (the template, recorded so that
training and evaluation apply exactly the same one). Nothing is written unless the
whole input is valid, so a bad file never leaves a half-made dataset behind.

Every row gets a `key`, the short part of the answer a correct reply must contain:
from the key column where the input has one (key_source "given"), otherwise
derived from the answer as its longest run of words that the question does not
already contain (key_source "derived": "The currency of Japan is the Yen." ->
"Yen"), so evaluation need not fall back on token F1, which rewards echoing the
sentence frame. Check the derived keys in formatted.jsonl and correct them by
adding a key column, or turn derivation off with --no-derive-keys.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import (DEFAULT_COMPLETION_TEMPLATE, DEFAULT_PROMPT_TEMPLATE, PipelineError,
                    read_csv, file_sha256, normalize_question, normalize_whitespace,
                    read_records, run_main, write_json, write_jsonl)

# Column pairs recognised automatically, in order of preference (lower-case names).
# user/assistant is the original project's dataset.jsonl format.
COLUMN_PAIRS = (
    ("question", "answer"),
    ("user", "assistant"),
    ("instruction", "output"),
    ("prompt", "completion"),
    ("input", "output"),
)
# Fields of generated data carried through so later stages can split and report by them
# (the key is read separately, from --key-field).
EXTRA_FIELDS = ("category", "fact_id", "fact_group")
# Words that never make a derived key on their own: articles, copulas and question words.
FRAME_WORDS = frozenset("the a an is are was were of in on to it its and or for that this be "
                        "by as at with which what who where when how "
                        # verbs and comparatives that only link the answer to the question
                        "has have had do does did there than equals can".split())
# Number words: a derived key prefers a number ("A spider has eight legs." -> "eight").
NUMBER_WORDS = frozenset("zero one two three four five six seven eight nine ten eleven twelve "
                         "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
                         "thirty forty fifty sixty seventy eighty ninety hundred thousand million "
                         "billion dozen".split())
# Copulas: a capitalised run right before one is the answer's subject ("Jupiter is ...").
COPULAS = frozenset("is are was were".split())
# Stripped from the ends of a derived key: "Paris." -> "Paris", '"yes"' -> 'yes'; a leading
# "-" ("-40") and marks such as "°" or "%" stay.
KEY_TRAILING = ".,;:!?\"'”’)]}"
KEY_LEADING = "\"'“‘([{"
BRACKETS = {"(": ")", "[": "]", "{": "}"}
OPENERS = {close: open_ for open_, close in BRACKETS.items()}
# Input files by suffix; anything else must be a save_to_disk folder or a Hub dataset id.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LOCAL_ALTERNATIVES = ".jsonl, .json, .csv, .parquet or a save_to_disk folder"
# A Hub dataset id: owner/name, as the Hub spells them.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def parse_args(argv=None) -> argparse.Namespace:
    """Read the command line."""
    formats = next(part for part in __doc__.split("\n\n") if part.startswith("--input takes"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=formats)
    parser.add_argument("--input", default="data/qa_pairs.jsonl",
                        help="question-answer data: a .jsonl, .json (list), .csv or .parquet "
                             "file, a folder written by datasets' save_to_disk, or a Hugging "
                             "Face Hub dataset id (org/name) (default data/qa_pairs.jsonl: "
                             "what generate_dataset.py writes)")
    parser.add_argument("--split", default=None,
                        help="which split to read from a Hub dataset id or a save_to_disk "
                             "folder holding a DatasetDict; Hub ids also take slices such as "
                             "train[:1000] (default train: the split that holds the rows to "
                             "learn from)")
    parser.add_argument("--output", default="data/formatted.jsonl",
                        help="formatted rows; template.json goes beside it (default "
                             "data/formatted.jsonl: where split_dataset.py looks)")
    parser.add_argument("--question-field", default=None,
                        help="column holding the question, given with --answer-field "
                             "(default: detected from the known pairs question/answer, "
                             "user/assistant, instruction/output, prompt/completion, "
                             "input/output, so common files need no option)")
    parser.add_argument("--answer-field", default=None,
                        help="column holding the answer, given with --question-field "
                             "(default: detected like --question-field, for the same reason)")
    parser.add_argument("--key-field", default=None,
                        help="column holding the short answer a correct reply must contain; "
                             "rows without one get a derived key, see --no-derive-keys "
                             "(default: a column named 'key', if the file has one: the name "
                             "generate_dataset.py writes)")
    parser.add_argument("--no-derive-keys", action="store_true",
                        help="leave rows without a key unkeyed instead of deriving one from "
                             "the answer (default off: derived keys let evaluation score key "
                             "accuracy rather than token F1 alone)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                        help="text the model sees, must contain {question}; in bash write a "
                             "newline as $'...\\n...' (default %(default)r: the original "
                             "project's chat format)")
    parser.add_argument("--completion-template", default=DEFAULT_COMPLETION_TEMPLATE,
                        help="text the model learns to produce, must contain {answer} "
                             "(default %(default)r: its leading space joins it to "
                             "'Assistant:' as one word boundary)")
    args = parser.parse_args(argv)
    if (args.question_field is None) != (args.answer_field is None):
        parser.error("give --question-field and --answer-field together")
    return args


def check_templates(prompt_template: str, completion_template: str) -> None:
    """Refuse templates that lack their placeholder or would leak the answer into the prompt."""
    if "{question}" not in prompt_template:
        raise PipelineError(f"--prompt-template {prompt_template!r} must contain {{question}}")
    if "{answer}" in prompt_template:
        raise PipelineError("--prompt-template must not contain {answer}: the model would "
                            "see the answer it is asked for")
    if "{answer}" not in completion_template:
        raise PipelineError(f"--completion-template {completion_template!r} must contain "
                            "{answer}")


def row_error(path: Path, number: int, message: str) -> PipelineError:
    """An error for one record: its line (.jsonl, .csv), item (.json list) or row (the rest)."""
    suffix = "" if path.is_dir() else path.suffix.lower()
    if suffix == ".json":
        return PipelineError(f"item {number}: {message}", path)
    if suffix in (".jsonl", ".csv"):
        return PipelineError(message, path, number)
    return PipelineError(message, f"{path}, row {number}")


# -----------------------------------------------------------------------------
# Reading the input: files, save_to_disk folders and Hub datasets
# -----------------------------------------------------------------------------


@dataclass
class Input:
    """What was read: (line/item/row number, row) records and how to describe their source."""
    records: list[tuple[int, dict]]
    kind: str  # for the summary line, e.g. "';'-separated CSV"
    provenance: dict  # recorded in template.json


def is_hub_id(text: str) -> bool:
    """Whether --input names a Hub dataset (org/name) rather than a missing local file."""
    path = Path(text)
    return (HUB_ID.fullmatch(text) is not None and not path.exists()
            and path.suffix.lower() not in FILE_SUFFIXES and not path.parent.is_dir())


def read_input(text: str, split: str | None) -> Input:
    """Read --input of any accepted kind into records, or stop with a one-line error."""
    path = Path(text)
    if is_hub_id(text):
        return read_hub(text, split or "train")
    if not path.exists():
        raise PipelineError("file not found; run `python generate_dataset.py` first, or pass "
                            "--input with your own question-answer file", path)
    if path.is_dir():
        return read_saved(path, split)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise PipelineError(f"unsupported file type; expected {LOCAL_ALTERNATIVES}, "
                            "or a Hub dataset id (org/name)", path)
    if split is not None:
        raise PipelineError("--split applies to Hub dataset ids and save_to_disk folders, "
                            f"not to a {suffix} file", path)
    provenance = {"source_sha256": file_sha256(path)}
    if suffix == ".csv":
        table = read_csv(path)
        return Input(table.records, f"{table.delimiter!r}-separated CSV", provenance)
    if suffix == ".parquet":
        return Input(read_parquet(path), "Parquet", provenance)
    return Input(read_records(path), suffix[1:].upper(), provenance)


@contextlib.contextmanager
def quiet_datasets():
    """Import `datasets` with its progress bars and log messages off (errors come as one line)."""
    import datasets
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    message = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def dataset_records(dataset) -> list[tuple[int, dict]]:
    """Rows of a datasets.Dataset as (1-based row, row) pairs.

    A null or NaN cell becomes "" (an empty cell, as in a CSV file), so a row without a
    question or answer is dropped as empty; a whole float becomes an int ("4", not "4.0"),
    as a column of integers with gaps is stored as floats (pandas does so).
    """
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    return [(number, {name: cell(value) for name, value in row.items()})
            for number, row in enumerate(dataset.to_list(), start=1)]


def read_parquet(path: Path) -> list[tuple[int, dict]]:
    """A .parquet file's rows, read through datasets (its cache kept out of the user's)."""
    import pyarrow.parquet

    try:
        if pyarrow.parquet.read_metadata(path).num_rows == 0:
            return []  # datasets refuses an empty file; main says "no rows"
    except Exception as exc:  # pyarrow raises several kinds for a file that is not Parquet
        raise PipelineError(f"not a readable Parquet file ({first_line(exc)})", path) from None
    with quiet_datasets() as datasets, tempfile.TemporaryDirectory() as cache:
        try:
            dataset = datasets.Dataset.from_parquet(str(path), cache_dir=cache,
                                                    keep_in_memory=True)
        except Exception as exc:  # pyarrow and datasets raise many kinds
            raise PipelineError(f"not a readable Parquet file ({first_line(exc)})",
                                path) from None
        return dataset_records(dataset)


def folder_sha256(folder: Path) -> str:
    """Checksum of a folder: every file's relative path and content, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def read_saved(folder: Path, split: str | None) -> Input:
    """A folder written by save_to_disk: a Dataset, or one split (--split) of a DatasetDict."""
    with quiet_datasets() as datasets:
        try:
            saved = datasets.load_from_disk(str(folder))
        except FileNotFoundError:
            raise PipelineError("not a folder written by datasets' save_to_disk (no "
                                "state.json or dataset_dict.json); give a .jsonl, .json, .csv "
                                "or .parquet file, such a folder, or a Hub dataset id",
                                folder) from None
        except Exception as exc:
            raise PipelineError(f"cannot read this save_to_disk folder ({first_line(exc)})",
                                folder) from None
        provenance = {"source_sha256": folder_sha256(folder)}
        if isinstance(saved, datasets.DatasetDict):
            name = split or "train"
            if name not in saved:
                raise PipelineError(f"no split {name!r}; the folder has splits: "
                                    f"{', '.join(saved)}; choose one with --split", folder)
            return Input(dataset_records(saved[name]), f"save_to_disk folder, split {name!r}",
                         {**provenance, "source_split": name})
        if split is not None:
            raise PipelineError("--split given, but this save_to_disk folder holds a single "
                                "Dataset, not a DatasetDict of splits; leave --split out",
                                folder)
        return Input(dataset_records(saved), "save_to_disk folder", provenance)


def env_true(name: str) -> bool:
    """Whether an environment variable is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def forced_offline(datasets):
    """Make datasets and huggingface_hub skip the network (they read these flags on import)."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def read_hub(name: str, split: str) -> Input:
    """One split of a Hugging Face Hub dataset; offline, only from the local datasets cache."""
    from models import hub_reachable  # imports torch: only for Hub ids

    if env_true("HF_HUB_OFFLINE") or env_true("HF_DATASETS_OFFLINE"):
        offline = "offline mode is set"
    elif not hub_reachable():
        offline = "no answer within 3 s"
    else:
        offline = None
    with quiet_datasets() as datasets, \
            (forced_offline(datasets) if offline else contextlib.nullcontext()):
        try:
            dataset = datasets.load_dataset(name, split=split)
        except ValueError as exc:
            if "split" not in str(exc).lower():
                raise PipelineError(f"cannot load this dataset ({first_line(exc)})",
                                    name) from None
            raise PipelineError(f"--split {split}: {first_line(exc).split(': ', 1)[1]}",
                                name) from None
        except (ConnectionError, FileNotFoundError) as exc:
            if offline:
                raise PipelineError(f"the Hugging Face Hub is not reachable ({offline}) and "
                                    "this dataset is not in the local datasets cache; give "
                                    f"a local file instead: {LOCAL_ALTERNATIVES}",
                                    name) from None
            raise PipelineError(f"cannot load this dataset ({first_line(exc)})", name) from None
        except Exception as exc:
            if type(exc).__name__ == "DatasetNotFoundError":
                raise PipelineError("no such dataset on the Hugging Face Hub, or it is private "
                                    "or gated (log in with `hf auth login`); for a local "
                                    f"file or folder check the path ({LOCAL_ALTERNATIVES})",
                                    name) from None
            raise PipelineError(f"cannot load this dataset ({first_line(exc)})", name) from None
        kind = f"Hub dataset, split {split!r}" + (", from the local cache" if offline else "")
        return Input(dataset_records(dataset), kind,
                     {"source_split": split, "source_fingerprint": dataset._fingerprint})


def columns_found(records: list[tuple[int, dict]]) -> dict[str, str]:
    """Lower-case column name -> name as first spelled, over all rows in file order."""
    found: dict[str, str] = {}
    for _, row in records:
        for name in row:
            found.setdefault(str(name).lower(), str(name))
    return found


def choose_columns(path: Path, records, question_field, answer_field) -> tuple[str, str]:
    """Pick the question and answer columns (lower-case), named or detected, or explain why not."""
    found = columns_found(records)
    listed = ", ".join(found.values()) or "none"
    if question_field is not None:
        missing = [name for name in (question_field, answer_field) if name.lower() not in found]
        if missing:
            raise PipelineError(f"column(s) {', '.join(missing)} not found; the file has "
                                f"columns: {listed}", path)
        return question_field.lower(), answer_field.lower()
    for question, answer in COLUMN_PAIRS:
        if question in found and answer in found:
            return question, answer
    expected = "; ".join(f"{q}/{a}" for q, a in COLUMN_PAIRS)
    raise PipelineError(f"no question/answer columns found; expected one of the pairs "
                        f"{expected} (or name them with --question-field/--answer-field); "
                        f"the file has columns: {listed}", path)


def field_text(path: Path, number: int, row: dict, column: str) -> str:
    """A row's value for a column (any case) as text, or an error naming line and field."""
    lowered = {str(name).lower(): name for name in row}
    if column not in lowered:
        raise row_error(path, number, f"missing field {column!r}; this row has "
                                      f"{', '.join(map(str, row)) or 'no fields'}")
    value = row[lowered[column]]
    # bool is a subclass of int but true/false is never a question or an answer.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "null" if value is None else f"a {type(value).__name__}"
        raise row_error(path, number, f"field {lowered[column]!r} is {kind}; "
                                      "expected text or a number")
    return normalize_whitespace(value)


def extra_fields(row: dict) -> dict:
    """The category/fact_id/fact_group values of a row, where present and not empty."""
    lowered = {str(name).lower(): name for name in row}
    extras = {}
    for field in EXTRA_FIELDS:
        if field in lowered and row[lowered[field]] not in (None, ""):
            extras[field] = row[lowered[field]]
    return extras


def choose_key_column(path: Path, records, key_field) -> str | None:
    """The key column (lower-case): the one named, else 'key' if present, else None."""
    found = columns_found(records)
    if key_field is None:
        return "key" if "key" in found else None
    if key_field.lower() not in found:
        raise PipelineError(f"--key-field column {key_field} not found; the file has columns: "
                            f"{', '.join(found.values())}", path)
    return key_field.lower()


def given_key(path: Path, number: int, row: dict, column: str | None) -> str:
    """A row's key from the key column as text; "" where the column is absent or empty."""
    lowered = {str(name).lower(): name for name in row}
    if column is None or column not in lowered or row[lowered[column]] in (None, ""):
        return ""
    return field_text(path, number, row, column)


def word_form(word: str) -> str:
    """A word as compared: lower case without punctuation; a number keeps its sign and point."""
    number = re.fullmatch(r"\W*?(-?\d+(?:[.,]\d+)*)\W*", word)
    return number.group(1).replace(",", "") if number else normalize_question(word)


def singular(word: str) -> str:
    """A compared word without a plural s ("legs" -> "leg"): plurals of question words are frame."""
    return word[:-1] if len(word) >= 4 and word.endswith("s") and not word.endswith("ss") else word


def is_number(word: str) -> bool:
    """A word_form that is a number: digits ("-4", "4.5") or a number word ("eight")."""
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)*", word)) or word in NUMBER_WORDS


def derive_key(question: str, answer: str) -> str:
    """The part of the answer a correct reply must give, from the words the question lacks.

    Leftover runs are the answer's runs of words not in the question (singular or plural)
    nor FRAME_WORDS.  In order of preference:
    1. "Yes" or "No" when the answer opens with one;
    2. the first number in a run, with the run's words after it ("0 degrees Celsius");
    3. a named entity: a run that opens with a capital letter, not as the answer's first
       word unless a copula follows it ("Jupiter is the largest planet ..." -> "Jupiter");
    4. the longest run (the first if tied), with a number right after it ("thing 7");
    5. with no run at all, the whole answer.
    """
    frame = {singular(word_form(word)) for word in question.split()} | FRAME_WORDS
    words = list(re.finditer(r"\S+", answer))
    forms = [word_form(match.group()) for match in words]
    if forms and forms[0] in ("yes", "no"):
        return trim_key(words[0].group())
    runs, run = [], []
    for index, bare in enumerate(forms):
        if bare and bare not in frame and singular(bare) not in frame:
            run.append(index)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    if not runs:  # every word is in the question: the whole answer is the key
        return answer.strip().removesuffix(".").strip() or answer.strip()
    numbered = [(r, i) for r in runs for i in r if is_number(forms[i])]
    if numbered:
        chosen, first = numbered[0]
        return span(answer, words, first, chosen[-1])
    for r in runs:
        opens = words[r[0]].group().lstrip(KEY_LEADING)[:1]
        after = forms[r[-1] + 1] if r[-1] + 1 < len(forms) else ""
        if opens.isupper() and (r[0] > 0 or after in COPULAS):
            return span(answer, words, r[0], r[-1])
    longest = max(runs, key=len)  # max keeps the first of equally long runs
    last = longest[-1] + 1 if longest[-1] + 1 < len(forms) and is_number(forms[longest[-1] + 1]) \
        else longest[-1]
    return span(answer, words, longest[0], last)


def span(answer: str, words: list, first: int, last: int) -> str:
    """The answer's text from word first to word last, end punctuation trimmed."""
    return trim_key(answer[words[first].start():words[last].end()])


def trim_key(text: str) -> str:
    """Strip punctuation from the ends of a key, keeping brackets that pair up inside it."""
    trimmed = text
    while trimmed and trimmed[0] in KEY_LEADING and BRACKETS.get(trimmed[0], "\0") not in trimmed:
        trimmed = trimmed[1:]
    while trimmed and trimmed[-1] in KEY_TRAILING and not (
            trimmed[-1] in BRACKETS.values() and
            trimmed.count(trimmed[-1]) <= trimmed.count(OPENERS[trimmed[-1]])):
        trimmed = trimmed[:-1]
    return trimmed or text


def apply_template(template: str, placeholder: str, text: str) -> str:
    """Put text into a template; plain replacement, so braces in the text are harmless."""
    return template.replace("{" + placeholder + "}", text)


def group_of(question: str, extras: dict) -> str:
    """Hold-out group: fact_group (a fact and its restatements), else fact_id, else question."""
    for field in ("fact_group", "fact_id"):
        if field in extras:
            return str(extras[field])
    return normalize_question(question)


def key_fields(key: str, question: str, answer: str, derive: bool) -> dict:
    """key and key_source for a row: the given key, else a derived one, else none."""
    if key:
        return {"key": key, "key_source": "given"}
    if derive:
        return {"key": derive_key(question, answer), "key_source": "derived"}
    return {}


def print_keys(rows: list[dict], derive_off: bool) -> None:
    """Say how many keys were given and derived, with three derived examples to check."""
    derived = [row for row in rows if row.get("key_source") == "derived"]
    given = sum(row.get("key_source") == "given" for row in rows)
    unkeyed = len(rows) - given - len(derived)
    print(f"keys: {given} given, {len(derived)} derived from the answer, {unkeyed} none"
          + (" (--no-derive-keys)" if derive_off and unkeyed else ""))
    for row in derived[:3]:
        print(f"  derived: {row['question']!r} -> {row['key']!r}  (answer {row['answer']!r})")
    if derived:
        print("  check the derived keys in the output; give a key column (--key-field) to "
              "override them")


def main(args: argparse.Namespace) -> None:
    """Read, validate, normalise, de-duplicate and format; write only when all is well."""
    source = Path(args.input)
    output = Path(args.output)
    template_path = output.parent / "template.json"
    check_templates(args.prompt_template, args.completion_template)

    # Read the input and find the question and answer columns.
    loaded = read_input(args.input, args.split)
    records = loaded.records
    if not records:
        after = " after the header" if loaded.kind.endswith("CSV") else ""
        raise PipelineError(f"no rows; expected question-answer rows{after}", source)
    q_col, a_col = choose_columns(source, records, args.question_field, args.answer_field)
    k_col = choose_key_column(source, records, args.key_field)
    keyed = f"key column {k_col!r}" if k_col else "no key column"
    print(f"read {len(records)} rows from {source} ({loaded.kind}; question column {q_col!r}, "
          f"answer column {a_col!r}, {keyed})")

    # Normalise every row first, so any bad row stops the run before anything is written.
    rows, seen = [], set()
    empty = duplicates = 0
    for number, record in records:
        question = field_text(source, number, record, q_col)
        answer = field_text(source, number, record, a_col)
        if not question or not answer:
            empty += 1
            continue
        if (question, answer) in seen:
            duplicates += 1
            continue
        seen.add((question, answer))
        extras = extra_fields(record)
        rows.append({"prompt": apply_template(args.prompt_template, "question", question),
                     "completion": apply_template(args.completion_template, "answer", answer),
                     "question": question, "answer": answer, "group": group_of(question, extras),
                     **key_fields(given_key(source, number, record, k_col), question, answer,
                                  not args.no_derive_keys),
                     **extras})
    print(f"dropped {empty} rows empty after whitespace normalisation and "
          f"{duplicates} exact duplicates (same question and answer)")
    if not rows:
        raise PipelineError("all rows are empty (no row has both a question and an answer)",
                            source)
    print_keys(rows, args.no_derive_keys)

    # Write the rows and the template that made them.
    write_jsonl(output, rows)
    write_json(template_path, {"prompt_template": args.prompt_template,
                               "completion_template": args.completion_template,
                               "source": str(source), **loaded.provenance,
                               "question_field": q_col, "answer_field": a_col,
                               "key_field": k_col, "derive_keys": not args.no_derive_keys})
    print(f"wrote {len(rows)} rows to {output} and the template to {template_path}")


if __name__ == "__main__":
    run_main(main, parse_args())
