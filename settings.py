"""The training settings every fine-tune script shares: one typed record, each default with its reason.

    settings = TrainSettings.from_args(finetune_lora.parse_args(["--seeds", "3"]))
    settings.lr, settings.method_options["rank"]     # 0.0018, 16

`training_parser` turns the fields below into the scripts' command-line options,
so a default and the reason for it are written once, here.  A method's own
options (LoRA's rank, BitFit's bias selection) are added by its script and
arrive in `method_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


# --- the methods ------------------------------------------------------------------------

# Every method the project trains: its name (its output folder, its row in every table) and
# the command that trains it, in the order of every table and chart.  LoRA's variants are
# options of finetune_lora.py, each under its own name so the verdict compares it as a method.
METHODS = {
    "full": "finetune.py",
    "lora": "finetune_lora.py",
    "qlora": "finetune_qlora.py",
    "bitfit": "finetune_bitfit.py",
    "dora": "finetune_dora.py",
    "rslora": "finetune_lora.py --rslora",
    "pissa": "finetune_lora.py --init pissa",
    "loraplus": "finetune_lora.py --loraplus-ratio 16",
    "lokr": "finetune_lokr.py",
    "ia3": "finetune_ia3.py",
    "prompt": "finetune_prompt.py",
}
DEFAULT_METHODS = ("full", "lora", "qlora", "bitfit")  # the mission's four: make all's default


def command_for(method: str) -> str:
    """The script and options that train a method (METHODS), for the Makefile and messages."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method]


# --- the models and precisions the options offer (models.py reads them from here) ---------

OFFLINE_PRESETS = ("smollm2-135m", "tiny-gpt2", "tiny-llama")
DEFAULT_MODEL = "distilgpt2"     # the original project's model, wherever it can be had
FALLBACK_MODEL = "smollm2-135m"  # the embedded offline preset used where it cannot
DEFAULT_MODEL_HELP = (f"{DEFAULT_MODEL} when the Hub or the local cache has it, else the "
                      f"offline {FALLBACK_MODEL} preset")
PRECISIONS = ("auto", "fp32", "bf16")
# auto: bf16 where the hardware computes it natively (results/defaults.md, "precision").
DEFAULT_PRECISION = "auto"


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def lr_grid(text: str) -> list[float]:
    """--lr-grid: at least two distinct positive rates, ascending."""
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}") from None
    if len(rates) < 2 or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"give at least two positive rates: {text!r}")
    return rates


def option(default, help: str, identity: bool = False, **argparse_kwargs):
    """A field that is also a command-line option; help carries the reason for the default.

    identity=True: the field defines the run (its run_id), so runs that differ in it
    are not seeds of one run and --resume does not skip them; the others (where files
    go, how often to save, the seed) leave a run the same run.
    """
    return field(default=default, metadata={"help": help, "identity": identity,
                                            **argparse_kwargs})


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a training run except the method's own options."""

    model: str | None = option(
        None, "Hub id, local model folder, .gguf file, or an offline preset: "
              f"{', '.join(OFFLINE_PRESETS)} (default: {DEFAULT_MODEL_HELP}; "
              "metrics.json records the model used)", identity=True)
    data_dir: str = option(
        "data", "folder with train.jsonl, valid.jsonl, template.json (default data: where the data "
                "stage writes them; eval.jsonl is never read)")
    output_dir: str = option(
        "outputs", "the model goes to <output-dir>/<method>/ (default outputs: where evaluate.py "
                   "looks)")
    epochs: int = option(
        2, "passes over the training set (default 2: what the published comparison trains, a "
           "few minutes a run on 2 CPU cores; results/defaults.md)", type=positive_int,
        identity=True)
    max_steps: int | None = option(
        None, "stop after this many optimiser steps (default: none, --epochs decides; it "
              "overrides --epochs, as in the HF Trainer)",
        type=positive_int, identity=True)
    batch_size: int = option(
        16, "examples per step (default 16: padded only to the longest in the batch)",
        type=positive_int, identity=True)
    grad_accum: int = option(
        1, "micro-batches per optimiser step (default 1: the default batch fits; raise it to "
           "fit a large batch in little memory)",
        type=positive_int, identity=True)
    lr: float = option(5e-5, "learning rate (each script sets its own default)",
                       type=positive_float, identity=True)
    warmup_ratio: float = option(
        0.05, "fraction of steps with a linear warm-up before the linear decay to 0 (default "
              "0.05: a few steps, so the first updates of fresh moments stay small)", type=float,
        identity=True)
    max_grad_norm: float = option(
        1.0, "gradient clipping norm (default 1.0: the usual transformer setting)",
        type=positive_float,
        identity=True)
    optim: str = option(
        "adamw", "adamw (default: exact fp32 moments): torch's AdamW, 8 bytes a trainable "
                 "parameter; "
                 "adamw_8bit: bitsandbytes' blockwise 8-bit AdamW (Dettmers et al. 2022), 2 bytes "
                 "a parameter, for full fine-tuning where the moments fill the memory; it gives "
                 "other numbers, so it is part of what defines a run",
        choices=["adamw", "adamw_8bit"], identity=True)
    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in the backward pass instead of keeping "
               "them: the same gradients in less memory, for one more forward pass a step; for "
               "long sequences or large batches on a GPU (off by default: a small model's "
               "activations are small)",
        action="store_true")
    compile: str = option(
        "off", "torch.compile the training step's forward and backward: default fuses kernels, "
               "reduce-overhead also replays them as CUDA graphs; it pays where a step is bound by "
               "launching kernels rather than by arithmetic (a small model on a GPU), after a "
               "compilation of tens of seconds; under CUDA graphs batches are padded to a "
               "multiple of 16 tokens so few shapes occur (default off: on a CPU the step is "
               "arithmetic, and compiling did not pay there; results/defaults.md)",
        choices=["off", "default", "reduce-overhead"])
    seed: int = option(42, "seeds initialisation, dropout and batch order (default 42: any fixed "
                          "number makes a run repeatable)", type=int)
    seeds: int = option(
        1, "train N runs with seeds --seed, --seed+1, ...: the first writes "
           "<output-dir>/<method>/, the others <method>-seed<N>/; evaluate.py reports the "
           "mean and an interval over seeds (default 1, the quick path)", type=positive_int)
    tune_lr: bool = option(
        False, "first search the learning rate: train --search-epochs at each rate of --lr-grid, "
               "score each on data/valid.jsonl, then train at the rate with the lowest "
               "validation answer NLL (continuous and paired over the same questions, so its "
               "standard error is a fraction of key accuracy's; never tuned on eval)",
        action="store_true")
    lr_grid: list[float] | None = option(
        None, "comma-separated rates for --tune-lr (default: --lr x 0.3, 1, 3: the script's "
              "rate, already the learning-rate search's choice, and one ~3x step either way); "
              "the rate with the lowest validation answer NLL is chosen (continuous and paired "
              "over the same questions: a fraction of key accuracy's standard error), and a "
              "choice at either end adds a rate 3x beyond it, up to 3 times",
        type=lr_grid)
    search_epochs: float = option(
        1, "epochs per rate in the --tune-lr search, each with its own warm-up and decay; a "
           "fraction such as 0.5 trains that share of an epoch (default 1: half an epoch "
           "favoured rates that score worse after the full run; results/defaults.md)",
        type=positive_float)
    search_only: bool = option(
        False, "with --tune-lr: write the search (<output-dir>/search/<method>.json) and stop "
               "without training the seeds", action="store_true")
    device: str = option(
        "auto", "auto (default): CUDA when present, else the CPU; cpu or cuda to insist",
        choices=["auto", "cpu", "cuda"])
    precision: str = option(
        DEFAULT_PRECISION,
        f"auto: bf16 autocast where the hardware computes bf16 natively (CUDA with bf16, CPUs "
        f"with AVX512-BF16 or AMX), else fp32; fp32 or bf16 to insist; weights and optimiser "
        f"state stay fp32 either way (default {DEFAULT_PRECISION}: faster where native, at "
        f"validation quality close to fp32's; results/defaults.md)",
        choices=["auto", "fp32", "bf16"], identity=True)
    max_length: int | None = option(
        None, "truncate examples to this many tokens (default: the model's context)",
        type=positive_int, identity=True)
    train_on_prompt: bool = option(
        False, "also compute the loss on prompt tokens (default: the answer only)",
        action="store_true", identity=True)
    save_every: int = option(
        200, "save a checkpoint every N steps, also at each epoch's end and on Ctrl-C (default "
             "200: past a default run's length, so epochs' ends decide)",
        type=positive_int)
    keep_checkpoints: int = option(
        2, "how many checkpoints to keep (default 2: the newest and the one before it; older "
           "ones only take space)", type=positive_int)
    resume: bool = option(
        False, "continue from the newest checkpoint in <output-dir>/checkpoints/<method>/ and "
               "skip finished seeds (default off: a run starts afresh)",
        action="store_true")
    trust_remote_code: bool = option(
        False, "allow model code from the Hub to run (default off: it executes arbitrary Python)",
        action="store_true", identity=True)
    # Not options: set by runs.resolve for the record.
    model_requested: str | None = None  # what the command asked for ("default" when nothing)
    method_options: dict = field(default_factory=dict)  # the script's own options, by name

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        """Split a script's parsed options into the shared settings and its method's own."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = vars(args)
        return cls(**{k: v for k, v in values.items() if k in names},
                   method_options={k: v for k, v in values.items() if k not in names})

    def replace(self, **changes) -> "TrainSettings":
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every setting by name, the method's options alongside (metrics.json's "args")."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "method_options"}
        return {**shared, **self.method_options}

    def identity(self) -> dict:
        """The settings that define the run (fields marked identity=True) and the method's options.

        What run_id fingerprints: seeds of one run share it, and a new field leaves it
        unchanged unless marked.
        """
        marked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.metadata.get("identity")}
        return {**marked, **self.method_options}


def training_parser(description: str, lr: float, lr_help: str) -> argparse.ArgumentParser:
    """The options every fine-tune script shares; the method's default learning rate is its own."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainSettings):
        if "help" not in f.metadata:
            continue
        kwargs = {k: v for k, v in f.metadata.items() if k != "identity"}
        default = f.default
        if f.name == "lr":
            default, kwargs["help"] = lr, lr_help
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
    return parser


if __name__ == "__main__":  # make all METHODS=...: `python settings.py dora` prints its command
    import sys

    try:
        print(command_for(sys.argv[1] if len(sys.argv) > 1 else ""))
    except ValueError as exc:
        sys.exit(f"METHODS: {exc}")
