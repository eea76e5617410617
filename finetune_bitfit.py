"""BitFit: only the bias terms train; every weight matrix stays frozen.

    python finetune_bitfit.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_bitfit.py --model smollm2-135m     # offline, a real pretrained model

BitFit (Ben Zaken et al. 2022) trains a model's bias vectors alone: about 0.1%
of the parameters.  Llama-style models (Llama, Mistral, SmolLM2) have no bias
terms at all, where BitFit would silently train nothing.  For those this script
adds zero-initialised biases to the attention and MLP projections (a zero bias
leaves the model's outputs unchanged at the start) and trains only those; it
switches on the config's attention_bias and mlp_bias so the standard loader
builds them again.  Writes outputs/bitfit/: the model (loads with
AutoModelForCausalLM), metrics.json, training_metrics.png.
"""

import torch

import common
import tuning
from settings import TrainSettings, training_parser

DEFAULT_LR = 9e-3
# Config switch -> the projections it gives a bias (transformers' Llama family).
BIAS_SWITCHES = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                 "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def parse_args(argv=None):
    """Command-line options: the shared ones (settings.TrainSettings)."""
    parser = training_parser(__doc__, DEFAULT_LR, "learning rate (default 9e-3: biases are few "
                                                  "and need a rate far above full fine-tuning's; "
                                                  "the search's choice, results/defaults.md)")
    return parser.parse_args(argv)


def add_missing_biases(model) -> list[str]:
    """Give bias-free attention/MLP projections a zero bias; return the names of those added."""
    added = []
    for switch, projections in BIAS_SWITCHES.items():
        if getattr(model.config, switch, True):
            continue  # the architecture has no such switch, or its biases exist already
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in projections and module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros(
                    module.out_features, dtype=module.weight.dtype, device=module.weight.device))
                added.append(f"{name}.bias")
        setattr(model.config, switch, True)  # so from_pretrained builds these biases
    return added


def prepare(model, settings: TrainSettings):
    """BitFit: add zero biases where a Llama-style model has none, then train only biases."""
    added = add_missing_biases(model)
    if added:
        print(f"bitfit: the model had no bias in {len(added)} projections; added zero-initialised "
              "biases there (outputs unchanged at the start)")
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith("bias")
    if not any(p.requires_grad for p in model.parameters()):
        raise common.PipelineError(f"{settings.model} has no bias terms and no config switch to add "
                                   "them, so BitFit would train nothing; use finetune_lora.py")
    return model, {"added_biases": len(added), "added_bias_names": added[:20]}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "bitfit", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
