"""One method's runs: a learning-rate search on the validation split, then one run per seed.

Every fine-tune script ends in train_method(settings, method, prepare): the
script says how its method changes the model (prepare); this module decides how
often and at which rate to train it.  From a script's main to the optimiser:

    main -> tuning.train_method -> tuning.train_run -> loop.fit -> loop.train_step
         -> steps.Trainer.update (optimizer.step())

    python finetune_lora.py                      # one run at the script's rate (the quick path)
    python finetune_lora.py --seeds 3            # three seeds: outputs/lora, lora-seed43, lora-seed44
    python finetune_lora.py --tune-lr --seeds 3  # search the rate on data/valid.jsonl first

The search trains --search-epochs at each rate of the grid (the script's
evidence-based rate x 0.3, 1, 3: GRID_FACTORS) and keeps the rate with the lowest validation
answer NLL: summed negative log-likelihood over summed answer tokens of
data/valid.jsonl, each question scored as evaluate.py scores it.  The NLL is
continuous and paired over the same questions, so the standard error of a
difference between two rates is a fraction of key accuracy's (on 84 questions
key accuracy's binomial SE, ~4.5 points, was as large as the margins that
decided).  Key accuracy (token F1 where the data has no keys), from the same
greedy decoding evaluate.py uses, is recorded and shown but does not choose.
Each rate is recorded with its difference to the chosen rate and the standard
error of that paired difference, clustered by fact group; a rate within 2 SE
is marked as a near tie.  A winner at either end of the grid widens it: one
more rate a factor 3 beyond that end is trained, until the winner is interior,
3 rates were added or the new rate diverged.  A rate whose loss becomes
non-finite is recorded as diverged and never chosen.  data/eval.jsonl is never
read.  The search is written to outputs/search/<method>.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

import answer_loss
import checkpoints
import common
import generation
import loop
import record
import runpaths
import runs
import scoring
import steps
from runpaths import RunPaths
from settings import TrainSettings

# Around each script's default (itself the search's choice on the default data,
# results/smollm2-135m/search/): one step of ~3x either way checks it on the data at hand
# while the default stays in the grid, so the choice never scores below it on validation.
GRID_FACTORS = (0.3, 1, 3)
# A winner at an end of the grid may not be the best rate: the grid grows past that end by
# WIDEN_FACTOR, the grid's own step, at most MAX_WIDENINGS times (so at most 3^3 = 27x beyond
# the rates asked for), which bounds what an ever-improving direction can cost.
WIDEN_FACTOR = 3
MAX_WIDENINGS = 3
# A rate whose validation NLL lies within this many standard errors of the chosen rate's is
# marked a near tie: on this split the data cannot tell the two apart.
NEAR_TIE_SE = 2
# The methods FSDP may shard: the two tests/test_fsdp.py checks, and BitFit (plain
# parameters, as full's); QLoRA and the PEFT methods beyond LoRA are refused in one line.
SHARDABLE = ("full", "lora", "bitfit")
METRIC = "valid_answer_nll"
METRIC_LABEL = "validation answer NLL (nats per answer token)"


def run_id(settings: TrainSettings, method: str) -> str:
    """A fingerprint of what defines a run (settings.identity()) and its data: seeds share it."""
    values = dict(sorted(settings.identity().items()))
    folder = Path(settings.data_dir)  # a missing file is reported by start_run, naming the command
    data = {name: common.file_sha256(folder / name) if (folder / name).exists() else None
            for name in ("train.jsonl", "valid.jsonl", "template.json")}
    blob = json.dumps({"method": method, "settings": values, "data": data}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_run(settings: TrainSettings, method: str, prepare, name: str, load_kwargs: dict,
              extra: dict, callbacks: tuple = ()) -> dict:
    """Set up, load and prepare, fit, write the run's folder; returns its metrics only, so the
    model is let go before the next seed trains (it would add to that run's peak memory)."""
    run = runs.start_run(settings, method, name)
    model, tokenizer, details = runs.load_prepared(run, prepare, load_kwargs)
    metrics = loop.fit(run, model, tokenizer, details, callbacks=callbacks)
    return record.save_outputs(run, model, tokenizer, {**metrics, **extra})


def train_unsaved(settings: TrainSettings, method: str, prepare, load_kwargs: dict,
                  callbacks: tuple = ()) -> tuple[dict, runs.Run, object, object]:
    """A search run, set up, loaded, fitted, its checkpoints dropped: (metrics, run, model,
    tokenizer)."""
    run = runs.start_run(settings, method, method)
    model, tokenizer, details = runs.load_prepared(run, prepare, load_kwargs)
    metrics = loop.fit(run, model, tokenizer, details, callbacks=callbacks)
    checkpoints.discard(run)
    return metrics, run, model, tokenizer


def validation_score(run: runs.Run, model, tokenizer) -> tuple[float, str, str]:
    """(headline score in %, its field, its label) on data/valid.jsonl, decoded as evaluate.py does."""
    rows = run.valid_rows
    stop = common.turn_marker(run.template)
    max_new = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
    predictions = generation.generate_answers(model, tokenizer, [r["prompt"] for r in rows],
                                              max_new, run.device, stop=stop,
                                              desc=f"{run.method}: validation answers",
                                              precision=run.precision)
    summary = scoring.summarise(scoring.score_rows(rows, predictions))
    field, _, label = scoring.quality_key([summary])
    return summary[field], field, label


def validation_nll(run: runs.Run, model, tokenizer) -> list[tuple[float, int]]:
    """Each validation question's (summed answer NLL, answer tokens), as evaluate.py scores eval.

    The same tokenisation (never cut to the context; the EOS token not scored, as for
    the untuned base) and the same loop, answer_loss.answer_nll_by_example, rounded as
    evaluate.evaluate_model stores answer_nll: the search compares rates on the
    numbers the evaluation would report for them.
    """
    examples = common.tokenize_rows(tokenizer, run.valid_rows, 10**9, source="valid.jsonl",
                                    label_eos=False)
    found = answer_loss.answer_nll_by_example(
        model, examples, tokenizer.pad_token_id, run.device,
        batch_size=generation.generation_batch_size(run.device),
        desc=f"{run.method}: validation answer NLL", precision=run.precision)
    return [(round(total, 6), count) for total, count in found]


def lr_grid(settings: TrainSettings) -> list[float]:
    """The rates to search: --lr-grid, else GRID_FACTORS around --lr."""
    return settings.lr_grid or [round(settings.lr * f, 12) for f in GRID_FACTORS]


def try_rate(settings: TrainSettings, method: str, prepare, load_kwargs: dict, callbacks: tuple,
             lr: float) -> tuple[dict, dict | None]:
    """Train briefly at one rate and score it on the validation split.

    Returns (the search's entry for the rate, what is the same at every rate): the
    entry holds the rate's validation answer NLL, key accuracy ("score"), validation
    loss and each question's summed answer NLL ("answer_nll"); the second is each
    question's answer tokens and fact group, and the score's field and label, or
    None when the run diverged.
    """
    trial = settings.replace(lr=lr, epochs=settings.search_epochs, max_steps=None,
                             resume=False, seeds=1)
    try:
        metrics, run, model, tokenizer = train_unsaved(trial, method, prepare, load_kwargs,
                                                       callbacks)
    except steps.Diverged as exc:
        # The diverged run's checkpoints must not be resumed from by a later command.
        shutil.rmtree(RunPaths(settings.output_dir, method).checkpoints, ignore_errors=True)
        print(f"{method}: lr {lr:g}: diverged ({exc}); never chosen")
        return {"lr": lr, "score": None, "diverged": True, "valid_loss": None,
                "valid_nll": None, "error": str(exc)}, None
    import verdict  # here, not at the top: only the search needs it, not every training run

    nll = validation_nll(run, model, tokenizer)
    score, field, label = validation_score(run, model, tokenizer)
    del model
    tokens = [count for _, count in nll]
    result = {"lr": lr, "score": score, "diverged": False,
              "valid_nll": sum(total for total, _ in nll) / sum(tokens),
              "valid_loss": metrics["valid_loss"][-1]["loss"],
              "train_loss": metrics["train_loss"], "train_seconds": metrics["train_seconds"],
              "steps": metrics["steps"], "precision": metrics["precision"],
              "answer_nll": [total for total, _ in nll]}
    print(f"{method}: lr {lr:g}: validation answer NLL {result['valid_nll']:.4f} per token, "
          f"{label} {score:.1f}%, validation loss {result['valid_loss']:.4f}")
    return result, {"answer_tokens": tokens, "groups": verdict.group_ids(run.valid_rows),
                    "score_metric": field, "score_label": label}


def lowest_nll(results: list[dict]) -> dict:
    """The finished rate with the lowest validation answer NLL (a tie goes to the lower rate)."""
    return min((r for r in results if not r["diverged"]), key=lambda r: (r["valid_nll"], r["lr"]))


def wider_rate(grid: list[float], best: float) -> float | None:
    """The rate a factor WIDEN_FACTOR beyond the end of grid that best sits at; None if interior."""
    if best == grid[0]:
        return round(grid[0] / WIDEN_FACTOR, 12)
    if best == grid[-1]:
        return round(grid[-1] * WIDEN_FACTOR, 12)
    return None


def paired_differences(results: list[dict], chosen: dict, shared: dict) -> None:
    """Add to each rate its NLL difference to the chosen rate, that difference's SE, near_tie.

    Both rates are scored on the same questions with the same answer tokens, so the
    difference of their ratios is one ratio, summed (nll_r - nll_chosen) over summed
    tokens.  Its SE is verdict.perplexity_interval's delta method
    (verdict.linearised_ratio), with the CR1 variance over fact groups
    (verdict.cluster_variance).  The SE, and so near_tie, is None where it cannot be
    estimated (one group); the chosen rate itself is no near tie.
    """
    import verdict  # only the search needs it

    tokens = np.asarray(shared["answer_tokens"], dtype=float)
    codes = verdict.group_codes(shared["groups"])
    reference = np.asarray(chosen["answer_nll"], dtype=float)
    for result in results:
        if result["diverged"]:
            result.update(nll_difference=None, nll_difference_se=None, near_tie=False)
        elif result is chosen:
            result.update(nll_difference=0.0, nll_difference_se=0.0, near_tie=False)
        else:
            paired = np.asarray(result["answer_nll"], dtype=float) - reference
            difference, linear = verdict.linearised_ratio(paired, tokens)
            variance, _ = verdict.cluster_variance(linear, codes)
            se = float(np.sqrt(variance)) if np.isfinite(variance) else None
            result.update(nll_difference=difference, nll_difference_se=se,
                          near_tie=None if se is None else difference <= NEAR_TIE_SE * se)


def search_learning_rate(settings: TrainSettings, method: str, prepare, load_kwargs: dict,
                         callbacks: tuple = ()) -> dict:
    """Train briefly at each rate of the grid and keep the one with the lowest validation NLL.

    A winner at an end of the grid widens it (wider_rate), until the winner is
    interior, MAX_WIDENINGS rates were added or the added rate diverged.  A rate whose
    run raises steps.Diverged is recorded as diverged (score and NLL null) and
    never chosen; when every rate of the grid diverges the search stops with one
    PipelineError.
    """
    initial = lr_grid(settings)
    results, shared, rank = [], None, runs.process_rank()
    for number, lr in enumerate(initial, start=1):
        print(f"{method}: learning-rate search {number}/{len(initial)}: lr {lr:g}, "
              f"{settings.search_epochs:g} epoch(s)")
        result, found = try_rate(settings, method, prepare, load_kwargs, callbacks, lr)
        results.append(result)
        shared = shared or found
    if shared is None:
        raise common.PipelineError(
            f"{method}: the learning-rate search diverged at every rate "
            f"({', '.join(f'{lr:g}' for lr in initial)}); try a lower --lr-grid")
    widened = []
    while len(widened) < MAX_WIDENINGS:
        best = lowest_nll(results)["lr"]
        lr = wider_rate(sorted(r["lr"] for r in results), best)
        if lr is None:
            break
        widened.append(lr)
        print(f"{method}: lr {best:g} is at the edge of the grid; widening it with lr {lr:g} "
              f"({len(widened)} of at most {MAX_WIDENINGS}), {settings.search_epochs:g} epoch(s)")
        result, _ = try_rate(settings, method, prepare, load_kwargs, callbacks, lr)
        results.append(result)
        if result["diverged"]:  # the rate beyond it diverged: the winner is interior now
            break
    results.sort(key=lambda r: r["lr"])
    grid = [r["lr"] for r in results]
    best = lowest_nll(results)
    paired_differences(results, best, shared)
    label, groups = shared["score_label"], len(set(shared["groups"]))
    search = {"method": method, "model": settings.model, "grid": grid, "initial_grid": initial,
              "widened": widened, "results": results, "chosen_lr": best["lr"],
              "metric": METRIC, "metric_label": METRIC_LABEL,
              "criterion": (
                  f"the lowest validation answer NLL, summed NLL / summed answer tokens over the "
                  f"{len(shared['groups'])} questions of valid.jsonl (scored as "
                  "evaluate.py scores eval.jsonl), because it is continuous and paired over the "
                  f"same questions, so its standard error is a fraction of {label}'s; "
                  f"{label} is shown, not used; near_tie marks rates within "
                  f"{NEAR_TIE_SE} standard errors of the chosen rate, the SE of the paired "
                  f"difference being cluster-robust (CR1) over {groups} fact groups (a row "
                  "without a group is its own)"),
              "score_metric": shared["score_metric"], "score_label": label,
              "answer_tokens": shared["answer_tokens"], "groups": shared["groups"],
              "split": "valid.jsonl", "search_epochs": settings.search_epochs,
              "precision": settings.precision,
              "budget": f"{settings.search_epochs:g} epoch(s) per rate, {len(grid)} rates, seed "
                        f"{settings.seed}", "edge": best["lr"] in (grid[0], grid[-1]),
              "diverged": [r["lr"] for r in results if r["diverged"]]}
    path = runpaths.search_file(settings.output_dir, method)
    if rank == 0:
        common.write_json(path, search)
    ties = [f"{r['lr']:g}" for r in results if r["near_tie"]]
    note = (f"; within {NEAR_TIE_SE} SE of it: lr {', '.join(ties)}" if ties else "")
    note += (f" (still at the edge of the grid after {len(widened)} widenings: a wider "
             "--lr-grid may do better)" if search["edge"] else "")
    print(f"{method}: chose lr {best['lr']:g} (validation answer NLL {best['valid_nll']:.4f} per "
          f"token, {label} {best['score']:.1f}%){note}; wrote {path}")
    return search


def previous_search(settings: TrainSettings, method: str) -> dict | None:
    """With --resume, a finished search of this model over the same grid and budget is reused.

    The grid compared is the one asked for (initial_grid), before any widening added to
    it.  A search that chose by another signal (key accuracy, before 2026-12-05) is not
    reused: its choice is not the one this search would make.
    """
    path = runpaths.search_file(settings.output_dir, method)
    if not path.exists():
        return None
    search = common.read_json(path)
    if search.get("metric") != METRIC:
        print(f"{method}: --resume: {path} chose by {search.get('metric')}, not by validation "
              "answer NLL; searching again")
        return None
    if (search.get("initial_grid", search["grid"]), search.get("search_epochs"),
            search.get("model"), search.get("precision", "fp32")) != (
            lr_grid(settings), settings.search_epochs, settings.model, settings.precision):
        return None
    print(f"{method}: --resume: using the finished learning-rate search in {path} "
          f"(lr {search['chosen_lr']:g})")
    return search


def remove_stale_seeds(output_dir: Path, method: str, keep: set[str]) -> None:
    """Delete <method>-seed<N>/ folders this run does not make, so no old seed is mixed in."""
    for folder in runpaths.seed_folders(output_dir, method):
        if folder.name not in keep:
            shutil.rmtree(folder)


def is_finished(paths: RunPaths, identity: str, seed: int) -> bool:
    """Whether a run's folder holds a completed run with this identity and seed."""
    if not runpaths.is_complete(paths.run):
        return False
    metrics = common.read_json(paths.metrics)
    return metrics.get("run_id") == identity and metrics["args"]["seed"] == seed


def resume_action(settings: TrainSettings, paths: RunPaths, identity: str,
                  any_finished: bool) -> str:
    """The resume rule, for one seed: "skip", "continue" or "start".

    Without --resume every seed starts.  With it, a seed whose folder holds this run's
    finished result (same run_id and seed) is skipped; the seed that was interrupted
    continues from the method's checkpoint; a seed never begun starts afresh.  With
    nothing finished and no checkpoint, the first seed "continues", so start_run says
    there is nothing to resume.
    """
    if not settings.resume:
        return "start"
    if is_finished(paths, identity, settings.seed):
        return "skip"
    if checkpoints.listed(paths) or not any_finished:
        return "continue"
    return "start"


def choose_rate(settings: TrainSettings, method: str, prepare, load_kwargs: dict,
                callbacks: tuple) -> dict | None:
    """With --tune-lr, the search (a finished one reused under --resume); else None."""
    if settings.search_only and not settings.tune_lr:
        raise common.PipelineError("--search-only needs --tune-lr (there is no search to run)")
    if not settings.tune_lr:
        return None
    search = previous_search(settings, method) if settings.resume else None
    return search or search_learning_rate(settings, method, prepare, load_kwargs, callbacks)


def train_method(settings: TrainSettings, method: str, prepare, callbacks: tuple = (),
                 **load_kwargs) -> list[dict]:
    """Optionally search the rate, then train and save one run per seed; returns their metrics.

    prepare(model, settings) -> (model, details) applies the method to a freshly
    loaded base model; load_kwargs go to models.load_model (quantize_4bit=True);
    callbacks run after every step (runs.Callback).
    """
    if load_kwargs.get("quantize_4bit") and runs.sharding_requested():
        raise common.PipelineError("QLoRA under FSDP needs the 4-bit weights stored in the "
                                   "compute dtype (bnb_4bit_quant_storage), which "
                                   "models.nf4_config does not set and no test here covers; "
                                   "run finetune_qlora.py without configs/fsdp.yaml")
    if method not in SHARDABLE and runs.sharding_requested():
        raise common.PipelineError(f"{method} under FSDP is untried here (tests/test_fsdp.py "
                                   "shards full fine-tuning and LoRA); run it without "
                                   "configs/fsdp.yaml")
    main_process = runs.process_rank() == 0
    # One process at a time writes a method's runs (rank 0 holds the lock for all ranks).
    with runpaths.method_lock(RunPaths(settings.output_dir, method), take=main_process):
        settings = runs.resolve(settings)  # the model, device and precision, once
        extra = {"model_requested": settings.model_requested}
        search = choose_rate(settings, method, prepare, load_kwargs, callbacks)
        if search is not None:
            if settings.search_only:
                return []
            settings = settings.replace(lr=search["chosen_lr"])
            extra["lr_search"] = {k: search[k] for k in ("grid", "chosen_lr", "metric", "budget")}
        seeds = [settings.seed + i for i in range(settings.seeds)]
        seed_paths = [RunPaths(settings.output_dir, method, runpaths.run_name(method, i, seed))
                      for i, seed in enumerate(seeds)]
        if main_process:
            remove_stale_seeds(Path(settings.output_dir), method, {p.name for p in seed_paths})
        identity = run_id(settings, method)
        # Under --resume a search (reused, or run now) is work done: with no checkpoint the
        # first seed starts afresh instead of stopping with "nothing to resume"
        searched = settings.resume and search is not None
        finished = []
        for number, (paths, seed) in enumerate(zip(seed_paths, seeds), start=1):
            if settings.seeds > 1:
                print(f"{method}: seed {seed} ({number} of {len(seeds)}) -> {paths.run}/")
            seed_settings = settings.replace(seed=seed)
            action = resume_action(seed_settings, paths, identity, bool(finished) or searched)
            if action == "skip":
                print(f"{method}: {paths.run}/ is already complete; skipped")
                finished.append(common.read_json(paths.metrics))
                continue
            finished.append(train_run(seed_settings.replace(resume=action == "continue"),
                                      method, prepare, paths.name, load_kwargs,
                                      {**extra, "run_id": identity}, callbacks))
        return finished
