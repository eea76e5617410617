"""benchmarks/gpu_check.py's parts that run on the CPU: the memory-table row on a tiny shape,
the in-place NF4 quantisation it uses for QLoRA, a step under its timeout, and the report."""

import math
import sys

import pytest
import torch

import gpu_check
from bench_workers import shape_config
import models

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
    model = AutoModelForCausalLM.from_config(shape_config("tiny-llama-untied",
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
              "versions": "torch x", "started": "now", "seconds": 1.0, "tiny": False,
              "precision": "bf16", "logs": "/tmp/logs", "memory_batch": 16, "bench": None,
              "steps": [{"step": "pytest-cuda", "status": "passed", "seconds": 3.0,
                         "command": "python -m pytest tests/test_cuda.py",
                         "tail": "===== 9 passed in 3.0s ====="},
                        {"step": "train-full", "status": "failed (exit 1)", "seconds": 2.0,
                         "command": "python finetune.py", "tail": "Traceback\nerror: a | b\n"}],
              "memory": [{"shape": "llama-3.1-8b", "method": "lora",
                          "gradient_checkpointing": False, "weights_gib": 15.0,
                          "peak_allocated_gib": 40.0, "peak_reserved_gib": 42.0,
                          "seconds_per_step": 0.5, "fits_24gb": False, "fits_80gb": True},
                         {"shape": "llama-3.1-8b", "method": "qlora",
                          "gradient_checkpointing": False, "error": "CUDA out of memory"}]}
    text = gpu_check.render(report)
    assert "| pytest-cuda | passed | 3.0 | 9 passed in 3.0s |" in text
    assert "| train-full | failed (exit 1) | 2.0 | error: a / b |" in text  # why, table-safe
    assert "| llama-3.1-8b | lora | no | 15.00 | 40.00 | 42.00 | 0.5 | no | yes |" in text
    assert "| llama-3.1-8b | qlora | no | CUDA out of memory |" in text
    assert "wrote no JSON" in text


def test_a_step_records_its_status_time_and_the_tail_of_its_log(tmp_path):
    passed = gpu_check.run_step("ok", [sys.executable, "-c", "print('hello')"], 60, tmp_path)
    assert passed["status"] == "passed" and passed["tail"] == "hello\n"
    assert (tmp_path / "ok.log").read_text() == "hello\n"
    failed = gpu_check.run_step("bad", [sys.executable, "-c", "raise SystemExit(3)"], 60, tmp_path)
    assert failed["status"] == "failed (exit 3)"
    slow = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1,
                              tmp_path)
    assert slow["status"] == "timed out after 1 s"
