"""LoRA: the pretrained weights stay frozen; small low-rank adapters train.

    python finetune_lora.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_lora.py --model smollm2-135m     # offline, a real pretrained model
    python finetune_lora.py --rank 8 --target-modules c_attn   # the original project's setting

Each adapted layer W gains a trainable update B·A of rank r (Hu et al. 2021),
scaled by alpha/r; W itself never changes.  Writes outputs/lora/: the adapter
(loads with peft.AutoPeftModelForCausalLM), metrics.json, training_metrics.png.
"""

from peft import LoraConfig, get_peft_model

import common
import models
import tuning
from settings import TrainSettings, positive_float, positive_int, training_parser

DEFAULT_LR = 1.8e-3
LR_HELP = ("learning rate (default 1.8e-3: adapters start at zero and need about 10x full "
           "fine-tuning's rate; the search's choice, results/defaults.md)")


def build_parser(description: str = __doc__, lr: float = DEFAULT_LR, lr_help: str = LR_HELP):
    """The shared options plus the adapter's shape (finetune_qlora.py uses these too)."""
    parser = training_parser(description, lr, lr_help)
    parser.add_argument("--rank", type=positive_int, default=16,
                        help="adapter rank r (default 16: QLoRA found quality flat in r once "
                             "every linear layer is adapted)")
    parser.add_argument("--alpha", type=positive_float, default=32,
                        help="scaling alpha; updates are scaled by alpha/r (default 32, 2r: the "
                             "usual ratio, so the update's scale stays put as r changes)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on the adapter input (default 0, PEFT's: validation "
                             "scored as with 0.05, for less work a step; results/defaults.md)")
    parser.add_argument("--target-modules", default="all-linear",
                        help="comma-separated module names, or all-linear (default): every "
                             "linear layer but the LM head, which QLoRA (Dettmers et al. 2023) "
                             "found necessary to match full fine-tuning; for GPT-2 that is "
                             "c_attn,c_proj,c_fc, for Llama q/k/v/o_proj and gate/up/down_proj")
    return parser


def parse_args(argv=None):
    """Command-line options (see build_parser)."""
    return build_parser().parse_args(argv)


def adapter_config(model, options: dict) -> LoraConfig:
    """The adapters from --rank, --alpha, --dropout, --target-modules (QLoRA uses the same)."""
    return LoraConfig(
        r=options["rank"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
        task_type="CAUSAL_LM", target_modules=models.target_modules(options["target_modules"]),
        fan_in_fan_out=models.uses_conv1d(model))  # GPT-2's Conv1D stores weights transposed


def prepare(model, settings: TrainSettings):
    """LoRA: freeze the base, add a trainable low-rank update to each target layer."""
    model = get_peft_model(model, adapter_config(model, settings.method_options))
    return model, models.lora_details(model)


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "lora", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
