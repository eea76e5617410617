"""One method's runs: a learning-rate search on the validation split, then one run per seed.

Every fine-tune script ends in train_method(settings, method, prepare): the
script says how its method changes the model (prepare); this module decides how
often and at which rate to train it.

    python finetune_lora.py                      # one run at the script's rate (the quick path)
    python finetune_lora.py --seeds 3            # three seeds: outputs/lora, lora-seed43, lora-seed44
    python finetune_lora.py --tune-lr --seeds 3  # search the rate on data/valid.jsonl first

The search trains --search-epochs at each rate of the grid (the script's
evidence-based rate x 1/3, 1, 3), answers every validation question with the
same greedy decoding evaluate.py uses, and keeps the rate with the best
headline score (key accuracy where the data has keys, else token F1; ties go to
the lower validation loss).  A rate whose loss becomes non-finite is recorded as
diverged and never chosen.  data/eval.jsonl is never read.  The search is
written to outputs/search/<method>.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import common
import generation
import models
import runpaths
import training
from runpaths import RunPaths
from settings import TrainSettings

# Around each script's default (itself the search's choice on the default data,
# results/smollm2-135m/search/): one step of ~3x either way checks it on the data at hand
# while the default stays in the grid, so the choice never scores below it on validation.
GRID_FACTORS = (0.3, 1, 3)


def run_id(settings: TrainSettings, method: str) -> str:
    """A fingerprint of what defines a run (settings.identity()) and its data: seeds share it."""
    values = dict(sorted(settings.identity().items()))
    folder = Path(settings.data_dir)  # a missing file is reported by start_run, naming the command
    data = {name: common.file_sha256(folder / name) if (folder / name).exists() else None
            for name in ("train.jsonl", "valid.jsonl", "template.json")}
    blob = json.dumps({"method": method, "settings": values, "data": data}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(method: str, index: int, seed: int) -> str:
    """Output folder of a method's index-th seed: <method>/, then <method>-seed<N>/."""
    return method if index == 0 else f"{method}-seed{seed}"


def load_prepared(settings: TrainSettings, prepare, device, load_kwargs: dict,
                  precision: str = "fp32") -> tuple:
    """Load the base and apply the method: (model, tokenizer, base path, the method's details)."""
    model, tokenizer, base_path = models.load_model(
        settings.model, device, trust_remote_code=settings.trust_remote_code,
        precision=precision, **load_kwargs)
    model, details = prepare(model, settings)
    models.store_frozen_in_bf16(model, precision)  # after prepare: only then is "frozen" known
    if settings.gradient_checkpointing:  # after prepare: PEFT wraps the model it is given
        models.enable_gradient_checkpointing(model)
    return model, tokenizer, base_path, details


def train_once(settings: TrainSettings, method: str, prepare, name: str, load_kwargs: dict,
               callbacks: tuple = ()) -> tuple[dict, training.Run, object, object]:
    """Load the base, apply the method, train; returns (metrics, run, model, tokenizer), unsaved."""
    run = training.start_run(settings, method, name)
    model, tokenizer, base_path, details = load_prepared(settings, prepare, run.device, load_kwargs,
                                                         run.precision)
    metrics = training.train(run, model, tokenizer, base_path, details, callbacks=callbacks)
    return metrics, run, model, tokenizer


def train_and_save(settings: TrainSettings, method: str, prepare, name: str, load_kwargs: dict,
                   extra: dict, callbacks: tuple = ()) -> dict:
    """train_once, then write the run's folder; returns its metrics only, so the model is let go."""
    metrics, run, model, tokenizer = train_once(settings, method, prepare, name, load_kwargs,
                                                callbacks)
    return training.save_outputs(run, model, tokenizer, {**metrics, **extra})


def validation_score(run: training.Run, model, tokenizer) -> tuple[float, str, str]:
    """(headline score in %, its field, its label) on data/valid.jsonl, decoded as evaluate.py does."""
    rows = run.valid_rows
    stop = common.turn_marker(run.template)
    max_new = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
    predictions = generation.generate_answers(model, tokenizer, [r["prompt"] for r in rows],
                                              max_new, run.device, stop=stop,
                                              desc=f"{run.method}: validation answers",
                                              precision=run.precision)
    summary = common.summarise(common.score_rows(rows, predictions))
    field, _, label = common.quality_key([summary])
    return summary[field], field, label


def lr_grid(settings: TrainSettings) -> list[float]:
    """The rates to search: --lr-grid, else GRID_FACTORS around --lr."""
    return settings.lr_grid or [round(settings.lr * f, 12) for f in GRID_FACTORS]


def search_learning_rate(settings: TrainSettings, method: str, prepare, load_kwargs: dict,
                         callbacks: tuple = ()) -> dict:
    """Train briefly at each rate of the grid and keep the one with the best validation score.

    A rate whose run raises training.Diverged is recorded as diverged (score null) and
    never chosen; when every rate diverges the search stops with one PipelineError.
    """
    grid = lr_grid(settings)
    results, metric, label, rank = [], None, None, training.process_rank()
    for number, lr in enumerate(grid, start=1):
        print(f"{method}: learning-rate search {number}/{len(grid)}: lr {lr:g}, "
              f"{settings.search_epochs:g} epoch(s)")
        trial = settings.replace(lr=lr, epochs=settings.search_epochs, max_steps=None,
                                 resume=False, seeds=1)
        try:
            metrics, run, model, tokenizer = train_once(trial, method, prepare, method,
                                                        load_kwargs, callbacks=callbacks)
            training.discard_checkpoints(run)
        except training.Diverged as exc:
            # The diverged run's checkpoints must not be resumed from by a later command.
            shutil.rmtree(Path(settings.output_dir) / "checkpoints" / method, ignore_errors=True)
            results.append({"lr": lr, "score": None, "diverged": True, "valid_loss": None,
                            "error": str(exc)})
            print(f"{method}: lr {lr:g}: diverged ({exc}); never chosen")
            continue
        score, metric, label = validation_score(run, model, tokenizer)
        results.append({"lr": lr, "score": score, "diverged": False,
                        "valid_loss": metrics["valid_loss"][-1]["loss"],
                        "train_loss": metrics["train_loss"],
                        "train_seconds": metrics["train_seconds"], "steps": metrics["steps"],
                        "precision": metrics["precision"]})
        print(f"{method}: lr {lr:g}: validation {label} {score:.1f}%, validation loss "
              f"{results[-1]['valid_loss']:.4f}")
        del model
    finished = [r for r in results if not r["diverged"]]
    if not finished:
        raise common.PipelineError(
            f"{method}: the learning-rate search diverged at every rate "
            f"({', '.join(f'{lr:g}' for lr in grid)}); try a lower --lr-grid")
    best = max(finished, key=lambda r: (r["score"], -r["valid_loss"]))
    search = {"method": method, "model": settings.model, "grid": grid, "results": results,
              "chosen_lr": best["lr"], "metric": metric, "metric_label": label,
              "split": "valid.jsonl", "search_epochs": settings.search_epochs,
              "precision": settings.precision,
              "budget": f"{settings.search_epochs:g} epoch(s) per rate, {len(grid)} rates, seed "
                        f"{settings.seed}", "edge": best["lr"] in (grid[0], grid[-1]),
              "diverged": [r["lr"] for r in results if r["diverged"]]}
    path = runpaths.search_file(settings.output_dir, method)
    if rank == 0:
        common.write_json(path, search)
    note = (" (at the edge of the grid: a wider --lr-grid may do better)" if search["edge"]
            else "")
    print(f"{method}: chose lr {best['lr']:g} ({label} {best['score']:.1f}% on the validation "
          f"split){note}; wrote {path}")
    return search


def previous_search(settings: TrainSettings, method: str) -> dict | None:
    """With --resume, a finished search of this model over the same grid and budget is reused."""
    path = runpaths.search_file(settings.output_dir, method)
    if not path.exists():
        return None
    search = common.read_json(path)
    if (search["grid"], search.get("search_epochs"), search.get("model"),
            search.get("precision", "fp32")) != (
            lr_grid(settings), settings.search_epochs, settings.model, settings.precision):
        return None
    print(f"{method}: --resume: using the finished learning-rate search in {path} "
          f"(lr {search['chosen_lr']:g})")
    return search


def remove_stale_seeds(output_dir: Path, method: str, keep: set[str]) -> None:
    """Delete <method>-seed<N>/ folders this run does not make, so no old seed is mixed in."""
    for folder in output_dir.glob(f"{method}-seed*"):
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder)


def is_finished(folder: Path, identity: str, seed: int) -> bool:
    """Whether folder holds a completed run with this identity and seed (skipped by --resume)."""
    if not runpaths.is_complete(folder):
        return False
    metrics = common.read_json(folder / "metrics.json")
    return metrics.get("run_id") == identity and metrics["args"]["seed"] == seed


def train_method(settings: TrainSettings, method: str, prepare, callbacks: tuple = (),
                 **load_kwargs) -> list[dict]:
    """Optionally search the rate, then train and save one run per seed; returns their metrics.

    prepare(model, settings) -> (model, details) applies the method to a freshly
    loaded base model; load_kwargs go to models.load_model (quantize_4bit=True);
    callbacks run after every step (training.Callback).
    """
    # One process at a time writes a method's runs (rank 0 holds the lock for all ranks).
    with runpaths.method_lock(RunPaths(settings.output_dir, method),
                              take=training.process_rank() == 0):
        return train_locked(settings, method, prepare, callbacks, load_kwargs)


def train_locked(settings: TrainSettings, method: str, prepare, callbacks: tuple,
                 load_kwargs: dict) -> list[dict]:
    """train_method's work, while it holds the method's lock."""
    # Choose the model once per command (the default may fall back to the offline preset,
    # said in one line), so every seed, checkpoint, run_id and metrics.json records the
    # model actually used; the request is kept as model_requested.
    requested = settings.model
    model = models.choose_model(requested, announce=training.process_rank() == 0)
    # Resolve --precision once, so the run's identity, its search and metrics.json all record
    # what was computed (auto differs between machines).
    precision = models.resolve_precision(models.pick_device(settings.device), settings.precision,
                                         announce=training.process_rank() == 0)
    settings = settings.replace(model=model, precision=precision,
                                model_requested="default" if requested is None else requested)
    extra = {"model_requested": settings.model_requested}
    if settings.search_only and not settings.tune_lr:
        raise common.PipelineError("--search-only needs --tune-lr (there is no search to run)")
    if settings.tune_lr:
        search = previous_search(settings, method) if settings.resume else None
        search = search or search_learning_rate(settings, method, prepare, load_kwargs,
                                                callbacks)
        if settings.search_only:
            return []
        settings = settings.replace(lr=search["chosen_lr"])
        extra["lr_search"] = {k: search[k] for k in ("grid", "chosen_lr", "metric", "budget")}
    output_dir = Path(settings.output_dir)
    seeds = [settings.seed + i for i in range(settings.seeds)]
    names = [run_name(method, i, seed) for i, seed in enumerate(seeds)]
    if training.process_rank() == 0:
        remove_stale_seeds(output_dir, method, set(names))
    identity = run_id(settings, method)
    finished = []
    for name, seed in zip(names, seeds):
        if settings.seeds > 1:
            print(f"{method}: seed {seed} ({names.index(name) + 1} of {len(seeds)}) -> "
                  f"{output_dir / name}/")
        if settings.resume and is_finished(output_dir / name, identity, seed):
            print(f"{method}: {output_dir / name}/ is already complete; skipped")
            finished.append(common.read_json(output_dir / name / "metrics.json"))
            continue
        # --resume continues the seed that was interrupted and starts the ones never begun;
        # with nothing finished and no checkpoint, start_run says there is nothing to resume.
        resume = settings.resume and (bool(training.checkpoints(output_dir, method))
                                      or not finished)
        seed_settings = settings.replace(seed=seed, resume=resume)
        # Keep only the metrics: holding on to this seed's model while the next one trains
        # would add its weights to the next run's peak memory.
        metrics = train_and_save(seed_settings, method, prepare, name, load_kwargs,
                                 extra={**extra, "run_id": identity}, callbacks=callbacks)
        finished.append(metrics)
    return finished
