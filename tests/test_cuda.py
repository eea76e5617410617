"""The CUDA path: bf16 autocast, NF4 on the GPU, batched generation, resume, out-of-memory advice.

Skipped where torch sees no CUDA device; every other test pins --device cpu, so
on a GPU machine these are the tests of the GPU.  Each run names --device cuda.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common
import finetune
import finetune_lora
import finetune_qlora
import generation
import models
import runs
from helpers import run_and_expect_exit, stop_at, write_split
from settings import TrainSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def train(script, data_dir, out, *extra, device="cuda", callbacks=()):
    """A short tiny-llama run (no dropout anywhere: runs on either device draw alike)."""
    args = script.parse_args(["--device", device, "--model", "tiny-llama", "--data-dir",
                              str(data_dir), "--output-dir", str(out), "--batch-size", "8",
                              "--max-steps", "6", *extra])
    script.main(args, callbacks=callbacks)
    method = {finetune: "full", finetune_lora: "lora", finetune_qlora: "qlora"}[script]
    return json.loads((out / method / "metrics.json").read_text())


def test_bf16_autocast_trains_fp32_weights_close_to_the_cpu(data_dir, tmp_path):
    """Autocast computes in bf16 while the weights stay fp32; step 1 (before any update) has
    the CPU's fp32 loss to within bf16's rounding (8 mantissa bits: 2% is generous)."""
    cuda = train(finetune, data_dir, tmp_path / "cuda")
    cpu = train(finetune, data_dir, tmp_path / "cpu", device="cpu")
    assert cuda["device"].startswith("cuda") and cpu["device"] == "cpu"
    if torch.cuda.is_bf16_supported():
        assert cuda["autocast"] == "bfloat16"
    weights = load_file(tmp_path / "cuda" / "full" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert cuda["history"][0]["loss"] == pytest.approx(cpu["history"][0]["loss"], rel=2e-2)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in cuda["history"])


def test_nf4_base_lives_on_the_gpu_and_qlora_trains(data_dir, tmp_path):
    settings = TrainSettings.from_args(finetune_qlora.parse_args(
        ["--device", "cuda", "--model", "tiny-llama", "--dropout", "0"]))
    run = SimpleNamespace(settings=settings, model_path=models.resolve_model("tiny-llama"),
                          device=CUDA, precision="fp32")
    model, _, _ = runs.load_prepared(run, finetune_qlora.prepare, {"quantize_4bit": True})
    packed = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert packed and all(p.device.type == "cuda" and p.dtype == torch.uint8 for p in packed)
    del model
    metrics = train(finetune_qlora, data_dir, tmp_path / "out", "--dropout", "0")
    assert metrics["details"]["base_quantization"] == "nf4"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"])
    adapter = load_file(tmp_path / "out" / "qlora" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0
               for name, tensor in adapter.items())  # B starts at zero: it moved


def test_batched_generation_equals_one_at_a_time_on_cuda(tmp_path):
    """Left padding under bf16 autocast gives the answers of one prompt at a time.

    On a model trained until it answers its questions, so the greedy choice is
    clear and a bf16 rounding cannot flip it (on a random model it could).
    """
    data = write_split(tmp_path / "data", n_train=8, n_eval=4)
    rows = common.load_split(data, "train")  # prompts of 3 lengths, so the batch is padded
    common.write_jsonl(data / "train.jsonl", [
        {**row, "prompt": row["prompt"].replace("User: ", "User: " + "Please, " * (i % 3))}
        for i, row in enumerate(rows)])
    finetune.main(finetune.parse_args([
        "--device", "cuda", "--model", "tiny-gpt2", "--data-dir", str(data), "--output-dir",
        str(tmp_path / "out"), "--batch-size", "8", "--max-steps", "150", "--lr", "3e-3",
        "--warmup-ratio", "0"]))
    model, tokenizer, _ = models.load_model(str(tmp_path / "out" / "full"), CUDA)
    model.eval()
    rows = common.load_split(data, "train")
    prompts = [r["prompt"] for r in rows]
    batched = generation.generate_answers(model, tokenizer, prompts, 30, CUDA, stop="\nUser:",
                                          batch_size=16)
    single = generation.generate_answers(model, tokenizer, prompts, 30, CUDA, stop="\nUser:",
                                         batch_size=1)
    assert batched == single
    assert len({len(common.prompt_ids(tokenizer, p)) for p in prompts}) > 1  # padding happened


def test_resumed_run_matches_an_unbroken_one_on_cuda(data_dir, tmp_path):
    """LoRA (frozen embeddings: no atomic-add embedding backward) stopped at step 4 and resumed.

    Within a tolerance, not bit for bit: some CUDA kernels sum in a varying order
    and bf16 autocast can magnify a last-bit difference.  rtol 1e-3 still catches a
    resume that restores the schedule, the moments or the batch order wrongly (each
    moves the adapters by percents).
    """
    extra = ["--dropout", "0", "--max-steps", "10", "--save-every", "3"]
    unbroken = train(finetune_lora, data_dir, tmp_path / "unbroken", *extra)
    with pytest.raises(KeyboardInterrupt):
        train(finetune_lora, data_dir, tmp_path / "broken", *extra, callbacks=[stop_at(4)])
    resumed = train(finetune_lora, data_dir, tmp_path / "broken", *extra, "--resume")
    torch.testing.assert_close([h["loss"] for h in resumed["history"]],
                               [h["loss"] for h in unbroken["history"]], rtol=1e-3, atol=0)
    a = load_file(tmp_path / "unbroken" / "lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_out_of_cuda_memory_is_caught_with_advice(data_dir, tmp_path, capsys):
    def oom(step, control):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def main(args):
        finetune.main(args, callbacks=[oom])

    args = finetune.parse_args(["--device", "cuda", "--model", "tiny-gpt2", "--data-dir",
                                str(data_dir), "--output-dir", str(tmp_path), "--batch-size",
                                "8", "--max-steps", "2"])
    line = run_and_expect_exit(main, args, capsys)
    assert "out of CUDA memory at batch size 8" in line
    assert "--batch-size 4 --grad-accum 2" in line
    assert not (tmp_path / "full").exists()


def test_8bit_adamw_learns_on_cuda(data_dir, tmp_path):
    """As tests/test_memory_options.py checks on the CPU: the loss falls by a tenth in 12 steps."""
    metrics = train(finetune, data_dir, tmp_path, "--optim", "adamw_8bit", "--lr", "1e-3",
                    "--warmup-ratio", "0", "--max-steps", "12", "--model", "tiny-gpt2")
    assert metrics["args"]["optim"] == "adamw_8bit"
    losses = [h["loss"] for h in metrics["history"]]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


def test_a_cuda_step_waits_for_the_gpu_only_where_transformers_looks(data_dir, tmp_path):
    """torch's sync debug mode flags every operation that makes the host wait for the GPU.

    Two whole steps (upload, forward, backward, clipping, update): the only waits
    left are transformers' own look at the position ids, one per forward, in
    masking_utils.py (tests/test_sync_free.py shows the same on the CPU).
    """
    import warnings

    import batches
    import runs
    import steps

    settings = TrainSettings.from_args(finetune_lora.parse_args(
        ["--device", "cuda", "--model", "tiny-llama", "--data-dir", str(data_dir),
         "--output-dir", str(tmp_path), "--batch-size", "8", "--max-steps", "4"]))
    run = runs.start_run(settings, "lora")
    model, tokenizer, _ = runs.load_prepared(run, finetune_lora.prepare, {})
    plan = batches.plan_training(run, model, tokenizer)
    trainer = steps.Trainer(run, model, plan.total_steps)
    assert run.sync_free
    order = batches.epoch_batches(run, plan, 0)
    trainer.update(batches.micro_batches(plan, order[:1], CUDA, True))  # allocates AdamW state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in (1, 2):
                trainer.update(batches.micro_batches(plan, order[i:i + 1], CUDA, True))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)]
    assert all(name.endswith("masking_utils.py") for name, _ in waits), waits
    assert len(waits) <= 2, waits


def test_a_step_compiled_with_cuda_graphs_trains_as_the_eager_one(data_dir, tmp_path):
    """--compile reduce-overhead: the same losses up to bf16 rounding."""
    eager = train(finetune_lora, data_dir, tmp_path / "eager", "--dropout", "0")
    graphs = train(finetune_lora, data_dir, tmp_path / "graphs", "--dropout", "0",
                   "--compile", "reduce-overhead")
    assert graphs["step_loss"].startswith("answer_loss_at") and graphs["args"]["compile"]
    torch.testing.assert_close([h["loss"] for h in graphs["history"]],
                               [h["loss"] for h in eager["history"]], rtol=2e-2, atol=0)
