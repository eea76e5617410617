"""QLoRA: LoRA on a base model held in 4-bit NormalFloat (NF4) with double quantisation.

    python finetune_qlora.py                          # distilgpt2 (or smollm2-135m offline)
    python finetune_qlora.py --model smollm2-135m     # offline, a real pretrained model

The frozen base weights are stored as 4-bit NF4 codes (bitsandbytes), with the
quantisation constants themselves quantised (Dettmers et al. 2023); they are
dequantised on the fly for each matrix multiply.  The adapters train in full
precision, exactly as in finetune_lora.py.  Runs on CUDA and, with
bitsandbytes >= 0.48, on the CPU.  Writes outputs/qlora/: the adapter (load it
with peft.AutoPeftModelForCausalLM on the same 4-bit base; evaluate.py does),
metrics.json, training_metrics.png.
"""

from peft import get_peft_model, prepare_model_for_kbit_training

import common
import models
import tuning
from settings import TrainSettings
import finetune_lora

DEFAULT_LR = 2e-3


def parse_args(argv=None):
    """Command-line options: finetune_lora.py's (same adapter, same defaults but the rate)."""
    parser = finetune_lora.build_parser(
        __doc__, DEFAULT_LR,
        "learning rate (default 2e-3: LoRA's adapters through 4-bit weights, about 10x full "
        "fine-tuning's rate; the search's choice, results/defaults.md)")
    return parser.parse_args(argv)


def prepare(model, settings: TrainSettings):
    """QLoRA: make the 4-bit base trainable-ready, then add the same adapters as LoRA."""
    options = settings.method_options
    # Checkpointing, when asked for, is switched on for every method alike by
    # runs.load_prepared (models.enable_gradient_checkpointing), not here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, finetune_lora.adapter_config(model, options))
    return model, models.lora_details(model, quantization="nf4")


def main(args, callbacks=()):
    """For each seed (after a rate search with --tune-lr): load in 4-bit, prepare, train, save."""
    tuning.train_method(TrainSettings.from_args(args), "qlora", prepare, callbacks,
                        quantize_4bit=True)


if __name__ == "__main__":
    common.run_main(main, parse_args())
