"""The general-text probe: what fine-tuning did to the model's English, as NLL on real prose.

    documents = load_probe(PROBE)                        # probe/sotu.jsonl: id, text a line
    cut = max_tokens(base_path)                          # the same cut for every model
    examples = probe_examples(tokenizer, documents, cut)
    nll = score_probe(model, examples, pad_id, device, precision)   # per document (sum, count)
    record = probe_record(documents, examples, nll, info, value)    # <run>/probe.json

Every model (the base and each run) is scored on the same tokens of the same
documents, through answer_loss (the loss training and evaluate.py use, so a
method that prepends virtual tokens there is scored as it is trained); the
first token of a document has no context and is not scored.  The change in mean
NLL per token against the base is the forgetting figure; its intervals, with
the document as the cluster, are verdict.py's (forgetting_intervals).

The probe ships in the repository (probe/README.md: source, licence, size);
nothing is fetched at run time.  Imports no torch at start-up: compare.py and
report.py read the records without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import common

PROBE = Path(__file__).resolve().parent / "probe" / "sotu.jsonl"
# Tokens scored a document at most; also at most half the model's context, leaving room
# for anything a method prepends (prompt tuning's virtual tokens).
MAX_TOKENS = 48
# LM-head rows a scoring batch holds at most (each is a vocabulary-wide float32 row).
BATCH_TOKENS = 2048
# Bump when how the probe is cut or scored changes: every saved probe.json is scored again.
PROBE_VERSION = "2026-12-06.1"


# --- The probe file ----------------------------------------------------------------


def load_probe(path: str | Path = PROBE) -> list[dict]:
    """The probe's documents ({"id", "text"} and whatever else a line holds), checked.

    One JSON object a line with a unique non-empty string id and non-empty text; a
    bad line stops with one line naming the file, the line and the field.
    """
    path = Path(path)
    if not path.exists():
        raise common.PipelineError("probe file not found; pass --probe PATH, or --no-probe "
                                   "to evaluate without measuring forgetting", path)
    documents, seen = [], {}
    for number, row in common.read_records(path):
        for field in ("id", "text"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise common.PipelineError(f"field {field!r} must be a non-empty string, found "
                                           f"{json.dumps(value)}", path, number)
        if row["id"] in seen:
            raise common.PipelineError(f"field 'id': {row['id']!r} repeats line "
                                       f"{seen[row['id']]}; every document needs its own id",
                                       path, number)
        seen[row["id"]] = number
        documents.append(row)
    if len(documents) < 2:
        raise common.PipelineError("the probe needs at least 2 documents for an interval", path)
    return documents


def max_tokens(context: int) -> int:
    """Tokens scored a document: MAX_TOKENS, or half the context where that is shorter."""
    return max(2, min(MAX_TOKENS, context // 2))


def base_context(base_path: str, trust_remote_code: bool = False) -> int:
    """The base model's context (models.context_length) read from its config, no weights."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    import models

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    return models.context_length(SimpleNamespace(config=config))


def probe_examples(tokenizer, documents: list[dict], cut: int) -> list[dict]:
    """Each document's first cut tokens, every one but the first labelled (answer_loss's form)."""
    examples = []
    for document in documents:
        ids = tokenizer(document["text"], add_special_tokens=False)["input_ids"][:cut]
        if len(ids) < 2:
            raise common.PipelineError(f"document {document['id']!r} is under 2 tokens long; "
                                       "nothing to score")
        examples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return examples


def probe_info(path: str | Path, documents: list[dict], examples: list[dict], cut: int) -> dict:
    """What a probe record was measured on: file, checksum, documents, tokens scored, the cut."""
    return {"file": Path(path).name, "sha256": common.file_sha256(path),
            "documents": len(documents), "tokens": sum(len(e["input_ids"]) - 1 for e in examples),
            "max_tokens": cut, "version": PROBE_VERSION}


# --- Scoring one model, and its cached record ------------------------------------------


def score_probe(model, examples: list[dict], pad_id: int, device, precision: str = "fp32",
                desc: str | None = None) -> list[tuple[float, int]]:
    """(summed NLL, tokens scored) per document, through answer_loss's evaluation loop."""
    import answer_loss

    longest = max(len(e["input_ids"]) for e in examples)
    return answer_loss.answer_nll_by_example(model, examples, pad_id, device,
                                             batch_size=max(1, BATCH_TOKENS // longest),
                                             desc=desc, precision=precision)


def fingerprint(model_digest: str, info: dict, precision: str) -> str:
    """What a run's probe scores depend on: its model files, the probe and its cut, precision."""
    blob = json.dumps({"model": model_digest, "probe": info, "precision": precision},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def probe_record(documents: list[dict], nll: list[tuple[float, int]], info: dict,
                 value: str) -> dict:
    """A run's probe.json: the fingerprint, what was measured, and per document id, NLL, tokens."""
    return {"fingerprint": value, "probe": info, "ids": [d["id"] for d in documents],
            "nll": [round(total, 6) for total, _ in nll], "tokens": [int(n) for _, n in nll]}


def cached_record(path: Path, value: str) -> dict | None:
    """A run's saved probe record, if it was made with this fingerprint; else None."""
    if not path.exists():
        return None
    record = common.read_json(path)
    return record if record.get("fingerprint") == value else None


def nats_per_token(record: dict) -> float:
    """A record's mean NLL per scored token."""
    return sum(record["nll"]) / sum(record["tokens"])
