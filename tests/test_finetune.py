"""The four fine-tuning scripts, end to end on tiny models (seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import answer_loss
import common
import finetune
import finetune_lora
import finetune_qlora
import models
from helpers import run_script
from helpers import ROOT, run_and_expect_exit, train_args

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
COMMON_FILES = {"COMPLETED", "metrics.json", "training_metrics.png", "tokenizer.json",
                "tokenizer_config.json"}


def snapshot(model):
    """Every parameter and buffer, cloned, by name (4-bit weights as their packed bytes)."""
    inner = models.causal_lm(model)
    state = {name: t.detach().clone() for name, t in inner.state_dict().items()}
    return state


def base_names(state):
    """Names of the base model's own tensors (not adapter tensors)."""
    return [n for n in state if "lora_" not in n]


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "bitfit"])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_each_script_writes_exactly_its_files(method, model, data_dir, tmp_path):
    out = tmp_path / "out"
    run_script(method, data_dir, out, model=model)
    files = {p.name for p in (out / method).iterdir()}
    expected = COMMON_FILES | (ADAPTER_FILES if method in ("lora", "qlora") else MODEL_FILES)
    assert files == expected
    metrics = json.loads((out / method / "metrics.json").read_text())
    for key in ("method", "model", "trainable_params", "total_params", "train_seconds",
                "train_tokens_per_s", "peak_memory_mb", "train_loss", "valid_loss",
                "valid_examples", "history"):
        assert key in metrics, key
    # The held-out loss during training is the validation split's; eval.jsonl is evaluate.py's.
    assert "eval_loss" not in metrics and "eval_examples" not in metrics
    assert metrics["valid_examples"] == 8
    assert sorted(metrics["data_sha256"]) == ["template.json", "train.jsonl", "valid.jsonl"]
    assert metrics["data_sha256"]["valid.jsonl"] == common.file_sha256(data_dir / "valid.jsonl")
    assert metrics["method"] == method
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    assert len(metrics["history"]) == 6
    assert {"step", "loss", "lr", "grad_norm"} <= set(metrics["history"][0])
    # A run shorter than an epoch still measures validation loss, at its end.
    assert metrics["valid_loss"][-1]["step"] == 6
    assert metrics["peak_memory_mb"] > 0 and metrics["train_tokens_per_s"] > 0
    assert not (out / "checkpoints" / method).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_qlora_base_is_really_4bit_nf4(data_dir, tmp_path):
    import bitsandbytes as bnb

    seen = {}

    def spy(model, stage):
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        seen[stage] = layers

    run_script("qlora", data_dir, tmp_path / "out", spy=spy, model="tiny-llama")
    layers = seen["before"]
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for layer in layers:
        assert layer.weight.dtype == torch.uint8  # packed 4-bit codes
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantisation
        assert not layer.weight.requires_grad


def test_qlora_trains_on_after_a_mid_run_validation_loss(data_dir, tmp_path):
    """The validation loss must not leave the 4-bit layers in bitsandbytes' CPU inference layout.

    On an AVX512-BF16 CPU a Linear4bit run in eval mode without gradients repacks its weights
    for good into a layout whose kernel has no backward; the training steps after the first
    epoch's validation loss would then get no gradient through the base layers (or fail).
    """
    import warnings

    import bitsandbytes as bnb

    packed = {}

    def spy(model, stage):
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if stage == "before":
            for layer in layers:  # as on a CPU with AVX512-BF16, whatever this one has
                layer.support_avx512bf16_for_cpu = True
        packed[stage] = [getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                         for layer in layers]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered")
        # epochs are 6 steps long: a validation loss at step 6, then 2 more training steps
        run_script("qlora", data_dir, tmp_path / "out", "--max-steps", "8", spy=spy,
                   model="tiny-llama")
    assert packed["after"] and not any(packed["after"])
    metrics = json.loads((tmp_path / "out" / "qlora" / "metrics.json").read_text())
    assert [v["step"] for v in metrics["valid_loss"]] == [6, 8]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_leave_base_weights_bit_for_bit(method, data_dir, tmp_path):
    states = {}
    run_script(method, data_dir, tmp_path / "out",
               spy=lambda model, stage: states.__setitem__(stage, snapshot(model)))
    before, after = states["before"], states["after"]
    for name in base_names(before):
        assert torch.equal(before[name], after[name]), name
    changed = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert changed, "the adapters did not train"


def test_bitfit_changes_only_biases_and_trains_on_llama(data_dir, tmp_path):
    states = {}
    run_script("bitfit", data_dir, tmp_path / "out", model="tiny-llama",
               spy=lambda model, stage: states.__setitem__(stage, snapshot(model)))
    before, after = states["before"], states["after"]
    biases = [n for n in before if n.endswith("bias")]
    assert len(biases) == 14  # added to q, k, v, o, gate, up, down in 2 layers
    assert all(torch.count_nonzero(before[n]) == 0 for n in biases)  # zero-initialised
    for name in before:
        if not name.endswith("bias"):
            assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in biases)
    metrics = json.loads((tmp_path / "out" / "bitfit" / "metrics.json").read_text())
    assert metrics["trainable_params"] == sum(before[n].numel() for n in biases)
    assert metrics["details"]["added_biases"] == 14


def test_full_finetuning_changes_the_weights(data_dir, tmp_path):
    states = {}
    run_script("full", data_dir, tmp_path / "out",
               spy=lambda model, stage: states.__setitem__(stage, snapshot(model)))
    weights = [n for n in states["before"] if n.endswith("weight")]
    changed = [n for n in weights if not torch.equal(states["before"][n], states["after"][n])]
    assert len(changed) == len(weights)


def logits_of(model, tokenizer):
    """Logits for a fixed prompt, in eval mode."""
    ids = torch.tensor([common.prompt_ids(tokenizer, "User: What is 2 plus 3?\nAssistant:")])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "bitfit"])
def test_saved_output_reloads_with_standard_api_and_same_logits(method, data_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_name = "tiny-llama" if method == "bitfit" else "tiny-gpt2"
    kept = {}
    run_script(method, data_dir, tmp_path / "out", model=model_name,
               spy=lambda model, stage: kept.__setitem__(stage, model))
    folder = tmp_path / "out" / method
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = logits_of(kept["after"], tokenizer)
    if method in ("full", "bitfit"):
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
    elif method == "lora":
        reloaded = AutoPeftModelForCausalLM.from_pretrained(folder)
    else:  # on the same 4-bit base it was trained on
        reloaded = AutoPeftModelForCausalLM.from_pretrained(
            folder, quantization_config=models.nf4_config(torch.device("cpu")),
            device_map={"": "cpu"})
    torch.testing.assert_close(logits_of(reloaded, tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_adapter_records_a_loadable_local_base(data_dir, tmp_path):
    run_script("lora", data_dir, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert base != "tiny-gpt2" and (Path(base) / "config.json").exists()


def test_loss_goes_down_on_learnable_data(data_dir, tmp_path):
    run_script("full", data_dir, tmp_path / "out", "--max-steps", "40", "--lr", "3e-3")
    metrics = json.loads((tmp_path / "out" / "full" / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert metrics["valid_loss"][-1]["loss"] < losses[0]


def test_selected_position_loss_equals_full_loss(data_dir):
    """LM-head logits only where labels exist give the model's own full loss (to 1e-5)."""
    device = torch.device("cpu")
    for name in ("tiny-gpt2", "tiny-llama"):
        model, tokenizer, _ = models.load_model(name, device)
        rows = common.load_split(data_dir, "train")[:8]
        examples = common.tokenize_rows(tokenizer, rows, 256)
        batch = common.collate(examples, tokenizer.pad_token_id)
        nll, count = answer_loss.answer_loss(model, **batch)
        reference = model(**batch).loss
        torch.testing.assert_close(nll / count, reference, rtol=1e-5, atol=1e-5)
        # and the gradients agree too
        model.zero_grad()
        (nll / count).backward()
        ours = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(**batch).loss.backward()
        for mine, theirs in zip(ours, (p.grad for p in model.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_labels_mask_the_prompt_and_end_with_eos(data_dir):
    _, tokenizer, _ = models.load_model("tiny-gpt2", torch.device("cpu"))
    ids, labels, cut = common.tokenize_pair(tokenizer, "User: Hi\nAssistant:", " Hello.", 256)
    n_prompt = len(common.prompt_ids(tokenizer, "User: Hi\nAssistant:"))
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id and not cut
    ids, labels, cut = common.tokenize_pair(tokenizer, "User: Hi\nAssistant:", " Hello.", 256,
                                            train_on_prompt=True)
    assert labels == ids


def test_batches_pad_only_to_the_longest_in_the_batch():
    examples = [{"input_ids": [1] * n, "labels": [2] * n} for n in (3, 5, 4)]
    batch = common.collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum().item() == 12
    assert (batch["labels"] == -100).sum().item() == 3


def test_length_grouped_batches_cover_every_example_once_and_are_deterministic():
    lengths = [(i * 37) % 50 + 5 for i in range(203)]
    batches = common.length_grouped_batches(lengths, 16, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == common.length_grouped_batches(lengths, 16, seed=1, epoch=0)
    assert batches != common.length_grouped_batches(lengths, 16, seed=1, epoch=1)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                  for b in batches)
    assert padding < 0.1 * sum(lengths)


# --- the loop reads the device's numbers only where it needs them -------------------------


# --- bad input and misuse: one line, exit status 2, nothing lost ---------------------


def cli(script, *args, cwd=ROOT):
    """Run a script as a user would; return (exit status, stderr)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_qlora_without_4bit_support(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    line = run_and_expect_exit(finetune_qlora.main,
                               train_args(finetune_qlora, data_dir, tmp_path), capsys)
    assert "4-bit loading needs bitsandbytes" in line
    assert not (tmp_path / "qlora").exists()


def test_example_longer_than_the_context(data_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").open()]
    rows[2]["prompt"] = "User: " + "why " * 400 + "\nAssistant:"
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = run_and_expect_exit(finetune.main, train_args(finetune, data_dir, tmp_path), capsys)
    assert "train.jsonl, line 3" in line and "context" in line


def test_long_answers_are_truncated_with_a_count(data_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").open()]
    rows[0]["completion"] = " " + "yes " * 400
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune.main(train_args(finetune, data_dir, tmp_path))
    assert "1 of 48 examples" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--epochs", "-1"], ["--lr", "0"],
                                    ["--max-steps", "x"], ["--bogus-flag"]])
def test_impossible_options_are_refused(option, data_dir, tmp_path, capsys):
    """Refused while parsing, before anything loads (in-process: a script start costs seconds)."""
    with pytest.raises(SystemExit) as exc:
        finetune_lora.parse_args(["--model", "tiny-gpt2", "--data-dir", str(data_dir),
                                  "--output-dir", str(tmp_path), *option])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()


def test_an_unknown_flag_stops_the_script_as_a_user_runs_it(data_dir, tmp_path):
    status, err = cli("finetune_lora.py", "--model", "tiny-gpt2", "--data-dir", str(data_dir),
                      "--output-dir", str(tmp_path), "--bogus-flag")
    assert status == 2 and "error: unrecognized arguments: --bogus-flag" in err
    assert not (tmp_path / "lora").exists()


def test_training_before_the_data_stage_names_the_command(tmp_path, capsys):
    args = train_args(finetune_lora, tmp_path / "data", tmp_path / "out")
    line = run_and_expect_exit(finetune_lora.main, args, capsys)
    assert "train.jsonl" in line and "python split_dataset.py" in line


def test_training_without_a_validation_split_names_the_command(data_dir, tmp_path, capsys):
    (data_dir / "valid.jsonl").unlink()  # a data folder made before valid.jsonl existed
    line = run_and_expect_exit(finetune_lora.main,
                               train_args(finetune_lora, data_dir, tmp_path / "out"), capsys)
    assert "valid.jsonl" in line and "python split_dataset.py" in line
    assert not (tmp_path / "out").exists()
