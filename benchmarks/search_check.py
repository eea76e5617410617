"""Does a cheaper learning-rate search choose what the published one chose?

    python benchmarks/search_check.py --search-epochs 0.5            # smollm2-135m, data/
    python benchmarks/search_check.py --search-epochs 0.5 --reference results/smollm2-135m/search
    python benchmarks/search_check.py --score-runs outputs/lora /tmp/other/lora   # at the final budget

Runs each fine-tune script with --tune-lr --search-only at the given budget (same
grid, seed, precision and validation split as the reference), then writes
benchmarks/search-check.md: per method, the rate each search chose, every rate's
validation score and loss on both budgets, and the search's training seconds.
A cheaper search is kept only if it chooses the same rates, or rates whose
validation scores in the reference search are no worse than the reference choice.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

SCRIPTS = {"full": "finetune.py", "lora": "finetune_lora.py", "qlora": "finetune_qlora.py",
           "bitfit": "finetune_bitfit.py"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-epochs", type=float, default=0.5,
                        help="the cheaper budget to check (default 0.5)")
    parser.add_argument("--reference", type=Path, default=ROOT / "results/smollm2-135m/search",
                        help="folder of the reference search/<method>.json files")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs/search-check")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--methods", default="full,lora,qlora,bitfit")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/search-check.md")
    parser.add_argument("--score-runs", nargs="+", type=Path, default=None, metavar="RUN",
                        help="instead: score finished run folders (e.g. the same method trained "
                             "to the end at two rates) on the validation split, with the "
                             "search's greedy decoding, and print each one's score and loss")
    parser.add_argument("--no-run", action="store_true",
                        help="compare the searches already in --output-dir/search (e.g. a "
                             "rigorous run's outputs/) instead of running them")
    return parser.parse_args(argv)


def run_search(method: str, args) -> float:
    """Run one script's search only; returns its wall seconds."""
    command = [sys.executable, SCRIPTS[method], "--model", args.model, "--tune-lr",
               "--search-only", "--search-epochs", f"{args.search_epochs:g}",
               "--precision", args.precision, "--data-dir", str(args.data_dir),
               "--output-dir", str(args.output_dir)]
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - started


def cell(result: dict) -> str:
    if result["diverged"]:
        return "diverged"
    return f"{result['score']:.1f}% / {result['valid_loss']:.4f}"


def verdict(new: dict, reference: dict) -> tuple[bool, str]:
    """Whether the cheaper search's choice is as good on the reference's validation scores."""
    if new["chosen_lr"] == reference["chosen_lr"]:
        return True, "same rate"
    scores = {r["lr"]: r["score"] for r in reference["results"] if not r["diverged"]}
    chosen, best = scores.get(new["chosen_lr"]), scores[reference["chosen_lr"]]
    if chosen is None:
        return False, "its rate is not in the reference grid"
    ok = chosen >= best
    return ok, (f"other rate; reference score there {chosen:.1f}% vs {best:.1f}%: "
                + ("no worse" if ok else "worse"))


def score_runs(args) -> int:
    """Validation score and loss of finished runs, decoded as the search decodes."""
    import torch

    import evaluate
    import generation
    import models

    device = torch.device("cpu")
    rows = common.read_jsonl(args.data_dir / "valid.jsonl")
    template = common.read_json(args.data_dir / "template.json")
    stop = common.turn_marker(template)
    for folder in args.score_runs:
        metrics = common.read_json(folder / "metrics.json")
        precision = metrics["precision"]
        model = evaluate.load_for_eval(metrics["method"], folder, metrics["base_model_path"],
                                       metrics, device, False, precision)
        tokenizer = models.load_tokenizer(folder) if (folder / "tokenizer.json").exists() \
            else models.load_tokenizer(metrics["base_model_path"])
        max_new = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])
        answers = generation.generate_answers(model, tokenizer, [r["prompt"] for r in rows],
                                              max_new, device, stop=stop, precision=precision)
        summary = common.summarise(common.score_rows(rows, answers))
        field, _, label = common.quality_key([summary])
        print(f"{folder}: lr {metrics['args']['lr']:g}, seed {metrics['args']['seed']}, "
              f"{metrics['epochs']:g} epoch(s): validation {label} {summary[field]:.1f}%, "
              f"validation loss {metrics['valid_loss'][-1]['loss']:.4f}")
    return 0


def main(args) -> int:
    if args.score_runs:
        return score_runs(args)
    methods = args.methods.split(",")
    walls = {m: None if args.no_run else run_search(m, args) for m in methods}
    lines = [
        "# Learning-rate search: cheaper budget against the reference",
        "",
        "- Command: `python benchmarks/search_check.py " + (
            f"--no-run --output-dir {args.output_dir}`" if args.no_run else
            f"--search-epochs {args.search_epochs:g} --model {args.model}`"),
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Reference: `{args.reference.relative_to(ROOT) if args.reference.is_relative_to(ROOT) else args.reference}`",
        "- Cells: validation score (the search's headline) / validation loss, per rate; "
        "the chosen rate in bold.",
        "",
        "| method | budget | " + " | ".join(f"rate {i + 1}" for i in range(3))
        + " | chosen | training s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    notes = []
    for method in methods:
        reference = common.read_json(args.reference / f"{method}.json")
        new = common.read_json(args.output_dir / "search" / f"{method}.json")
        if new["grid"] != reference["grid"]:
            raise SystemExit(f"{method}: grids differ ({new['grid']} vs {reference['grid']})")
        for label, search, wall in ((f"{reference['search_epochs']:g} epoch (reference)",
                                     reference, None),
                                    (f"{new['search_epochs']:g} epoch", new, walls[method])):
            if search is new and new["search_epochs"] == reference["search_epochs"]:
                raise SystemExit(f"{method}: both searches used {new['search_epochs']:g} epoch")
            cells = [(f"**{cell(r)}**" if r["lr"] == search["chosen_lr"] else cell(r))
                     + f" at {r['lr']:g}" for r in search["results"]]
            seconds = sum(r.get("train_seconds") or 0 for r in search["results"])
            lines.append(f"| {method} | {label} | " + " | ".join(cells)
                         + f" | {search['chosen_lr']:g} | {seconds:.0f} | "
                         + ("-" if wall is None else f"{wall:.0f}") + " |")
        ok, why = verdict(new, reference)
        all_ok &= ok
        notes.append(f"- {method}: {why}.")
    lines += ["", *notes, "",
              "Verdict: " + ("every choice is the reference's or no worse on its validation "
                             "scores; the cheaper budget is safe on this data."
                             if all_ok else "at least one choice is worse; keep the reference "
                                            "budget."), ""]
    common.write_text_atomic(args.report, "\n".join(lines))
    print("\n".join(lines))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
