"""Where a training step's time goes: torch.profiler over this project's step, grouped by operator.

    python benchmarks/profile_step.py                   # full fine-tuning, distilgpt2 shape
    python benchmarks/profile_step.py --method lora --steps 3
    python benchmarks/profile_step.py --precision bf16  # the bf16 autocast step
    python benchmarks/profile_step.py --device cuda --precision bf16 --output profile-cuda.md

Builds a random-weight model of --shape (shapes.py) and the batches bench_speed.py
times (the smollm2 tokenizer, the longest batch to warm up, quantile batches to
time), prepares it with the method script's prepare(), and profiles
training.Trainer's step.  Prints the share of host time per operator group:
matrix multiplies, the optimiser, the embedding's backward, attention,
elementwise and the rest.  On CUDA it also records the GPU's kernels: the
step's wall time against the time the GPU spent in kernels says whether the
step is bound by the host (Python and launches) or by the GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

GROUPS = (  # (group, substrings of profiler op names), first match wins
    ("optimizer (AdamW)", ("adam", "optimizer.step", "Optimizer.step")),
    ("embedding backward", ("embedding_dense_backward", "embedding_backward")),
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss (cross-entropy)", ("cross_entropy", "log_softmax", "nll_loss")),
)


def group_of(name: str) -> str:
    """The group an operator's time is counted in."""
    for group, needles in GROUPS:
        if any(n in name for n in needles):
            return group
    return "everything else (elementwise, norms, dropout, copies)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="full", choices=["full", "lora", "qlora", "bitfit"])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--data-dir", default="data", help="folder with train.jsonl")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="fp32 (default) or bf16 autocast over fp32 weights, as "
                             "--precision bf16 trains")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="distilgpt2",
                        help="a shape of shapes.py (default distilgpt2)")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead"],
                        help="profile the compiled step (compiled in the warm-up)")
    parser.add_argument("--tokenizer", default=None,
                        help="the shapes' tokenizer folder (default shapes.default_tokenizer())")
    parser.add_argument("--output", default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)

    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import shapes
    import training
    import workers

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(shapes.build(args.shape, args.tokenizer or shapes.default_tokenizer(),
                                     Path(tmp) / "model"))
        config = {"recipe": "ours", "method": args.method, "model_dir": model_dir,
                  "data_dir": args.data_dir, "batch_size": 16, "warmup": 2,
                  "steps": args.steps, "repeats": 1, "precision": args.precision,
                  "device": args.device, "compile": args.compile}
        torch.manual_seed(workers.SEED)
        model, stepper, _, warm, timed, collate = workers.prepared(config)
        model.train()
        batches = [training.to_device(collate(examples), device) for examples in timed]
        for examples in warm:  # with --compile, every timed batch's shape too
            stepper.step([training.to_device(collate(examples), device)])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        workers.sync(device)
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for batch in batches:
                stepper.step([batch])
            workers.sync(device)
        wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    totals: dict[str, float] = {}
    for event in events:
        # self time, so nested operators are not counted twice
        group = group_of(event.key)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    lines = [f"{args.method}, {args.shape} shape, {args.precision}, compile {args.compile}, "
             f"batch 16, {args.steps} steps on {args.device} "
             f"({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}): "
             f"{wall:.4f} s a step (wall, profiler on)", ""]
    if cuda:
        kernels = sum(e.self_device_time_total for e in events) / 1e6 / args.steps
        lines += [f"GPU busy in kernels: {kernels:.4f} s a step, {kernels / wall:.0%} of the wall "
                  f"time ({'bound by the host' if kernels < 0.5 * wall else 'bound by the GPU'})",
                  ""]
    lines += ["Host time by operator group (self time):", ""]
    lines += [f"- {group}: {100 * micros / whole:.1f}%"
              for group, micros in sorted(totals.items(), key=lambda kv: -kv[1])]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines += ["", f"Top operators by {sort}:", "", "```",
              events.table(sort_by=sort, row_limit=15), "```"]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
