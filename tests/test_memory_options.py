"""The memory options on the CPU: --gradient-checkpointing (the same gradients) and --optim adamw_8bit."""

import json
from types import SimpleNamespace

import pytest
import torch

import answer_loss
import common
import models
import runs
import steps
import tuning
from helpers import SCRIPTS, train_args
from settings import TrainSettings


def one_step_gradients(method, data_dir, checkpointing):
    """The gradients of one fp32 step on tiny-llama, and how often each MLP ran forward.

    tiny-llama has no dropout and --dropout 0 turns off the adapters', so both runs
    compute the same function; the seed fixes the adapters' initialisation.
    """
    script = SCRIPTS[method]
    argv = ["--device", "cpu", "--model", "tiny-llama", "--data-dir", str(data_dir)]
    argv += ["--dropout", "0"] if method in ("lora", "qlora") else []
    argv += ["--gradient-checkpointing"] if checkpointing else []
    settings = TrainSettings.from_args(script.parse_args(argv))
    torch.manual_seed(0)
    run = SimpleNamespace(settings=settings, model_path=models.resolve_model("tiny-llama"),
                          device=torch.device("cpu"), precision="fp32")
    model, tokenizer, _ = runs.load_prepared(run, script.prepare,
                                             {"quantize_4bit": method == "qlora"})
    calls = {}
    for name, module in models.causal_lm(model).named_modules():
        if name.endswith(".mlp"):
            # A pre-hook: the recomputation stops once it has every tensor it needs, before
            # the MLP returns, so a forward hook would not see it.
            module.register_forward_pre_hook(
                lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    examples = common.tokenize_rows(tokenizer, common.load_split(data_dir, "train")[:6], 256)
    batch = common.collate(examples, tokenizer.pad_token_id)
    model.train()
    nll, _ = answer_loss.answer_loss(model, **batch)
    nll.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return grads, calls


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "bitfit"])
def test_gradient_checkpointing_gives_the_same_gradients(method, data_dir):
    plain, plain_calls = one_step_gradients(method, data_dir, checkpointing=False)
    ckpt, ckpt_calls = one_step_gradients(method, data_dir, checkpointing=True)
    # Checkpointing is really on: each layer's MLP runs again in the backward pass.
    assert plain_calls and set(plain_calls.values()) == {1}
    assert ckpt_calls == {name: 2 for name in plain_calls}
    assert plain.keys() == ckpt.keys() and plain
    assert not [name for name, grad in ckpt.items() if grad is None]
    # The first layer sits right behind the (for LoRA, QLoRA, BitFit frozen) embeddings: its
    # trainable tensors must get a gradient.  (LoRA's A matrices get exactly zero at step one,
    # B starting at zero, so not every tensor can be asked for one.)
    assert any(grad.abs().sum() > 0 for name, grad in ckpt.items() if ".layers.0." in name)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_a_qlora_run_with_gradient_checkpointing_ends_where_one_without_does(data_dir, tmp_path):
    """End to end through the script: the same losses and adapter after 3 steps."""
    from safetensors.torch import load_file

    script, adapters, losses = SCRIPTS["qlora"], {}, {}
    for name, extra in (("plain", []), ("ckpt", ["--gradient-checkpointing"])):
        script.main(train_args(script, data_dir, tmp_path / name, "--model", "tiny-llama",
                               "--dropout", "0", "--max-steps", "3", *extra))
        folder = tmp_path / name / "qlora"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["args"]["gradient_checkpointing"] is bool(extra)
        losses[name] = [h["loss"] for h in metrics["history"]]
        adapters[name] = load_file(folder / "adapter_model.safetensors")
    torch.testing.assert_close(losses["ckpt"], losses["plain"], rtol=1e-5, atol=0)
    for key, tensor in adapters["plain"].items():
        torch.testing.assert_close(adapters["ckpt"][key], tensor, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_does_not_change_the_run_id(data_dir):
    """Seeds and results of a run with and without it belong together: the numbers are the same."""
    script = SCRIPTS["lora"]
    base = TrainSettings.from_args(script.parse_args(["--data-dir", str(data_dir)]))
    assert (tuning.run_id(base, "lora")
            == tuning.run_id(base.replace(gradient_checkpointing=True), "lora"))
    assert tuning.run_id(base, "lora") != tuning.run_id(base.replace(optim="adamw_8bit"), "lora")


def test_8bit_adamw_keeps_8bit_moments_on_the_cpu():
    """bitsandbytes 0.50 has a CPU kernel for its blockwise 8-bit update."""
    import bitsandbytes as bnb

    settings = TrainSettings(optim="adamw_8bit", lr=1e-2)
    weight = torch.nn.Parameter(torch.randn(128, 64))  # 8192 elements: above min_8bit_size
    optimizer = steps.make_optimizer([weight], settings)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    before = weight.detach().clone()
    weight.sum().backward()
    optimizer.step()
    assert optimizer.state[weight]["state1"].dtype == torch.uint8
    assert not torch.equal(weight.detach(), before)
    assert isinstance(steps.make_optimizer([weight], TrainSettings()), torch.optim.AdamW)


def test_full_finetuning_with_8bit_adamw_learns_as_adamw_does(data_dir, tmp_path):
    """Over 12 steps the training loss falls by a tenth, to within 5% of fp32 AdamW's."""
    final = {}
    for optim in ("adamw", "adamw_8bit"):
        args = train_args(SCRIPTS["full"], data_dir, tmp_path / optim, "--optim", optim,
                          "--max-steps", "12", "--lr", "1e-3", "--warmup-ratio", "0")
        SCRIPTS["full"].main(args)
        metrics = json.loads((tmp_path / optim / "full" / "metrics.json").read_text())
        losses = [h["loss"] for h in metrics["history"]]
        assert metrics["args"]["optim"] == optim and len(losses) == 12
        first, final[optim] = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert final[optim] < 0.9 * first, (optim, losses)
    assert abs(final["adamw_8bit"] - final["adamw"]) < 0.05 * final["adamw"], final


def test_resume_refuses_another_optimiser(data_dir, tmp_path, capsys):
    from helpers import run_and_expect_exit, stop_at

    script = SCRIPTS["full"]
    with pytest.raises(KeyboardInterrupt):
        script.main(train_args(script, data_dir, tmp_path, "--max-steps", "4"),
                    callbacks=[stop_at(2)])
    line = run_and_expect_exit(script.main, train_args(script, data_dir, tmp_path, "--max-steps",
                                                       "4", "--resume", "--optim", "adamw_8bit"),
                               capsys)
    assert "optim=adamw" in line and "adamw_8bit" in line
