"""Full fine-tuning: every parameter of the model trains.

    python finetune.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune.py --model smollm2-135m     # offline, a real pretrained model
    python finetune.py --max-steps 20 --model tiny-gpt2   # a smoke run in seconds

Reads data/train.jsonl and data/valid.jsonl (run the data stage first) and
writes outputs/full/: the model (loads with AutoModelForCausalLM), metrics.json
and training_metrics.png.  The most thorough method and the most expensive:
gradients and two AdamW moments for every weight (about 16 bytes a parameter).
"""

import common
import tuning
from settings import TrainSettings, training_parser

DEFAULT_LR = 1.5e-4


def parse_args(argv=None):
    """Command-line options: the shared ones (settings.TrainSettings)."""
    parser = training_parser(__doc__, DEFAULT_LR, "learning rate (default 1.5e-4: small, as "
                                                  "pretrained weights change directly; the "
                                                  "search's choice, results/defaults.md)")
    return parser.parse_args(argv)


def prepare(model, settings: TrainSettings):
    """Full fine-tuning: every weight trains."""
    model.requires_grad_(True)
    return model, {}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "full", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
