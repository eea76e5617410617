"""Where a run's files live, and the lock that lets one process at a time write a method's runs.

    paths = RunPaths("outputs", "lora", "lora-seed43")
    paths.run            # outputs/lora-seed43/          the finished model, metrics.json
    paths.checkpoint(40) # outputs/checkpoints/lora/step-0000040/
    paths.search         # outputs/search/lora.json      the learning-rate search
    paths.lock           # outputs/.lora.lock            who is writing lora's runs now
    with method_lock(paths):   # refuses while another live process holds it
        ...

Every script builds these paths here, so the layout is written once.  Imports
only the standard library (the data and report stages use it without torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import PipelineError

COMPLETED = "COMPLETED"  # written last into a run folder: the run finished
METRICS = "metrics.json"  # what a finished run records (record.run_metrics)
TRAINING_PLOT = "training_metrics.png"
SEARCHES = "search"  # <output>/search/<method>.json: each method's learning-rate search
CHECKPOINTS = "checkpoints"  # <output>/checkpoints/<method>/step-N/
PREDICTIONS = "predictions.jsonl"
FINGERPRINT = "predictions.fingerprint.json"
PROBE = "probe.json"  # the run's NLL per document of the general-text probe (forgetting.py)
EVALUATION = "evaluation.json"  # which runs were compared, and the decoding they were scored with
COMPARISON = "comparison.json"  # the numbers every table, chart and the report are drawn from


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether a run folder holds a finished run (its COMPLETED marker)."""
    return (Path(folder) / COMPLETED).exists()


def search_file(output_dir: str | os.PathLike, method: str) -> Path:
    """A method's learning-rate search: <output>/search/<method>.json."""
    return search_dir(output_dir) / f"{method}.json"


def search_dir(output_dir: str | os.PathLike) -> Path:
    """The folder of every method's learning-rate search: <output>/search/."""
    return Path(output_dir) / SEARCHES


def run_name(method: str, index: int, seed: int) -> str:
    """Output folder of a method's index-th seed: <method>, then <method>-seed<N>."""
    return method if index == 0 else f"{method}-seed{seed}"


def seed_folders(output_dir: str | os.PathLike, method: str) -> list[Path]:
    """A method's extra seed folders, <method>-seed<N>/ (N digits only), in order of N."""
    prefix = f"{method}-seed"
    found = [folder for folder in Path(output_dir).glob(f"{prefix}*")
             if folder.is_dir() and folder.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda folder: int(folder.name[len(prefix):]))


def evaluation_file(output_dir: str | os.PathLike) -> Path:
    """What evaluate.py compared: <output>/evaluation.json."""
    return Path(output_dir) / EVALUATION


def comparison_file(output_dir: str | os.PathLike) -> Path:
    """The measured comparison that report.py renders: <output>/comparison.json."""
    return Path(output_dir) / COMPARISON


def lock_file(output_dir: str | os.PathLike, method: str) -> Path:
    """The lock of a method's runs: <output>/.<method>.lock."""
    return Path(output_dir) / f".{method}.lock"


@dataclass(frozen=True)
class RunPaths:
    """Every path and marker of one run of a method (name: <method> or <method>-seed<N>)."""

    output_dir: Path
    method: str
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "name", self.name or self.method)

    @property
    def run(self) -> Path:
        return self.output_dir / self.name

    @property
    def completed(self) -> Path:
        return self.run / COMPLETED

    @property
    def predictions(self) -> Path:
        return self.run / PREDICTIONS

    @property
    def fingerprint(self) -> Path:
        return self.run / FINGERPRINT

    @property
    def probe(self) -> Path:
        return self.run / PROBE

    @property
    def metrics(self) -> Path:
        return self.run / METRICS

    @property
    def training_plot(self) -> Path:
        return self.run / TRAINING_PLOT

    @property
    def checkpoints(self) -> Path:
        """The method's checkpoint folders (shared by its seeds, which train one after another)."""
        return self.output_dir / CHECKPOINTS / self.method

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    @property
    def search(self) -> Path:
        return search_file(self.output_dir, self.method)

    @property
    def lock(self) -> Path:
        return lock_file(self.output_dir, self.method)


# --- one writer per method's runs ----------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_lock(path: Path) -> dict | None:
    """The lock's holder (pid, host, started, command), or None when there is no lock."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as left behind by a process that is gone


def live_holder(path: Path) -> dict | None:
    """The lock's holder if that process still runs; None when free or stale."""
    holder = read_lock(path)
    if not holder or "pid" not in holder:
        return None
    if holder.get("host") not in (None, socket.gethostname()):
        return holder  # another machine's process (a shared disk): cannot check, so respect it
    return holder if pid_alive(int(holder["pid"])) else None


def describe(holder: dict) -> str:
    """One phrase naming a lock's holder."""
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}")


def _create(path: Path, text: str) -> bool:
    """Create path with its whole text, atomically; False when it exists already."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if the lock exists; readers never see it half written
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(path: Path) -> dict:
    """Take the lock or refuse in one line; a lock whose process is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    for _ in range(3):  # two processes taking over the same stale lock: one wins
        if _create(path, json.dumps(mine)):
            return mine
        holder = live_holder(path)
        if holder is not None:
            raise PipelineError(f"another run is writing these runs ({describe(holder)}); "
                                "wait for it to finish or stop it, or use another --output-dir",
                                path)
        stale = read_lock(path) or {}
        print(f"note: taking over {path}: its process is gone "
              f"({describe(stale) if stale else 'unreadable lock'})", file=sys.stderr)
        path.unlink(missing_ok=True)
    raise PipelineError("could not take the lock: other processes keep taking it", path)


def release(path: Path, mine: dict) -> None:
    """Remove the lock if it is still ours."""
    holder = read_lock(path)
    if holder and holder.get("pid") == mine["pid"] and holder.get("started") == mine["started"]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def method_lock(paths: RunPaths, take: bool = True):
    """Hold a method's lock while its runs are written; released on success, error and Ctrl-C.

    take=False (the processes other than rank 0 under torchrun) holds nothing.
    """
    if not take:
        yield
        return
    made = not paths.output_dir.exists()
    mine = acquire(paths.lock)
    try:
        yield
    finally:
        release(paths.lock, mine)
        if made:  # a run that failed before writing anything leaves no empty output folder
            with contextlib.suppress(OSError):
                paths.output_dir.rmdir()
