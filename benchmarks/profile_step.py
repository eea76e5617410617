"""Where a training step's time goes: torch.profiler over this project's step, grouped by operator.

    python benchmarks/profile_step.py                   # full fine-tuning, distilgpt2 shape
    python benchmarks/profile_step.py --method lora --steps 3
    python benchmarks/profile_step.py --precision bf16  # the bf16 autocast step

Builds the same distilgpt2-shaped model and batches as bench_speed.py (the
smollm2 tokenizer, the longest batch to warm up, quantile batches to time),
prepares it with the method script's prepare(), and profiles training.Trainer's
step.  Prints the share of step time per operator group: matrix multiplies,
the optimiser, the embedding's backward, attention, elementwise and the rest.
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
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import shapes
    import workers

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(shapes.build("distilgpt2", shapes.default_tokenizer(),
                                     Path(tmp) / "model"))
        config = {"recipe": "ours", "method": args.method, "model_dir": model_dir,
                  "data_dir": args.data_dir, "batch_size": 16, "warmup": 2,
                  "steps": args.steps, "repeats": 1, "precision": args.precision}
        torch.manual_seed(workers.SEED)
        model, stepper, _, warm, timed, collate = workers.prepared(config)
        model.train()
        for examples in warm:
            stepper.step([collate(examples)])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for examples in timed:
                stepper.step([collate(examples)])
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        # self time, so nested operators are not counted twice
        group = group_of(event.key)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    print(f"{args.method}, distilgpt2 shape, {args.precision}, batch 16, {args.steps} steps, "
          f"{torch.get_num_threads()} threads: {whole / 1e6 / args.steps:.2f} s a step")
    for group, micros in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {group:55s} {100 * micros / whole:5.1f}%")
    print("\ntop operators by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
