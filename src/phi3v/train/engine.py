"""What differs between the engines: building the Accelerator, and taking the training state out and back in.

* ``ddp``: every process holds the whole model and optimizer; the main process saves them.
* ``deepspeed_zero2``: parameters are whole everywhere, but the fp32 master weights and the Adam moments are
  split across processes. The main process saves the parameters; every process saves its own ZeRO partition
  (``zero-rank{r}.*``), so a resume needs the same number of processes.
* ``fsdp2``: parameters and moments are sharded DTensors. They are gathered into whole tensors on the main
  process for saving (the checkpoint looks like a DDP one) and scattered again on resume.

All of it is safetensors + json: DeepSpeed's own checkpoints (``torch.save`` pickles) are never written or read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from phi3v.train import checkpoint as ckpt
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

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False)

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


def _inner(optimizer):
    """The optimizer under Accelerate's wrapper (for DeepSpeed: its ZeRO optimizer)."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


# ---- out ---------------------------------------------------------------------------------------------------------


def training_state(accelerator, model, unwrapped, optimizer, names: list[str]) -> dict[str, Any]:
    """The state a checkpoint holds. Collective: every process calls it.

    Returns ``trainable`` (name -> tensor) and ``optimizer`` ((tensors, json) by parameter name) on the main
    process, None elsewhere; ``rank_optimizer`` ((tensors, json) of this process's ZeRO partition) or None.
    """
    main = accelerator.is_main_process
    state: dict[str, Any] = {"trainable": None, "optimizer": None, "rank_optimizer": None}
    trainable_names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, main process only
        weights = get_model_state_dict(model, options=options)
        moments = get_optimizer_state_dict(model, _inner(optimizer), options=options)
        if main:
            state["trainable"] = {n: t for n, t in weights.items() if n in trainable_names}
            state["optimizer"] = _by_name(moments, names)
        return state
    deepspeed = is_deepspeed(accelerator)
    if deepspeed:  # the moments live in each process's partition
        state["rank_optimizer"] = zero_partition_state(_inner(optimizer))
    if main:
        state["trainable"] = {n: p for n, p in unwrapped.named_parameters() if n in trainable_names}
        if not deepspeed:
            state["optimizer"] = ckpt.optimizer_state(_inner(optimizer), names)
    return state


def _by_name(moments: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's name-keyed (full) optimizer state dict in our checkpoint layout (see ``ckpt.optimizer_state``)."""
    groups = [{**g, "params": [names.index(p) for p in g["params"]]} for g in moments["param_groups"]]
    return ckpt.split_moments(moments["state"], groups, names)


def zero_partition_state(zero_optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """This process's ZeRO-1/2 optimizer state (fp32 master partition, Adam moments, loss scale) as
    (tensors, json tree)."""
    state = dict(zero_optimizer.state_dict())
    scaler = state.pop("loss_scaler")
    state["loss_scaler"] = {k: v for k, v in vars(scaler).items() if v is None or isinstance(v, bool | int | float)}
    state.pop("param_slice_mappings", None)  # only DeepSpeed's "universal" checkpoint conversion reads these
    return flatten(state)


# ---- back in -----------------------------------------------------------------------------------------------------


def restore_training_state(accelerator, model, unwrapped, optimizer, names: list[str], loaded: dict) -> None:
    """Put a checkpoint's weights and optimizer state back (``loaded`` from ``ckpt.load_checkpoint``)."""
    params = dict(unwrapped.named_parameters())
    missing = sorted(set(loaded["trainable"]) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise EngineError(f"{loaded['folder']}: trainable parameters differ from this run's: {missing[:5]}")
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        meta = loaded["optimizer_meta"]
        moments = {
            "state": ckpt.join_moments(loaded["optimizer"], meta, names),
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]],
        }
        options = StateDictOptions(full_state_dict=True, strict=False)  # every process holds the whole state
        set_model_state_dict(model, loaded["trainable"], options=options)
        set_optimizer_state_dict(model, _inner(optimizer), moments, options=options)
        return

    with torch.no_grad():
        for name, tensor in loaded["trainable"].items():
            params[name].copy_(tensor)
    if is_deepspeed(accelerator):
        saved_world = loaded["trainer_state"].world_size
        if saved_world != accelerator.num_processes:
            raise EngineError(
                f"{loaded['folder']}: written by {saved_world} processes; DeepSpeed's ZeRO partitions the optimizer "
                f"state by process, so resume with {saved_world}, not {accelerator.num_processes}"
            )
        restore_zero_partition(_inner(optimizer), loaded["rank_optimizer"], accelerator.process_index,
                               accelerator.num_processes)  # fmt: skip
    else:
        ckpt.load_optimizer_state(_inner(optimizer), loaded["optimizer"], loaded["optimizer_meta"], names)


def restore_zero_partition(zero_optimizer, saved: tuple[dict[str, torch.Tensor], Any], rank: int, world: int) -> None:
    """Load this process's partition (from ``zero_partition_state``), fp32 master weights included."""
    state = unflatten(*saved)
    for key, value in state.pop("loss_scaler").items():
        setattr(zero_optimizer.loss_scaler, key, value)
    state["loss_scaler"] = zero_optimizer.loss_scaler
    # DeepSpeed indexes the list by rank; a rigid (same world size) checkpoint reads only its own entry.
    partitions = [None] * world
    partitions[rank] = state
    zero_optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)


# ---- nested state <-> safetensors + json --------------------------------------------------------------------------


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A nest of dicts, lists, tensors and plain values as (tensors by path, json-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {"tensor": path}
        if isinstance(value, dict):  # keys kept with their type (optimizer states use int keys)
            return {"dict": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            return {"list": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, bool | int | float | str):
            return {"value": value}
        raise TypeError(f"{path or '/'}: a {type(value).__name__} cannot be stored without pickle")

    return tensors, walk(tree, "")


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of ``flatten``."""
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: unflatten(tensors, v) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [unflatten(tensors, v) for v in skeleton["list"]]
    return skeleton["value"]
