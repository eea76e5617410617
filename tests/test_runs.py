"""runs: the model, device and precision decided once; a run's set-up reads train and valid only."""

import json

import common
import finetune_lora
import models
import runs
from helpers import run_script, train_args
from settings import TrainSettings


def test_training_never_reads_the_eval_split(data_dir, tmp_path, monkeypatch):
    """The held-out loss during training comes from valid.jsonl; eval.jsonl is not opened."""
    (data_dir / "eval.jsonl").unlink()
    read = []
    original = common.load_split
    monkeypatch.setattr(runs, "load_split",
                        lambda folder, split: read.append(split) or original(folder, split))
    run_script("lora", data_dir, tmp_path / "out", "--max-steps", "2")
    assert sorted(read) == ["train", "valid"]
    metrics = json.loads((tmp_path / "out" / "lora" / "metrics.json").read_text())
    assert [v["step"] for v in metrics["valid_loss"]] == [2]


def test_the_model_device_and_precision_are_decided_once_a_command(data_dir, tmp_path,
                                                                   monkeypatch):
    """Two seeds: the model and the precision are chosen once, every run reads them from the
    settings; each run resolves the model's folder once (start_run) and loads from it."""
    calls = {"choose_model": [], "resolve_precision": [], "resolve_model": []}
    for name, seen in calls.items():
        original = getattr(models, name)

        def counted(*args, _original=original, _seen=seen, **kwargs):
            _seen.append(args[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(models, name, counted)
    finetune_lora.main(train_args(finetune_lora, data_dir, tmp_path, "--seeds", "2"))
    assert calls["choose_model"] == ["tiny-gpt2"]
    assert len(calls["resolve_precision"]) == 1
    folder = models.resolve_model("tiny-gpt2")
    # start_run resolves the name; load_model is handed the folder it resolved to
    assert calls["resolve_model"][:-1] == ["tiny-gpt2", folder, "tiny-gpt2", folder]
    for name in ("lora", "lora-seed43"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert (metrics["args"]["device"], metrics["args"]["precision"]) == ("cpu", "fp32")
        assert metrics["base_model_path"] == folder


def test_resolve_turns_auto_into_what_the_run_uses(monkeypatch):
    monkeypatch.setattr(models, "native_bf16", lambda device: False)
    settings = runs.resolve(TrainSettings(model="tiny-gpt2", device="cpu", precision="auto"),
                            announce=False)
    assert (settings.model, settings.device, settings.precision) == ("tiny-gpt2", "cpu", "fp32")
    assert settings.model_requested == "tiny-gpt2"
    monkeypatch.setattr(models, "native_bf16", lambda device: True)
    assert runs.resolve(TrainSettings(model="tiny-gpt2", device="cpu"),
                        announce=False).precision == "bf16"
