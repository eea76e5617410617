"""Prompt tuning: the model stays frozen; a few learned "virtual token" embeddings go first.

    python finetune_prompt.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_prompt.py --model smollm2-135m --virtual-tokens 50

Prompt tuning (Lester et al. 2021) trains only a short sequence of input
embeddings that stands before every example: no weight of the model changes.
They start as the embeddings of tokens drawn from the vocabulary (the paper's
better start than random vectors).  The virtual tokens shift every position by
their number; the answer-only loss, perplexity and decoding put them before
each sequence and score the real tokens alone (answer_loss.hidden_states,
generation.greedy_rows).  Writes outputs/prompt/: the learned prompt (loads
with peft.AutoPeftModelForCausalLM), metrics.json, training_metrics.png.
"""

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

import common
import tuning
from settings import TrainSettings, positive_int, training_parser

DEFAULT_LR = 3e-2


def parse_args(argv=None):
    """Command-line options: the shared ones plus the prompt's length."""
    parser = training_parser(__doc__, DEFAULT_LR, "learning rate (default 3e-2: a few input "
                                                  "embeddings need a rate far above a weight's; "
                                                  "the search's choice, results/defaults.md)")
    parser.add_argument("--virtual-tokens", type=positive_int, default=20,
                        help="learned embeddings before each example (default 20: Lester et "
                             "al. found 20 close to 100 once the model is not tiny)")
    return parser.parse_args(argv)


def prepare(model, settings: TrainSettings):
    """Prompt tuning: freeze the whole model, learn the embeddings of the virtual tokens."""
    tokens = settings.method_options["virtual_tokens"]
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    model = get_peft_model(model, config)
    return model, {"virtual_tokens": tokens, "init": "sample_vocab", "base_quantization": "none"}


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "prompt", prepare, callbacks)


if __name__ == "__main__":
    common.run_main(main, parse_args())
