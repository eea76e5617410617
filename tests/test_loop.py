"""loop.fit: when the loop reads the device's numbers, and a diverging run stops with one line."""

import json
import subprocess
import sys

import torch

import runpaths
import finetune
import steps
from helpers import ROOT, run_script
from helpers import run_and_expect_exit, train_args


def test_the_loop_reads_at_log_steps_epoch_ends_and_the_end(data_dir, tmp_path, monkeypatch):
    """48 examples in batches of 8: epochs end at steps 6 and 12, the log interval is 10."""
    sizes = []
    original = steps.read_steps

    def spy(trainer, pending, steps_per_epoch):
        sizes.append([stats.step for stats in pending])
        return original(trainer, pending, steps_per_epoch)

    monkeypatch.setattr(steps, "read_steps", spy)
    run_script("full", data_dir, tmp_path / "out", "--max-steps", "12")
    assert sizes == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11, 12]]
    metrics = json.loads((tmp_path / "out" / "full" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, 13))


def test_a_diverging_rate_stops_with_one_line_and_marks_nothing_complete(data_dir, tmp_path):
    out = tmp_path / "out"
    # Loss 6.25 at step 1, NaN from step 2 on at this rate (checked: it diverges on tiny-gpt2).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--device", "cpu", "--model", "tiny-gpt2",
         "--lr", "1e6", "--max-steps", "6", "--batch-size", "8", "--data-dir", str(data_dir),
         "--output-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "diverged at step 2" in errors[0] and "--lr 1e+06" in errors[0]
    assert "lower rate" in errors[0]
    assert not (out / "full").exists()
    assert not list(out.rglob(runpaths.COMPLETED))
    assert not (out / ".full.lock").exists()


# --- bad input and misuse: one line, exit status 2, nothing lost ---------------------


def test_out_of_memory_is_caught_with_advice(data_dir, tmp_path, capsys):
    def oom(step, control):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def main(args):
        finetune.main(args, callbacks=[oom])

    line = run_and_expect_exit(main, train_args(finetune, data_dir, tmp_path), capsys)
    assert "out of CPU memory at batch size 8" in line
    assert "--batch-size 4 --grad-accum 2" in line and "finetune_qlora.py" in line
    assert not (tmp_path / "full").exists()
