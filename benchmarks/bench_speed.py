"""Speed and memory: this project against the original recipe, TRL's SFTTrainer and an earlier commit, in one run.

    python benchmarks/bench_speed.py                  # about 25 minutes on 2 idle cores
    python benchmarks/bench_speed.py --quick          # tiny sizes: checks that everything runs
    python benchmarks/bench_speed.py --compare-ref HEAD~1        # also the previous commit's step
    python benchmarks/bench_speed.py --data-dir data --eval-model outputs/full   # a tuned model's eval
    python benchmarks/bench_speed.py --smollm2        # plus training speed on smollm2-135m
    python benchmarks/bench_speed.py --only training --precisions bf16   # a shorter look
    python benchmarks/bench_speed.py --device cuda --precisions bf16 --shape smollm2-135m \
        --only training --json gpu.json                                  # on a GPU

Each configuration runs in its own Python process (dispatch.py, workers.py),
so that one's peak memory and warm caches never pollute another's:
  training   the original recipe (Trainer-equivalent loop, every example padded
             to 128 tokens, batch 2, labels = input ids, logits over the whole
             vocabulary everywhere), this project's (training.Trainer's step,
             batch 16 padded to its longest, length-grouped batches, the LM head
             at answer positions only; each model prepared by its script's
             prepare()), TRL's SFTTrainer at its best settings and with its
             defaults (trl_runs.py; pip install --no-deps -r
             benchmarks/requirements.txt), and with --compare-ref the same worker
             of an earlier commit: non-pad tokens per second, seconds per 100
             examples, model-FLOP utilisation, peak memory.  Ours and TRL run at
             each of --precisions (fp32, bf16 autocast), compared at equal
             precision; the original runs at its only precision, fp32, and is
             compared with ours at our default (--precision auto);
  evaluation the original's one question at a time with 50 free-running new
             tokens against generation.generate_answers (batched, stopping):
             questions per second, peak memory, on the distilgpt2-shaped model and
             on smollm2-135m untuned, or on a fine-tuned model (--eval-model);
  peak       the matrix-multiply rate of this device in each precision
             (2048x2048, median), at the start and end of the run;
  memory     this project's full / LoRA / QLoRA / BitFit on smollm2-135m with the
             same batches: the process's peak beside what torch's tensors needed
             (MemTracker), by kind.
The training comparison uses a model with random weights of --shape
(distilgpt2's or smollm2-135m's: the same arithmetic as the real one) and the
smollm2-135m tokenizer, so token lengths are realistic.  --device cuda runs
every part on the GPU, each timer reading after torch.cuda.synchronize().  Every configuration is warmed up, then timed --repeats
times; tables give medians with [min-max], and ratios are computed per repeat
pair, then the median taken.  Writes benchmarks/results.md and results.json
(or --output and --json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_render import render  # noqa: E402
from bench_summary import (METHODS, PRECISIONS, TRL_METHODS, peak_flops,  # noqa: E402
                           summarise_eval, summarise_memory, summarise_training, target_checks,
                           train_label)
from dispatch import worker_main  # noqa: E402
from workers import ORIGINAL_BATCH, log  # noqa: E402

# --- The models -----------------------------------------------------------------
# Random weights in a named shape (shapes.py) cost the same arithmetic as trained ones.
TRAIN_SHAPES = ("distilgpt2", "smollm2-135m", "gpt2-tiny")
PARTS = ("training", "evaluation", "memory")


# =============================================================================
# Parent: data, model and plan
# =============================================================================


def make_data(folder: Path, size: int) -> Path:
    """Generate, format and split a data set with the project's own scripts."""
    py = sys.executable
    folder.mkdir(parents=True, exist_ok=True)
    for cmd in ([py, "generate_dataset.py", "--size", str(size), "--output",
                 str(folder / "qa_pairs.jsonl")],
                [py, "format_dataset.py", "--input", str(folder / "qa_pairs.jsonl"),
                 "--output", str(folder / "formatted.jsonl")],
                [py, "split_dataset.py", "--input", str(folder / "formatted.jsonl"),
                 "--output-dir", str(folder)]):
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder


def settings_from(args, default_precision: str) -> dict:
    """The run's sizes: the options, or tiny ones with --quick."""
    shared = {"batch_size": args.batch_size, "threads": args.threads,
              "eval_repeats": 1 if args.quick else args.eval_repeats,
              "trl": args.trl and trl_available(), "trl_defaults_limit": args.trl_defaults_limit,
              "device": args.device, "precisions": args.precisions,
              "default_precision": default_precision, "parts": args.only or list(PARTS),
              "quick": args.quick,
              "shapes": ["gpt2-tiny" if args.quick and shape == "distilgpt2" else shape
                         for shape in args.shape],
              "compile": args.compile}
    if args.quick:
        # The real-model section reuses the tiny model unless one is named.
        return {**shared, "repeats": 1, "steps": 1, "steps_original": 2,
                "warmup": 1, "questions": 4, "data_size": 300, "matmul_size": 512,
                "matmul_runs": 5, "matmul_end": False, "real_model": args.real_model}
    return {**shared, "repeats": args.repeats, "steps": args.steps,
            "steps_original": args.steps_original, "warmup": args.warmup,
            "questions": args.eval_questions, "data_size": args.data_size,
            "matmul_size": 2048, "matmul_runs": 10, "matmul_end": True,
            "real_model": args.real_model or "smollm2-135m"}


def eval_configs(s: dict, key: str, model_dir: str, data_dir: str) -> list[tuple[str, dict]]:
    """Both evaluation paths on one model, each at its default precision (evaluate.py's is auto)."""
    if "evaluation" not in s["parts"]:
        return []
    return [(f"{key}/eval/{recipe}",
             {"task": "eval", "recipe": recipe, "model_dir": model_dir, "data_dir": data_dir,
              "questions": s["questions"], "repeats": s["eval_repeats"],
              "threads": s["threads"], "device": s["device"],
              "precision": s["default_precision"] if recipe == "ours" else "fp32"})
            for recipe in ("original", "ours")]


def trl_available() -> bool:
    """Whether TRL is installed (pip install --no-deps -r benchmarks/requirements.txt)."""
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def matmul_configs(s: dict, when: str) -> list[tuple[str, dict]]:
    """The matmul peak of each precision compared, at one point of the run."""
    # One 2048x2048 product takes tens of microseconds on a GPU, about the cost of a
    # launch and a sync, so there each reading times 50 of them; on a CPU, one.
    inner = 50 if s["device"] == "cuda" else 1
    return [(f"matmul/{when}/{dtype}",
             {"task": "matmul", "size": s["matmul_size"], "runs": s["matmul_runs"],
              "inner": inner, "threads": s["threads"], "device": s["device"], "dtype": dtype})
            for dtype in s["precisions"]]


def train_configs(s: dict, key: str, model_dir: str, data_dir: str, methods: list[str],
                  previous: str | None) -> list[tuple[str, dict]]:
    """The training comparison on one model; the recipes alternate per method.

    Per method: the original (fp32, its only precision), then ours and TRL at each
    precision, side by side; the previous commit's worker beside ours at fp32.
    """
    base = {"task": "train", "model_dir": model_dir, "data_dir": data_dir, "device": s["device"],
            "repeats": s["repeats"], "warmup": s["warmup"], "threads": s["threads"]}
    plan = []
    for method in methods:
        if method != "qlora":  # the original's "QLoRA" is its LoRA run (it never quantised)
            plan.append((train_label(key, "original", method),
                         {**base, "recipe": "original", "method": method, "precision": "fp32",
                          "steps": s["steps_original"], "batch_size": ORIGINAL_BATCH}))
        for precision in s["precisions"]:
            ours = {**base, "recipe": "ours", "method": method, "steps": s["steps"],
                    "batch_size": s["batch_size"], "precision": precision}
            plan.append((train_label(key, "ours", method, precision), ours))
            if previous and precision == "fp32":  # that commit's worker, from its own checkout
                plan.append((train_label(key, "previous", method), {**ours, "root": previous}))
            if s["trl"] and method in TRL_METHODS:
                plan.append((train_label(key, "trl", method, precision),
                             {**ours, "task": "trl", "preset": "best"}))
    if s["trl"] and "full" in methods:  # what a newcomer gets: one capped run
        plan.append((train_label(key, "trl-defaults", "full"),
                     {**base, "task": "trl", "preset": "defaults", "method": "full",
                      "warmup": 1, "steps": 1, "repeats": 1, "batch_size": s["batch_size"],
                      "time_limit_s": s["trl_defaults_limit"]}))
    return plan


def build_plan(s: dict, methods: list[str], models: dict[str, str], data_dir: str,
               real: tuple[str, str] | None, tuned: tuple[str, str] | None,
               previous: str | None = None) -> list[tuple[str, dict]]:
    """The workers to run, in order: (label, config).

    models get the whole comparison (the original recipe, ours, the previous
    commit's code when given, TRL); real the memory table (and an evaluation
    unless a tuned model is given); tuned an evaluation.  Parts left out of
    s["parts"] (--only) are not planned.
    """
    training = "training" in s["parts"]  # the matmul peaks serve its utilisation only
    plan = matmul_configs(s, "start") if training else []
    for key, model_dir in models.items():
        if training:
            plan += train_configs(s, key, model_dir, data_dir, methods, previous)
        plan += eval_configs(s, key, model_dir, data_dir)
    if training and s.get("compile"):
        # Ours compiled, after everything else: compiling takes tens of seconds a
        # configuration, so a --time-limit cuts these first.
        plan += [(label.replace("/train/ours/", "/train/ours-compiled/"),
                  {**config, "compile": s["compile"]})
                 for label, config in list(plan) if "/train/ours/" in label]
    if real is not None and "memory" in s["parts"]:
        # Memory: the longest batch twice (AdamW state, then the real peak), one more step
        key, model_dir = real
        memory = {"task": "memory", "model_dir": model_dir, "data_dir": data_dir, "steps": 1,
                  "repeats": 1, "warmup": 2, "batch_size": s["batch_size"],
                  "threads": s["threads"], "device": s["device"],
                  "precision": s["default_precision"]}
        for method in methods:
            plan.append((f"{key}/memory/{method}", {**memory, "method": method}))
    if real is not None and tuned is None and real[0] not in models:
        plan += eval_configs(s, *real, data_dir)  # a pretrained model's answers stop sometimes
    if tuned is not None:  # a fine-tuned model stops after its answer, as in evaluate.py
        plan += eval_configs(s, *tuned, data_dir)
    if s["matmul_end"] and training:
        plan += matmul_configs(s, "end")
    return plan


def real_model(s: dict, main: tuple[str, str]) -> tuple[str, str] | None:
    """(key, folder) of the pretrained model for the memory table and an evaluation, or None.

    None when neither part runs (--only training), with --real-model none, or when
    it cannot be found (the rest of the benchmark still stands).  --quick without a
    --real-model uses the main (tiny) model.
    """
    import common
    import models

    if not {"evaluation", "memory"} & set(s["parts"]) or s["real_model"] == "none":
        return None
    if s["real_model"] is None:
        return main
    try:
        return Path(s["real_model"]).name, models.resolve_model(s["real_model"])
    except common.PipelineError as exc:
        log(f"skipping the memory table on {s['real_model']}: {exc}")
        return None


def checkout(rev: str, folder: Path) -> Path:
    """A detached git worktree of rev (removed again at the end of the run)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), rev], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def unfinished(workers: dict) -> tuple[list[str], list[str]]:
    """The configurations --time-limit cut or skipped, and those that failed.

    A cut is what the caller asked for, so only a failure makes the exit status 1.
    """
    cut = [label for label, w in workers.items() if w.get("error", "").endswith("--time-limit")]
    failed = [label for label, w in workers.items() if "error" in w and label not in cut]
    return cut, failed


def run_worker(label: str, config: dict, index: int, count: int,
               timeout: float | None = None) -> dict:
    """Run one configuration in a fresh Python process; its JSON result, or an error record."""
    log(f"[{index}/{count}] {label}")
    started = time.perf_counter()
    root = Path(config.get("root", ROOT))  # another commit's checkout runs its own worker
    try:
        proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_speed.py"),
                               "--worker", json.dumps(config)], cwd=root, stdout=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"    STOPPED at the time limit after {timeout:.0f} s")
        return {"config": config, "error": "stopped at --time-limit", "wall_s": timeout}
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        log(f"    FAILED (exit {proc.returncode}) after {wall:.0f} s")
        return {"config": config, "error": f"exit status {proc.returncode}", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    log(f"    done in {wall:.0f} s")
    return result


# =============================================================================
# Parent: the machine
# =============================================================================


def cpu_times() -> tuple[int, int]:
    """(all, idle) CPU time so far, summed over cores, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy over a short wait while none of ours runs: other work on the machine."""
    total0, idle0 = cpu_times()
    time.sleep(seconds)
    total1, idle1 = cpu_times()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def library_versions() -> dict:
    """Python's and the libraries' versions, as installed where this process looks."""
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl",
                 "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return versions


def hardware(device) -> dict:
    """CPU model, core count, the GPU on CUDA and library versions (torch threads come from the workers)."""
    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    out = {"cpu": model, "cores": os.cpu_count(), "versions": library_versions(),
           "niceness": os.nice(0), "cpu_busy_start": cpu_busy()}
    if device.type == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# =============================================================================
# Main
# =============================================================================


def default_output(args) -> Path:
    """benchmarks/results.md for the whole CPU run, else a name saying what differs from it."""
    parts = (["quick"] if args.quick else []) + ([args.device] if args.device != "cpu" else [])
    parts += [] if args.shape == ["distilgpt2"] else args.shape
    parts += ["compile"] if args.compile else []
    parts += args.only or []
    return Path(__file__).parent / ("-".join(["results", *parts]) + ".md")


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--repeats", type=int, default=3,
        help="timed repeats per configuration (default 3: medians and a spread)")
    add("--steps", type=int, default=3,
        help="this project's timed steps per repeat, batch 16 (default 3: ~3 s each here)")
    add("--steps-original", type=int, default=6,
        help="the original's timed steps per repeat, batch 2 (default 6: ~3 s each for full "
             "fine-tuning here, so both sides time 10-20 s per repeat)")
    add("--warmup", type=int, default=2,
        help="untimed steps first (default 2: the first allocates AdamW's state, the second "
             "reaches the steady peak)")
    add("--batch-size", type=int, default=16, help="this project's batch (default 16, its default)")
    add("--eval-questions", type=int, default=64,
        help="questions both evaluation paths answer (default 64: one batch of evaluate.py's)")
    add("--eval-repeats", type=int, default=2,
        help="timed repeats of each evaluation (default 2: the original answers one question "
             "in 2-4 s, so each repeat of it takes minutes)")
    add("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora,bitfit")
    add("--precisions", default=",".join(PRECISIONS),
        help="comma-separated subset of fp32,bf16: the precisions ours and TRL are compared at, "
             "and whose matmul peaks are measured (default both; bf16 is autocast over fp32 "
             "weights, as --precision bf16 trains)")
    add("--device", choices=("cpu", "cuda"), default="cpu",
        help="where every worker trains, evaluates and multiplies (default cpu; on cuda each "
             "timer reading waits for torch.cuda.synchronize())")
    add("--shape", default="distilgpt2",
        help="comma-separated shapes of the random-weight training models, each compared in "
             f"full (of {', '.join(TRAIN_SHAPES)}; default distilgpt2, 82 M parameters; "
             "smollm2-135m is a Llama of 135 M, slower here; gpt2-tiny, 2x64, is so small "
             "that a step is bound by per-operation overhead, as a small model's is on a GPU). "
             "--quick uses gpt2-tiny for distilgpt2")
    add("--tokenizer", default=None,
        help="the shapes' tokenizer folder (default: the converted smollm2-135m preset's; "
             "its tokenizer files suffice)")
    add("--compile", default=None, choices=("default", "reduce-overhead"),
        help="also time ours with --compile MODE beside ours uncompiled and TRL (compilation "
             "and CUDA-graph recording happen in the warm-up, which covers every timed batch "
             "once)")
    add("--only", choices=PARTS, action="append", default=None,
        help="run only this part (repeatable; default all): training skips the evaluation "
             "and memory parts, which take most of a full run's time")
    add("--smollm2", action="store_true",
        help="also run the training comparison on smollm2-135m (adds roughly 8 minutes, "
             "estimated: the original recipe's steps on it take several seconds each)")
    add("--real-model", default=None,
        help="pretrained model (preset, folder or .gguf) for the memory table and, unless "
             "--eval-model is given, a second evaluation (default smollm2-135m; with --quick "
             "the tiny model; 'none' to skip both)")
    add("--eval-model", default=None,
        help="a fine-tuned full-model folder (e.g. outputs/full or outputs/bitfit from a finished "
             "run, trained on data like --data-dir's) for the second evaluation: its answers "
             "stop after the answer, as in evaluate.py, where an untuned model often rambles to "
             "the bound (default: evaluate --real-model untuned)")
    add("--compare-ref", default=None, metavar="REV",
        help="also time the training step of this git commit (e.g. HEAD~1), checked out in a "
             "temporary worktree, side by side with this one at fp32 (an earlier commit's "
             "worker may know no other precision; so it needs fp32 among --precisions)")
    add("--no-trl", dest="trl", action="store_false",
        help="skip TRL's SFTTrainer (it runs when installed: "
             "pip install --no-deps -r benchmarks/requirements.txt)")
    add("--trl-defaults-limit", type=int, default=300,
        help="seconds allowed to TRL with its defaults (default 300; on a CPU it is very slow)")
    add("--threads", type=int, default=None,
        help="torch threads in every worker (default: torch's own choice, all cores)")
    add("--data-dir", default=None,
        help="folder with train.jsonl, eval.jsonl, template.json (default: generate one with "
             "--data-size rows into a temporary folder)")
    add("--data-size", type=int, default=1300, help="rows to generate when no --data-dir")
    add("--quick", action="store_true",
        help="tiny model, one repeat, one or two steps: checks the code in a minute or two")
    add("--output", default=None,
        help="markdown report, with the same name .json beside it unless --json says "
             "otherwise (default benchmarks/results.md for the whole run on the CPU; "
             "otherwise named for what differs, e.g. results-quick.md, results-cuda-training.md, "
             "so a partial or smoke run never overwrites the published results)")
    add("--json", default=None, metavar="PATH",
        help="where to write every result as JSON (default: --output's name with .json)")
    add("--time-limit", type=float, default=None, metavar="SECONDS",
        help="stop starting (and stop) workers once this many seconds have passed, and report "
             "what was measured; the compiled configurations come last, so they are what a "
             "limit cuts first (default: no limit)")
    add("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "steps_original", "warmup", "batch_size", "eval_questions",
                 "eval_repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_model and not (Path(args.eval_model) / "config.json").exists():
        parser.error(f"--eval-model {args.eval_model}: not a model folder (no config.json); "
                     "adapters (outputs/lora, outputs/qlora) need their base, give a full model")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: expected some of {', '.join(METHODS)}")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions: expected some of {', '.join(PRECISIONS)}")
    args.precisions = list(dict.fromkeys(args.precisions))  # once each, in the order given
    args.shape = list(dict.fromkeys(part.strip() for part in args.shape.split(",") if part.strip()))
    if not args.shape or set(args.shape) - set(TRAIN_SHAPES):
        parser.error(f"--shape: expected some of {', '.join(TRAIN_SHAPES)}")
    if args.only:
        args.only = list(dict.fromkeys(args.only))
    if args.compare_ref and "fp32" not in args.precisions:
        parser.error("--compare-ref compares at fp32: add fp32 to --precisions")
    return args


def main(args) -> None:
    """Prepare data and model, run every configuration in its own process, write the report."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here needs the network; never wait on it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import common
    import models

    device = models.pick_device(args.device)  # a clear error when CUDA is asked for and absent
    # What --precision auto gives here: ours is compared with the original at it
    default_precision = models.resolve_precision(device, "auto", announce=False)
    started, s = time.time(), settings_from(args, default_precision)
    report = {"command": "python " + shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "hardware": hardware(device), "settings": s}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        tmp = Path(tmp)
        # Data and models: generated here, identical for every configuration
        if args.data_dir:
            data_dir = Path(args.data_dir).resolve()
            report["data"] = f"{data_dir} (given)"
        else:
            log(f"generating {s['data_size']} rows with the project's data scripts ...")
            data_dir = make_data(tmp / "data", s["data_size"])
            report["data"] = f"generate_dataset.py --size {s['data_size']}, formatted and split"
        n_train = len(common.load_split(data_dir, "train"))
        n_eval = len(common.load_split(data_dir, "eval"))
        report["data"] += f": {n_train} train, {n_eval} eval rows"
        import shapes

        tokenizer = args.tokenizer or shapes.default_tokenizer()
        train_models = {}
        for shape in s["shapes"]:
            log(f"building the {shape}-shape model (random weights, "
                f"{shapes.TOKENIZER_PRESET} tokenizer) ...")
            train_models[f"{shape}-shape"] = str(shapes.build(shape, tokenizer, tmp / shape))
        main_key = next(iter(train_models))
        if args.smollm2:
            train_models["smollm2-135m"] = models.resolve_model("smollm2-135m")
        tuned = None
        if args.eval_model:
            tuned = (f"tuned-{Path(args.eval_model).name}", str(Path(args.eval_model).resolve()))
        real = real_model(s, (main_key, train_models[main_key]))

        previous = None
        if args.compare_ref:
            previous = checkout(args.compare_ref, tmp / "previous")
            report["previous"] = f"{args.compare_ref} = " + subprocess.run(
                ["git", "log", "-1", "--format=%h %s", args.compare_ref], cwd=ROOT,
                capture_output=True, text=True, check=True).stdout.strip()
        if not s["trl"] and args.trl:
            log("TRL is not installed: pip install --no-deps -r benchmarks/requirements.txt")

        # Every configuration in its own process
        plan = build_plan(s, args.methods, train_models, str(data_dir), real, tuned,
                          str(previous) if previous else None)
        workers = {}
        for i, (label, config) in enumerate(plan, start=1):
            left = args.time_limit - (time.time() - started) if args.time_limit else None
            if left is not None and left < 5:
                log(f"[{i}/{len(plan)}] {label}: skipped, --time-limit reached")
                workers[label] = {"config": config, "error": "skipped at --time-limit"}
                continue
            workers[label] = run_worker(label, config, i, len(plan), timeout=left)
            log(f"    elapsed {(time.time() - started) / 60:.1f} min")

        if previous:
            subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT,
                           check=False)

    # Summary and report
    report["hardware"]["cpu_busy_end"] = cpu_busy()
    report["workers"] = workers
    peak = peak_flops(workers)
    memory_key = real[0] if real and "memory" in s["parts"] else None
    eval_keys = [k for k in (*train_models, memory_key, tuned[0] if tuned else None)
                 if k and any(label.startswith(f"{k}/eval/") for label in workers)]
    eval_keys = list(dict.fromkeys(eval_keys))
    summary = {"peak_flops": peak, "precisions": s["precisions"],
               "default_precision": default_precision,
               "training": {k: summarise_training(workers, k, args.methods, s["precisions"],
                                                  default_precision, peak)
                            for k in train_models} if "training" in s["parts"] else {},
               "evaluation": {k: summarise_eval(workers, k) for k in eval_keys},
               "memory": {memory_key: summarise_memory(workers, memory_key, args.methods)}
               if memory_key else {}}
    summary["targets"] = target_checks(summary, main_key, memory_key)
    report["summary"], report["wall_s"] = summary, time.time() - started
    report["main_key"] = main_key
    output = Path(args.output) if args.output else default_output(args)
    json_path = Path(args.json) if args.json else output.with_suffix(".json")
    common.write_json(json_path, report)
    common.write_text_atomic(output, render(report) + "\n")
    log(f"wrote {output} and {json_path} in {report['wall_s'] / 60:.1f} min")
    for target, measured, met in summary["targets"]:
        log(f"  {'MET ' if met else 'n/a ' if met is None else 'MISS'} {target}: {measured}")
    cut, failed = unfinished(workers)
    if cut:
        log(f"  --time-limit cut {len(cut)} configuration(s): {', '.join(cut)}")
    if failed:
        sys.exit(1)  # the report is written; say that part of it failed


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker is not None:
        worker_main(cli.worker)
    else:
        import common

        common.run_main(main, cli)
