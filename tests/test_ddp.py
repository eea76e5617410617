"""Two CPU processes (DDP, gloo backend) train one method and write one complete output."""

import json
import os
import socket
import subprocess
import sys

import common
from conftest import ROOT


def free_port() -> int:
    """A TCP port nobody is listening on, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lora_under_torchrun_with_two_processes(data_dir, tmp_path):
    common.resolve_model("tiny-gpt2")  # build the tiny model before the processes start
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(ROOT / "finetune_lora.py"), "--model", "tiny-gpt2", "--data-dir", str(data_dir),
         "--output-dir", str(out), "--batch-size", "4", "--epochs", "1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "lora" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["effective_batch_size"] == 8
    # 48 examples in batches of 4 is 12 batches, shared by 2 processes: 6 steps.
    assert metrics["steps"] == 6 and len(metrics["history"]) == 6
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"] * 1.5
    assert (out / "lora" / "COMPLETED").exists()
    assert sorted(p.name for p in out.iterdir()) == ["lora"]
    # one process wrote: the summary line appears once
    assert proc.stdout.count("wrote ") == 1
