"""--precision: bf16 autocast really happens when asked, fp32 is today's computation, and
evaluation merges LoRA without changing an fp32 answer.  Every number compared here is
computed with an explicit --precision, never with auto (conftest pins auto to fp32)."""

import json

import pytest
import torch

import evaluate
import generation
import loop
import models
from helpers import SCRIPTS, write_split


def train(method, data_dir, out, *extra, model="tiny-gpt2", hook=None):
    """Train method briefly; hook(model) sees the prepared model before training."""
    script = SCRIPTS[method]
    args = script.parse_args(["--device", "cpu", "--model", model, "--data-dir", str(data_dir),
                              "--output-dir", str(out), "--batch-size", "8", "--max-steps", "6",
                              *extra])
    if hook is None:
        script.main(args)
    else:
        original = loop.fit

        def wrapped(run, model_, *rest, **kwargs):
            hook(model_)
            return original(run, model_, *rest, **kwargs)

        loop.fit = wrapped
        try:
            script.main(args)
        finally:
            loop.fit = original
    return json.loads((out / method / "metrics.json").read_text())


def record_matmul_dtypes(seen: list):
    """A hook that notes the output dtype of every Linear-like layer's forward in training."""
    def hook(model):
        def note(module, inputs, output):
            if module.training and torch.is_tensor(output):
                seen.append(output.dtype)
        for module in model.modules():
            if type(module).__name__ in ("Linear", "Conv1D", "Linear4bit"):
                module.register_forward_hook(note)
    return hook


@pytest.mark.parametrize("method,model", [("full", "tiny-gpt2"), ("lora", "tiny-llama")])
def test_bf16_autocasts_the_training_step(method, model, data_dir, tmp_path):
    seen = []
    metrics = train(method, data_dir, tmp_path / "out", "--precision", "bf16", model=model,
                    hook=record_matmul_dtypes(seen))
    assert metrics["precision"] == "bf16" and metrics["autocast"] == "bfloat16"
    assert torch.bfloat16 in seen
    assert metrics["args"]["precision"] == "bf16"
    # weights (and so the saved model) stay fp32: only the computation is bf16
    assert all(h["loss"] == h["loss"] for h in metrics["history"])


def test_fp32_runs_no_bf16_and_auto_without_native_bf16_is_fp32_bit_for_bit(data_dir,
                                                                             tmp_path):
    seen = []
    fp32 = train("full", data_dir, tmp_path / "a", "--precision", "fp32",
                 hook=record_matmul_dtypes(seen))
    auto = train("full", data_dir, tmp_path / "b", "--precision", "auto")  # conftest: no bf16
    assert seen and set(seen) == {torch.float32}
    assert fp32["precision"] == auto["precision"] == "fp32" and fp32["autocast"] == "none"
    assert [h["loss"] for h in fp32["history"]] == [h["loss"] for h in auto["history"]]
    assert fp32["valid_loss"] == auto["valid_loss"]


def test_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert models.resolve_precision(cpu, "auto") == "fp32"  # conftest: no native bf16
    monkeypatch.setattr(models, "native_bf16", lambda device: True)
    assert models.resolve_precision(cpu, "auto") == "bf16"
    assert models.resolve_precision(cpu, "fp32") == "fp32"
    assert models.nf4_config(cpu, "bf16").bnb_4bit_compute_dtype == torch.bfloat16
    assert models.nf4_config(cpu, "fp32").bnb_4bit_compute_dtype == torch.float32


def test_qlora_trains_in_bf16_on_the_cpu(data_dir, tmp_path):
    """The 4-bit layers compute in bf16, gradients reach the adapters, and the loss goes down."""
    kept = {}

    def hook(model):
        kept["model"] = model
        kept["before"] = {n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad}

    metrics = train("qlora", data_dir, tmp_path / "out", "--precision", "bf16", "--max-steps",
                    "30", "--lr", "3e-3", model="tiny-llama", hook=hook)
    model = kept["model"]
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    after = dict(model.named_parameters())
    lora_b = [n for n in kept["before"] if "lora_B" in n]
    assert lora_b and all(after[n].dtype == torch.float32 for n in lora_b)
    assert all(not torch.equal(kept["before"][n], after[n].detach()) for n in lora_b)
    losses = [h["loss"] for h in metrics["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # nats; a random tiny model


def test_merged_lora_answers_as_the_unmerged_adapter_in_fp32(tmp_path):
    from peft import AutoPeftModelForCausalLM

    data = write_split(tmp_path / "data")
    metrics = train("lora", data, tmp_path / "out", "--precision", "fp32", "--max-steps", "12",
                    "--lr", "1e-2", model="tiny-llama")
    folder = tmp_path / "out" / "lora"
    device = torch.device("cpu")
    merged = evaluate.load_for_eval("lora", folder, metrics["base_model_path"], metrics, device,
                                    False, "fp32")
    unmerged = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not hasattr(merged, "peft_config") and hasattr(unmerged, "peft_config")
    tokenizer = models.load_tokenizer(metrics["base_model_path"])
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    answers = [generation.generate_answers(m, tokenizer, prompts, 12, device, stop="\nUser:",
                                           batch_size=5, precision="fp32")
               for m in (merged, unmerged)]
    assert answers[0] == answers[1]
    assert any(answers[0])  # the adapter says something, so the comparison is not vacuous


def test_evaluate_records_bf16_in_the_fingerprint_only(tmp_path):
    """fp32 predictions keep their fingerprint; bf16 ones are told apart from them."""
    data = write_split(tmp_path / "data")
    out = tmp_path / "out"
    train("lora", data, out, "--precision", "fp32")
    marker = out / "lora" / evaluate.FINGERPRINT
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data),
                                       "--output-dir", str(out), "--precision", "fp32"]))
    fp32 = json.loads(marker.read_text())["fingerprint"]
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data),
                                       "--output-dir", str(out), "--precision", "bf16"]))
    assert json.loads(marker.read_text())["fingerprint"] != fp32
    evaluate.main(evaluate.parse_args(["--device", "cpu", "--data-dir", str(data),
                                       "--output-dir", str(out), "--precision", "auto"]))
    assert json.loads(marker.read_text())["fingerprint"] == fp32  # auto = fp32 here
