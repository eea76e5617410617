"""DoRA: LoRA on the direction of each weight, with its magnitude trained apart.

    python finetune_dora.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_dora.py --model smollm2-135m     # offline, a real pretrained model

DoRA (Liu et al. 2024) writes each adapted weight as a magnitude times a
direction, W = m · V / ||V||, starting from the pretrained W.  The direction
gets LoRA's low-rank update B·A; the magnitude m (one number per output
column) trains as well.  Same adapter shape and options as finetune_lora.py.
Writes outputs/dora/: the adapter (loads with peft.AutoPeftModelForCausalLM),
metrics.json, training_metrics.png.
"""

from peft import get_peft_model

import common
import finetune_lora
import models
import tuning
from settings import TrainSettings

DEFAULT_LR = 1.8e-3


def parse_args(argv=None):
    """Command-line options: finetune_lora.py's adapter shape (rank, alpha, targets)."""
    parser = finetune_lora.build_parser(
        __doc__, DEFAULT_LR,
        "learning rate (default 1.8e-3: the search's choice, the same as LoRA's; "
        "results/defaults.md)")
    return parser.parse_args(argv)


def prepare(model, settings: TrainSettings):
    """DoRA: LoRA's adapters with use_dora, which adds the trained magnitude vector."""
    config = finetune_lora.adapter_config(model, settings.method_options)
    config.use_dora = True
    model = get_peft_model(model, config)
    return model, {**models.lora_details(model), "use_dora": True}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "dora", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
