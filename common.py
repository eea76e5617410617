"""What every script shares: errors and files, prompts and tokenisation, plotting.

Sections: errors and files · prompts and tokenisation · plotting.  How an answer
is scored (the text metrics) is scoring.py's.
The data-stage scripts import only this module and the standard library at
start-up: torch and matplotlib are imported inside the few functions that need
them.  The model side lives beside it: models.py (presets and loading),
settings.py (training options), training.py (the loop), answer_loss.py
(the answer-only loss), generation.py (greedy answers), memory.py (peak memory).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import string
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple



# =============================================================================
# Errors and files
# =============================================================================


class PipelineError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(where + message)


def run_main(main, args) -> None:
    """Run a script's main(args), turning PipelineError into one line and exit 2."""
    try:
        main(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it normal rights
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def finite(obj):
    """obj with every NaN and infinity replaced by None: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if obj - obj == 0 else None  # inf - inf and nan - nan are nan
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows (dicts) as strict JSON lines (null for NaN), atomically."""
    # allow_nan=False: a non-finite number that slips past finite() fails here, loudly.
    text = "".join(json.dumps(finite(row), ensure_ascii=False, allow_nan=False) + "\n"
                   for row in rows)
    write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write one strict JSON document (null for NaN), atomically and readable by a person."""
    write_text_atomic(path, json.dumps(finite(obj), indent=2, ensure_ascii=False,
                                       allow_nan=False) + "\n")


def is_write_failure(exc: BaseException) -> bool:
    """Whether an error is a failed write (a full disk, a lost folder, no permission).

    safetensors and torch.save report a full disk in their own exception types, so
    their message is checked too.
    """
    return isinstance(exc, OSError) or "No space left on device" in str(exc)


def write_failed(path: str | os.PathLike, exc: BaseException) -> PipelineError:
    """The one-line error for a failed write: the path, the reason and the free space."""
    path = Path(path)
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:,.0f} MB free there"
    except OSError:
        free = "free space unknown"
    return PipelineError(f"could not write ({reason}; {free}); the previous files are "
                         "unchanged: free some space and run the same command again", path)


def read_json(path: str | os.PathLike):
    """Read one JSON document, with a one-line error naming the file when it is broken."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Checksum of a file, recorded so a run says which data it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """Read a whole file as UTF-8, with an error that says what went wrong."""
    if not path.exists():
        raise PipelineError("file not found", path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        # exc.object is what the codec saw (after any BOM), so count lines in it.
        line = exc.object[: exc.start].count(b"\n") + 1
        raise PipelineError(
            f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8", path, line) from None


def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Read a .jsonl, .json (a list of objects) or .csv file as (line number, row) pairs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise PipelineError("unsupported file type; expected .jsonl, .json or .csv", path)
    if suffix == ".csv":
        return read_csv(path).records
    text = read_text(path)
    if not text.strip():
        raise PipelineError("the file is empty; expected question-answer rows", path)
    if suffix == ".jsonl":
        records = []
        # Split on "\n" only: str.splitlines() also breaks at U+2028 and other
        # characters that JSON strings may hold raw (write_jsonl writes them so).
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"malformed JSON ({exc.msg} at column {exc.colno}); "
                                    "expected one JSON object per line", path, number) from None
            if not isinstance(row, dict):
                raise PipelineError(f"expected a JSON object, found {type(row).__name__}",
                                    path, number)
            records.append((number, row))
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None
        if not isinstance(data, list):
            raise PipelineError("expected a JSON list of objects", path)
        # Line numbers of list items are not tracked by json; report the item index.
        records = []
        for index, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise PipelineError(f"item {index}: expected a JSON object, "
                                    f"found {type(row).__name__}", path)
            records.append((index, row))
        return records


# CSV delimiters recognised in the header row, comma first; how a message names each.
CSV_DELIMITERS = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|' characters"}


def sniff_delimiter(text: str) -> str:
    """The CSV delimiter: ',' unless the header row splits into more columns on ; tab or |."""
    header = io.StringIO(text, newline="").readline()
    columns = {mark: len(next(csv.reader([header], delimiter=mark), []))
               for mark in CSV_DELIMITERS}
    if columns[","] > 1:
        return ","
    best = max(CSV_DELIMITERS, key=columns.get)  # the first of equals: ',' when none splits
    return best if columns[best] > 1 else ","


def open_quote(text: str, delimiter: str) -> int | None:
    """Offset of a quote that opens a field and is never closed, reading text as one CSV record
    and what follows it (the csv module then silently reads on to the end of the file)."""
    state, opened = "start", None
    for offset, char in enumerate(text):
        if state == "quoted":
            state = "quote" if char == '"' else "quoted"
        elif char in "\r\n" or char == delimiter:
            state = "start"
        elif state == "start" and char == '"':
            state, opened = "quoted", offset
        elif state == "quote" and char == '"':
            state = "quoted"  # a doubled quote inside a quoted field
        else:
            state = "field"
    return opened if state == "quoted" else None


class CsvTable(NamedTuple):
    """A CSV file read by read_csv()."""
    header: list[str]
    records: list[tuple[int, dict]]  # (first line of the record, row); a short row lacks keys
    delimiter: str


def read_csv(path: str | os.PathLike) -> CsvTable:
    """The one CSV reader: a file with a header row, its delimiter sniffed from the header."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise PipelineError("the file is empty; expected question-answer rows", path)
    delimiter = sniff_delimiter(text)
    # A StringIO with newline="" keeps line breaks inside quoted fields, which csv needs;
    # line_num then counts physical lines, so multi-line records do not shift the line
    # numbers of the rows after them.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header or not any(name.strip() for name in header):
        raise PipelineError("the CSV file has no header row", path)
    header = [name.strip() for name in header]
    records, last = [], 1
    start = reader.line_num + 1
    for values in reader:
        number, start = start, reader.line_num + 1
        if values:
            last = number
        if not values or not any(value.strip() for value in values):
            continue
        if len(values) > len(header):
            raise PipelineError(f"{len(values)} fields but the header has {len(header)}; quote "
                                f"values that contain {CSV_DELIMITERS[delimiter]}", path, number)
        # A short row simply lacks the trailing columns, so callers report them missing.
        records.append((number, dict(zip(header, values))))
    # An unclosed quote makes the last record swallow the rest of the file: find it.
    lines = io.StringIO(text, newline="").readlines()
    tail = "".join(lines[last - 1:])
    opened = open_quote(tail, delimiter)
    if opened is not None:
        before = tail[:opened]
        line = last + before.count("\n") + before.count("\r") - before.count("\r\n")
        raise PipelineError('unterminated quote: the " that opens a field on this line is '
                            'never closed, so the rest of the file would be one value; close '
                            'it, or write a quote inside a quoted field as ""', path, line)
    return CsvTable(header, records, delimiter)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (),
               hint: str | None = None) -> list[dict]:
    """Read a pipeline JSONL file, checking each row has the required fields.

    hint names the command that makes the file, for the error when it is missing.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError("file not found" + (f"; run `{hint}` first" if hint else ""), path)
    rows = []
    for number, row in read_records(path):
        missing = [field for field in required if field not in row]
        if missing:
            raise PipelineError(f"missing field(s) {', '.join(missing)}; found "
                                f"{', '.join(sorted(row)) or 'none'}", path, number)
        rows.append(row)
    return rows


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_question(text: str) -> str:
    """Lower-case, strip punctuation and collapse spaces: the key for leakage checks."""
    return " ".join(str(text).lower().translate(_PUNCT_TABLE).split())


def normalize_whitespace(text: str) -> str:
    """Collapse runs of white space to one space and trim the ends."""
    return re.sub(r"\s+", " ", str(text)).strip()


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike):
    """Yield a temporary folder beside `final`; move it into place only on success.

    A crash or Ctrl-C leaves `final` as it was (or absent), never half written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it normal rights
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# =============================================================================
# Prompts and tokenisation
# =============================================================================

DEFAULT_PROMPT_TEMPLATE = "User: {question}\nAssistant:"
DEFAULT_COMPLETION_TEMPLATE = " {answer}"


def load_template(data_dir: str | os.PathLike) -> dict:
    """The prompt template that format_dataset.py recorded, so every stage uses the same one."""
    path = Path(data_dir) / "template.json"
    if not path.exists():
        raise PipelineError("file not found; run `python format_dataset.py` first", path)
    template = read_json(path)
    for field in ("prompt_template", "completion_template"):
        if field not in template:
            raise PipelineError(f"missing field {field}", path)
    return template


def turn_marker(template: dict) -> str | None:
    """The text that starts a new user turn (e.g. "\\nUser:"): generation stops there."""
    prefix = template["prompt_template"].split("{question}")[0].strip()
    return "\n" + prefix if prefix else None


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Read data/<split>.jsonl as made by split_dataset.py."""
    path = Path(data_dir) / f"{split}.jsonl"
    rows = read_jsonl(path, required=("prompt", "completion"), hint="python split_dataset.py")
    if not rows:
        raise PipelineError("no rows; re-run `python split_dataset.py`", path)
    return rows


def tokenize_pair(tokenizer, prompt: str, completion: str, max_len: int,
                  train_on_prompt: bool = False,
                  label_eos: bool = True) -> tuple[list[int], list[int], bool]:
    """Token ids of prompt + completion + EOS, labels (-100 on the prompt), and whether it was cut.

    Prompt and completion are tokenised separately so the prompt's tokens are
    exactly the ones the model sees at generation time.  label_eos=False leaves
    EOS unscored (answer perplexity: the untuned base was never taught to stop).
    """
    prompt = prompt_ids(tokenizer, prompt)
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt + answer + [tokenizer.eos_token_id]
    eos_label = [tokenizer.eos_token_id] if label_eos else [-100]
    labels = list(ids) if train_on_prompt else [-100] * len(prompt) + answer + eos_label
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids exactly as tokenize_pair builds them (for generation)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenize_rows(tokenizer, rows: list[dict], max_len: int, train_on_prompt: bool = False,
                  source: str = "data", label_eos: bool = True) -> list[dict]:
    """Tokenise rows for training or scoring; print how many were cut to the context."""
    examples, truncated = [], 0
    for number, row in enumerate(rows, start=1):
        ids, labels, cut = tokenize_pair(tokenizer, row["prompt"], row["completion"], max_len,
                                         train_on_prompt, label_eos)
        if not any(label != -100 for label in labels[1:]):
            raise PipelineError(f"the prompt alone fills the model's context of {max_len} "
                                "tokens, leaving no answer token to learn or score", source, number)
        truncated += cut
        examples.append({"input_ids": ids, "labels": labels})
    if truncated:
        print(f"note: {truncated} of {len(rows)} examples in {source} were longer than the "
              f"context ({max_len} tokens) and were truncated")
    return examples


def collate(examples: list[dict], pad_id: int, side: str = "right", width: int | None = None):
    """Pad a batch to its longest example (never to a fixed length), or to width if given."""
    import torch

    width = max([len(ex["input_ids"]) for ex in examples] + [width or 0])
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(ex["input_ids"])
        mask[i, cols] = 1
        if "labels" in ex:
            labels[i, cols] = torch.tensor(ex["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           epoch: int) -> list[list[int]]:
    """A shuffled epoch of batches whose members have similar lengths (less padding).

    Examples are shuffled, cut into windows of 50 batches, sorted by length
    within each window, batched, and the batches shuffled again: similar lengths
    share a batch while the order stays random.  Deterministic per seed and epoch.
    """
    import random

    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# =============================================================================
# Plotting
# =============================================================================


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics: dict, path: Path) -> None:
    """Three panels against step: train and validation loss, learning rate, gradient norm."""
    plt = pyplot()
    history = metrics["history"]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    axes[0].plot(steps, [h["loss"] for h in history], lw=1, alpha=0.8, label="train (per step)")
    valid = metrics["valid_loss"]
    axes[0].plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", color="C3",
                 label="validation (answer tokens)")
    axes[0].set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    axes[0].legend()
    axes[1].plot(steps, [h["lr"] for h in history], color="C2")
    axes[1].set(title="Learning rate", xlabel="step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].plot(steps, [h["grad_norm"] for h in history], color="C4", lw=1)
    axes[2].set(title="Gradient norm (before clipping)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics['method']} on {metrics['model']}: {metrics['trainable_params']:,} "
                 f"trainable parameters, {metrics['train_seconds']:.0f} s")
    fig.savefig(path, dpi=110)
    plt.close(fig)

