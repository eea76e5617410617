"""benchmarks/gpu_check.py's parts that run on the CPU: the memory-table row on a tiny shape,
the in-place NF4 quantisation it uses for QLoRA, and the report."""

import math
import sys

import pytest
import torch

import models
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import shapes  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer_dir():
    return models.resolve_model("tiny-llama")


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "bitfit"])
def test_a_memory_row_trains_the_method_on_a_tiny_shape(method, tokenizer_dir):
    row = gpu_check.memory_row("tiny-llama-untied", method, method == "lora", CPU, "bf16",
                               tokenizer_dir, batch=2, seq_len=16, steps=1, warmup=1)
    assert row["seconds_per_step"] > 0 and math.isfinite(row["loss"])
    assert (row["trainable_params"] == row["total_params"]) == (method == "full")
    assert row["peak_allocated_gib"] is None  # no tensor-level counter on the CPU


def test_quantize_nf4_gives_4bit_layers_peft_adapts(tokenizer_dir):
    from transformers import AutoModelForCausalLM

    import finetune_qlora
    from settings import TrainSettings

    tokenizer = models.load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shapes.config("tiny-llama-untied",
                                                                    tokenizer))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        gpu_check.quantize_nf4(model, CPU, torch.float32)
        after = model(input_ids=ids).logits
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds and type(model.get_output_embeddings()).__name__ == "Linear"
    assert not torch.equal(before, after)  # really quantised...
    assert torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1] > 0.9  # ...not broken
    settings = TrainSettings.from_args(finetune_qlora.parse_args(["--device", "cpu"]))
    model, _ = finetune_qlora.prepare(model, settings)
    adapted = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"
               and hasattr(m, "lora_A")]
    assert len(adapted) == 14  # q, k, v, o, gate, up, down in 2 layers


def test_the_report_says_which_cards_fit_and_which_rows_failed():
    report = {"command": "python benchmarks/gpu_check.py", "device_name": "a GPU",
              "versions": "torch x", "started": "now", "seconds": 1.0, "budget": 480,
              "tiny": False, "precision": "bf16",
              "logs": "/tmp/logs", "memory_batch": 16, "bench": None,
              "steps": [{"step": "pytest-cuda", "status": "passed", "seconds": 3.0,
                         "command": "python -m pytest tests/test_cuda.py",
                         "tail": "===== 9 passed in 3.0s ====="}],
              "memory": [{"shape": "llama-3.1-8b", "method": "lora",
                          "gradient_checkpointing": False, "weights_gib": 15.0,
                          "peak_allocated_gib": 40.0, "peak_reserved_gib": 42.0,
                          "seconds_per_step": 0.5, "fits_24gb": False, "fits_80gb": True},
                         {"shape": "llama-3.1-8b", "method": "qlora",
                          "gradient_checkpointing": False, "error": "CUDA out of memory"}]}
    text = gpu_check.render(report)
    assert "| pytest-cuda | passed | 3.0 | 9 passed in 3.0s |" in text
    assert "| llama-3.1-8b | lora | no | 15.00 | 40.00 | 42.00 | 0.5 | no | yes |" in text
    assert "| llama-3.1-8b | qlora | no | CUDA out of memory |" in text
    assert "wrote no JSON" in text


def test_the_targets_take_the_better_of_ours_and_ours_compiled_against_trl():
    def row(method, plain, compiled):
        ratio = lambda value: {"median": value, "min": value, "max": value}  # noqa: E731
        return {"method": method, "vs_trl": {"bf16": ratio(plain) if plain else None},
                "compiled_vs_trl": {"bf16": ratio(compiled) if compiled else None}}

    report = {"seconds": 500.0, "tiny": False, "precision": "bf16",
              "steps": [{"step": "evaluate", "status": "passed", "seconds": 14.2}],
              "bench": {"summary": {"training": {"distilgpt2-shape": {"rows": [
                  row("full", 1.2, 3.4), row("lora", 3.1, None), row("qlora", 1.1, 2.0),
                  row("bitfit", 1.0, 9.0)]}}}}}
    checks = {target.split(":")[0]: (measured, met) for target, measured, met
              in gpu_check.targets(report)}
    assert checks["the whole check in at most 480 s"] == ("500 s", False)
    assert [v for k, v in checks.items() if k.startswith("evaluate.py")] == [("14.2 s", True)]
    assert checks["distilgpt2-shape, full"] == ("ours 1.20x, compiled 3.40x", True)
    assert checks["distilgpt2-shape, lora"] == ("ours 3.10x", True)
    assert checks["distilgpt2-shape, qlora"] == ("ours 1.10x, compiled 2.00x", False)
    assert not any("bitfit" in k for k in checks)  # reported, not a target
    report["bench"] = None
    assert gpu_check.targets(report)[-1][1:] == ("not measured", None)
