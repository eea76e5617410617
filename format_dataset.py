"""Turn a question-answer file into prompt/completion rows with one fixed template.

Run from the repository root:

    python format_dataset.py                      # data/qa_pairs.jsonl -> data/formatted.jsonl
    python format_dataset.py --input my_data.csv  # any .jsonl, .json (list) or .csv file

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
import re
from pathlib import Path

from common import (DEFAULT_COMPLETION_TEMPLATE, DEFAULT_PROMPT_TEMPLATE, PipelineError,
                    file_sha256, normalize_question, normalize_whitespace, read_records,
                    run_main, write_json, write_jsonl)

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
                        "by as at with which what who where when how".split())
# Stripped from the ends of a derived key: "Paris." -> "Paris", '"yes"' -> 'yes'; a leading
# "-" ("-40") and marks such as "°" or "%" stay.
KEY_TRAILING = ".,;:!?\"'”’)]}"
KEY_LEADING = "\"'“‘([{"
BRACKETS = {"(": ")", "[": "]", "{": "}"}
OPENERS = {close: open_ for open_, close in BRACKETS.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="data/qa_pairs.jsonl",
                        help="question-answer file (.jsonl, .json list or .csv); the default "
                             "is what generate_dataset.py writes")
    parser.add_argument("--output", default="data/formatted.jsonl",
                        help="formatted rows; template.json goes beside it. The default is "
                             "where split_dataset.py looks")
    parser.add_argument("--question-field", default=None,
                        help="column holding the question; by default detected from the "
                             "known pairs (question/answer, user/assistant, instruction/output, "
                             "prompt/completion, input/output). Give with --answer-field")
    parser.add_argument("--answer-field", default=None,
                        help="column holding the answer; by default detected like "
                             "--question-field. Give with --question-field")
    parser.add_argument("--key-field", default=None,
                        help="column holding the short answer a correct reply must contain "
                             "(default: a column named 'key', if the file has one). Rows "
                             "without one get a derived key (see --no-derive-keys)")
    parser.add_argument("--no-derive-keys", action="store_true",
                        help="leave rows without a key unkeyed instead of deriving one from "
                             "the answer (default off: derived keys let evaluation score key "
                             "accuracy rather than token F1 alone)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                        help="text the model sees, must contain {question}; the default is "
                             "the original project's chat format (in bash, write a newline "
                             "as $'...\\n...')")
    parser.add_argument("--completion-template", default=DEFAULT_COMPLETION_TEMPLATE,
                        help="text the model learns to produce, must contain {answer}; the "
                             "default's leading space joins it to 'Assistant:' as one word "
                             "boundary")
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
    """An error for one record, naming its line, or its item index in a .json list."""
    if path.suffix.lower() == ".json":
        return PipelineError(f"item {number}: {message}", path)
    return PipelineError(message, path, number)


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


def derive_key(question: str, answer: str) -> str:
    """The answer's longest run of words not in the question nor FRAME_WORDS (first if tied)."""
    frame = {word_form(word) for word in question.split()} | FRAME_WORDS
    runs, run = [], []
    for match in re.finditer(r"\S+", answer):
        bare = word_form(match.group())
        if bare and bare not in frame:
            run.append(match)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    if not runs:  # every word is in the question: the whole answer is the key
        return answer.strip().removesuffix(".").strip() or answer.strip()
    longest = max(runs, key=len)  # max keeps the first of equally long runs
    return trim_key(answer[longest[0].start():longest[-1].end()])


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

    # Read the file and find the question and answer columns.
    if not source.exists():
        raise PipelineError("file not found; run `python generate_dataset.py` first, or pass "
                            "--input with your own question-answer file", source)
    records = read_records(source)
    if not records:
        raise PipelineError("no rows; expected question-answer rows after the header", source)
    q_col, a_col = choose_columns(source, records, args.question_field, args.answer_field)
    k_col = choose_key_column(source, records, args.key_field)
    keyed = f"key column {k_col!r}" if k_col else "no key column"
    print(f"read {len(records)} rows from {source} (question column {q_col!r}, "
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
                               "source": str(source), "source_sha256": file_sha256(source),
                               "question_field": q_col, "answer_field": a_col,
                               "key_field": k_col, "derive_keys": not args.no_derive_keys})
    print(f"wrote {len(rows)} rows to {output} and the template to {template_path}")


if __name__ == "__main__":
    run_main(main, parse_args())
