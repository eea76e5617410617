"""One method's runs: a learning-rate search on the validation split, then one run per seed.

Every fine-tune script ends in train_method(args, method, prepare): the script
says how its method changes the model (prepare); this module decides how often
and at which rate to train it.

    python finetune_lora.py                      # one run at the script's rate (the quick path)
    python finetune_lora.py --seeds 3            # three seeds: outputs/lora, lora-seed43, lora-seed44
    python finetune_lora.py --tune-lr --seeds 3  # search the rate on data/valid.jsonl first

The search trains --search-epochs at each rate of the grid, answers every
validation question with the same greedy decoding evaluate.py uses, and keeps
the rate with the best headline score (key accuracy where the data has keys,
else token F1; ties go to the lower validation loss).  data/eval.jsonl is
never read.  The search is written to outputs/search/<method>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import common

GRID_FACTORS = (0.3, 1, 3, 10)  # around the method's rate: a 33x span, mostly upwards (LoRA
#                                 wants ~10x full fine-tuning's rate: "LoRA Without Regret")
NOT_PART_OF_A_RUN = ("seed", "seeds", "resume", "output_dir", "data_dir", "device", "save_every",
                     "keep_checkpoints", "tune_lr", "lr_grid", "search_epochs",
                     "model_requested")  # the run is defined by the model used (args.model)


def with_changes(args, **changes) -> argparse.Namespace:
    """A copy of args with some options changed."""
    return argparse.Namespace(**{**vars(args), **changes})


def run_id(args, method: str) -> str:
    """A fingerprint of everything that defines a run except its seed: seeds of one run share it."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_PART_OF_A_RUN}
    folder = Path(args.data_dir)  # a missing file is reported by start_run, naming the command
    data = {name: common.file_sha256(folder / name) if (folder / name).exists() else None
            for name in ("train.jsonl", "valid.jsonl", "template.json")}
    blob = json.dumps({"method": method, "settings": settings, "data": data}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(method: str, index: int, seed: int) -> str:
    """Output folder of a method's index-th seed: <method>/, then <method>-seed<N>/."""
    return method if index == 0 else f"{method}-seed{seed}"


def train_once(args, method: str, prepare, name: str, load_kwargs: dict, extra: dict,
               save: bool = True) -> tuple[dict, object, object, object]:
    """Load the base, apply the method, train; returns (metrics, run, model, tokenizer)."""
    run = common.start_run(args, method)
    run.name = name
    model, tokenizer, base_path = common.load_model(args.model, run.device,
                                                    trust_remote_code=args.trust_remote_code,
                                                    **load_kwargs)
    model, details = prepare(model, args)
    metrics = common.train_and_save(run, model, tokenizer, base_path, details, extra=extra,
                                    save=save)
    return metrics, run, model, tokenizer


def validation_score(run, model, tokenizer) -> tuple[float, str, str]:
    """(headline score in %, its field, its label) on data/valid.jsonl, decoded as evaluate.py does."""
    rows = run.valid_rows
    stop = common.turn_marker(run.template)
    max_new = common.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
    predictions = common.generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new,
                                          run.device, stop=stop,
                                          desc=f"{run.method}: validation answers")
    summary = common.summarise(common.score_rows(rows, predictions))
    if summary["key_accuracy"] is not None:
        return summary["key_accuracy"], "key_accuracy", "key-answer accuracy"
    return summary["token_f1"], "token_f1", "token F1"


def lr_grid(args) -> list[float]:
    """The rates to search: --lr-grid, else GRID_FACTORS around --lr."""
    return args.lr_grid or [round(args.lr * f, 12) for f in GRID_FACTORS]


def search_learning_rate(args, method: str, prepare, load_kwargs: dict) -> dict:
    """Train briefly at each rate of the grid and keep the one with the best validation score."""
    grid = lr_grid(args)
    results, metric, label = [], None, None
    for number, lr in enumerate(grid, start=1):
        print(f"{method}: learning-rate search {number}/{len(grid)}: lr {lr:g}, "
              f"{args.search_epochs} epoch(s)")
        trial = with_changes(args, lr=lr, epochs=args.search_epochs, max_steps=None,
                             resume=False, seeds=1)
        metrics, run, model, tokenizer = train_once(trial, method, prepare, method, load_kwargs,
                                                    extra={}, save=False)
        score, metric, label = validation_score(run, model, tokenizer)
        results.append({"lr": lr, "score": score, "valid_loss": metrics["valid_loss"][-1]["loss"],
                        "train_loss": metrics["train_loss"],
                        "train_seconds": metrics["train_seconds"]})
        print(f"{method}: lr {lr:g}: validation {label} {score:.1f}%, validation loss "
              f"{results[-1]['valid_loss']:.4f}")
        del model
    best = max(results, key=lambda r: (r["score"], -r["valid_loss"]))
    search = {"method": method, "model": args.model, "grid": grid, "results": results,
              "chosen_lr": best["lr"], "metric": metric, "metric_label": label,
              "split": "valid.jsonl", "search_epochs": args.search_epochs,
              "budget": f"{args.search_epochs} epoch(s) per rate, {len(grid)} rates, seed "
                        f"{args.seed}", "edge": best["lr"] in (grid[0], grid[-1])}
    if run.rank == 0:
        common.write_json(Path(args.output_dir) / "search" / f"{method}.json", search)
    note = (" (at the edge of the grid: a wider --lr-grid may do better)" if search["edge"]
            else "")
    print(f"{method}: chose lr {best['lr']:g} ({label} {best['score']:.1f}% on the validation "
          f"split){note}; wrote {Path(args.output_dir) / 'search' / f'{method}.json'}")
    return search


def previous_search(args, method: str) -> dict | None:
    """With --resume, a finished search of this model over the same grid and budget is reused."""
    path = Path(args.output_dir) / "search" / f"{method}.json"
    if not path.exists():
        return None
    search = common.read_json(path)
    if (search["grid"], search.get("search_epochs"), search.get("model")) != (
            lr_grid(args), args.search_epochs, args.model):
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
    if not (folder / "COMPLETED").exists():
        return False
    metrics = common.read_json(folder / "metrics.json")
    return metrics.get("run_id") == identity and metrics["args"]["seed"] == seed


def train_method(args, method: str, prepare, **load_kwargs) -> list[dict]:
    """Optionally search the rate, then train and save one run per seed; returns their metrics.

    prepare(model, args) -> (model, details) applies the method to a freshly
    loaded base model; load_kwargs go to common.load_model (quantize_4bit=True).
    """
    # Choose the model once per command (the default may fall back to the offline preset,
    # said in one line), so every seed, checkpoint, run_id and metrics.json records the
    # model actually used; the request is kept as model_requested.
    requested = args.model
    model = common.choose_model(requested, announce=common.dist_info()[0] == 0)
    args = with_changes(args, model=model,
                        model_requested="default" if requested is None else requested)
    extra = {"model_requested": args.model_requested}
    if args.tune_lr:
        search = previous_search(args, method) if args.resume else None
        search = search or search_learning_rate(args, method, prepare, load_kwargs)
        args = with_changes(args, lr=search["chosen_lr"])
        extra["lr_search"] = {k: search[k] for k in ("grid", "chosen_lr", "metric", "budget")}
    output_dir = Path(args.output_dir)
    seeds = [args.seed + i for i in range(args.seeds)]
    names = [run_name(method, i, seed) for i, seed in enumerate(seeds)]
    if common.dist_info()[0] == 0:
        remove_stale_seeds(output_dir, method, set(names))
    identity = run_id(args, method)
    finished = []
    for name, seed in zip(names, seeds):
        if args.seeds > 1:
            print(f"{method}: seed {seed} ({names.index(name) + 1} of {len(seeds)}) -> "
                  f"{output_dir / name}/")
        if args.resume and is_finished(output_dir / name, identity, seed):
            print(f"{method}: {output_dir / name}/ is already complete; skipped")
            finished.append(common.read_json(output_dir / name / "metrics.json"))
            continue
        # --resume continues the seed that was interrupted and starts the ones never begun;
        # with nothing finished and no checkpoint, start_run says there is nothing to resume.
        resume = args.resume and (bool(common.checkpoints(output_dir, method)) or not finished)
        seed_args = with_changes(args, seed=seed, resume=resume)
        # Keep only the metrics: holding on to this seed's model while the next one trains
        # would add its weights to the next run's peak memory.
        metrics = train_once(seed_args, method, prepare, name, load_kwargs,
                             extra={**extra, "run_id": identity})[0]
        finished.append(metrics)
    return finished
