"""LoKr: each adapted weight gains a Kronecker-product update; the weights stay frozen.

    python finetune_lokr.py --model smollm2-135m     # offline, a real pretrained model

LoKr (Yeh et al. 2024, LyCORIS) writes the update of a d_out x d_in weight as
the Kronecker product of a small factor and a low-rank one, C ⊗ (B·A), scaled
by alpha/r, with one factor starting at zero so training starts at the base.
Kronecker factors reach a full-rank update with fewer numbers than LoRA's B·A.
PEFT builds LoKr for nn.Linear layers only: GPT-2-style models (distilgpt2,
tiny-gpt2), whose layers are transformers' Conv1D, are refused in one line.
Writes outputs/lokr/: the adapter (loads with peft.AutoPeftModelForCausalLM),
metrics.json, training_metrics.png.
"""

from peft import LoKrConfig, get_peft_model

import common
import finetune_lora
import models
import tuning
from settings import TrainSettings

DEFAULT_LR = 5.4e-3


def parse_args(argv=None):
    """Command-line options: finetune_lora.py's rank, alpha and targets.

    LoRA's --dropout (on the adapter's input) has no counterpart in LoKr, so a non-zero
    value is refused rather than ignored."""
    parser = finetune_lora.build_parser(
        __doc__, DEFAULT_LR,
        "learning rate (default 5.4e-3: an additive update from zero, at 3x LoRA's rate; the "
        "search's choice, results/defaults.md)")
    args = parser.parse_args(argv)
    if args.dropout:
        parser.error("--dropout is LoRA's dropout on the adapter input, which LoKr does not "
                     "have; leave it at 0")
    return args


def prepare(model, settings: TrainSettings):
    """LoKr: freeze the base, add a Kronecker-product update to each target layer."""
    if models.uses_conv1d(model):
        raise common.PipelineError(
            f"LoKr: {settings.model} stores its layers as transformers' Conv1D (GPT-2 style), "
            "which PEFT's LoKr does not support (nn.Linear only); use a Llama-style model "
            "(e.g. --model smollm2-135m) or finetune_lora.py")
    options = settings.method_options
    config = LoKrConfig(r=options["rank"], alpha=options["alpha"], task_type="CAUSAL_LM",
                        target_modules=models.target_modules(options["target_modules"]))
    model = get_peft_model(model, config)
    config = model.peft_config["default"]
    return model, {"rank": config.r, "alpha": config.alpha,
                   "target_modules": sorted(config.target_modules), "base_quantization": "none"}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "lokr", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
