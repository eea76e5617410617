"""Training and evaluation speed: this project against the original recipe and TRL's SFTTrainer.

    pip install --no-deps -r benchmarks/requirements.txt      # TRL, for its side
    python benchmarks/bench.py --only training --data-dir data  # the training comparison
    python benchmarks/bench.py --data-dir data --eval-model outputs/full   # and evaluation
    python benchmarks/bench.py --quick                          # tiny sizes: checks that it runs

Each configuration runs in its own process (bench_workers.py), warmed up, then timed
--repeats times.  Training, per method: the original recipe (fp32), ours and TRL at its best
settings at each of --precisions, on a random-weight model of a named shape: non-pad tokens
per second, s/100 examples, padding, peak memory.  Evaluation: the original's one question
at a time against ours, questions per second.  Tables give medians [min-max]; ratios are
taken per repeat pair.  benchmarks/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_workers import ORIGINAL_BATCH, build_shape, default_tokenizer, log  # noqa: E402

METHODS = ("full", "lora", "qlora", "bitfit")
TRL_METHODS = ("full", "lora", "qlora")  # TRL's SFTTrainer has no BitFit
PRECISIONS = ("fp32", "bf16")
SHAPES = ("distilgpt2", "smollm2-135m", "gpt2-tiny")
PARTS = ("training", "evaluation")


# --- The plan -----------------------------------------------------------------------


def train_label(key: str, recipe: str, method: str, precision: str | None = None) -> str:
    """A training worker's label (the original has one precision)."""
    return f"{key}/train/{recipe}/{method}" + (f"/{precision}" if precision else "")


def train_configs(s: dict, key: str, model_dir: str, data_dir: str) -> list[tuple[str, dict]]:
    """Per method the original (fp32), then ours and TRL at each precision, side by side."""
    base = {"task": "train", "model_dir": model_dir, "data_dir": data_dir, "device": s["device"],
            "repeats": s["repeats"], "warmup": s["warmup"]}
    plan = []
    for method in s["methods"]:
        if method != "qlora":  # the original's "QLoRA" is its LoRA run (it never quantised)
            plan.append((train_label(key, "original", method),
                         {**base, "recipe": "original", "method": method, "precision": "fp32",
                          "steps": s["steps_original"], "batch_size": ORIGINAL_BATCH}))
        for precision in s["precisions"]:
            ours = {**base, "recipe": "ours", "method": method, "steps": s["steps"],
                    "batch_size": s["batch_size"], "precision": precision}
            plan.append((train_label(key, "ours", method, precision), ours))
            if s["trl"] and method in TRL_METHODS:
                plan.append((train_label(key, "trl", method, precision), {**ours, "task": "trl"}))
    return plan


def eval_configs(s: dict, key: str, model_dir: str, data_dir: str) -> list[tuple[str, dict]]:
    """Both evaluation paths on one model, each at its default precision (evaluate.py's is auto)."""
    return [(f"{key}/eval/{recipe}",
             {"task": "eval", "recipe": recipe, "model_dir": model_dir, "data_dir": data_dir,
              "questions": s["questions"], "repeats": s["eval_repeats"], "device": s["device"],
              "precision": s["default_precision"] if recipe == "ours" else "fp32"})
            for recipe in ("original", "ours")]


def build_plan(s: dict, models: dict[str, str], data_dir: str,
               eval_model: tuple[str, str] | None) -> list[tuple[str, dict]]:
    """The workers to run, in order: (label, config); parts left out by --only are not planned."""
    plan = []
    for key, model_dir in models.items():
        if "training" in s["parts"]:
            plan += train_configs(s, key, model_dir, data_dir)
    if "evaluation" in s["parts"]:
        first = next(iter(models.items()))
        for key, model_dir in [first] + ([eval_model] if eval_model else []):
            plan += eval_configs(s, key, model_dir, data_dir)
    return plan


# --- Running ------------------------------------------------------------------------


def make_data(folder: Path, size: int) -> Path:
    """Generate, format and split a data set with the project's own scripts."""
    py = sys.executable
    for cmd in ([py, "generate_dataset.py", "--size", str(size), "--output",
                 str(folder / "qa_pairs.jsonl")],
                [py, "format_dataset.py", "--input", str(folder / "qa_pairs.jsonl"),
                 "--output", str(folder / "formatted.jsonl")],
                [py, "split_dataset.py", "--input", str(folder / "formatted.jsonl"),
                 "--output-dir", str(folder)]):
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder


def run_worker(label: str, config: dict) -> dict:
    """One configuration in a fresh Python process; its JSON result, or an error record."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_workers.py"),
                           json.dumps(config)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        log(f"    {label}: FAILED (exit {proc.returncode})")
        return {"config": config, "error": f"exit status {proc.returncode}"}
    log(f"    {label}: done in {time.perf_counter() - started:.0f} s")
    return json.loads(lines[-1])


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy over a short wait while none of ours runs: other work on the machine."""
    def times():
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # idle + iowait

    total0, idle0 = times()
    time.sleep(seconds)
    total1, idle1 = times()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def hardware(device) -> dict:
    """The CPU, core count, GPU on CUDA, and library versions where this process looks."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = {"gpu": __import__("torch").cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions, **gpu}


# --- Summary: rates and ratios from the workers' results ------------------------------


def median_spread(values: list[float]) -> dict:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def pair_ratios(numerators: list[float], denominators: list[float]) -> dict | None:
    """numerator/denominator per repeat pair (repeat i with repeat i), then median and spread."""
    pairs = [a / b for a, b in zip(numerators, denominators) if b]
    return median_spread(pairs) if pairs else None


def training_stats(worker: dict | None) -> dict | None:
    """Medians of one training worker's per-repeat rates, and its tokens/s per repeat."""
    if not worker or "error" in worker or not worker.get("repeats"):
        return None
    reps = worker["repeats"]
    tokens = [r["tokens_per_s"] for r in reps]
    return {"tokens_per_s": median_spread(tokens), "per_repeat_tokens_per_s": tokens,
            "s_per_100": median_spread([r["s_per_100_examples"] for r in reps]),
            "pad_share": median_spread([1 - r["real_tokens"] / r["padded_tokens"] for r in reps]),
            "peak_mb": worker["peak_bytes"] / 1e6, "problems": worker.get("problems", [])}


def speedup(ours: dict | None, other: dict | None) -> dict | None:
    """Ours' tokens/s over another recipe's, per repeat pair, when both were measured."""
    return pair_ratios(ours["per_repeat_tokens_per_s"],
                       other["per_repeat_tokens_per_s"]) if ours and other else None


def summarise_training(workers: dict, key: str, methods: list[str], precisions: list[str],
                       default: str) -> dict:
    """Per method every recipe's rates and ours' speed-ups."""
    rows = []
    for method in methods:
        original_is = "lora" if method == "qlora" else method  # the original never quantised
        row = {"method": method, "original_is": original_is, "default_precision": default,
               "original": training_stats(workers.get(train_label(key, "original", original_is))),
               **{recipe: {p: training_stats(workers.get(train_label(key, recipe, method, p)))
                           for p in precisions} for recipe in ("ours", "trl")}}
        row["vs_trl"] = {p: speedup(row["ours"][p], row["trl"][p]) for p in precisions}
        row["vs_original"] = speedup(row["ours"].get(default), row["original"])
        rows.append(row)
    return {"rows": rows}


def summarise_eval(workers: dict, key: str) -> dict | None:
    """Questions per second of both recipes and the per-pair speed-up."""
    orig, ours = workers.get(f"{key}/eval/original"), workers.get(f"{key}/eval/ours")
    if not orig or not ours or "error" in orig or "error" in ours:
        return None
    out = {name: {"questions_per_s": median_spread(w["questions_per_s"]),
                  "peak_mb": w["peak_bytes"] / 1e6} for name, w in (("original", orig),
                                                                   ("ours", ours))}
    out["speedup"] = pair_ratios(ours["questions_per_s"], orig["questions_per_s"])
    return out


# --- The report -----------------------------------------------------------------------


def fmt(stat: dict | None, spec: str = ".1f", unit: str = "") -> str:
    """'median [min-max]' of a median_spread dict, or n/a."""
    if not stat:
        return "n/a"
    if stat["n"] == 1:
        return f"{stat['median']:{spec}}{unit}"
    return f"{stat['median']:{spec}}{unit} [{stat['min']:{spec}}-{stat['max']:{spec}}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def speed_table(training: dict, precisions: list[str]) -> list[str]:
    """Per method every recipe's non-pad tokens per second and ours' speed-ups."""
    rows = training["rows"]
    default = rows[0]["default_precision"] if rows else "fp32"
    tok = lambda stats: fmt((stats or {}).get("tokens_per_s"), ".0f")  # noqa: E731
    header = (["method", "original tok/s (fp32)"] + [f"TRL {p} tok/s" for p in precisions]
              + [f"ours {p} tok/s" for p in precisions]
              + [f"ours / TRL at {p}" for p in precisions] + [f"ours ({default}) / original"])
    return table(header, [
        [r["method"] + (" (original = its LoRA)" if r["original_is"] != r["method"] else ""),
         tok(r["original"]), *(tok(r["trl"][p]) for p in precisions),
         *(tok(r["ours"][p]) for p in precisions),
         *(fmt(r["vs_trl"][p], ".2f", "x") for p in precisions),
         fmt(r["vs_original"], ".2f", "x")] for r in rows])


def detail_table(training: dict, precisions: list[str]) -> list[str]:
    """Per method, recipe and precision: seconds per 100 examples, padding, peak memory."""
    out = []
    for row in training["rows"]:
        runs = [("original", "fp32", row["original"])]
        runs += [(recipe, p, row[recipe][p]) for recipe in ("trl", "ours") for p in precisions]
        out += [[row["method"], recipe, p, fmt(stats["s_per_100"]),
                 fmt(stats["pad_share"], ".0%"), f"{stats['peak_mb']:.0f}",
                 "; ".join(stats["problems"]) or "-"]
                for recipe, p, stats in runs if stats]
    return table(["method", "recipe", "precision", "s/100 examples", "padding", "peak MB",
                  "problems"], out)


def render(report: dict) -> str:
    """The markdown report: what ran where, then the training and evaluation tables."""
    hw, summary, s = report["hardware"], report["summary"], report["settings"]
    lines = ["# Training and evaluation speed", "", f"`{report['command']}`", "",
             f"{report['date']}, {hw['cpu']} ({hw['cores']} cores){', ' + hw['gpu'] if 'gpu' in hw else ''}; "
             f"{', '.join(f'{k} {v}' for k, v in hw['versions'].items())}. Other work kept "
             f"{hw['cpu_busy_start']:.0%} of the CPU busy at the start, "
             f"{hw['cpu_busy_end']:.0%} at the end. Data: {report['data']}. "
             f"Ours: batch {s['batch_size']}, {s['steps']} steps a repeat; the original: batch "
             f"{ORIGINAL_BATCH}, {s['steps_original']} steps; {s['warmup']} warm-up steps, "
             f"{s['repeats']} repeats, in {report['wall_s'] / 60:.1f} min.", ""]
    for key, training in summary["training"].items():
        lines += [f"## Training, {key}", "", "Non-pad tokens per second, median [min-max] "
                  "over repeats; ratios per repeat pair.", "",
                  *speed_table(training, summary["precisions"]), "",
                  *detail_table(training, summary["precisions"]), ""]
    for key, ev in summary["evaluation"].items():
        lines += [f"## Evaluation, {key}", ""]
        lines += table(["recipe", "questions/s", "peak MB"],
                       [[name, fmt(ev[name]["questions_per_s"], ".2f"),
                         f"{ev[name]['peak_mb']:.0f}"] for name in ("original", "ours")]) + [
            "", f"Speed-up: {fmt(ev['speedup'], '.1f', 'x')}.", ""] if ev else ["failed", ""]
    failed = [f"{label} ({w['error']})" for label, w in report["workers"].items() if "error" in w]
    lines += ["Not measured: " + ", ".join(failed), ""] if failed else []
    return "\n".join(lines)


# --- Main -----------------------------------------------------------------------------


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--repeats", type=int, default=3, help="timed repeats (default 3: a median and a spread)")
    add("--steps", type=int, default=3, help="our timed steps a repeat (default 3: seconds on a CPU)")
    add("--steps-original", type=int, default=6,
        help="the original's timed steps a repeat (default 6: at batch 2, as long as ours)")
    add("--warmup", type=int, default=2, help="untimed steps first (default 2: the first "
        "allocates AdamW's state, the second reaches the steady peak)")
    add("--batch-size", type=int, default=16, help="our batch (default 16, the scripts' own)")
    add("--eval-questions", type=int, default=64,
        help="questions per evaluation (default 64: one batch of evaluate.py's)")
    add("--eval-repeats", type=int, default=2,
        help="timed evaluation repeats (default 2: the original takes seconds a question)")
    add("--methods", default=",".join(METHODS), help="comma-separated subset (default all four)")
    add("--precisions", default=",".join(PRECISIONS), help="ours and TRL are compared at each "
        "(default fp32,bf16: bf16 is autocast over fp32 weights, as --precision bf16)")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="where every worker runs "
        "(default cpu; on cuda each timer reading waits for torch.cuda.synchronize())")
    add("--shape", default="distilgpt2", help="comma-separated random-weight training models "
        f"of {', '.join(SHAPES)} (default distilgpt2: the original project's model)")
    add("--tokenizer", help="the shapes' tokenizer (default smollm2-135m's: realistic lengths)")
    add("--only", choices=PARTS, action="append", default=None,
        help="run only this part (repeatable; default both)")
    add("--eval-model", default=None, help="model folder or preset for a second evaluation "
        "(default smollm2-135m untuned; a tuned full model, e.g. outputs/full, stops after "
        "its answer as in evaluate.py; 'none' skips it)")
    add("--no-trl", dest="trl", action="store_false", help="skip TRL (default: run when installed)")
    add("--data-dir", default=None, help="folder with train.jsonl, eval.jsonl, template.json "
        "(default: --data-size rows generated into a temporary folder)")
    add("--data-size", type=int, default=1300,
        help="rows to generate without --data-dir (default 1300: make all's data)")
    add("--quick", action="store_true", help="a 2-layer model, one repeat, one or two steps, "
        "no second evaluation: checks the code in minutes")
    add("--output", default=None, help="markdown report, its JSON beside it (default "
        "benchmarks/results-<what differs from a whole CPU run>.md: nothing is overwritten)")
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "steps_original", "warmup", "batch_size", "eval_questions",
                 "eval_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name, allowed in (("methods", METHODS), ("precisions", PRECISIONS), ("shape", SHAPES)):
        values = list(dict.fromkeys(v.strip() for v in getattr(args, name).split(",")
                                    if v.strip()))
        if not values or set(values) - set(allowed):
            parser.error(f"--{name}: expected some of {', '.join(allowed)}")
        setattr(args, name, values)
    return args


def settings_from(args, default_precision: str) -> dict:
    """The run's sizes: the options, or tiny ones with --quick."""
    s = {"batch_size": args.batch_size, "device": args.device,
         "trl": args.trl and importlib.util.find_spec("trl") is not None,
         "methods": args.methods, "precisions": args.precisions,
         "default_precision": default_precision, "parts": args.only or list(PARTS),
         "shapes": ["gpt2-tiny" if args.quick and x == "distilgpt2" else x for x in args.shape],
         "repeats": args.repeats, "steps": args.steps, "steps_original": args.steps_original,
         "warmup": args.warmup, "questions": args.eval_questions,
         "eval_repeats": args.eval_repeats, "data_size": args.data_size}
    if args.quick:
        s.update(repeats=1, steps=1, steps_original=2, warmup=1, questions=4, eval_repeats=1,
                 data_size=300)
    return s


def default_output(args) -> Path:
    """benchmarks/results.md for a whole CPU run, else a name saying what differs from it."""
    parts = (["quick"] if args.quick else []) + ([args.device] if args.device != "cpu" else [])
    parts += [] if args.shape == ["distilgpt2"] else args.shape
    return Path(__file__).parent / ("-".join(["results", *parts, *(args.only or [])]) + ".md")


def main(args) -> None:
    """Prepare data and models, run every configuration in its own process, write the report."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here needs the network; never wait on it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import common
    import models

    device = models.pick_device(args.device)  # a clear error when CUDA is asked for and absent
    default_precision = models.resolve_precision(device, "auto", announce=False)
    started, s = time.time(), settings_from(args, default_precision)
    report = {"command": "python " + shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "hardware": {**hardware(device), "cpu_busy_start": cpu_busy()}, "settings": s}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            data_dir = Path(args.data_dir).resolve()
        else:
            log(f"generating {s['data_size']} rows with the project's data scripts ...")
            data_dir = make_data(tmp / "data", s["data_size"])
        report["data"] = (f"{data_dir if args.data_dir else 'generated'}: "
                          f"{len(common.load_split(data_dir, 'train'))} train, "
                          f"{len(common.load_split(data_dir, 'eval'))} eval rows")
        tokenizer = args.tokenizer or default_tokenizer()
        train_models = {f"{shape}-shape": str(build_shape(shape, tokenizer, tmp / shape))
                        for shape in s["shapes"]}
        name = args.eval_model or ("none" if args.quick else "smollm2-135m")
        eval_model = ((Path(name).name, str(models.resolve_model(name)))
                      if name != "none" and "evaluation" in s["parts"] else None)
        if args.trl and not s["trl"]:
            log("TRL is not installed: pip install --no-deps -r benchmarks/requirements.txt")
        plan = build_plan(s, train_models, str(data_dir), eval_model)
        workers = {}
        for i, (label, config) in enumerate(plan, start=1):
            log(f"[{i}/{len(plan)}] {label}")
            workers[label] = run_worker(label, config)
    report["hardware"]["cpu_busy_end"] = cpu_busy()
    report["workers"] = workers
    report["summary"] = {
        "precisions": s["precisions"], "default_precision": default_precision,
        "training": {key: summarise_training(workers, key, s["methods"], s["precisions"],
                                             default_precision) for key in train_models}
        if "training" in s["parts"] else {},
        "evaluation": {key: summarise_eval(workers, key)
                       for key in dict.fromkeys(label.split("/eval/")[0] for label in workers
                                                if "/eval/" in label)}}
    report["wall_s"] = time.time() - started
    output = Path(args.output) if args.output else default_output(args)
    common.write_json(output.with_suffix(".json"), report)
    common.write_text_atomic(output, render(report) + "\n")
    log(f"wrote {output} and its .json in {report['wall_s'] / 60:.1f} min")
    if any("error" in w for w in workers.values()):
        sys.exit(1)  # the report is written; say that part of it failed


if __name__ == "__main__":
    import common

    common.run_main(main, parse_args())
