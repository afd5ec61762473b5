"""What differs between the engines when setting up: the Accelerator, and (FSDP2) how the model is sharded and
loaded. Saving and restoring the training state is ``checkpoint.Checkpointer``'s.

* ``ddp``: every process holds the whole model and optimizer.
* ``deepspeed_zero2``: parameters are whole everywhere; fp32 master weights, gradients and Adam moments are split
  across processes (DeepSpeed through Accelerate's plugin).
* ``fsdp2``: parameters, gradients and moments are sharded DTensors, as torchtitan applies FSDP2: ``fully_shard``
  on each decoder layer, on the CLIP tower, then on the root (``shard_fsdp2``). We call torch's ``fully_shard``
  ourselves rather than through Accelerate's plugin, whose class-name wrap policy and loading path would hide the
  units, their order, ``reshard_after_forward`` and the rank-0 load behind settings; written out, they read as
  torchtitan's ``apply_fsdp``. Accelerate still forms the process group and runs backward, gradient accumulation
  (``set_requires_gradient_sync``) and clipping. The loop hands Accelerate only the optimizer
  (``prepare_optimizer``): its ``prepare(model, optimizer)`` re-points the optimizer by data pointer, which the
  empty shards of small tensors break.

Notation: ``N`` processes, ``P`` bytes of the whole model's parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phi3v.model import without_adapters
from phi3v.train.config import TrainConfig


class EngineError(ValueError):
    """The engine cannot run as configured; the message says what to change."""


def make_accelerator(config: TrainConfig, accumulation: int, find_unused_parameters: bool = False):
    """The Accelerator for ``config.resolved_engine``; on a machine without CUDA, every engine runs over gloo."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[config.precision]
    engine = config.resolved_engine
    if engine != "ddp" and "LOCAL_RANK" not in os.environ:
        raise EngineError(
            f"engine={engine} shards the training state across processes: start it with `torchrun "
            "--nproc_per_node=N -m phi3v train ...` or `accelerate launch`, or use engine=ddp for one process"
        )
    kwargs: dict[str, Any] = {
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    }
    if engine == "deepspeed_zero2":
        from accelerate.utils import DeepSpeedPlugin

        # Everything "auto" in zero2.json is stated here: no DataLoader goes through prepare() to infer it.
        ds_config = json.loads(Path(__file__).with_name("zero2.json").read_text())
        ds_config.update(
            train_micro_batch_size_per_gpu=config.per_device_batch_size,
            train_batch_size=config.global_batch_size,
            gradient_accumulation_steps=accumulation,
            gradient_clipping=config.max_grad_norm,
        )
        ds_config["bf16"]["enabled"] = config.precision == "bf16"
        ds_config["fp16"]["enabled"] = config.precision == "fp16"
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    elif engine == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # The plugin tells Accelerate that the run is FSDP2; shard_fsdp2 applies fully_shard itself.
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)

    cpu = not torch.cuda.is_available()
    if cpu and engine == "deepspeed_zero2":
        # DeepSpeed runs on its CPU accelerator over gloo; Accelerate's cpu mode would drop DeepSpeed.
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"].append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False
    # Otherwise, without a GPU, Accelerate forms a (gloo) process group only when told to run on the CPU.
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=accumulation, cpu=cpu, **kwargs)
    if cpu and engine == "fsdp2" and accelerator.num_processes > 1:
        # Accelerate turns FSDP on only for accelerators, although torch's FSDP2 runs on the CPU over gloo.
        # Switch its (shared) state as it does on GPUs, so that CPU runs take the same path as GPU runs.
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


# ---- FSDP2 ---------------------------------------------------------------------------------------------------------

RESHARD_AFTER_FORWARD = True
"""Decoder layers and the CLIP tower free their gathered parameters after their forward and gather them again in
backward (ZeRO-3). FSDP2 is the engine for models whose fp32 state does not fit whole on each device (ZeRO-2 is
the faster choice when it does); keeping every layer gathered from forward to backward (``False``) would hold the
whole bf16 model on every device during the step, which is what sharding is meant to avoid. The price is one more
all-gather per layer in backward, overlapped with compute by FSDP2's prefetching. The root module (embeddings,
final norm, output head, projector, separators) is never resharded after forward: backward starts with it."""


def mixed_precision_policy(precision: str):
    """FSDP2's mixed precision for ``precision``.

    bf16 / fp16: the fp32 shards are cast once per all-gather to a bf16 / fp16 compute copy, and gradients are
    reduce-scattered in fp32 into the fp32 shards (the optimizer steps fp32 master weights). fp32: nothing is cast.

    Args:
        precision: ``"bf16"``, ``"fp16"`` or ``"fp32"``.

    Returns:
        A ``torch.distributed.fsdp.MixedPrecisionPolicy``.

    Raises:
        ValueError: for another precision.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r}: expected bf16, fp16 or fp32")
    return MixedPrecisionPolicy(param_dtype=dtypes[precision], reduce_dtype=torch.float32)


def shard_fsdp2(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Shard ``model`` with FSDP2 and fill every rank's shards from rank 0's weights. Collective.

    On rank 0 ``model`` holds the weights (on the CPU); on the other ranks it is the same model built on the meta
    device (shapes only). Rank 0 keeps its weights as a state dict [P bytes of host memory], every rank turns its
    model into meta tensors, shards it, allocates its own shards on ``device`` [P / N bytes each], and
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` sends each whole tensor from rank 0 to the others, which
    keep their shard of it. Host memory is therefore about P on rank 0 and P / N elsewhere (plus a receive buffer
    of one whole tensor at a time and allocator slack: measured 160-200 MiB for 82 MiB of shards, RESULTS.md),
    instead of P on every rank.

    Sharding units, in order (torchtitan's order: children before the root):

    * each decoder layer ``model.layers[i]``;
    * the CLIP tower (``vision_embed_tokens.img_processor``) as one unit. Its layers are small (CLIP-L: 12.6M
      parameters each against 113M per decoder layer) and run back to back once per step, so one all-gather of the
      tower is expected to cost less than 23 small ones (not measured: no GPU yet) and still frees it after the
      image encoding. (It is its own unit, apart
      from the root, so that text-only steps and generation's decode steps need not gather it at all; see
      ``Phi3VModel.embed`` for how ranks agree on running it.)
    * the root (``model`` itself, the PEFT wrapper for LoRA): embeddings, final norm, output head, projector and
      separators.

    Args:
        model: The model after ``apply_strategy`` (and activation checkpointing / compile, which wrap the layers
            in place and so come first, as in torchtitan).
        precision: The run's precision (``mixed_precision_policy``).
        device: Where the shards live (``accelerator.device``).

    Returns:
        ``model``, sharded in place (now a ``torch.distributed.fsdp.FSDPModule``).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    full = model.state_dict() if dist.get_rank() == 0 else {}  # references to rank 0's weights, no copy
    model.to("meta")  # the modules drop their storage; rank 0's weights live on in `full` only
    policy = mixed_precision_policy(precision)
    base = without_adapters(model)
    for layer in base.model.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=RESHARD_AFTER_FORWARD)
    fully_shard(base.model.vision_embed_tokens.img_processor, mp_policy=policy,
                reshard_after_forward=RESHARD_AFTER_FORWARD)  # fmt: skip
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    model.to_empty(device=device)  # this rank's shards, uninitialised
    base.reset_buffers()  # rotary frequencies and CLIP position ids: not in any state dict
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def fsdp2_layout(model: nn.Module) -> dict[str, Any]:
    """The FSDP2 units and every rank's share of the parameters, for the log and ``summary.json``. Collective.

    Returns:
        ``units``: names of the modules that are FSDP units (``""`` is the root); ``param_bytes``: bytes of the
        whole (unsharded) parameters; ``local_param_bytes``: bytes of each rank's shards, by rank.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    params = list(model.parameters())
    local = sum(p.to_local().numel() * p.element_size() for p in params)
    per_rank: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return {"units": units, "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "local_param_bytes": per_rank}  # fmt: skip
