"""(IA)³: learned vectors rescale the attention keys and values and the MLP's inner activations.

    python finetune_ia3.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_ia3.py --model smollm2-135m     # offline, a real pretrained model

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning") multiplies the keys, the values and the
input of the MLP's down projection by learned vectors that start at one, so
training starts at the base model.  Nothing else trains: a few thousand numbers
for a 135M model.  The layers are PEFT's choice for the architecture, the
paper's: for GPT-2 c_attn (keys and values) and the MLP's c_proj, for Llama
k_proj, v_proj and down_proj.  Writes outputs/ia3/: the adapter (loads with
peft.AutoPeftModelForCausalLM), metrics.json, training_metrics.png.
"""

from peft import IA3Config, get_peft_model

import common
import models
import tuning
from settings import TrainSettings, training_parser

DEFAULT_LR = 3e-2


def parse_args(argv=None):
    """Command-line options: the shared ones (settings.TrainSettings)."""
    parser = training_parser(__doc__, DEFAULT_LR, "learning rate (default 3e-2: scaling vectors "
                                                  "that start at one need a large rate; the "
                                                  "search's choice, results/defaults.md)")
    return parser.parse_args(argv)


def prepare(model, settings: TrainSettings):
    """(IA)³: freeze the base, add a trainable rescaling vector to each target layer."""
    config = IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=models.uses_conv1d(model))
    model = get_peft_model(model, config)
    config = model.peft_config["default"]
    return model, {"target_modules": sorted(config.target_modules),
                   "feedforward_modules": sorted(config.feedforward_modules),
                   "base_quantization": "none"}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "ia3", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
