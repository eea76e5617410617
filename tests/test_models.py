"""The default model: distilgpt2 wherever it can be had, else the offline smollm2-135m preset.

Offline throughout (conftest sets HF_HUB_OFFLINE=1); the Hub check and the cache
check are replaced by stand-ins, and smollm2-135m is never loaded or converted.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import common
import evaluate
import models
import settings
from settings import TrainSettings
import finetune
import finetune_lora
from helpers import ROOT
from helpers import run_and_expect_exit, train_args

NOTE = ("note: distilgpt2 is not cached and the Hugging Face Hub is not reachable; using the "
        "offline preset smollm2-135m instead (pass --model distilgpt2 to insist)")


@pytest.fixture
def no_hub(monkeypatch):
    """A fresh machine: the Hub unreachable and nothing in the Hugging Face cache."""
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "hub_cached", lambda name: None)


def test_default_falls_back_to_the_preset_with_one_line(no_hub, capsys):
    assert models.choose_model(None) == "smollm2-135m"
    out = capsys.readouterr().out
    assert out.splitlines() == [NOTE]


def test_fallback_note_can_be_silenced_for_other_processes(no_hub, capsys):
    assert models.choose_model(None, announce=False) == "smollm2-135m"
    assert capsys.readouterr().out == ""


def test_default_keeps_distilgpt2_when_cached(no_hub, monkeypatch, capsys):
    monkeypatch.setattr(models, "hub_cached",
                        lambda name: "/fake/snapshot" if name == "distilgpt2" else None)
    assert models.choose_model(None) == "distilgpt2"
    assert capsys.readouterr().out == ""


def test_default_keeps_distilgpt2_when_the_hub_answers(no_hub, monkeypatch, capsys):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    assert models.choose_model(None) == "distilgpt2"
    assert capsys.readouterr().out == ""


def test_a_named_model_is_kept_as_given(no_hub, capsys):
    for name in ("distilgpt2", "tiny-gpt2", "smollm2-135m", "someone/model"):
        assert models.choose_model(name) == name
    assert capsys.readouterr().out == ""


def test_explicit_distilgpt2_insists_and_fails_fast(no_hub, capsys):
    started = time.monotonic()
    with pytest.raises(common.PipelineError, match="distilgpt2: not in the local Hugging Face "
                                                   "cache and the Hub is not reachable"):
        models.resolve_model("distilgpt2")
    assert time.monotonic() - started < 5
    assert "note:" not in capsys.readouterr().out  # no fallback for a model named explicitly


def test_explicit_distilgpt2_cached_offline_loads_the_snapshot(no_hub, monkeypatch):
    monkeypatch.setattr(models, "hub_cached",
                        lambda name: "/fake/snapshot" if name == "distilgpt2" else None)
    assert models.resolve_model("distilgpt2") == "/fake/snapshot"


def test_resolving_the_default_offline_builds_the_preset(no_hub, monkeypatch, tmp_path, capsys):
    """resolve_model(None) takes the fallback too (conversion stubbed: nothing is loaded)."""
    monkeypatch.setenv("QA_FT_CACHE", str(tmp_path))
    converted = []
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, folder: converted.append(folder))
    assert models.resolve_model(None) == str(tmp_path / "smollm2-135m")
    assert converted == [tmp_path / "smollm2-135m"]
    assert NOTE in capsys.readouterr().out


def test_help_describes_the_default():
    text = " ".join(settings.training_parser("x", 1e-4, "lr").format_help().split())
    assert "distilgpt2 when the Hub or the local cache has it, else the offline smollm2-135m " \
           "preset" in text
    assert finetune.parse_args([]).model is None


def test_explicit_distilgpt2_command_fails_fast_without_writing(no_hub, data_dir, tmp_path,
                                                                capsys):
    from helpers import run_and_expect_exit, train_args

    started = time.monotonic()
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path / "out",
                                                         "--model", "distilgpt2"), capsys)
    assert time.monotonic() - started < 20
    assert "distilgpt2: not in the local Hugging Face cache" in line
    assert not (tmp_path / "out" / "full").exists()


def test_default_command_falls_back_once_and_records_the_model_used(no_hub, monkeypatch,
                                                                   data_dir, tmp_path, capsys):
    """A whole command on the default: one note for the search and every seed, and every
    output names the model actually used (tiny-gpt2 stands in for smollm2-135m here)."""
    monkeypatch.setattr(models, "FALLBACK_MODEL", "tiny-gpt2")
    out = tmp_path / "out"
    args = finetune.parse_args(["--device", "cpu", "--data-dir", str(data_dir), "--output-dir",
                                str(out),
                                "--batch-size", "8", "--max-steps", "2", "--seeds", "2",
                                "--tune-lr", "--lr-grid", "1e-4,1e-3", "--search-epochs", "1"])
    assert args.model is None
    finetune.main(args)
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert notes == [NOTE.replace("smollm2-135m", "tiny-gpt2")]
    for name in ("full", "full-seed43"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["model"] == "tiny-gpt2"
        assert metrics["model_requested"] == "default"
        assert metrics["args"]["model"] == "tiny-gpt2"
        assert metrics["base_model_path"] == models.resolve_model("tiny-gpt2")
    search = json.loads((out / "search" / "full.json").read_text())
    assert search["model"] == "tiny-gpt2"


def test_run_id_follows_the_model_used_not_the_request():
    import tuning

    settings = TrainSettings.from_args(finetune.parse_args(["--model", "distilgpt2"]))
    named = settings.replace(model_requested="distilgpt2")
    default = settings.replace(model_requested="default")
    assert tuning.run_id(named, "full") == tuning.run_id(default, "full")
    assert tuning.run_id(settings.replace(model="smollm2-135m"), "full") != \
        tuning.run_id(settings, "full")


def make_train(tmp_path, *overrides):
    """The training commands `make train` runs, through a stand-in interpreter that prints them
    (settings.py, which names each method's command, runs for real)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = settings.py ]; then exec {sys.executable} "$@"; fi\n'
                    'echo "RUN $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-o", "setup", "-o", ".venv/.installed",
                           "train", f"PY={fake}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line[4:] for line in proc.stdout.splitlines() if line.startswith("RUN ")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_trains_the_four_and_passes_model_only_when_named(tmp_path):
    lines = make_train(tmp_path)
    assert [line.split()[0] for line in lines] == ["finetune.py", "finetune_lora.py",
                                                   "finetune_qlora.py", "finetune_bitfit.py"]
    assert not any("--model" in line for line in lines)
    lines = make_train(tmp_path, "MODEL=distilgpt2")
    assert len(lines) == 4 and all("--model distilgpt2 " in line for line in lines)
    lines = make_train(tmp_path, "METHODS=dora rslora")
    assert [line.split()[0] for line in lines] == ["finetune_dora.py", "finetune_lora.py"]
    assert lines[1].split()[1] == "--rslora"


# --- bad input and misuse: one line, exit status 2, nothing lost ---------------------


def test_unknown_model(data_dir, tmp_path, capsys):
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--model", "./no/such/model"), capsys)
    assert "no such file or folder" in line
    assert not (tmp_path / "full").exists()


def test_hub_model_while_offline_fails_fast_naming_alternatives(data_dir, tmp_path, capsys):
    started = time.monotonic()
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path, "--model",
                                                         "someone/not-cached-model"), capsys)
    assert time.monotonic() - started < 20  # not the stock 50 s retry loop
    assert "not in the local Hugging Face cache" in line and "smollm2-135m" in line


def test_weights_are_never_unpickled(tmp_path):
    """A folder with only a pickle checkpoint is refused, not loaded."""
    folder = tmp_path / "pickled"
    model, tokenizer, path = models.load_model("tiny-gpt2", torch.device("cpu"))
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(common.PipelineError, match="could not load model"):
        models.load_model(str(folder), torch.device("cpu"))


def test_trust_remote_code_is_off_unless_asked():
    assert finetune_lora.parse_args([]).trust_remote_code is False
    assert evaluate.parse_args([]).trust_remote_code is False
    assert finetune_lora.parse_args(["--trust-remote-code"]).trust_remote_code is True
