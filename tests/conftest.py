"""Shared fixtures: an offline model cache, and a small learnable Q&A data set (helpers.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_split
# Nothing in the tests may reach the network; the Hub check must fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build the tiny models once per test session, in a private cache."""
    folder = tmp_path_factory.mktemp("model-cache")
    os.environ["QA_FT_CACHE"] = str(folder)
    return folder


@pytest.fixture
def data_dir(tmp_path):
    """A fresh small data folder for one test."""
    return write_split(tmp_path / "data")


@pytest.fixture(scope="session", autouse=True)
def no_native_bf16():
    """--precision auto means fp32 in every test, whatever the test machine's CPU computes.

    Session-wide, so module-scoped fixtures that train see it too.  Tests that check bf16
    ask for it with --precision bf16, which works everywhere.
    """
    import models

    patch = pytest.MonkeyPatch()
    patch.setattr(models, "native_bf16", lambda device: False)
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def cpu_tests_name_their_device():
    """--device auto is refused in-process, so every test says which device it means.

    On a machine with CUDA, auto means CUDA: a test of the CPU path that left its
    device to auto would run on the GPU there and fail for reasons of its own (bf16
    rounding, non-deterministic kernels).  Refusing auto here, on the CPU, catches such a
    test before a CUDA machine does.  Every module holding models.pick_device by name is
    patched; scripts the tests start as subprocesses are not (they say --device cpu).
    """
    import models

    original = models.pick_device

    def pick_device(requested="auto"):
        if requested == "auto":
            raise AssertionError("a test left --device to auto: say --device cpu (or cuda, "
                                 "in tests/test_cuda.py)")
        return original(requested)

    patch = pytest.MonkeyPatch()
    root = str(Path(__file__).resolve().parents[1])
    for module in list(sys.modules.values()):
        if getattr(module, "pick_device", None) is original and \
                str(getattr(module, "__file__", "")).startswith(root):
            patch.setattr(module, "pick_device", pick_device)
    yield
    patch.undo()


@pytest.fixture
def sleeper():
    """A live process that is not this one (the pid of the other run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()
