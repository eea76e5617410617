"""Set up one training run: the model, device and precision resolved once, processes joined.

    settings = runs.resolve(settings)            # model, device, precision decided here, once
    run = runs.start_run(settings, "lora")       # the accelerator, the rows, the model's path
    model, tokenizer, details = runs.load_prepared(run, prepare, {})
    metrics = loop.fit(run, model, tokenizer, details)
    record.save_outputs(run, model, tokenizer, metrics)

`accelerate` owns the plumbing: processes (torchrun or `accelerate launch`),
the DistributedDataParallel wrapping, gradient sync only on an optimiser step's
last micro-batch, all-reduces, bf16 autocast on CUDA, seeding, and the
checkpoint files with every process's RNG state.  What is ours: the loss over
the answer tokens only (answer_loss.py, steps.py), the length-grouped batch
order (batches.py), the check that --resume continues the same configuration
(checkpoints.py), and the output folder that appears only when complete
(record.py).  The loop itself is loop.fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

import checkpoints
import models
from common import PipelineError, load_split, load_template
from runpaths import RunPaths
from settings import TrainSettings


# Under CUDA graphs (--compile reduce-overhead) batches are padded to these multiples of
# tokens and of label positions, so graphs are recorded for few shapes.  Plain compilation
# has dynamic shapes and needs none: on the CPU this padding cost more than compiling saved
# (results/defaults.md, --compile).
GRAPH_PADDING = (16, 64)


@dataclass
class Control:
    """What the loop is asked to do between steps; set by Ctrl-C, SIGTERM or a callback."""

    stop: bool = False


# A callback runs after every optimiser step as callback(step, control); setting
# control.stop checkpoints and stops exactly as Ctrl-C does (the tests use this).
Callback = Callable[[int, Control], None]


@dataclass
class Run:
    """One training run: its settings, where it runs, the model it loads and the rows it reads.

    The device and precision are the accelerator's (made once, in start_run, from the
    settings resolve() decided); model_path is what the model resolved to, once.
    """

    method: str
    settings: TrainSettings
    accelerator: object  # accelerate.Accelerator
    model_path: str      # models.resolve_model's answer: the folder the base loads from
    template: dict
    train_rows: list[dict]
    valid_rows: list[dict]
    name: str = ""  # the output folder's name: <method> or <method>-seed<N>

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.settings.output_dir, self.method, self.name)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """Whether accelerate shards the model over the processes (FSDP2, configs/fsdp.yaml)."""
        return sharding_requested()

    @property
    def precision(self) -> str:
        """"bf16" (autocast) or "fp32": what the accelerator computes in."""
        return "bf16" if self.accelerator.mixed_precision == "bf16" else "fp32"

    @property
    def sync_free(self) -> bool:
        """Whether steps score label positions counted on the host (answer_loss_at).

        On CUDA the exact path's boolean mask, and the attention mask the model
        inspects, make the host wait for the GPU in every forward pass; a compiled
        step needs shapes that follow from its inputs.  The CPU otherwise keeps the
        exact path (the same loss up to float rounding).
        """
        return self.device.type == "cuda" or self.settings.compile != "off"

    @property
    def pad_multiple(self) -> tuple[int, int]:
        """(width, label positions) multiples a batch is padded to: few shapes to record."""
        return GRAPH_PADDING if self.settings.compile == "reduce-overhead" else (1, 1)


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when alone), before any set-up."""
    return int(os.environ.get("RANK", 0))


def sharding_requested() -> bool:
    """Whether the processes were started for FSDP (accelerate launch with configs/fsdp.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def force_fsdp_on_cpu(accelerator, plugin) -> None:
    """Make accelerate honour FSDP on CPU processes (gloo), as it does on GPUs.

    accelerate 1.15.0, accelerate/state.py, AcceleratorState.__init__ (about line 986):
    FSDP is enabled only `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_HPU,
    MULTI_NEURON]`; MULTI_CPU is absent, so CPU processes silently become DDP.  torch's
    fully_shard itself runs on a CPU mesh.  Both shared states are set: every new
    AcceleratorState() (reduce, a scheduler's wrapper) re-copies PartialState's.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def make_accelerator(device_choice: str = "auto", precision: str = "fp32"):
    """An Accelerator for --device and --precision: bf16 autocast (models.autocast_dtype) or fp32.

    On a machine without CUDA the processes of torchrun or `accelerate launch
    --multi_gpu --num_processes N` run on the CPU and talk over gloo.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = models.pick_device(device_choice)
    bf16 = models.autocast_dtype(device, precision) == torch.bfloat16
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != ("bf16" if bf16 else "no"):
        # accelerate keeps one precision per process; a later run in the same process (a
        # test, a benchmark) at another precision starts its state afresh, processes kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    # device_placement off: models.load_model has put the model on its device already (a
    # 4-bit model must not be moved again), and batches are moved by the loop.
    plugin = None
    if sharding_requested():
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* settings
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no",
                              device_placement=False, fsdp_plugin=plugin)
    if plugin is not None and device.type == "cpu" and accelerator.num_processes > 1:
        force_fsdp_on_cpu(accelerator, plugin)
    if plugin is not None and not accelerator.is_fsdp2:
        raise PipelineError(f"FSDP was asked for, but accelerate runs "
                            f"{accelerator.distributed_type} with fsdp_version "
                            f"{plugin.fsdp_version}: use configs/fsdp.yaml (fsdp_version 2) "
                            "with --num_processes 2 or more")
    return accelerator


def resolve(settings: TrainSettings, announce: bool | None = None) -> TrainSettings:
    """The settings with the model, device and precision decided, once per command.

    The default model may fall back to the offline preset (said in one line); --device
    auto becomes the device found; --precision auto becomes fp32 or bf16.  Every seed,
    checkpoint, run_id and metrics.json then records what was actually used; the
    requested model is kept as model_requested.
    """
    announce = process_rank() == 0 if announce is None else announce
    model = models.choose_model(settings.model, announce=announce)
    device = models.pick_device(settings.device)
    precision = models.resolve_precision(device, settings.precision, announce=announce)
    requested = "default" if settings.model is None else settings.model
    return settings.replace(model=model, device=device.type, precision=precision,
                            model_requested=requested)


def start_run(settings: TrainSettings, method: str, name: str | None = None) -> Run:
    """Check the inputs, join the processes, resolve the model and seed everything, before loading.

    The first process resolves (builds or converts) the model before the others,
    so they never race on the cache.
    """
    from accelerate.utils import set_seed

    # Training reads train and valid only: eval.jsonl is kept for evaluate.py.
    train_rows = load_split(settings.data_dir, "train")
    valid_rows = load_split(settings.data_dir, "valid")
    template = load_template(settings.data_dir)
    paths = RunPaths(settings.output_dir, method)
    if settings.resume and not checkpoints.listed(paths):
        raise PipelineError(f"--resume: no checkpoint in {paths.checkpoints}")
    accelerator = make_accelerator(settings.device, settings.precision)
    with accelerator.main_process_first():
        model_path = models.resolve_model(settings.model)
    # After resolving: building a tiny preset seeds torch's RNG itself, and a run that built
    # it must draw the same initialisation and dropout as every later run of the command.
    set_seed(settings.seed)
    return Run(method=method, settings=settings, accelerator=accelerator, model_path=model_path,
               template=template, train_rows=train_rows, valid_rows=valid_rows,
               name=name or method)


def load_prepared(run: Run, prepare, load_kwargs: dict) -> tuple:
    """Load the run's base model and apply the method: (model, tokenizer, the method's details).

    prepare(model, settings) -> (model, details); load_kwargs go to models.load_model
    (quantize_4bit=True).  The model loads from run.model_path, already resolved.
    """
    settings = run.settings
    model, tokenizer, _ = models.load_model(
        run.model_path, run.device, trust_remote_code=settings.trust_remote_code,
        precision=run.precision, **load_kwargs)
    model, details = prepare(model, settings)
    if not sharding_requested():  # FSDP2 shards a layer's tensors in one dtype: frozen stay fp32
        models.store_frozen_in_bf16(model, run.precision)  # after prepare: "frozen" is known
    if settings.gradient_checkpointing:  # after prepare: PEFT wraps the model it is given
        models.enable_gradient_checkpointing(model)
    return model, tokenizer, details
