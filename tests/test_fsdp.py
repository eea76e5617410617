"""Sharded training (FSDP2 through accelerate, configs/fsdp.yaml): 2 CPU processes over gloo
train as 1 process with accumulation does, resume as an uninterrupted run, and leave a final
folder that plain transformers / peft load in one process."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import finetune_lora
import finetune_qlora
import models
from helpers import ROOT, run_and_expect_exit, train_args
from runpaths import RunPaths
from test_ddp import free_port

# As test_ddp: tiny-llama has no dropout and the adapter's is off, fp32 on the CPU.
TRAIN = ["--model", "tiny-llama", "--epochs", "1", "--precision", "fp32",
         "--device", "cpu", "--batch-size", "4", "--max-steps", "4", "--save-every", "2"]
# 2 processes' all-reduces against 1 process's accumulation: the same sums in another order.
RTOL = 1e-5
# Runs a script's main() with a callback that stops at a step as Ctrl-C would.
STOPPER = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import common, importlib
from helpers import stop_at
script = importlib.import_module({script!r})
common.run_main(lambda a: script.main(a, callbacks=[stop_at({step})]), script.parse_args())
"""


def sharded(script, data_dir, out, *extra, stop_at=None, tmp=None):
    """Run a script on 2 processes under accelerate launch --config_file configs/fsdp.yaml."""
    path = str(ROOT / f"{script}.py")
    if stop_at is not None:
        path = str(tmp / f"stop_{script}.py")
        with open(path, "w") as f:
            f.write(STOPPER.format(root=str(ROOT), tests=str(ROOT / "tests"), script=script,
                                   step=stop_at))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "fsdp.yaml"), "--num_processes", "2",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), path,
           *TRAIN, "--data-dir", str(data_dir), "--output-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def single(script, data_dir, out, *extra):
    """The same run in one process, accumulating the two processes' batches."""
    return subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *TRAIN, "--data-dir",
                           str(data_dir), "--output-dir", str(out), "--grad-accum", "2", *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def metrics(out, method):
    return json.loads((out / method / "metrics.json").read_text())


def assert_same_steps(a, b, rtol=RTOL):
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close([h[key] for h in a["history"]], [h[key] for h in b["history"]],
                                   rtol=rtol, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close([v["loss"] for v in a["valid_loss"]],
                               [v["loss"] for v in b["valid_loss"]], rtol=rtol, atol=0)


def largest_differences(a, b) -> dict:
    """The largest relative difference of each per-step number (printed for the record)."""
    out = {}
    for key in ("loss", "grad_norm"):
        out[key] = max(abs(x[key] - y[key]) / abs(y[key])
                       for x, y in zip(a["history"], b["history"]))
    out["valid"] = max(abs(x["loss"] - y["loss"]) / abs(y["loss"])
                       for x, y in zip(a["valid_loss"], b["valid_loss"]))
    return out


def test_full_fine_tuning_sharded_matches_one_process_and_resumes(data_dir, tmp_path):
    """Full fine-tuning: 2 sharded processes = 1 process x 2 accumulation, step by step;
    stopped at step 2 and resumed (sharded checkpoint) = uninterrupted; the folder loads."""
    from transformers import AutoModelForCausalLM

    models.resolve_model("tiny-llama")  # built before the processes start
    two, one, cut = tmp_path / "two", tmp_path / "one", tmp_path / "cut"
    result = sharded("finetune", data_dir, two)
    assert result.returncode == 0, result.stderr[-3000:]
    result = single("finetune", data_dir, one)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(two, "full"), metrics(one, "full")
    assert a["processes"] == 2 and b["processes"] == 1 and len(a["history"]) == 4
    print("full, 2 sharded vs 1:", largest_differences(a, b))
    assert_same_steps(a, b)

    result = sharded("finetune", data_dir, cut, stop_at=2, tmp=tmp_path)
    # each process exits 130 as after Ctrl-C; the launcher reports its own failure status
    assert "stopped at step 2" in result.stderr, result.stderr[-3000:]
    checkpoint = RunPaths(cut, "full").checkpoint(2)
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # accelerate's sharded files, one per process
    result = sharded("finetune", data_dir, cut, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed = metrics(cut, "full")
    print("full, resumed vs uninterrupted:", largest_differences(resumed, a))
    assert_same_steps(resumed, a, rtol=1e-6)

    # The final folder is a whole model: plain transformers loads it in one process.
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(out / "full").eval()(ids).logits
                  for out in (two, one)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_lora_sharded_matches_one_process_and_saves_the_adapter(data_dir, tmp_path):
    """LoRA (frozen and trainable tensors in one sharded unit): the same steps, and the
    final folder is the adapter alone, loading with peft on the base in one process."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models.resolve_model("tiny-llama")
    two, one = tmp_path / "two", tmp_path / "one"
    result = sharded("finetune_lora", data_dir, two, "--dropout", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    result = single("finetune_lora", data_dir, one, "--dropout", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = metrics(two, "lora"), metrics(one, "lora")
    print("lora, 2 sharded vs 1:", largest_differences(a, b))
    assert_same_steps(a, b)
    x = load_file(two / "lora" / "adapter_model.safetensors")
    y = load_file(one / "lora" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all("lora_" in name for name in x)
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=1e-4, atol=1e-6)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), two / "lora")
    assert model(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_qlora_refuses_to_shard_in_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = run_and_expect_exit(finetune_qlora.main,
                               train_args(finetune_qlora, data_dir, tmp_path), capsys)
    assert "bnb_4bit_quant_storage" in line and "configs/fsdp.yaml" in line


def test_methods_fsdp_has_not_tried_refuse_to_shard_in_one_line(data_dir, tmp_path, capsys,
                                                                monkeypatch):
    import finetune_prompt

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = run_and_expect_exit(finetune_prompt.main,
                               train_args(finetune_prompt, data_dir, tmp_path), capsys)
    assert "prompt under FSDP is untried" in line
    assert "configs/fsdp.yaml" in line
    line = run_and_expect_exit(finetune_lora.main,
                               train_args(finetune_lora, data_dir, tmp_path, "--rslora"), capsys)
    assert "rslora under FSDP" in line
