"""The distributed strategy of a pretraining run (DDP, FSDP2, DeepSpeed ZeRO): how the EMA target encoder is
updated under it, and how the masks are sampled across data-parallel processes (:func:`mask_collator_for_process`).

I-JEPA keeps two encoders of the same architecture: the context encoder (trained) and the target encoder (an
exponential moving average of it, no gradients). The EMA ``target = m * target + (1 - m) * context`` is
element-wise, so it needs, on every rank, the same elements of both encoders:

* **replicated** (one process, DDP, DeepSpeed ZeRO-1/2): every rank holds whole parameters; the update is local.
* **local_shards** (FSDP2): parameters are ``DTensor`` shards. Accelerate wraps the whole ``IJepaForPreTraining``
  with one policy (``fully_shard`` per ``IJepaBlock`` plus the root), and FSDP2 shards every parameter along dim 0
  over the same mesh, so a target parameter and its context twin have the same local slice; the update runs on
  ``to_local()`` tensors without communication (``IJepaForPreTraining.update_target_encoder`` checks the layouts).
* **gathered** (DeepSpeed ZeRO-3): parameters are partitioned and only materialised inside
  ``deepspeed.zero.GatheredParameters``; the update gathers both encoders, applies the EMA on rank 0 and lets
  DeepSpeed re-partition rank 0's result.

Accelerate 1.15 does not fully set up either on CPU processes: with ``ACCELERATE_USE_CPU=1`` it silently turns an
FSDP config into plain data parallelism and ignores DeepSpeed; DeepSpeed without it (no GPU) gets a gloo process
group but Accelerate counts one process. :func:`configure_distributed` turns an FSDP2 launcher config into a real
FSDP2 run on CPU processes, repairs DeepSpeed's process count, and refuses what cannot be honoured.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..masking import IJepaMaskCollator

__all__ = ["EmaMode", "ema_mode", "after_checkpoint_load", "configure_distributed", "mask_collator_for_process",
           "match_deepspeed_config", "update_target_encoder", "ema_mode_of", "zero_stage", "run_on_main_process"]


class EmaMode(str, Enum):
    """How the EMA reaches the target encoder's parameters (see the module docstring)."""

    REPLICATED = "replicated"
    LOCAL_SHARDS = "local_shards"
    GATHERED = "gathered"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the run, ``None`` when DeepSpeed is not used."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", plugin.zero_stage)
    return int(stage) if stage is not None else 0


def ema_mode(distributed_type: Any, *, zero_stage: int | None = None, fsdp_version: int | None = None) -> EmaMode:
    """The EMA mode for an Accelerate ``distributed_type`` (a ``DistributedType`` or its name).

    Args:
        distributed_type: the run's distributed type (``NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``,
            ...).
        zero_stage: DeepSpeed's ZeRO stage (0-3); required for ``DEEPSPEED``.
        fsdp_version: 1 or 2; required for ``FSDP``.

    Raises:
        ValueError: FSDP1 (it flattens each wrapped unit's parameters into one sharded tensor, the root's holding
            parts of both encoders, so there is no per-parameter local slice to update; use ``fsdp_version: 2``),
            or a ZeRO stage outside 0-3.
    """
    name = getattr(distributed_type, "value", distributed_type)
    name = str(name).upper().split(".")[-1]
    if name == "FSDP":
        if fsdp_version != 2:
            raise ValueError(
                f"FSDP version {fsdp_version} is not supported for I-JEPA: the EMA target encoder needs per-parameter "
                "shards laid out like the context encoder's. Set `fsdp_version: 2` in the Accelerate config "
                "(examples/accelerate_configs/fsdp2.yaml)."
            )
        return EmaMode.LOCAL_SHARDS
    if name == "DEEPSPEED":
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        return EmaMode.GATHERED if zero_stage == 3 else EmaMode.REPLICATED
    if name in ("MEGATRON_LM", "XLA"):
        raise ValueError(f"distributed type {name} is not supported by the I-JEPA pretraining loop (use DDP, FSDP2 "
                         "or DeepSpeed)")
    return EmaMode.REPLICATED


def run_on_main_process(accelerator: Any, function: Any) -> Any:
    """``function()`` on the main process only; every process returns its (picklable) result, or raises the
    exception it raised, so that no process waits in a later collective for one that failed."""
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(True, function())]
        except Exception as error:  # noqa: BLE001 - raised on every process below
            outcome = [(False, error)]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def mask_collator_for_process(config: Any, *, seed: int, num_processes: int, process_index: int
                              ) -> IJepaMaskCollator:
    """The mask collator of one data-parallel process, sampling as the config's ``mask_sampling`` says.

    * ``"global"`` (the default of ``mask_mode="fixed"``): each process samples the masks of the whole global batch
      (``num_processes x B`` images: one block size, contexts equalised over the global batch) and keeps its own
      rows, so a P-process run sees exactly the masks of a 1-process run with the global batch.
    * ``"per_process"`` (the default of ``mask_mode="official"``): as the official code, every process samples the
      masks of its own batch of ``B`` images (contexts equalised within the per-process batch; with the run's one
      seed, the masks of a step are the same on every process, as the official generator seeded by the iteration
      number). Equalising over ``B`` rather than the global batch is part of the official distribution: the
      shortest context of a larger batch is shorter.
    """
    from ..masking import IJepaMaskCollator

    return IJepaMaskCollator.from_config(config, seed=seed, num_processes=num_processes, process_index=process_index)


def configure_distributed(accelerator: Any) -> EmaMode:
    """Check the run's distributed strategy right after ``Accelerator(...)`` and return its :class:`EmaMode`.

    * An FSDP launcher config on CPU processes (``ACCELERATE_USE_CPU=1`` + ``ACCELERATE_USE_FSDP``, where
      Accelerate 1.15 would silently run plain DDP) is turned into an FSDP2 run over gloo: the FSDP plugin is built
      from the launcher's environment and installed in the accelerator state before ``prepare``.
    * FSDP must be version 2, and its ``fsdp_state_dict_type`` ``FULL_STATE_DICT`` (see :func:`_check_fsdp`).
    * DeepSpeed under ``ACCELERATE_USE_CPU=1`` is refused (Accelerate would silently run without it); DeepSpeed on
      CPU processes without it gets Accelerate's process count repaired, and its settings checked
      (:func:`_check_deepspeed`).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_CPU and _flag("ACCELERATE_USE_DEEPSPEED"):
        raise RuntimeError(
            "A DeepSpeed config was launched with ACCELERATE_USE_CPU=1, under which Accelerate does not use DeepSpeed "
            "and would silently train with plain data parallelism. Launch without ACCELERATE_USE_CPU (on a machine "
            "without GPUs DeepSpeed then runs on the CPUs over gloo; see docs/distributed.md)."
        )
    if accelerator.distributed_type == DistributedType.MULTI_CPU and _flag("ACCELERATE_USE_FSDP"):
        _enable_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        _check_fsdp(accelerator.state.fsdp_plugin)
        _explain_fsdp2_view_warning()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _repair_deepspeed_process_counts(accelerator)
        _check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config)
    return ema_mode(accelerator.distributed_type, zero_stage=zero_stage(accelerator),
                    fsdp_version=getattr(accelerator.state.fsdp_plugin, "fsdp_version", None)
                    if accelerator.distributed_type == DistributedType.FSDP else None)


# torch warns once per process that the FSDP2 root returns a view: the predictions come out of the predictor's last
# linear layer, which runs on [M * B * Kt, d] rows and hands back a 3-D view of them. The warning is about an
# in-place op on that view skipping FSDP's pre-backward all-gather; nothing in this package (or transformers'
# loss) writes into the outputs in place, so for this module it does not apply.
FSDP2_VIEW_WARNING = r"FSDP2-wrapped module \(FSDPIJepaForPreTraining\) returned a view tensor"


def _explain_fsdp2_view_warning() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=FSDP2_VIEW_WARNING, category=UserWarning)
    logging.getLogger(__name__).debug(
        "Silenced torch's FSDP2 'returned a view tensor' warning for IJepaForPreTraining: its outputs are never "
        "modified in place (ijepa_hf.training.distributed.FSDP2_VIEW_WARNING)")


def _enable_fsdp_on_cpu(accelerator: Any) -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        _check_fsdp(plugin)  # raises: only FSDP2 runs on CPU
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _check_fsdp(plugin: Any) -> None:
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    ema_mode("FSDP", fsdp_version=plugin.fsdp_version)  # raises for FSDP1
    if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        raise ValueError(
            f"fsdp_state_dict_type {plugin.state_dict_type.name} is not supported: sharded checkpoints are written by "
            "torch.distributed.checkpoint, whose metadata files are pickles that resuming would have to unpickle "
            "(ijepa_hf loads checkpoints with weights_only=True only). Set `fsdp_state_dict_type: FULL_STATE_DICT` "
            "(rank 0 writes the gathered model and optimizer states)."
        )
    if plugin.ignored_modules:
        raise ValueError("fsdp_ignored_modules would leave some parameters unsharded on one encoder and sharded on "
                         "the other; the EMA target encoder needs both encoders sharded identically: remove it")


def _repair_deepspeed_process_counts(accelerator: Any) -> None:
    """DeepSpeed on CPU processes (no GPU, no ``ACCELERATE_USE_CPU``): DeepSpeed builds the gloo process group but
    Accelerate 1.15 leaves its process count at 1 (it only reads it for device types it knows), so every rank
    would believe it trains alone. Copy the process group's numbers into Accelerate's state."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if not dist.is_initialized() or dist.get_world_size() == accelerator.num_processes:
        return
    if accelerator.device.type != "cpu":
        raise RuntimeError(f"DeepSpeed: Accelerate counts {accelerator.num_processes} process(es) but the process "
                           f"group has {dist.get_world_size()}; check the launcher's --num_processes")
    for state in (PartialState(), AcceleratorState()):
        state.num_processes = dist.get_world_size()
        state.process_index = dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def _check_deepspeed(config: dict[str, Any]) -> None:
    """Refuse DeepSpeed's fp16/bf16 modes: they cast the whole model, the EMA target encoder included, to 16 bits,
    and an EMA step ``(1 - m) * (context - target)`` with ``m`` near 1 is far below half a bf16 unit in the last
    place of the target's weights, so it would be rounded away and the target encoder would stop following.
    Under ZeRO-3 the final export needs the gathered weights: refuse at the start, not after the run."""
    zero = config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save cannot export the trained model "
            "(its parameters are partitioned). Set `zero3_save_16bit_model: true` in the Accelerate config "
            "(examples/accelerate_configs/deepspeed_zero3.yaml); with mixed_precision 'no' the weights stay fp32."
        )
    for key in ("bf16", "fp16"):
        enabled = config.get(key, {}).get("enabled", False)
        if enabled is True or str(enabled).lower() in ("true", "auto"):
            raise ValueError(
                f"DeepSpeed {key} is not supported for I-JEPA pretraining: DeepSpeed stores the EMA target encoder "
                f"in {key}, where the EMA update is rounded away. Use mixed_precision 'no' with DeepSpeed, or FSDP2 "
                "(examples/accelerate_configs/fsdp2.yaml) or DDP, which keep fp32 weights under bf16 autocast."
            )


def match_deepspeed_config(accelerator: Any, *, gradient_accumulation_steps: int, max_grad_norm: float | None,
                           skip_nonfinite_steps: int = 0) -> None:
    """Make the DeepSpeed config say what the run's own arguments say (call before ``prepare``).

    Accelerate fills an ``auto`` ``gradient_clipping`` with 1.0 and prefers DeepSpeed's
    ``gradient_accumulation_steps`` over the script's (with only a warning); DeepSpeed, not the loop, then clips
    and accumulates. ``auto`` values are set from ``--max_grad_norm`` (0: no clipping) and
    ``--gradient_accumulation_steps``; explicit values that disagree are refused. ``--skip_nonfinite_steps`` is
    refused: the engine steps the optimizer inside ``accelerator.backward``, before the loop could skip it.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if skip_nonfinite_steps:
        raise ValueError("--skip_nonfinite_steps is not supported with DeepSpeed (its engine steps the optimizer "
                         "inside backward, before a non-finite update can be skipped); leave it at 0")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"gradient_clipping": float(max_grad_norm or 0.0),
              "gradient_accumulation_steps": int(gradient_accumulation_steps)}
    flags = {"gradient_clipping": "--max_grad_norm", "gradient_accumulation_steps": "--gradient_accumulation_steps"}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif float(given) != value:
            raise ValueError(
                f"The DeepSpeed config sets {key} {given} but the run has {flags[key]} {value:g}: DeepSpeed would "
                f"apply its own value. Make them equal (or set {key}: auto in the DeepSpeed config)."
            )


def after_checkpoint_load(accelerator: Any, model: Any) -> None:
    """Under ZeRO-3, release the parameters DeepSpeed's checkpoint load left gathered and reset its record of the
    order in which modules fetch parameters: otherwise the first backward after a resume fails with a "tracing
    error" (the fetch queue no longer matches)."""
    if zero_stage(accelerator) == 3:
        model.empty_partition_cache()


@contextlib.contextmanager
def _gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None) -> Iterator[None]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
        yield


def ema_mode_of(model: Any) -> EmaMode:
    """The EMA mode read off the parameters themselves (for callers without the run's accelerator, e.g. a
    ``Trainer`` callback): DeepSpeed ZeRO-3 parameters carry their partition in ``ds_tensor``, FSDP2 parameters are
    ``DTensor``s."""
    parameter = next(model.target_encoder.parameters())
    if getattr(parameter, "ds_tensor", None) is not None:
        return EmaMode.GATHERED
    return EmaMode.LOCAL_SHARDS if hasattr(parameter, "to_local") else EmaMode.REPLICATED


@torch.no_grad()
def update_target_encoder(model: Any, momentum: float, mode: EmaMode | None = None, *,
                          is_main_process: bool = True) -> None:
    """Apply the EMA of momentum ``momentum`` to ``model`` (the unwrapped ``IJepaForPreTraining``) under ``mode``
    (``None``: :func:`ema_mode_of`).

    ``replicated`` and ``local_shards`` are the model's own ``update_target_encoder`` (which works on local shards
    of ``DTensor`` parameters). ``gathered`` (ZeRO-3) materialises both encoders' full parameters on every rank,
    updates them on the process of global rank 0 (``is_main_process``) and lets DeepSpeed broadcast and
    re-partition the result (every rank must call it).
    """
    mode = ema_mode_of(model) if mode is None else mode
    if mode is not EmaMode.GATHERED:
        model.update_target_encoder(momentum)
        return
    parameters = [*model.target_encoder.parameters(), *model.context_encoder.parameters()]
    with _gathered(parameters, modifier_rank=0):
        if is_main_process:
            model.update_target_encoder(momentum)
