"""Validation quality at fp32 and bf16 autocast: one short run per method and precision.

    python benchmarks/precision_check.py --model smollm2-135m --data-dir data --output-dir /tmp/pc

Each method trains --epochs (default 1) at its script's default rate (the published
search's choice), seed 42, once with --precision fp32 and once with --precision bf16,
then answers the validation split with the same greedy decoding as the search
(tuning.validation_score).  Only data/train.jsonl and data/valid.jsonl are read.
Prints one markdown row per run, as it finishes; no timing is reported (a shared
machine's timings mean nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune  # noqa: E402
import finetune_bitfit  # noqa: E402
import finetune_lora  # noqa: E402
import finetune_qlora  # noqa: E402
import tuning  # noqa: E402
from settings import TrainSettings  # noqa: E402

SCRIPTS = {"lora": (finetune_lora, {}), "qlora": (finetune_qlora, {"quantize_4bit": True}),
           "full": (finetune, {}), "bitfit": (finetune_bitfit, {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output-dir", default="outputs/precision-check")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--methods", default=",".join(SCRIPTS))
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    print("| method | lr | precision | validation key accuracy | validation loss |")
    print("|---|---|---|---|---|", flush=True)
    for method in args.methods.split(","):
        script, load_kwargs = SCRIPTS[method]
        for precision in args.precisions.split(","):
            parsed = script.parse_args(["--model", args.model, "--data-dir", args.data_dir,
                                        "--output-dir", args.output_dir, "--epochs",
                                        str(args.epochs), "--precision", precision])
            settings = TrainSettings.from_args(parsed)
            metrics, run, model, tokenizer = tuning.train_once(
                settings, method, script.prepare, method, load_kwargs, extra={}, save=False)
            score, _, label = tuning.validation_score(run, model, tokenizer)
            print(f"| {method} | {settings.lr:g} | {metrics['precision']} | {score:.1f}% | "
                  f"{metrics['valid_loss'][-1]['loss']:.4f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
