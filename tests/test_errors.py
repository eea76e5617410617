"""Bad input and misuse: each gets one clear line (exit status 2) and nothing is lost."""

import json
import subprocess
import sys
import time

import pytest
import torch

import common
import models
import evaluate
import finetune
import finetune_lora
import finetune_qlora
from helpers import ROOT, run_and_expect_exit, train_args


def cli(script, *args, cwd=ROOT):
    """Run a script as a user would; return (exit status, stderr)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


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


def test_qlora_without_4bit_support(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    line = run_and_expect_exit(finetune_qlora.main,
                               train_args(finetune_qlora, data_dir, tmp_path), capsys)
    assert "4-bit loading needs bitsandbytes" in line
    assert not (tmp_path / "qlora").exists()


def test_example_longer_than_the_context(data_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").open()]
    rows[2]["prompt"] = "User: " + "why " * 400 + "\nAssistant:"
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path), capsys)
    assert "train.jsonl, line 3" in line and "context" in line


def test_long_answers_are_truncated_with_a_count(data_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").open()]
    rows[0]["completion"] = " " + "yes " * 400
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune.main(train_args(finetune, data_dir, tmp_path))
    assert "1 of 48 examples" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--epochs", "-1"], ["--lr", "0"],
                                    ["--max-steps", "x"], ["--bogus-flag"]])
def test_impossible_options_are_refused(option, data_dir, tmp_path):
    status, err = cli("finetune_lora.py", "--model", "tiny-gpt2", "--data-dir", str(data_dir),
                      "--output-dir", str(tmp_path), *option)
    assert status == 2 and "error:" in err
    assert not (tmp_path / "lora").exists()


def test_out_of_memory_is_caught_with_advice(data_dir, tmp_path, capsys):
    def oom(step, control):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def main(args):
        finetune.main(args, callbacks=[oom])

    line = run_and_expect_exit(main, train_args(finetune, data_dir, tmp_path), capsys)
    assert "out of CPU memory at batch size 8" in line
    assert "--batch-size 4 --grad-accum 2" in line and "finetune_qlora.py" in line
    assert not (tmp_path / "full").exists()


def test_training_before_the_data_stage_names_the_command(tmp_path, capsys):
    args = train_args(finetune_lora, tmp_path / "data", tmp_path / "out")
    line = run_and_expect_exit(finetune_lora.main, args, capsys)
    assert "train.jsonl" in line and "python split_dataset.py" in line


def test_training_without_a_validation_split_names_the_command(data_dir, tmp_path, capsys):
    (data_dir / "valid.jsonl").unlink()  # a data folder made before valid.jsonl existed
    line = run_and_expect_exit(finetune_lora.main,
                               train_args(finetune_lora, data_dir, tmp_path / "out"), capsys)
    assert "valid.jsonl" in line and "python split_dataset.py" in line
    assert not (tmp_path / "out").exists()


def test_evaluate_with_no_trained_methods(data_dir, tmp_path, capsys):
    args = evaluate.parse_args(["--device", "cpu", "--data-dir", str(data_dir), "--output-dir",
                                str(tmp_path)])
    line = run_and_expect_exit(evaluate.main, args, capsys)
    assert "no finished fine-tuning runs" in line and "finetune_lora.py" in line


def test_resume_without_a_checkpoint(data_dir, tmp_path, capsys):
    line = run_and_expect_exit(finetune.main,
                               train_args(finetune, data_dir, tmp_path, "--resume"), capsys)
    assert "no checkpoint" in line


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
