"""loop.fit: when the loop reads the device's numbers, and a diverging run stops with one line."""

import json
import subprocess
import sys

import runpaths
import steps
from helpers import ROOT, run_script


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
