"""Training checkpoints: safetensors and json only, written atomically, verified before use.

A checkpoint ``RUN/checkpoints/step-0000050/`` holds

* ``trainable.safetensors``: every trainable parameter (all weights for full fine-tuning, adapters for LoRA);
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments by parameter name, and the param groups
  (DeepSpeed instead: ``zero-rank{r}.safetensors`` + ``.json``, each rank's ZeRO partition);
* ``scheduler.json``, ``trainer_state.json`` (step, losses, best metric);
* ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json``: every rank's torch, CUDA, NumPy and Python RNG states;
* ``manifest.json``, written last: the size and SHA-256 of every file.

The folder is assembled under a temporary name and renamed into place, so a crash leaves no folder that looks
complete; ``find_resumable`` also recomputes the manifest, so a file damaged later is caught and the previous
checkpoint is used instead.

``Checkpointer`` writes and reads all of it for every engine (DDP, DeepSpeed ZeRO-2, FSDP2); the training loop
calls its ``save`` and ``load``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from phi3v.train.engine import is_deepspeed
from phi3v.utils import atomic_write_text

logger = logging.getLogger("phi3v")
STEP_DIR = re.compile(r"^step-(\d{7})$")
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


@dataclass
class TrainerState:
    """What the loop carries from step to step, saved as ``trainer_state.json`` in every checkpoint."""

    run: dict[str, Any]
    """The settings the run is only valid for (a resume with other values is refused)."""
    step: int = 0
    """Optimizer steps done."""
    losses: list[float] = field(default_factory=list)
    """The loss of every step so far."""
    best: float | None = None
    """The best value of the task's main metric so far."""
    best_checkpoint: str | None = None
    """The checkpoint of the best evaluation (kept by pruning)."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation: ``{"step": s, metric: value, ...}``."""
    scaler: dict[str, Any] | None = None
    """The fp16 loss scaler's state."""
    world_size: int = 1
    """Processes that wrote the checkpoint."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: Path) -> TrainerState:
        """Read and check a ``trainer_state.json``; ``CheckpointError`` names the file and every bad field."""
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a mapping, got {type(data).__name__}")
        kinds = {"run": dict, "step": int, "losses": list, "best": (int, float),
                 "best_checkpoint": str, "evaluations": list, "scaler": dict, "world_size": int}  # fmt: skip
        optional = {"best", "best_checkpoint", "scaler"}
        problems = [f"{k}: missing" for k in kinds if k not in data]
        problems += [f"{k}: unknown field" for k in data if k not in kinds]
        for key, kind in kinds.items():
            value = data.get(key)
            present = key in data and not (value is None and key in optional)
            if present and (isinstance(value, bool) or not isinstance(value, kind)):
                problems.append(f"{key}: {value!r} is not {getattr(kind, '__name__', 'a number')}")
        if not problems and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data["losses"]):
            problems.append("losses: not a list of numbers")
        if not problems and data["step"] != len(data["losses"]):
            problems.append(f"step {data['step']} but {len(data['losses'])} losses")
        if problems:
            raise CheckpointError(f"{path}: " + "; ".join(problems[:5]))
        return cls(**data)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


REQUIRED = ("trainable.safetensors", "scheduler.json", "trainer_state.json")
"""Files every checkpoint has (besides the per-rank RNG states and the optimizer's, which depend on the engine)."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(folder: Path) -> dict[str, dict]:
    """The manifest, checked for shape: file name -> ``{"size": int, "sha256": hex}``, plain names only."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish)")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: expected a mapping of file names, got {type(manifest).__name__}")
    problems = []
    for name, entry in manifest.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            problems.append(f"{name!r}: not a plain file name")
        elif not isinstance(entry, dict):
            problems.append(f"{name}: expected {{size, sha256}}, got {type(entry).__name__}")
        elif type(entry.get("size")) is not int or entry["size"] < 0:
            problems.append(f"{name}: size {entry.get('size')!r} is not a byte count")
        elif not (isinstance(entry.get("sha256"), str) and SHA256.match(entry["sha256"])):
            problems.append(f"{name}: sha256 {entry.get('sha256')!r} is not a SHA-256 hex digest")
    problems += [f"{name}: missing from the manifest" for name in REQUIRED if name not in manifest]
    if problems:
        raise CheckpointError(f"{manifest_path}: " + "; ".join(problems[:5]))
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err


def verify(folder: Path) -> None:
    """Raise ``CheckpointError`` unless the manifest is well formed, every file of it is there with its size and
    hash, and the trainer state reads as a ``TrainerState``."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    for name, expected in read_manifest(folder).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest says {expected['size']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: content differs from the manifest (corrupted)")
    TrainerState.from_json(folder / "trainer_state.json")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are reported and skipped."""
    for folder in list_checkpoints(run_dir):
        try:
            verify(folder)
            return folder
        except CheckpointError as err:
            logger.warning("skipping checkpoint %s: %s", folder.name, err)
    return None


# ---- the checkpointer ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores a run's whole training state, for every engine; the loop calls ``save`` and ``load``.

    What each engine contributes:

    * ``ddp``: every process holds the whole model and optimizer; the main process saves them, and on resume every
      process reads them.
    * ``deepspeed_zero2``: parameters are whole everywhere, but the fp32 master weights and the Adam moments are
      split across processes. The main process saves the parameters; every process saves its own ZeRO partition
      (``zero-rank{r}.*``), so a resume needs the same number of processes.
    * ``fsdp2``: parameters and moments are sharded DTensors. They are gathered into whole tensors on the main
      process for saving (the checkpoint looks like a DDP one). On resume only the main process reads the files;
      ``broadcast_from_rank0`` sends each tensor to the others, which keep their shard of it, so host memory does
      not grow with the number of processes.

    Scheduler, fp16 loss scaler, trainer state (json) and every rank's RNG state (safetensors + json) are the same
    for all engines. DeepSpeed's own checkpoints (``torch.save`` pickles) are never written or read.

    Args:
        run_dir: The run's ``output_dir``; checkpoints go to ``run_dir/checkpoints/step-{step:07d}``.
        accelerator: The run's ``Accelerator`` (engine, process index and count, barrier, fp16 scaler).
        model: The model as prepared (FSDP2: the sharded root module).
        optimizer: The optimizer as prepared.
        scheduler: The learning-rate scheduler (its ``state_dict`` is json).
        names: The optimizer's parameter names, in its order (from ``make_optimizer``).
        keep_last: Checkpoints kept besides the best one.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator, model, optimizer, scheduler, names: list[str],
                 keep_last: int) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.accelerator, self.model, self.scheduler = accelerator, model, scheduler
        self.unwrapped = accelerator.unwrap_model(model)
        self.optimizer = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # under Accelerate's
        self.names, self.keep_last = names, keep_last
        if accelerator.is_fsdp2:
            self.engine = "fsdp2"
        elif is_deepspeed(accelerator):
            self.engine = "deepspeed_zero2"
        else:
            self.engine = "ddp"
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    # ---- save --------------------------------------------------------------------------------------------------

    def save(self, state: TrainerState) -> Path:
        """Write the checkpoint of ``state.step`` and prune older ones (keeping ``state.best_checkpoint``).

        Collective: every process calls it. Rank 0 writes weights, optimizer (DeepSpeed: every rank its ZeRO
        partition), scheduler and trainer state; every rank its RNG state. The folder is assembled under
        ``.tmp-step-*`` and renamed into place once the manifest is written.

        Returns:
            The checkpoint folder.
        """
        scaler = self.accelerator.scaler
        state = dataclasses.replace(state, world_size=self.world,
                                    scaler=scaler.state_dict() if scaler is not None else state.scaler)  # fmt: skip
        trainable, moments, partition = self._gather()  # collective (sharded engines)
        final = checkpoint_dir(self.run_dir, state.step)
        staging = final.parent / f".tmp-{final.name}"
        main, barrier = self.rank == 0, self.accelerator.wait_for_everyone
        if main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        try:
            barrier()
            tensors, meta = rng_state()
            _write_pair(staging, f"rng-rank{self.rank}", tensors, meta)
            if partition is not None:
                _write_pair(staging, f"zero-rank{self.rank}", *partition)
            if main:
                save_file(trainable, staging / "trainable.safetensors")
                if moments is not None:
                    _write_pair(staging, "optimizer", *moments)
                atomic_write_text(staging / "scheduler.json", json.dumps(self.scheduler.state_dict()))
                atomic_write_text(staging / "trainer_state.json", json.dumps(state.to_dict()))
            barrier()
            if main:
                write_manifest(staging)
                # A checkpoint of the same step is replaced only once the new one is whole: moved aside first
                # (``remove_staging`` puts it back if the process dies before the new one is in place).
                old = final.parent / f".old-{final.name}"
                if final.exists():
                    os.replace(final, old)
                os.replace(staging, final)
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # Ctrl-C or a failed write: no half-written folder stays behind
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        barrier()
        if main:
            best = {Path(state.best_checkpoint).resolve()} if state.best_checkpoint else set()
            prune(self.run_dir, self.keep_last, best)
        return final

    def _gather(self) -> tuple[dict | None, tuple | None, tuple | None]:
        """(trainable weights, optimizer moments) on rank 0 (None elsewhere), and this rank's ZeRO partition."""
        main = self.rank == 0
        if self.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            # whole tensors, on the main process only (others get empty dicts); frozen weights are not gathered
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            weights = get_model_state_dict(self.model, options=options)
            moments = get_optimizer_state_dict(self.model, self.optimizer, options=options)
            if not main:
                return None, None, None
            groups = [{**g, "params": [self.names.index(p) for p in g["params"]]} for g in moments["param_groups"]]
            # cpu_offload gave fresh CPU tensors: kept as they are, not copied a second time
            return _cpu(weights, copy=False), split_moments(moments["state"], groups, self.names, copy=False), None
        partition = None
        if self.engine == "deepspeed_zero2":  # the moments live in each process's partition
            partition = zero_partition_state(self.optimizer)
        if not main:
            return None, None, partition
        trainable = _cpu({n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad})
        moments = None if partition is not None else optimizer_state(self.optimizer, self.names)
        return trainable, moments, partition

    # ---- load --------------------------------------------------------------------------------------------------

    def load(self, folder: Path, run: dict[str, Any]) -> TrainerState:
        """Restore a checkpoint: weights, optimizer, scheduler, loss scaler and this rank's RNG state.

        Collective: every process calls it. Under FSDP2 only rank 0 reads the weights and moments and broadcasts
        them. The RNG state goes in last, so nothing after this call may draw from the RNGs before the step.

        Args:
            folder: A checkpoint folder that passed ``verify`` (``find_resumable`` or the loop's explicit resume
                check; not hashed a second time here).
            run: This run's settings that the checkpoint must have been written with (``TrainerState.run``).

        Returns:
            The checkpoint's trainer state, with this run's ``world_size``.

        Raises:
            CheckpointError: when the settings, the trainable parameters, the optimizer's parameters or (DeepSpeed)
                the number of processes differ from the checkpoint's, an RNG file of this run's ranks is missing,
                or the checkpoint was written by an engine whose optimizer state this one cannot read. Every
                rank raises the same error, before any collective.
        """
        saved = TrainerState.from_json(folder / "trainer_state.json")
        changed = {k: (saved.run.get(k), v) for k, v in run.items() if saved.run.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise CheckpointError(f"{folder} was written by a run with other settings ({listed}); resume with "
                                  "the same settings or start a new output_dir")  # fmt: skip
        zero = (folder / "zero-rank0.safetensors").exists()
        if zero != (self.engine == "deepspeed_zero2"):
            written = "deepspeed_zero2 (optimizer state in per-process partitions)" if zero else "ddp or fsdp2"
            raise CheckpointError(f"{folder}: written with engine {written}; this run's engine is {self.engine}: "
                                  "resume with the engine that wrote it")  # fmt: skip
        if self.engine == "deepspeed_zero2" and saved.world_size != self.world:
            raise CheckpointError(
                f"{folder}: written by {saved.world_size} processes; DeepSpeed's ZeRO partitions the optimizer "
                f"state by process, so resume with {saved.world_size}, not {self.world}"
            )
        # Checked for every rank on every rank (files, not collectives), so that all ranks raise together.
        missing = [r for r in range(self.world) if not (folder / f"rng-rank{r}.safetensors").exists()]
        if missing:
            raise CheckpointError(f"{folder}: no RNG state for rank(s) {missing}; resume with the same number of "
                                  f"processes as the run ({saved.world_size}, not {self.world})")  # fmt: skip
        rng_file = folder / f"rng-rank{self.rank}.safetensors"
        trainable_names = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if self.engine == "fsdp2":
            self._load_fsdp2(folder, trainable_names)
        else:
            trainable = load_file(folder / "trainable.safetensors")
            self._check_trainable(folder, set(trainable), trainable_names)
            params = dict(self.unwrapped.named_parameters())
            with torch.no_grad():
                for name, tensor in trainable.items():
                    params[name].copy_(tensor)
            if self.engine == "deepspeed_zero2":
                zero = folder / f"zero-rank{self.rank}"
                restore_zero_partition(self.optimizer, _read_pair(zero), self.rank, self.world)
            else:
                tensors, meta = _read_pair(folder / "optimizer")
                load_optimizer_state(self.optimizer, tensors, meta, self.names)
        self.scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
        if saved.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved.scaler)
        set_rng_state(load_file(rng_file), _read_json(folder / f"rng-rank{self.rank}.json"))
        return dataclasses.replace(saved, world_size=self.world)

    def _load_fsdp2(self, folder: Path, trainable_names: set[str]) -> None:
        """Rank 0 reads whole tensors; ``broadcast_from_rank0`` scatters them into every rank's shards."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        weights, moments, problem = {}, {}, [None]
        if self.rank == 0:
            try:
                weights = load_file(folder / "trainable.safetensors")
                tensors, meta = _read_pair(folder / "optimizer")
                moments = {
                    "state": join_moments(tensors, meta, self.names),
                    "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]}
                                     for g in meta["param_groups"]],
                }  # fmt: skip
                problem = [self._trainable_problem(folder, set(weights), trainable_names)]
            except CheckpointError as err:
                problem = [str(err)]
            except Exception as err:  # any unreadable file: the other ranks must not wait in the broadcast
                problem = [f"{folder}: cannot read ({type(err).__name__}: {err})"]
        # rank 0's checks, shared, so that every rank raises the same error rather than waiting in the broadcast
        dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise CheckpointError(problem[0])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, moments, options=options)

    @staticmethod
    def _trainable_problem(folder: Path, saved: set[str], trainable: set[str]) -> str | None:
        differ = sorted(saved ^ trainable)
        return f"{folder}: trainable parameters differ from this run's: {differ[:5]}" if differ else None

    def _check_trainable(self, folder: Path, saved: set[str], trainable: set[str]) -> None:
        if problem := self._trainable_problem(folder, saved, trainable):
            raise CheckpointError(problem)


def _cpu(tensors: dict[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """CPU copies of live tensors; ``copy=False`` for tensors that already are fresh CPU copies (FSDP2's offloaded
    state dicts: a second copy would double rank 0's host memory while saving)."""
    return {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in tensors.items()}


def _write_pair(folder: Path, stem: str, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    """``{stem}.safetensors`` + ``{stem}.json``."""
    save_file(tensors, folder / f"{stem}.safetensors")
    atomic_write_text(folder / f"{stem}.json", json.dumps(meta))


def _read_pair(stem: Path) -> tuple[dict[str, torch.Tensor], Any]:
    return load_file(stem.with_name(stem.name + ".safetensors")), _read_json(stem.with_name(stem.name + ".json"))


# ---- optimizer state --------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of the optimizer state keyed ``{param name}/{key}``, and the json-able rest."""
    state = optimizer.state_dict()
    return split_moments({names[i]: values for i, values in state["state"].items()}, state["param_groups"], names)


def split_moments(
    by_name: dict[str, dict], param_groups: list[dict], names: list[str], copy: bool = True
) -> tuple[dict, dict]:
    """Per-parameter optimizer state (name -> {key: value}) as (tensors ``{name}/{key}``, json meta); tensors are
    copied to the CPU unless ``copy`` is false (already fresh CPU copies)."""
    tensors, scalars = {}, {}
    for name, values in by_name.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu", copy=copy).contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": param_groups, "scalars": scalars, "names": names}


def join_moments(tensors: dict[str, torch.Tensor], meta: dict, names: list[str]) -> dict[str, dict]:
    """The inverse of ``split_moments``: name -> {key: value}; checks the parameter list first."""
    if meta["names"] != names:
        raise CheckpointError("the optimizer's parameters differ from the checkpoint's (another strategy or model?)")
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        name, field = key.rsplit("/", 1)
        by_name.setdefault(name, {})[field] = value
    return by_name


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, names: list[str]) -> None:
    by_name = join_moments(tensors, meta, names)
    state = {names.index(name): values for name, values in by_name.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def zero_partition_state(zero_optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """This process's ZeRO-1/2 optimizer state (fp32 master partition, Adam moments, loss scale) as
    (tensors, json tree)."""
    state = dict(zero_optimizer.state_dict())
    scaler = state.pop("loss_scaler")
    state["loss_scaler"] = {k: v for k, v in vars(scaler).items() if v is None or isinstance(v, bool | int | float)}
    state.pop("param_slice_mappings", None)  # only DeepSpeed's "universal" checkpoint conversion reads these
    return flatten(state)


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


# ---- RNG state --------------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and every CUDA device), NumPy and Python RNG states as (tensors, json)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
    }
    return tensors, meta


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of ``rng_state``."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


# ---- nested state <-> safetensors + json --------------------------------------------------------------------------


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A nest of dicts, lists, tensors and plain values as (tensors by path, json-able skeleton).

    Raises:
        TypeError: for a value json cannot hold (it would need pickle), naming its path.
    """
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


# ---- housekeeping -------------------------------------------------------------------------------------------------


def prune(run_dir: str | os.PathLike, keep_last: int, keep: set[Path]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those in ``keep`` (e.g. the best one)."""
    for folder in list_checkpoints(run_dir)[keep_last:]:
        if folder.resolve() not in keep:
            shutil.rmtree(folder)


def remove_staging(run_dir: str | os.PathLike) -> None:
    """Clean up after a killed save: delete ``.tmp-step-*`` folders (never a checkpoint: those are renamed in
    whole), and put a checkpoint moved aside as ``.old-step-*`` back when its replacement never arrived."""
    root = Path(run_dir) / "checkpoints"
    for folder in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
    for old in root.glob(".old-step-*") if root.is_dir() else []:
        final = old.with_name(old.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def set_aside_newer(run_dir: str | os.PathLike, step: int) -> None:
    """Rename checkpoints newer than ``step`` to ``abandoned-step-*`` (resuming from an older one rewinds the run;
    the newer ones belong to the abandoned continuation and must not be picked by a later ``resume=auto``)."""
    for folder in list_checkpoints(run_dir):
        if int(STEP_DIR.match(folder.name).group(1)) > step:
            target = folder.with_name(f"abandoned-{folder.name}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(folder, target)
            logger.warning("set aside %s (newer than the resumed step %d) as %s", folder.name, step, target.name)
