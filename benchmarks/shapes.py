"""Random-weight models in the named shapes of real ones, built offline.

    folder = shapes.build("distilgpt2", shapes.default_tokenizer(), Path("model"))

Random weights cost the same arithmetic and memory as trained ones, so speed and
memory are measured on them without downloading the real weights.  Every shape's
config is written here; its tokenizer is the offline smollm2-135m preset's, whose
49,152 ids fit every vocabulary below, and whose special ids the config takes, so
generation stops and pads as with that tokenizer.
Seed 0 and fp32: the same shape gives the same weights on every machine.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_PRESET = "smollm2-135m"

# Rope scaling (Llama 3.x) is left out: it changes neither memory nor time per step.
SHAPES = {
    # GPT-2 family
    "distilgpt2": {"family": "gpt2", "n_layer": 6, "n_embd": 768, "n_head": 12,
                   "n_positions": 1024, "vocab_size": 50257},                     # 82 M
    "gpt2-tiny": {"family": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2,
                  "n_positions": 1024, "vocab_size": 50257},                      # --quick
    # Llama family
    "smollm2-135m": {"family": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-3.2-1b": {"family": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-3.1-8b": {"family": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    # stand-ins for a CPU rehearsal: the same families, small
    "tiny-llama-shape": {"family": "llama", "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 49152,
                         "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
SHAPES["tiny-llama-untied"] = {**SHAPES["tiny-llama-shape"], "tie_word_embeddings": False}


def default_tokenizer() -> str:
    """The smollm2-135m preset's folder, converted once if needed: only its tokenizer is read."""
    import models

    return str(models.resolve_model(TOKENIZER_PRESET))


def config(shape: str, tokenizer):
    """The transformers config of a named shape, with the tokenizer's special ids."""
    from transformers import GPT2Config, LlamaConfig

    sizes = dict(SHAPES[shape])
    family = sizes.pop("family")
    if len(tokenizer) > sizes["vocab_size"]:
        raise SystemExit(f"the tokenizer's {len(tokenizer)} ids do not fit {shape}'s vocabulary")
    make = GPT2Config if family == "gpt2" else LlamaConfig
    return make(**sizes, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build(shape: str, tokenizer_dir: str, folder: Path) -> Path:
    """Save a random-weight model (seed 0, fp32) of the shape with the tokenizer, once."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import models

    if (folder / "config.json").exists():
        return folder
    hf_logging.disable_progress_bar()
    tokenizer = models.load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(shape, tokenizer), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
