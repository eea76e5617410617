"""Checks the GPU path and measures it, on any CUDA machine with the project's requirements.

    python benchmarks/gpu_check.py                        # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --tiny    # a rehearsal: tiny shapes, a few steps

Each step runs in its own process under a timeout, logged: tests/test_cuda.py; the four
methods (20 steps each) and evaluate.py end to end on random weights in SmolLM2-135M's
shape; the memory table (tensor-level and reserved peak, seconds a step, which rows fit a
24 GB and an 80 GB card) on Llama-3.2-1B and -3.1-8B shapes; bench.py's training comparison
with TRL at bf16.  Writes benchmarks/results-gpu.md and its JSON; benchmarks/README.md says more.
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

from bench_workers import SCRIPTS, build_shape, default_tokenizer, shape_config, sync  # noqa: E402

# (shape, method, --gradient-checkpointing) rows of the memory table, full run and --tiny
MEMORY_ROWS = [("llama-3.2-1b", m, False) for m in ("full", "lora", "qlora", "bitfit")] + [
    ("llama-3.1-8b", "lora", False), ("llama-3.1-8b", "qlora", False),
    ("llama-3.1-8b", "qlora", True)]
TINY_MEMORY_ROWS = [("tiny-llama-shape", m, False) for m in ("full", "lora", "qlora", "bitfit")] + [
    ("tiny-llama-untied", "lora", False), ("tiny-llama-untied", "qlora", True)]
CARDS_GIB = (24, 80)
# A card holds less than its size for tensors: the CUDA context (~0.5 GiB) and the caching
# allocator's fragmentation; a row fits when its reserved peak plus this margin fits.
CONTEXT_GIB = 1.0


# --- The memory table: one (shape, method) in one process -------------------------


def quantize_nf4(model, device, compute_dtype) -> None:
    """Every Linear but the LM head made NF4 in place, as from_pretrained with models.nf4_config."""
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
    """Random ids, the loss on each row's second half (an answer), in the sync-free step's form."""
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
    """Tensor-level peak memory (CUDA) and median seconds a step of one method on one shape."""
    import importlib

    from transformers import AutoModelForCausalLM

    import models
    from steps import make_optimizer
    from answer_loss import answer_loss_at
    from settings import TrainSettings

    script = importlib.import_module(SCRIPTS[method])
    tokenizer = models.load_tokenizer(tokenizer_dir)
    config = shape_config(shape, tokenizer)
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
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    data = step_batch(batch, seq_len, len(tokenizer), device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if cuda else None
    times = []
    for _ in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            nll, count = answer_loss_at(model, **data)  # as CUDA trains
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
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


def run_step(name: str, command: list[str], timeout: float, logs: Path) -> dict:
    """Run command with its output in logs/<name>.log; its status, seconds and log tail."""
    log = logs / f"{name}.log"
    print(f"[gpu-check] {name} (up to {timeout:.0f} s): {' '.join(command)}", flush=True)
    start = time.monotonic()
    with open(log, "w") as handle:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                                ).returncode
            status = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    outcome = {"step": name, "command": " ".join(command), "status": status,
               "seconds": round(time.monotonic() - start, 1),
               "tail": log.read_text(errors="replace")[-1500:]}
    print(f"[gpu-check] {name}: {status} in {outcome['seconds']} s", flush=True)
    return outcome


def memory_table(args, work: Path, steps: list[dict]) -> list[dict]:
    """Each memory-table row in its own process (a clean allocator, an OOM kept to one row)."""
    rows = []
    for shape, method, checkpointing in TINY_MEMORY_ROWS if args.tiny else MEMORY_ROWS:
        name = f"memory-{shape}-{method}" + ("-ckpt" if checkpointing else "")
        steps.append(run_step(name, [
            sys.executable, str(Path(__file__).resolve()), "--memory-row",
            f"{shape},{method},{int(checkpointing)}", "--device", args.device, "--precision",
            args.precision, "--tokenizer", args.tokenizer, "--row-json", str(work / f"{name}.json")]
            + (["--tiny"] if args.tiny else []), 120, work / "logs"))
        result = work / f"{name}.json"
        row = (json.loads(result.read_text()) if result.exists() else
               {"shape": shape, "method": method, "gradient_checkpointing": checkpointing,
                "error": steps[-1]["status"]})
        if "out of memory" in steps[-1]["tail"].lower():
            row["error"] = "CUDA out of memory"
        rows.append(row)
    return rows


# --- Report ------------------------------------------------------------------------------


def gib(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(report: dict) -> str:
    """benchmarks/results-gpu.md from the report's JSON."""
    lines = ["# GPU check", "", f"Made by `{report['command']}` on {report['device_name']} "
             f"({report['versions']}), {report['started']}; {report['seconds']:.0f} s in all.",
             "", "## Steps", "", "| step | status | seconds | summary |", "|---|---|---|---|"]
    for step in report["steps"]:  # the last line of its log: pytest's counts, or why it failed
        summary = (step["tail"].strip().splitlines() or [""])[-1].strip("= ")[:160]
        summary = summary.replace("|", "/")
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']} | {summary} |")
    lines += ["", f"Logs: `{report['logs']}`", "", "## Memory table", "",
              "Tensor-level peak (`torch.cuda.max_memory_allocated`) and the allocator's reserved "
              f"peak over warm-up and timed steps, at batch {report['memory_batch']}; weights are "
              "what the prepared model holds before the first step (frozen weights in bf16, "
              f"4-bit for QLoRA). A card fits a row when the reserved peak plus {CONTEXT_GIB} "
              "GiB (CUDA context, fragmentation) is within its size.", "",
              "| shape | method | checkpointing | weights GiB | peak allocated GiB | "
              "peak reserved GiB | s/step | 24 GB | 80 GB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["memory"]:
        ckpt = "yes" if row["gradient_checkpointing"] else "no"
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['method']} | {ckpt} | {row['error']} | | | | | |")
            continue
        fits = [("yes" if row[f"fits_{c}gb"] else "no") if f"fits_{c}gb" in row else "–"
                for c in CARDS_GIB]
        lines.append(f"| {row['shape']} | {row['method']} | {ckpt} | {gib(row['weights_gib'])} | "
                     f"{gib(row['peak_allocated_gib'])} | {gib(row['peak_reserved_gib'])} | "
                     f"{row['seconds_per_step']} | {fits[0]} | {fits[1]} |")
    lines += ["", "## Training speed against TRL", ""]
    if report["bench"] is None:
        lines.append("bench.py wrote no JSON: see the bench-training step's log.")
    else:
        from bench import detail_table, speed_table

        summary = report["bench"]["summary"]
        for key, training in summary["training"].items():
            lines += [f"### {key}", "", *speed_table(training, summary["precisions"]), "",
                      *detail_table(training, summary["precisions"]), ""]
    return "\n".join(lines) + "\n"


# --- Main -------------------------------------------------------------------------------


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda", help="where every step runs (default cuda; cpu with "
        "--tiny rehearses the check)")
    add("--precision", default="bf16", choices=("bf16", "fp32"),
        help="precision of every run (default bf16, as a GPU user trains)")
    add("--tiny", action="store_true", help="tiny shapes, a few steps, a small data set: "
        "checks the check itself in minutes")
    add("--tokenizer", default=None, help="the shapes' tokenizer folder (default the "
        "smollm2-135m preset's: its ids fit every shape)")
    add("--logs", default=None, help="folder for the logs (default a temporary one: in the report)")
    add("--output", default=None, help="markdown report, JSON beside it (default "
        "benchmarks/results-gpu.md, with --tiny -tiny.md: a rehearsal overwrites no run)")
    add("--memory-row", default=None, help=argparse.SUPPRESS)  # internal: one table row
    add("--row-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokenizer = args.tokenizer or default_tokenizer()
    return args


def main(args) -> dict:
    """Run every step; write the report."""
    from bench import hardware, make_data
    from common import write_json, write_text_atomic

    if args.memory_row:  # internal: measure one memory-table row and write it as JSON
        shape, method, checkpointing = args.memory_row.split(",")
        small = {"batch": 4, "seq_len": 32, "steps": 1} if args.tiny else {}
        write_json(Path(args.row_json), memory_row(
            shape, method, checkpointing == "1", torch.device(args.device), args.precision,
            args.tokenizer, **small))
        return {}
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    work = Path(args.logs or tempfile.mkdtemp(prefix="gpu-check-"))
    py, logs = sys.executable, work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = [run_step("pytest-cuda", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_cuda.py"], 120, logs)]
    model_dir = build_shape("tiny-llama-shape" if args.tiny else "smollm2-135m", args.tokenizer,
                             work / "model")
    data = make_data(work / "data", 300 if args.tiny else 1300)
    out = work / "outputs"
    run_args = ["--data-dir", str(data), "--output-dir", str(out), "--device", args.device,
                "--precision", args.precision]
    # a check that every script runs, not a measurement (bench-training measures speed)
    train = ["--max-steps", "2", "--batch-size", "4"] if args.tiny else ["--max-steps", "20"]
    for method, script in SCRIPTS.items():
        steps.append(run_step(f"train-{method}", [py, f"{script}.py", "--model", str(model_dir),
                                                  *run_args, *train], 180, logs))
    steps.append(run_step("evaluate", [py, "evaluate.py", *run_args]
                          + (["--limit", "8"] if args.tiny else []), 180, logs))
    memory = memory_table(args, work, steps)
    bench_json = work / "bench.json"
    steps.append(run_step("bench-training", [
        py, "benchmarks/bench.py", "--device", args.device, "--precisions", args.precision,
        "--shape", "distilgpt2" if args.tiny else "distilgpt2,smollm2-135m", "--only",
        "training", "--tokenizer", args.tokenizer, "--data-dir", str(data),
        "--output", str(bench_json.with_suffix(".md"))]
        + (["--quick"] if args.tiny else []), 600, logs))
    machine = hardware(torch.device(args.device))
    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "started": started, "seconds": round(time.monotonic() - start, 1),
        "tiny": args.tiny, "precision": args.precision, "device": args.device,
        "device_name": machine.get("gpu", machine["cpu"]),
        "versions": ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "logs": str(logs), "memory_batch": 4 if args.tiny else 16, "steps": steps,
        "memory": memory, "bench": json.loads(bench_json.read_text())
        if bench_json.exists() else None}
    output = Path(args.output) if args.output else (
        ROOT / "benchmarks" / ("results-gpu-tiny.md" if args.tiny else "results-gpu.md"))
    write_json(output.with_suffix(".json"), report)
    write_text_atomic(output, render(report))
    print(f"[gpu-check] wrote {output} and its .json in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main(parse_args())
