"""A bf16 training step on smollm2-135m with frozen weights stored in fp32 against bf16.

    python benchmarks/frozen_bf16_speed.py lora      # or bitfit

Both copies live in one process and take their steps in turn, so a busy machine slows
both alike; prints each copy's median seconds per step (steps 2-7) and the last loss,
which must be equal (models.store_frozen_in_bf16 changes no number under autocast).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import finetune_bitfit  # noqa: E402
import finetune_lora  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
from answer_loss import answer_loss  # noqa: E402
from settings import TrainSettings  # noqa: E402


def main(method: str, steps: int = 7) -> None:
    """Time alternating steps of the two copies; print medians and losses."""
    script = {"lora": finetune_lora, "bitfit": finetune_bitfit}[method]
    cpu = torch.device("cpu")
    runs = {}
    for name in ("fp32-stored", "bf16-stored"):
        torch.manual_seed(0)  # LoRA's A is drawn at random: the same in both copies
        model, tokenizer, _ = models.load_model("smollm2-135m", cpu, precision="bf16")
        settings = TrainSettings.from_args(script.parse_args(["--device", "cpu",
                                                              "--precision", "bf16"]))
        model, _ = script.prepare(model, settings)
        if name == "bf16-stored":
            models.store_frozen_in_bf16(model, "bf16")
        model.train()
        optimizer = training.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                            settings)
        runs[name] = (model, optimizer, [], [])
    rows = [{"prompt": f"User: What is {a} plus {b}?\nAssistant:",
             "completion": f" {a} plus {b} is {a + b}."} for a in range(4) for b in range(2)]
    batch = common.collate(common.tokenize_rows(tokenizer, rows, 256), tokenizer.pad_token_id)
    for _ in range(steps):
        for model, optimizer, times, losses in runs.values():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nll, count = answer_loss(model, **batch)
            (nll / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(float(nll.detach() / count))
    for name, (_, _, times, losses) in runs.items():
        print(f"{method} {name}: batch 8, median {statistics.median(times[1:]):.3f} s/step "
              f"(steps 2-{steps}), last loss {losses[-1]!r}")


if __name__ == "__main__":
    main(sys.argv[1])
