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


# ---- state pieces -----------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of the optimizer state keyed ``{param name}/{key}``, and the json-able rest."""
    state = optimizer.state_dict()
    return split_moments({names[i]: values for i, values in state["state"].items()}, state["param_groups"], names)


def split_moments(by_name: dict[str, dict], param_groups: list[dict], names: list[str]) -> tuple[dict, dict]:
    """Per-parameter optimizer state (name -> {key: value}) as (tensors ``{name}/{key}``, json meta)."""
    tensors, scalars = {}, {}
    for name, values in by_name.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
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


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
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
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


# ---- save / load ------------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    scheduler: Any,
    trainer_state: TrainerState,
    rank: int,
    world_size: int,
    barrier,
) -> Path:
    """Write a checkpoint: rank 0 the weights and optimizer, every rank its RNG state (and ZeRO partition).

    ``state`` is ``engine.training_state``'s: ``trainable`` and ``optimizer`` (on rank 0), ``rank_optimizer``
    (per rank, DeepSpeed only).
    """
    final = checkpoint_dir(run_dir, step)
    staging = final.parent / f".tmp-{final.name}"
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    try:
        barrier()
        _write_pieces(staging, state, scheduler, trainer_state, rank, world_size)
        barrier()
        if rank == 0:
            write_manifest(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
    except BaseException:  # Ctrl-C or a failed write: no half-written folder stays behind
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    return final


def _write_pieces(staging: Path, state: dict[str, Any], scheduler: Any, trainer_state: TrainerState, rank: int,
                  world_size: int) -> None:  # fmt: skip
    tensors, meta = rng_state()
    save_file(tensors, staging / f"rng-rank{rank}.safetensors")
    atomic_write_text(staging / f"rng-rank{rank}.json", json.dumps(meta))
    if state.get("rank_optimizer") is not None:
        tensors, meta = state["rank_optimizer"]
        save_file(tensors, staging / f"zero-rank{rank}.safetensors")
        atomic_write_text(staging / f"zero-rank{rank}.json", json.dumps(meta))
    if rank == 0:
        trainable = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state["trainable"].items()}
        save_file(trainable, staging / "trainable.safetensors")
        if state.get("optimizer") is not None:
            opt_tensors, opt_meta = state["optimizer"]
            save_file(opt_tensors, staging / "optimizer.safetensors")
            atomic_write_text(staging / "optimizer.json", json.dumps(opt_meta))
        atomic_write_text(staging / "scheduler.json", json.dumps(scheduler.state_dict()))
        saved = dataclasses.replace(trainer_state, world_size=world_size)
        atomic_write_text(staging / "trainer_state.json", json.dumps(saved.to_dict()))


def load_checkpoint(folder: Path, rank: int) -> dict:
    """Read a verified checkpoint's pieces (no pickles anywhere)."""
    verify(folder)
    rng_file = folder / f"rng-rank{rank}.safetensors"
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file}: missing; resume with the same number of processes as the run")
    loaded = {
        "folder": folder,
        "trainable": load_file(folder / "trainable.safetensors"),
        "optimizer": None,
        "optimizer_meta": None,
        "rank_optimizer": None,
        "scheduler": _read_json(folder / "scheduler.json"),
        "trainer_state": TrainerState.from_json(folder / "trainer_state.json"),
        "rng": load_file(rng_file),
        "rng_meta": _read_json(folder / f"rng-rank{rank}.json"),
    }
    if (folder / "optimizer.safetensors").exists():
        loaded["optimizer"] = load_file(folder / "optimizer.safetensors")
        loaded["optimizer_meta"] = _read_json(folder / "optimizer.json")
    zero = folder / f"zero-rank{rank}.safetensors"
    if zero.exists():
        loaded["rank_optimizer"] = (load_file(zero), _read_json(zero.with_suffix(".json")))
    return loaded


def prune(run_dir: str | os.PathLike, keep_last: int, keep: set[Path]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those in ``keep`` (e.g. the best one)."""
    for folder in list_checkpoints(run_dir)[keep_last:]:
        if folder.resolve() not in keep:
            shutil.rmtree(folder)


def remove_staging(run_dir: str | os.PathLike) -> None:
    """Delete ``.tmp-step-*`` folders a killed save left behind (never a checkpoint: those are renamed in whole)."""
    root = Path(run_dir) / "checkpoints"
    for folder in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)


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
