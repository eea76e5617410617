"""Shared fixtures: an offline model cache, and a small learnable Q&A data set (helpers.py)."""

import os

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
