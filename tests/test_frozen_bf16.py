"""Frozen weights stored in bf16 (models.store_frozen_in_bf16): under bf16 autocast the
matmuls already see bf16 copies of them, so a step's loss and gradients, and evaluate's
greedy answers, are the same with and without; fp32 runs are untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

import common
import evaluate
import answer_loss
import generation
import models
from settings import TrainSettings
from helpers import SCRIPTS, write_split

CPU = torch.device("cpu")


def prepared(method, model_name, cast, precision="bf16"):
    """A tiny model loaded and prepared by the method's script, cast or not."""
    settings = TrainSettings.from_args(SCRIPTS[method].parse_args(
        ["--device", "cpu", "--model", model_name, "--precision", precision]))
    kwargs = {"quantize_4bit": True} if method == "qlora" else {}
    model, tokenizer, _ = models.load_model(model_name, CPU, precision=precision, **kwargs)
    torch.manual_seed(0)  # LoRA's A is drawn at random
    model, _ = SCRIPTS[method].prepare(model, settings)
    if method in ("lora", "qlora"):  # LoRA's B starts at zero: give it values, so grads reach A
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    names = models.store_frozen_in_bf16(model, precision) if cast else []
    return model, tokenizer, names


def step(model, tokenizer, data_dir):
    """One bf16-autocast forward and backward on 8 rows: (loss, {trainable name: grad})."""
    rows = common.load_split(data_dir, "train")[:8]
    batch = common.collate(common.tokenize_rows(tokenizer, rows, 256), tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, count = answer_loss.answer_loss(model, **batch)
    loss = nll / count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,model_name", [("lora", "tiny-gpt2"), ("lora", "tiny-llama"),
                                               ("bitfit", "tiny-llama"), ("bitfit", "tiny-gpt2"),
                                               ("qlora", "tiny-llama")])
def test_one_step_has_the_same_loss_and_gradients(method, model_name, data_dir):
    results = []
    for cast in (False, True):
        model, tokenizer, names = prepared(method, model_name, cast)
        results.append((step(model, tokenizer, data_dir), names, model))
    (loss0, grads0), _, _ = results[0]
    (loss1, grads1), names, model = results[1]
    assert names  # something was cast, so the comparison is not vacuous
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.bfloat16 and not params[n].requires_grad for n in names)
    # trainable tensors, norms and embeddings stay fp32
    assert all(p.dtype == torch.float32 for n, p in params.items() if p.requires_grad)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__:
            assert all(p.dtype == torch.float32 for p in module.parameters(recurse=False))


def test_fp32_casts_nothing():
    model, _, names = prepared("lora", "tiny-llama", cast=True, precision="fp32")
    assert names == []
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_tied_lm_head_stays_fp32_with_its_embedding():
    model, _, names = prepared("lora", "tiny-gpt2", cast=True)
    lm = models.causal_lm(model)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert lm.get_input_embeddings().weight.dtype == torch.float32
    assert not any(name.endswith("wte.weight") or "lm_head" in name for name in names)


def test_bitfit_at_bf16_saves_the_base_weights_in_fp32(data_dir, tmp_path):
    out = tmp_path / "out"
    SCRIPTS["bitfit"].main(SCRIPTS["bitfit"].parse_args(
        ["--device", "cpu", "--model", "tiny-llama", "--data-dir", str(data_dir),
         "--output-dir", str(out), "--batch-size", "8", "--max-steps", "2",
         "--precision", "bf16"]))
    metrics = json.loads((out / "bitfit" / "metrics.json").read_text())
    base = load_file(f"{metrics['base_model_path']}/model.safetensors")
    saved = load_file(out / "bitfit" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    weights = [n for n in base if not n.endswith("bias")]
    assert weights and all(torch.equal(base[n], saved[n]) for n in weights)


@pytest.mark.parametrize("method", ["lora", "bitfit", "qlora"])
def test_evaluate_answers_the_same_from_bf16_weights(method, tmp_path):
    """load_for_eval at bf16 stores bf16 weights; greedy answers equal those of the fp32-stored
    model under the same autocast (LoRA: merged in fp32 first)."""
    data = write_split(tmp_path / "data")
    out = tmp_path / "out"
    SCRIPTS[method].main(SCRIPTS[method].parse_args(
        ["--device", "cpu", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir",
         str(out), "--batch-size", "8", "--max-steps", "12", "--lr", "1e-2",
         "--precision", "bf16"]))
    folder = out / method
    metrics = json.loads((folder / "metrics.json").read_text())
    tokenizer = models.load_tokenizer(metrics["base_model_path"])
    prompts = [json.loads(line)["prompt"] for line in (data / "eval.jsonl").read_text().splitlines()]
    reference = reference_model(method, folder)
    model = evaluate.load_for_eval(method, folder, metrics["base_model_path"], metrics, CPU,
                                   False, "bf16")
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype != torch.bfloat16 for p in reference.parameters())
    answers = [generation.generate_answers(m, tokenizer, prompts, 12, CPU, stop="\nUser:",
                                           batch_size=5, precision="bf16")
               for m in (reference, model)]
    assert answers[0] == answers[1]
    assert any(answers[1])  # the model says something, so the comparison is not vacuous


def reference_model(method, folder):
    """The run as load_for_eval loads it at bf16, but with every weight left in fp32."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    if method == "bitfit":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if method == "qlora":
        return AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        **models.nf4_load_kwargs(CPU, "bf16"))
    return AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32).merge_and_unload()
