"""Turn a question-answer file into prompt/completion rows with one fixed template.

Run from the repository root:

    python format_dataset.py                      # data/qa_pairs.jsonl -> data/formatted.jsonl
    python format_dataset.py --input my_data.csv  # any .jsonl, .json (list) or .csv file

Writes data/formatted.jsonl and data/template.json (the template, recorded so that
training and evaluation apply exactly the same one). Nothing is written unless the
whole input is valid, so a bad file never leaves a half-made dataset behind.
"""

from __future__ import annotations

import argparse
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
# Fields of generated data carried through so later stages can split and report by them.
EXTRA_FIELDS = ("key", "category", "fact_id")


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
    """The key/category/fact_id values of a row, where present and not empty."""
    lowered = {str(name).lower(): name for name in row}
    extras = {}
    for field in EXTRA_FIELDS:
        if field in lowered and row[lowered[field]] not in (None, ""):
            extras[field] = row[lowered[field]]
    return extras


def apply_template(template: str, placeholder: str, text: str) -> str:
    """Put text into a template; plain replacement, so braces in the text are harmless."""
    return template.replace("{" + placeholder + "}", text)


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
    print(f"read {len(records)} rows from {source} (question column {q_col!r}, "
          f"answer column {a_col!r})")

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
        # Wordings of one generated fact share a group; user rows group by their question.
        group = str(extras["fact_id"]) if "fact_id" in extras else normalize_question(question)
        rows.append({"prompt": apply_template(args.prompt_template, "question", question),
                     "completion": apply_template(args.completion_template, "answer", answer),
                     "question": question, "answer": answer, "group": group, **extras})
    print(f"dropped {empty} rows empty after whitespace normalisation and "
          f"{duplicates} exact duplicates (same question and answer)")
    if not rows:
        raise PipelineError("all rows are empty (no row has both a question and an answer)",
                            source)

    # Write the rows and the template that made them.
    write_jsonl(output, rows)
    write_json(template_path, {"prompt_template": args.prompt_template,
                               "completion_template": args.completion_template,
                               "source": str(source), "source_sha256": file_sha256(source),
                               "question_field": q_col, "answer_field": a_col})
    print(f"wrote {len(rows)} rows to {output} and the template to {template_path}")


if __name__ == "__main__":
    run_main(main, parse_args())
