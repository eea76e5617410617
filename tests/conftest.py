"""Shared fixtures: an offline model cache, and a small learnable Q&A data set."""

import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Nothing in the tests may reach the network; the Hub check must fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build the tiny models once per test session, in a private cache."""
    folder = tmp_path_factory.mktemp("model-cache")
    os.environ["QA_FT_CACHE"] = str(folder)
    return folder


def write_split(folder: Path, n_train: int = 48, n_eval: int = 12, n_valid: int = 8,
                seed: int = 0) -> Path:
    """A learnable arithmetic data set in the layout split_dataset.py writes.

    81 rows: the first n_train train, the next n_eval eval (for evaluate.py) and the
    next n_valid valid (the held-out loss during training).
    """
    rows = []
    for a in range(1, 10):
        for b in range(1, 10):
            question = f"What is {a} plus {b}?"
            answer = f"{a} plus {b} is {a + b}."
            rows.append({"prompt": f"User: {question}\nAssistant:", "completion": f" {answer}",
                         "question": question, "answer": answer, "key": str(a + b),
                         "category": "arithmetic", "group": f"{a}+{b}"})
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    assert n_train + n_eval + n_valid <= len(rows)
    train, held = rows[:n_train], rows[n_train:n_train + n_eval]
    valid = rows[n_train + n_eval:n_train + n_eval + n_valid]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    for name, part in (("eval", held), ("valid", valid)):
        (folder / f"{name}.jsonl").write_text("".join(
            json.dumps({**r, "eval_kind": "unseen_question"}) + "\n" for r in part))
    (folder / "template.json").write_text(json.dumps(
        {"prompt_template": "User: {question}\nAssistant:", "completion_template": " {answer}"}))
    return folder


@pytest.fixture
def data_dir(tmp_path):
    """A fresh small data folder for one test."""
    return write_split(tmp_path / "data")
