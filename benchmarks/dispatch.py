"""Run one benchmark configuration in this process: the task it names, its result as one JSON line.

    python benchmarks/bench_speed.py --worker '{"task": "train", "recipe": "ours", ...}'

bench_speed.py starts one process per configuration and calls worker_main in it.
This module sits above both kinds of worker, so neither imports the other:
workers.py (this project's and the original recipe's steps, evaluation, memory,
the matmul peak) and trl_runs.py (TRL's SFTTrainer, built on workers.py's set-up).
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch

import common
import memory
import workers


def task_trl(config: dict, baseline: int) -> dict:
    """TRL's SFTTrainer on the same model and rows (trl_runs.py; TRL is a benchmark-only install)."""
    import trl_runs  # imported only when asked for, as TRL is an optional install

    return trl_runs.task_trl(config, baseline)


TASKS = {"train": workers.task_train, "memory": workers.task_memory, "eval": workers.task_eval,
         "matmul": workers.task_matmul, "trl": task_trl}


def worker_main(config_json: str) -> None:
    """Run one configuration; print its result as one JSON line on stdout."""
    import warnings

    config = json.loads(config_json)
    real_stdout = sys.stdout
    # peft calls a transformers API deprecated for v6; the warning says nothing about speed.
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.redirect_stdout(sys.stderr):  # library prints must not mix with the JSON
        # Import every library before the baseline, so each configuration's
        # baseline holds the same code and the rest is the model and training.
        if config.get("threads"):
            torch.set_num_threads(config["threads"])
        import peft  # noqa: F401  (imported before the baseline is read)
        import transformers  # noqa: F401
        with contextlib.suppress(ImportError):
            import bitsandbytes  # noqa: F401
        memory.release_free_heap()
        result = TASKS[config["task"]](config, memory.rss_bytes())
    real_stdout.write(json.dumps(common.finite(result), allow_nan=False) + "\n")  # strict JSON
