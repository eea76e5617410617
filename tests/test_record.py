"""record: a run's folder is written whole or not at all."""


import checkpoints
import common
import finetune
import record
from helpers import finished_files, hidden, no_space, run_and_expect_exit, train_args
from runpaths import RunPaths


def test_a_full_disk_while_saving_the_model_keeps_the_previous_one(data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    finetune.main(train_args(finetune, data_dir, tmp_path))
    before = finished_files(tmp_path / "full")
    monkeypatch.setattr(record, "write_json", no_space({"metrics.json"}, common.write_json))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path,
                                                         "--save-every", "1"), capsys)
    assert str(tmp_path / "full") in line and "No space left on device" in line
    assert "MB free" in line
    assert finished_files(tmp_path / "full") == before
    assert hidden(tmp_path) == []  # no partial folder, no lock
    # The checkpoint of the run that could not be saved stays, for --resume.
    assert [p.name for p in checkpoints.listed(RunPaths(tmp_path, "full"))] == ["step-0000001"]
