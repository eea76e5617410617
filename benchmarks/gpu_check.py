"""One command that checks the GPU path and measures it, with nothing from the network.

    python benchmarks/gpu_check.py                        # on a CUDA machine: about 8 minutes
    python benchmarks/gpu_check.py --wheels wheels/       # install brought wheels first
    python benchmarks/gpu_check.py --device cpu --tiny    # rehearsal: tiny shapes, a few steps

It runs, each step in its own process under a timeout, the whole under --budget seconds:
  1. pip install of the wheels in --wheels (no index, no dependencies);
  2. pytest tests/test_cuda.py (skipped where torch sees no CUDA);
  3. the four methods and evaluate.py end to end on random weights in SmolLM2-135M's shape;
  4. the memory table: tensor-level peak (torch.cuda.max_memory_allocated) and time per step
     on a Llama-3.2-1B shape for all four methods at batch 16, and on a Llama-3.1-8B shape
     for LoRA on a bf16 base and QLoRA, with which fit on 24 GB and 80 GB cards;
  5. benchmarks/profile_step.py on a full fine-tuning step of the distilgpt2 shape:
     torch.profiler with CUDA activity, the step's wall time against the GPU's kernel time;
  6. benchmarks/bench_speed.py's training comparison against TRL on the distilgpt2 and
     SmolLM2 shapes at bf16, ours also with --compile (default reduce-overhead: CUDA
     graphs), on the data of step 3, last, with what the budget has left (at most 240 s)
     and its own --time-limit so that a cut keeps what was measured (its own JSON,
     folded into ours);
  7. the CPU-pinned suite (pytest tests/ but test_cuda.py), started first in the
     background on the upper half of the CPU cores (torch threads capped), so it shares
     neither cores nor the GPU with the timed steps.
and writes benchmarks/results-gpu.md, the targets first (met or not), and
benchmarks/results-gpu.json (with --tiny,
results-gpu-tiny.*, so a rehearsal never overwrites real results).  Each step's log goes
to $OUT/gpu-check/ when $OUT is set, else to a temporary folder named in the report.

Models are random weights in named shapes (shapes.py, configs written there); their
tokenizer is the offline smollm2-135m preset's (--tokenizer, default its converted
cache folder), whose ids fit every shape's vocabulary.  Random weights never emit EOS,
so every answer runs to the bound: evaluation times are worst cases.

Bringing libraries to a GPU machine without network: `make gpu-bundle`, on a machine
with network, runs benchmarks/gpu_bundle.py: CPython 3.12 wheels of transformers, peft,
bitsandbytes (trimmed to its CPU and CUDA 13 libraries), TRL and datasets at this
project's pins into .whl/ (about 22 MiB), and the smollm2-135m tokenizer into
.gpu-tokenizer/ (3.4 MiB; shapes.default_tokenizer prefers it).  Carry both; there,
`python benchmarks/gpu_check.py --wheels .whl`: the wheels shadow the machine's own
transformers (5.17 on the one lent here) and peft.  datasets' own dependencies (pyarrow,
pandas, xxhash) must already be on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import shapes  # noqa: E402

# --- Shapes (shapes.py) and the memory table's rows --------------------------------
# (shape, method, --gradient-checkpointing) rows of the memory table, full run and --tiny
MEMORY_ROWS = [("llama-3.2-1b", m, False) for m in ("full", "lora", "qlora", "bitfit")] + [
    ("llama-3.1-8b", "lora", False), ("llama-3.1-8b", "qlora", False),
    ("llama-3.1-8b", "qlora", True)]
TINY_MEMORY_ROWS = [("tiny-llama-shape", m, False) for m in ("full", "lora", "qlora", "bitfit")] + [
    ("tiny-llama-untied", "lora", False), ("tiny-llama-untied", "qlora", True)]
CARDS_GIB = (24, 80)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no step may wait on a network
# A card holds less than its size for tensors: the CUDA context (~0.5 GiB) and the caching
# allocator's fragmentation; a row fits when its reserved peak plus this margin fits.
CONTEXT_GIB = 1.0
METHOD_SCRIPTS = {"full": "finetune", "lora": "finetune_lora", "qlora": "finetune_qlora",
                  "bitfit": "finetune_bitfit"}


# --- The memory table: one (shape, method) in one process -------------------------


def quantize_nf4(model, device, compute_dtype) -> None:
    """Replace every Linear but the LM head by a bitsandbytes NF4 layer (double quantisation),
    in place: what from_pretrained does with models.nf4_config, without a checkpoint file."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True,
                                             quant_type="nf4").to(device)  # quantises here
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # PEFT wraps Linear4bit layers only on a model marked so


def step_batch(batch: int, seq_len: int, vocab: int, device):
    """Random token ids with the loss on the second half of each row, as answers follow prompts,
    in the sync-free step's form (answer_loss_at: label positions counted on the host)."""
    from answer_loss import label_positions

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, :seq_len // 2] = -100
    positions, targets = label_positions(labels)
    return {"input_ids": ids.to(device), "positions": positions.to(device),
            "targets": targets.to(device)}


def memory_row(shape: str, method: str, checkpointing: bool, device, precision: str,
               tokenizer_dir: str, batch: int = 16, seq_len: int = 256, steps: int = 3,
               warmup: int = 2) -> dict:
    """Tensor-level peak memory and seconds per optimiser step of one method on one shape.

    The model is built on the device in fp32 (seed 0), quantised for QLoRA, prepared by
    the method script's prepare() with frozen weights stored in bf16 as training does;
    the peak counts from there: weights, gradients, optimiser state and activations of
    warmup + steps steps of batch x seq_len tokens.  Time per step: the median of the
    steps after warm-up, CUDA-synchronised.  On the CPU the peak is not measured (None).
    """
    import importlib

    from transformers import AutoModelForCausalLM

    import models
    import training
    from answer_loss import answer_loss_at
    from settings import TrainSettings

    script = importlib.import_module(METHOD_SCRIPTS[method])
    tokenizer = models.load_tokenizer(tokenizer_dir)
    config = shapes.config(shape, tokenizer)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dtype = models.autocast_dtype(device, precision)
    if method == "qlora":
        quantize_nf4(model, device, dtype or torch.float32)
    argv = ["--device", device.type, "--precision", precision, "--batch-size", str(batch)]
    settings = TrainSettings.from_args(script.parse_args(
        argv + (["--gradient-checkpointing"] if checkpointing else [])))
    model, _ = script.prepare(model, settings)  # new biases and adapters land on their layer's device
    models.store_frozen_in_bf16(model, precision)
    if checkpointing:
        models.enable_gradient_checkpointing(model)
    model.train()
    trainable, total = models.count_parameters(model)
    optimizer = training.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                        settings)
    data = step_batch(batch, seq_len, len(tokenizer), device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if cuda else None
    times = []
    for _ in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            nll, count = answer_loss_at(model, **data)  # as CUDA trains
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    gib = 2 ** 30
    row = {"shape": shape, "method": method, "gradient_checkpointing": checkpointing,
           "precision": precision, "batch": batch, "seq_len": seq_len,
           "trainable_params": trainable, "total_params": total,
           "seconds_per_step": round(statistics.median(times[warmup:]), 4),
           "loss": round(float(nll.detach() / count), 4), "device": str(device),
           "weights_gib": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
    if cuda:
        row.update(weights_gib=round(held / gib, 2),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2))
        for card in CARDS_GIB:
            row[f"fits_{card}gb"] = row["peak_reserved_gib"] + CONTEXT_GIB <= card
    return row


# --- Steps: each a process under a timeout, logged ------------------------------------


class Steps:
    """Runs the check's steps in order within one overall budget; keeps their outcomes."""

    def __init__(self, logs: Path, budget: float):
        self.logs, self.deadline, self.done = logs, time.monotonic() + budget, []
        logs.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, command: list[str], threads: int) -> tuple:
        """Start command in the background on the upper half of the cores; (process, outcome)."""
        cores = sorted(os.sched_getaffinity(0))
        upper = set(cores[len(cores) // 2:]) or set(cores)
        log = self.logs / f"{name}.log"
        outcome = {"step": name, "command": " ".join(command), "log": str(log),
                   "started": time.monotonic()}
        print(f"[gpu-check] {name} (background, cores {min(upper)}-{max(upper)}): "
              f"{outcome['command']}", flush=True)
        threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"),
                                   stderr=subprocess.STDOUT,
                                   env={**os.environ, **OFFLINE, **threads_env},
                                   preexec_fn=lambda: os.sched_setaffinity(0, upper))
        return process, outcome

    def finish(self, process, outcome: dict) -> dict:
        """Wait for a background step within the budget left (killed past it); record it."""
        try:
            rc = process.wait(timeout=max(1.0, self.left()))
            # its seconds run to when it was collected; pytest's summary has its own time
            status = ("passed" if rc == 0 else f"failed (exit {rc})") + " (background)"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = "timed out at the budget"
        started = outcome.pop("started")
        outcome.update(status=status, seconds=round(time.monotonic() - started, 1),
                       tail=Path(outcome["log"]).read_text(errors="replace")[-1500:])
        print(f"[gpu-check] {outcome['step']}: {status} in {outcome['seconds']} s", flush=True)
        self.done.append(outcome)
        return outcome

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run command, its output to logs/<name>.log, under min(timeout, the budget left)."""
        limit = min(timeout, self.left())
        log = self.logs / f"{name}.log"
        outcome = {"step": name, "command": " ".join(command), "log": str(log)}
        if limit < 5:
            outcome.update(status="skipped: no time left", seconds=0.0)
            self.done.append(outcome)
            print(f"[gpu-check] {name}: skipped, no time left", flush=True)
            return outcome
        print(f"[gpu-check] {name} (up to {limit:.0f} s): {outcome['command']}", flush=True)
        start = time.monotonic()
        with open(log, "w") as handle:
            try:
                rc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=limit, env={**os.environ, **OFFLINE, **(env or {})}
                                    ).returncode
                status = "passed" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
        outcome.update(status=status, seconds=round(time.monotonic() - start, 1),
                       tail=log.read_text(errors="replace")[-1500:])
        print(f"[gpu-check] {name}: {status} in {outcome['seconds']} s", flush=True)
        self.done.append(outcome)
        return outcome


def pytest_summary(tail: str) -> str:
    """pytest's last summary line ("12 passed, 3 skipped in 40s"), or ''."""
    lines = [line.strip("= ") for line in tail.splitlines() if " in " in line and (
        "passed" in line or "failed" in line or "skipped" in line or "error" in line)]
    return lines[-1] if lines else ""


def make_data(steps: Steps, folder: Path, tiny: bool) -> Path:
    """The default data pipeline (generate -> format -> split) into folder."""
    size = ["--size", "300"] if tiny else []
    py = sys.executable
    steps.run("data-generate", [py, "generate_dataset.py", *size, "--output",
                                str(folder / "qa_pairs.jsonl")], 60)
    steps.run("data-format", [py, "format_dataset.py", "--input", str(folder / "qa_pairs.jsonl"),
                              "--output", str(folder / "formatted.jsonl")], 60)
    steps.run("data-split", [py, "split_dataset.py", "--input", str(folder / "formatted.jsonl"),
                             "--output-dir", str(folder)], 60)
    return folder


def end_to_end(steps: Steps, args, model_dir: Path, data: Path, out: Path) -> None:
    """The four scripts and evaluate.py on the shape's model, at bf16 on the device."""
    py, common_args = sys.executable, ["--model", str(model_dir), "--data-dir", str(data),
                                       "--output-dir", str(out), "--device", args.device]
    precision = ["--precision", args.precision]
    # a check that every script runs, not a measurement (bench-training measures speed)
    train = ["--max-steps", "2", "--batch-size", "4"] if args.tiny else ["--max-steps", "20"]
    for method, script in METHOD_SCRIPTS.items():
        steps.run(f"train-{method}", [py, f"{script}.py", *common_args, *precision, *train],
                  90)  # a tiny rehearsal on a busy 2-core CPU takes as long as a GPU run
    limit = ["--limit", "8"] if args.tiny else []
    steps.run("evaluate", [py, "evaluate.py", "--data-dir", str(data), "--output-dir", str(out),
                           "--device", args.device, *precision, *limit], 120)


def memory_table(steps: Steps, args, work: Path) -> list[dict]:
    """Each memory-table row in its own process (a clean allocator, an OOM kept to one row)."""
    rows = []
    for shape, method, checkpointing in TINY_MEMORY_ROWS if args.tiny else MEMORY_ROWS:
        name = f"memory-{shape}-{method}" + ("-ckpt" if checkpointing else "")
        result = work / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker",
                   f"{shape},{method},{int(checkpointing)}", "--device", args.device,
                   "--precision", args.precision, "--tokenizer", args.tokenizer,
                   "--worker-json", str(result)]
        if args.tiny:
            command += ["--worker-steps", "1", "--worker-seq-len", "32", "--worker-batch", "4"]
        outcome = steps.run(name, command, 120)
        row = (json.loads(result.read_text()) if result.exists() else
               {"shape": shape, "method": method, "gradient_checkpointing": checkpointing,
                "error": outcome["status"]})
        if "out of memory" in outcome.get("tail", "").lower():
            row["error"] = "CUDA out of memory"
        rows.append(row)
    return rows


def profile(steps: Steps, args, work: Path, data: Path) -> str | None:
    """profile_step.py on a full fine-tuning step of the distilgpt2 shape: host against GPU time."""
    result = work / "profile.md"
    shape = "gpt2-tiny" if args.tiny else "distilgpt2"
    steps.run("profile-full", [sys.executable, "benchmarks/profile_step.py", "--device",
                               args.device, "--precision", args.precision, "--shape", shape,
                               "--tokenizer", args.tokenizer, "--data-dir", str(data),
                               "--output", str(result)], 90)
    return result.read_text() if result.exists() else None


def bench(steps: Steps, args, work: Path, data: Path) -> dict | None:
    """bench_speed.py's training comparison with TRL at bf16 on both shapes; its JSON."""
    result = work / "bench.json"
    names = "distilgpt2" if args.tiny else "distilgpt2,smollm2-135m"
    command = [sys.executable, "benchmarks/bench_speed.py", "--device", args.device,
               "--precisions", args.precision, "--shape", names, "--only", "training",
               "--tokenizer", args.tokenizer, "--data-dir", str(data),
               "--output", str(result.with_suffix(".md")), "--json", str(result)]
    command += ["--compile", args.compile] if args.compile != "off" else []
    command += ["--quick"] if args.tiny else []
    # It runs last and takes what the budget has left (at most 240 s); its own limit comes
    # first: past it, bench_speed stops its current worker (the compiled ones come last)
    # and still writes what it measured.
    limit = max(30.0, min(150 if args.tiny else 240, steps.left() - 5))
    command += ["--time-limit", f"{limit - 25:.0f}", "--trl-defaults-limit", "30"]
    steps.run("bench-training", command, limit)
    return json.loads(result.read_text()) if result.exists() else None


# --- Report ------------------------------------------------------------------------------

TRL_TARGET = 3.0         # ours (plain or compiled) over TRL's steady tokens/s
TRL_TARGET_METHODS = ("full", "lora", "qlora")
EVAL_TARGET_S = 20       # evaluate.py wall: base + four methods, 394 questions, SmolLM2 shape
BUDGET_TARGET_S = 480    # the whole check, installs included


def targets(report: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the issue's GPU targets; met is None when not measured."""
    checks = [(f"the whole check in at most {BUDGET_TARGET_S} s", f"{report['seconds']:.0f} s",
               report["seconds"] <= BUDGET_TARGET_S)]
    evaluate = next((step for step in report["steps"] if step["step"] == "evaluate"), None)
    label = (f"evaluate.py (base + 4 methods, every eval question, SmolLM2 shape) in at most "
             f"{EVAL_TARGET_S} s wall")
    if report["tiny"] or evaluate is None:  # a rehearsal answers 8 questions
        checks.append((label, "not measured", None))
    elif evaluate["status"] != "passed":
        checks.append((label, evaluate["status"], False))
    else:
        checks.append((label, f"{evaluate['seconds']} s", evaluate["seconds"] <= EVAL_TARGET_S))
    precision = report["precision"]
    training = ((report.get("bench") or {}).get("summary") or {}).get("training", {})
    for key, part in training.items():
        for row in part["rows"]:
            if row["method"] not in TRL_TARGET_METHODS:
                continue
            plain = row["vs_trl"].get(precision)
            compiled = row.get("compiled_vs_trl", {}).get(precision)
            shown = ", ".join(f"{name} {ratio['median']:.2f}x" for name, ratio in
                              (("ours", plain), ("compiled", compiled)) if ratio)
            best = max((r["median"] for r in (plain, compiled) if r), default=None)
            checks.append((f"{key}, {row['method']}: at least {TRL_TARGET:g}x TRL's steady "
                           f"tokens/s at {precision}", shown or "not measured",
                           None if best is None else best >= TRL_TARGET))
    if not training:
        checks.append((f"at least {TRL_TARGET:g}x TRL's steady tokens/s", "not measured", None))
    return checks


def gib(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(report: dict) -> str:
    """benchmarks/results-gpu.md from the report's JSON."""
    lines = ["# GPU check", "", f"Made by `{report['command']}` on {report['device_name']} "
             f"({report['versions']}), {report['started']}; {report['seconds']:.0f} s in all, "
             f"budget {report['budget']} s.", "", "## Targets", "",
             "| target | measured | met |", "|---|---|---|",
             *(f"| {target} | {measured} | "
               f"{'yes' if met else 'no' if met is False else 'n/a'} |"
               for target, measured, met in targets(report)),
             "", "## Steps", "",
             "| step | status | seconds | summary |", "|---|---|---|---|"]
    for step in report["steps"]:
        summary = pytest_summary(step.get("tail", "")) if "pytest" in step["command"] else ""
        if not summary and step["status"] not in ("passed",) and step.get("tail"):
            summary = step["tail"].strip().splitlines()[-1][:160].replace("|", "/")  # why
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']} | {summary} |")
    lines += ["", f"Logs: `{report['logs']}`", "", "## Memory table", "",
              "Tensor-level peak (`torch.cuda.max_memory_allocated`) and the allocator's reserved "
              f"peak over warm-up and timed steps, at batch {report['memory_batch']}; weights are "
              "what the prepared model holds before the first step (frozen weights in bf16, "
              f"4-bit for QLoRA). A card fits a row when the reserved peak plus {CONTEXT_GIB} "
              "GiB (CUDA context, fragmentation) is within its size.", "",
              "| shape | method | checkpointing | weights GiB | peak allocated GiB | "
              "peak reserved GiB | s/step | 24 GB | 80 GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in report["memory"]:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['method']} | "
                         f"{'yes' if row['gradient_checkpointing'] else 'no'} | "
                         f"{row['error']} | | | | | |")
            continue
        fits = [("yes" if row.get(f"fits_{c}gb") else "no") if f"fits_{c}gb" in row else "–"
                for c in CARDS_GIB]
        lines.append(f"| {row['shape']} | {row['method']} | "
                     f"{'yes' if row['gradient_checkpointing'] else 'no'} | "
                     f"{gib(row['weights_gib'])} | {gib(row['peak_allocated_gib'])} | "
                     f"{gib(row['peak_reserved_gib'])} | {row['seconds_per_step']} | "
                     f"{fits[0]} | {fits[1]} |")
    lines += ["", "## Where a full fine-tuning step's time goes", "",
              report.get("profile") or "profile_step.py wrote nothing: see the profile-full "
              "step's log.", "", "## Training speed against TRL", ""]
    bench = report["bench"]
    if bench is None:
        lines.append("bench_speed.py wrote no JSON: see the bench-training step's log.")
    else:
        from bench_render import speed_table, utilisation_table

        summary = bench["summary"]
        lines += ["Non-pad tokens per second, medians over repeats with [min-max], the same "
                  "rows, batch, loss positions and precision on each side, timers read after "
                  "the device has finished (torch.cuda.synchronize() on CUDA), warm-up "
                  "(and compilation) excluded on both sides (bench_speed.py; its whole JSON is "
                  "under `bench` in results-gpu.json).", ""]
        for key, training in summary["training"].items():
            lines += [f"### {key}", "", *speed_table(training, summary["precisions"]), "",
                      *utilisation_table(training, summary["precisions"],
                                         summary["peak_flops"]), ""]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output: Path) -> None:
    """The markdown and the JSON beside it, each written whole before it replaces the old."""
    from common import write_json, write_text_atomic

    write_json(output.with_suffix(".json"), report)
    write_text_atomic(output, render(report))


# --- Main -------------------------------------------------------------------------------


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a rehearsal)")
    add("--precision", default="bf16", choices=("bf16", "fp32"),
        help="precision of every run (default bf16, as a GPU user trains)")
    add("--tiny", action="store_true",
        help="tiny shapes, a few steps, a small data set: checks the orchestration in minutes")
    add("--wheels", default=None, help="a folder of wheels to pip install first (see above)")
    add("--tokenizer", default=None,
        help="the shapes' tokenizer folder (default: the converted smollm2-135m preset's)")
    add("--compile", default="reduce-overhead", choices=("off", "default", "reduce-overhead"),
        help="the benchmark also times ours with --compile MODE (default reduce-overhead: "
             "CUDA graphs, the lever against launch overhead; off to skip)")
    add("--budget", type=float, default=480,
        help="seconds for the whole check (default 480: the issue's 8 minutes)")
    add("--suite", default="tests",
        help="the CPU-pinned pytest selection, run in the background (default tests: the "
             "whole suite but tests/test_cuda.py)")
    add("--output", default=None,
        help="markdown report, JSON beside it (default benchmarks/results-gpu.md; "
             "with --tiny results-gpu-tiny.md)")
    add("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: one table row
    add("--worker-json", default=None, help=argparse.SUPPRESS)
    add("--worker-steps", type=int, default=3, help=argparse.SUPPRESS)
    add("--worker-seq-len", type=int, default=256, help=argparse.SUPPRESS)
    add("--worker-batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokenizer = args.tokenizer or shapes.default_tokenizer()
    if not (Path(args.tokenizer) / "tokenizer_config.json").exists():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer there (convert the preset "
                     "once with python -c 'import models; models.resolve_model(\"smollm2-135m\")'"
                     " or bring its cache folder)")
    return args


def memory_worker(args) -> None:
    """Internal: measure one memory-table row and write it as JSON."""
    from common import write_json

    shape, method, checkpointing = args.memory_worker.split(",")
    row = memory_row(shape, method, checkpointing == "1", torch.device(args.device),
                     args.precision, args.tokenizer, batch=args.worker_batch,
                     seq_len=args.worker_seq_len, steps=args.worker_steps)
    write_json(Path(args.worker_json), row)


def main(args) -> dict:
    """Run every step within the budget; write the report."""
    if args.memory_worker:
        memory_worker(args)
        return {}
    import bench_speed  # library_versions; not needed by the memory workers
    import models

    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    work = base / "gpu-check"
    steps = Steps(work / "logs", args.budget)
    py = sys.executable
    if args.wheels:
        # Into a folder of the check's own, on every step's path: the machine's environment
        # may not be writable, and stays as it was.
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        site = work / "site"
        steps.run("install-wheels", [py, "-m", "pip", "install", "--quiet", "--no-index",
                                     "--no-deps", "--no-compile", "--target", str(site),
                                     *wheels], 90)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(site)] + [part for part in [os.environ.get("PYTHONPATH")] if part])
        sys.path.insert(0, str(site))  # so the report names the versions installed
    suite = ["tests/test_results.py"] if args.tiny else args.suite.split()
    cpu_suite = steps.start("pytest-cpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           "--ignore", "tests/test_cuda.py", *suite],
                            threads=max(1, len(os.sched_getaffinity(0)) // 2))
    steps.run("pytest-cuda", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_cuda.py"], 120)
    model_dir = shapes.build("tiny-llama-shape" if args.tiny else "smollm2-135m", args.tokenizer,
                             work / "models" / ("tiny" if args.tiny else "smollm2-135m"))
    data = make_data(steps, work / "data", args.tiny)
    end_to_end(steps, args, model_dir, data, work / "outputs")
    memory = memory_table(steps, args, work)
    profile_text = profile(steps, args, work, data)
    bench_result = bench(steps, args, work, data)
    steps.finish(*cpu_suite)
    device = torch.device(args.device)
    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "started": started, "seconds": round(time.monotonic() - start, 1),
        "budget": args.budget, "tiny": args.tiny, "precision": args.precision,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "the CPU",
        "versions": ", ".join(f"{k} {v}" for k, v in bench_speed.library_versions().items()),
        "logs": str(work / "logs"),
        "memory_batch": 4 if args.tiny else 16, "steps": steps.done, "memory": memory,
        "bench": bench_result, "profile": profile_text,
        "bf16_native": models.native_bf16(device)}
    output = Path(args.output) if args.output else (
        ROOT / "benchmarks" / ("results-gpu-tiny.md" if args.tiny else "results-gpu.md"))
    write_report(report, output)
    print(f"[gpu-check] wrote {output} and {output.with_suffix('.json')} in "
          f"{report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main(parse_args())
