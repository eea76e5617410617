"""Helpers the tests share: a small learnable data set, the scripts by method, error checks.

pyproject.toml puts the repository and this folder on pytest's pythonpath, so
tests import the project's modules and these helpers by name.
"""

import errno
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import common
import finetune
import finetune_bitfit
import finetune_dora
import finetune_ia3
import finetune_lokr
import finetune_lora
import finetune_prompt
import finetune_qlora
import loop
import runpaths

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"full": finetune, "lora": finetune_lora, "qlora": finetune_qlora,
           "bitfit": finetune_bitfit, "dora": finetune_dora, "ia3": finetune_ia3,
           "lokr": finetune_lokr, "prompt": finetune_prompt}
FOUR = tuple(SCRIPTS[name] for name in ("full", "lora", "qlora", "bitfit"))  # make all's default
# LoRA's variants: finetune_lora.py with one option each (settings.METHODS)
VARIANTS = {"rslora": ["--rslora"], "pissa": ["--init", "pissa"],
            "loraplus": ["--loraplus-ratio", "16"]}


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



def error_line(capsys):
    """The one line run_main printed."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def run_and_expect_exit(main, args, capsys) -> str:
    """Run main through run_main; assert exit status 2 and return the error line."""
    with pytest.raises(SystemExit) as exc:
        common.run_main(main, args)
    assert exc.value.code == 2
    return error_line(capsys)


def train_args(script, data_dir, out, *extra):
    """A fast tiny-model argument list."""
    return script.parse_args(["--device", "cpu", "--model", "tiny-gpt2", "--data-dir",
                              str(data_dir), "--output-dir",
                              str(out), "--batch-size", "8", "--max-steps", "2", *extra])


def tiny_plan(data_dir, out):
    """A 2-step tiny-gpt2 full fine-tuning run on the CPU and its plan: (run, plan, model)."""
    import batches
    import models
    import runs
    from settings import TrainSettings

    settings = TrainSettings.from_args(train_args(finetune, data_dir, out))
    run = runs.start_run(settings, "full")
    model, tokenizer, _ = models.load_model(run.model_path, run.device)
    return run, batches.plan_training(run, model, tokenizer), model


def stop_at(step):
    """A training callback that asks the loop to stop at a step exactly as Ctrl-C would."""
    def callback(current, control):
        if current == step:
            control.stop = True
    return callback


# Every way a tensor's value reaches Python; on CUDA each one waits for the GPU.
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def count_reads(monkeypatch) -> list[tuple[str, str]]:
    """Record each read of a tensor's value, with the file that asked for it (undone by monkeypatch)."""
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append((_name, sys._getframe(1).f_code.co_filename))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def ours(reads: list[tuple[str, str]]) -> list[str]:
    """The reads not made by transformers' mask builder.

    Given an attention mask, transformers decides whether it can skip it by
    reading it (one bool per forward, masking_utils.fast_all).  The exact path
    (the CPU's) passes the mask; the sync-free path passes none, so it has no
    such read (tests/test_sync_free.py).
    """
    return [name for name, path in reads if not path.endswith("transformers/masking_utils.py")]


def finished_files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, by name (to show it was left as it was)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temporary (dot) files and folders left in a folder."""
    return sorted(p.name for p in folder.rglob(".*"))


def no_space(names, real):
    """A write_json that fails with a full disk for the named files."""
    def write(path, obj):
        if Path(path).name in names:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)
    return write


def write_lock(output_dir: Path, method: str, pid: int) -> Path:
    path = runpaths.lock_file(output_dir, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                "started": "2026-12-04T10:00:00",
                                "command": "finetune.py --save-every 2"}))
    return path


def run_script(method, data_dir, out_dir, *extra, model="tiny-gpt2", spy=None):
    """Run a script's main() in-process; spy(model, stage) sees the model before and after."""
    script = SCRIPTS["lora" if method in VARIANTS else method]
    args = script.parse_args(
        ["--device", "cpu", "--model", model, "--data-dir", str(data_dir),
         "--output-dir", str(out_dir),
         "--batch-size", "8", "--max-steps", "6", *VARIANTS.get(method, []), *extra])
    if spy is None:
        script.main(args)
        return None
    original = loop.fit

    def wrapped(run, model_, *args, **kwargs):
        spy(model_, "before")
        metrics = original(run, model_, *args, **kwargs)
        spy(model_, "after")
        return metrics

    loop.fit = wrapped
    try:
        script.main(args)
    finally:
        loop.fit = original


def strict_json(text):
    """Parse JSON as a strict reader does: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)
