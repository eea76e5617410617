"""LoRA: the pretrained weights stay frozen; small low-rank adapters train.

    python finetune_lora.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_lora.py --model smollm2-135m     # offline, a real pretrained model
    python finetune_lora.py --rank 8 --target-modules c_attn   # the original project's setting
    python finetune_lora.py --rslora                 # a variant, written to outputs/rslora/

Each adapted layer W gains a trainable update B·A of rank r (Hu et al. 2021),
scaled by alpha/r; W itself never changes.  Writes outputs/lora/: the adapter
(loads with peft.AutoPeftModelForCausalLM), metrics.json, training_metrics.png.

Three variants, one at a time, each under its own name so evaluate.py compares
it as a method of its own:
  --rslora               rank-stabilised scaling alpha/sqrt(r) instead of alpha/r
                         (Kalajdzievski 2023): outputs/rslora/
  --init pissa           A and B start from the principal singular vectors of W,
                         which keeps the rest, W - B0·A0, frozen (Meng et al. 2024);
                         saved as a rank-2r LoRA on the original W: outputs/pissa/
  --loraplus-ratio 16    B trains at 16x A's rate (LoRA+, Hayou et al. 2024):
                         outputs/loraplus/
"""

import sys

from peft import LoraConfig, get_peft_model

import common
import models
import record
import tuning
from settings import TrainSettings, positive_float, positive_int, training_parser

DEFAULT_LR = 1.8e-3
LR_HELP = ("learning rate (default 1.8e-3: adapters start at zero and need about 10x full "
           "fine-tuning's rate; the search's choice, results/defaults.md)")
# The variants' default rates: each its own search's choice, as LoRA's (results/defaults.md).
VARIANT_LR = {"rslora": 6e-4, "pissa": 6e-4, "loraplus": 1.8e-4}


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
    """Command-line options (see build_parser), with the variants of this script alone."""
    parser = build_parser()
    parser.add_argument("--rslora", action="store_true",
                        help="scale updates by alpha/sqrt(r), not alpha/r (rsLoRA: the update "
                             "keeps its size as r grows); trains as method rslora, default "
                             f"--lr {VARIANT_LR['rslora']:g}")
    parser.add_argument("--init", choices=["default", "pissa"], default="default",
                        help="default: A random, B zero, so training starts at the base model "
                             "(PEFT's); pissa: A and B from W's top-r singular vectors, the rest "
                             f"frozen; trains as method pissa, default --lr {VARIANT_LR['pissa']:g}")
    parser.add_argument("--loraplus-ratio", type=positive_float, default=None,
                        help="train B at this multiple of --lr (LoRA+; its paper's choice is "
                             "16); default off; trains as method loraplus, default --lr "
                             f"{VARIANT_LR['loraplus']:g} for A")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        name = variant(vars(args))
    except ValueError as exc:
        parser.error(str(exc))
    if name != "lora" and not any(a == "--lr" or a.startswith("--lr=") for a in argv):
        args.lr = VARIANT_LR[name]  # the variant's own searched rate, unless --lr was given
    return args


def variant(options: dict) -> str:
    """The method's name: lora, or the one variant asked for (rslora, pissa, loraplus)."""
    chosen = [name for name, on in (("rslora", options.get("rslora")),
                                    ("pissa", options.get("init") == "pissa"),
                                    ("loraplus", options.get("loraplus_ratio"))) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one variant at a time ({' and '.join(chosen)} were given): "
                         "each is compared as a method of its own")
    return chosen[0] if chosen else "lora"


def adapter_config(model, options: dict) -> LoraConfig:
    """The adapters from --rank, --alpha, --dropout, --target-modules, and the variant's
    scaling and initialisation (QLoRA and DoRA use the same)."""
    return LoraConfig(
        r=options["rank"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
        task_type="CAUSAL_LM", target_modules=models.target_modules(options["target_modules"]),
        use_rslora=bool(options.get("rslora")),
        init_lora_weights="pissa" if options.get("init") == "pissa" else True,
        fan_in_fan_out=models.uses_conv1d(model))  # GPT-2's Conv1D stores weights transposed


def prepare(model, settings: TrainSettings):
    """LoRA: freeze the base, add a trainable low-rank update to each target layer."""
    options = settings.method_options
    model = get_peft_model(model, adapter_config(model, options))
    if options.get("init") == "pissa":  # W now holds W - B0·A0: saved for the original W
        record.remember_initial_adapter(model)
    if options.get("loraplus_ratio"):  # LoRA+: steps.param_groups gives B its own rate
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.lr_scale = options["loraplus_ratio"]
    return model, {**models.lora_details(model), "variant": variant(options)}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), variant(vars(args)), prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
