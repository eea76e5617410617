"""runpaths: the paths the scripts write, and one writer per method's runs."""

import subprocess
import sys

import pytest

import common
import finetune
import finetune_lora
import runpaths
from helpers import run_and_expect_exit, stop_at, train_args, write_lock
from runpaths import RunPaths


def test_a_second_run_of_a_method_while_one_runs_is_refused(data_dir, tmp_path, capsys,
                                                            sleeper):
    lock = write_lock(tmp_path, "full", sleeper.pid)
    before = lock.read_text()
    for extra in ((), ("--resume",)):
        line = run_and_expect_exit(finetune.main,
                                   train_args(finetune, data_dir, tmp_path, *extra), capsys)
        assert f"pid {sleeper.pid}" in line and "2026-12-04T10:00:00" in line
        assert "finetune.py --save-every 2" in line
    assert lock.read_text() == before  # the other run's lock is left alone
    assert not (tmp_path / "full").exists()
    # Another method on the same folder: the everyday loop, allowed.
    finetune_lora.main(train_args(finetune_lora, data_dir, tmp_path))
    assert runpaths.is_complete(tmp_path / "lora")
    assert not runpaths.lock_file(tmp_path, "lora").exists()


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(data_dir, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = write_lock(tmp_path, "full", gone.pid)
    finetune.main(train_args(finetune, data_dir, tmp_path))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"pid {gone.pid}" in notes[0] and "process is gone" in notes[0]
    assert runpaths.is_complete(tmp_path / "full")
    assert not lock.exists()  # released on success


def test_the_lock_is_released_on_error_and_on_ctrl_c(data_dir, tmp_path, capsys):
    lock = runpaths.lock_file(tmp_path, "full")
    with pytest.raises(SystemExit) as exc:
        common.run_main(lambda a: finetune.main(a, callbacks=[stop_at(1)]),
                        train_args(finetune, data_dir, tmp_path, "--save-every", "1"))
    assert exc.value.code == 130 and not lock.exists()
    run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path, "--lr", "1e6",
                                                  "--max-steps", "6"), capsys)
    assert not lock.exists()


def test_run_paths_name_the_files_the_scripts_write(data_dir, tmp_path):
    finetune_lora.main(train_args(finetune_lora, data_dir, tmp_path, "--seeds", "2"))
    paths = RunPaths(tmp_path, "lora", "lora-seed43")
    assert paths.completed.exists() and paths.run == tmp_path / "lora-seed43"
    assert paths.checkpoint(12) == tmp_path / "checkpoints" / "lora" / "step-0000012"
    assert paths.search == tmp_path / "search" / "lora.json"
    assert paths.lock == tmp_path / ".lora.lock" and not paths.lock.exists()


def test_seed_folders_are_the_methods_numbered_seeds_in_order(tmp_path):
    for name in ("lora", "lora-seed43", "lora-seed100", "lora-seed9", "lora-seedx",
                 "lora-seed44.partial", "qlora-seed43"):
        (tmp_path / name).mkdir()
    (tmp_path / "lora-seed45").write_text("a file, not a run")
    assert [f.name for f in runpaths.seed_folders(tmp_path, "lora")] == [
        "lora-seed9", "lora-seed43", "lora-seed100"]
    assert [runpaths.run_name("lora", i, 42 + i) for i in range(3)] == [
        "lora", "lora-seed43", "lora-seed44"]
