"""The training config: one typed dataclass, read from YAML with ``key=value`` overrides, validated at once.

Every problem is collected and reported together, so a run never starts with a config that fails an hour later.
The resolved config is written to the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

Strategy = Literal["full", "frozen_vision", "lora", "qlora"]
Precision = Literal["bf16", "fp16", "fp32"]
Attention = Literal["sdpa", "flash_attention_2", "eager"]
Engine = Literal["auto", "ddp", "deepspeed_zero2", "fsdp2"]
Schedule = Literal["linear", "cosine", "constant"]
OnOverflow = Literal["error", "truncate", "drop"]
Training = Literal["frozen", "lora", "full"]


@dataclass(frozen=True)
class StrategySpec:
    """How each component trains (``frozen``, ``lora`` adapters on a frozen base, or ``full``), and whether the
    frozen base is quantised to 4-bit NF4. Components: see ``phi3v.train.strategy``."""

    vision: Training
    projector: Training
    language: Training
    quantize_base: bool = False

    @property
    def adapters(self) -> bool:
        """Some component trains LoRA adapters."""
        return "lora" in (self.vision, self.projector, self.language)

    def problems(self) -> list[str]:
        modes = (self.vision, self.projector, self.language)
        found = [f"{k}={v!r}: choose frozen, lora or full" for k, v in vars(self).items()
                 if k != "quantize_base" and v not in get_args(Training)]  # fmt: skip
        if not found and "lora" in modes and "full" in modes:
            found.append("components mix lora and full training: the adapter file would not hold the fully trained "
                         "weights; train every component as lora/frozen, or as full/frozen")  # fmt: skip
        if not found and self.quantize_base and "full" in modes:
            found.append("quantize_base with a fully trained component: 4-bit weights cannot be trained")
        if not found and all(m == "frozen" for m in modes):
            found.append("every component is frozen: nothing would train")
        return found


STRATEGIES: dict[str, StrategySpec] = {
    "full": StrategySpec(vision="full", projector="full", language="full"),
    "frozen_vision": StrategySpec(vision="frozen", projector="full", language="full"),
    "lora": StrategySpec(vision="lora", projector="lora", language="lora"),
    "qlora": StrategySpec(vision="lora", projector="lora", language="lora", quantize_base=True),
}
"""The named strategies are presets; the ``vision``, ``projector``, ``language`` and ``quantize_base`` settings
override a preset's entries (the reference recipe's LoRA adapts CLIP and the projector too)."""


class ConfigError(ValueError):
    """A config with problems; the message lists all of them."""


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the reference recipe (spec §4.3) where it has one."""

    # --- what to train
    model: str = "tiny"
    """A checkpoint directory or hub id, or a preset name (``tiny``, ``phi-3.5-vision``, ``phi-3-vision``)."""
    train_data: str = ""
    """The training jsonl file."""
    val_data: str | None = None
    """The validation jsonl file (evaluation during training)."""
    image_root: str = ""
    """Folder the jsonl image paths are relative to."""
    task: str = "generic"
    """Task name (``phi3v.tasks``): its metric scores evaluation."""
    system: str | None = None
    """The run's default system message, for training and validation records without their own ``system`` field
    (a record's own wins). Rendered as the official template does, ``<|system|>\n{system}<|end|>\n`` before the
    first user turn, and never trained on. Pass the same text to ``phi3v eval --system`` / ``phi3v generate
    --system`` afterwards."""
    strategy: Strategy = "lora"
    """A preset of the per-component settings below (``STRATEGIES``): ``full``, ``frozen_vision``, ``lora`` or
    ``qlora`` (4-bit NF4 base + LoRA)."""

    # --- numerics and shapes
    precision: Precision = "bf16"
    """Mixed precision: ``bf16``, ``fp16`` (with loss scaling) or ``fp32``."""
    attention: Attention = "sdpa"
    """Attention implementation."""
    num_crops: int = 16
    """HD crops per image (16 for single documents, 4 for several images or video frames)."""
    max_length: int = 4096
    """Longest sample in tokens; what happens to longer ones is ``on_overflow``."""
    on_overflow: OnOverflow = "error"
    """The length policy, for training and validation samples longer than ``max_length``, checked before the first
    step: ``error`` stops the run naming file, line and id; ``drop`` removes them; ``truncate`` cuts them at
    ``max_length`` (a cut that would split an image or keep no answer token is an error). Validation samples follow
    it as ``phi3v eval --on-overflow`` does: a prompt is never cut, so under ``truncate`` a longer one is evaluated
    whole when its prompt fits and is an error when it does not. Dropped and truncated samples are counted in
    ``summary.json``, the log and the report. ``phi3v data check --on-overflow`` applies the same policy."""
    skip_bad_images: bool = False
    """Remove (and count) samples with a missing or undecodable image instead of stopping the run; every image is
    decoded once before the first step either way."""
    packing: bool = False
    """Pack each micro-batch's samples into one row without padding (attention stays inside each sample)."""
    uint8_pixels: bool = True
    """Data-loader workers ship uint8 crops; normalisation and the global view are computed on the device."""
    compile: bool = False
    """``torch.compile`` every decoder and CLIP layer (dynamic shapes); the first steps are slower while it compiles."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing of decoder and CLIP layers."""
    checkpoint_every: int = 1
    """With ``gradient_checkpointing``: checkpoint every n-th layer only (1 = all; 2 keeps half the layers'
    activations and recomputes less, when memory allows)."""

    # --- batch and length of training
    per_device_batch_size: int = 1
    """Samples per device per micro-batch."""
    global_batch_size: int = 16
    """Samples per optimizer step over all devices; a multiple of per-device batch x world size."""
    epochs: float = 1.0
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run."""

    # --- optimizer
    lr: float = 4e-5
    """Peak learning rate."""
    schedule: Schedule = "linear"
    """Decay after warmup: ``linear`` to 0, ``cosine`` to 0, or ``constant``."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and the separators)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    adam_eps: float = 1e-7
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""

    # --- LoRA
    lora_rank: int = 64
    """LoRA rank."""
    lora_alpha: float = 128
    """LoRA alpha (the reference recipe uses 2 x rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
    )
    """Language-model modules that get adapters."""
    vision: Training | None = None
    """How the CLIP tower trains: ``frozen``, ``lora`` (adapters on q/k/v/out_proj, fc1, fc2) or ``full``;
    unset: as ``strategy`` says."""
    projector: Training | None = None
    """How the projector and separators train (``lora``: adapters on its two linear layers); unset: the preset's."""
    language: Training | None = None
    """How the language model trains (``lora``: adapters on ``lora_targets``); unset: the preset's."""
    quantize_base: bool | None = None
    """Quantise the frozen base to 4-bit NF4 (QLoRA; needs bitsandbytes); unset: the preset's."""

    # --- run
    engine: Engine = "auto"
    """``ddp``, ``deepspeed_zero2`` or ``fsdp2``; ``auto`` picks DDP for LoRA/QLoRA and ZeRO-2 for full and
    frozen_vision on several GPUs."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    output_dir: str = "runs/phi3v"
    """Run directory: config, logs, checkpoints, final model."""
    resume: str | None = None
    """``auto`` (latest valid checkpoint in the run directory, if any) or a checkpoint path."""
    overwrite: bool = False
    """Start afresh in an ``output_dir`` that holds another run: its checkpoints, logs and final model are deleted
    first. Without it (and without ``resume``), such a folder stops the run before anything is written."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (the best one by the metric is kept as well)."""
    eval_every: int = 0
    """Evaluate on ``val_data`` every N optimizer steps (0: only at the end, when ``val_data`` is set)."""
    eval_max_samples: int | None = None
    """Evaluate on at most this many validation samples."""
    log_every: int = 10
    """Log to TensorBoard and the console every N optimizer steps."""
    num_workers: int = 2
    """Data-loading worker processes per device."""

    @property
    def spec(self) -> StrategySpec:
        """The preset named by ``strategy`` with this config's per-component settings applied."""
        preset = STRATEGIES.get(self.strategy, STRATEGIES["full"])
        changes = {k: getattr(self, k) for k in ("vision", "projector", "language", "quantize_base")}
        return dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})

    @property
    def resolved_engine(self) -> str:
        """``auto``: DDP for LoRA/QLoRA; DeepSpeed ZeRO-2 for full and frozen_vision on several CUDA GPUs
        (its sharding has nothing to split on one device), DDP otherwise."""
        if self.engine != "auto":
            return self.engine
        import torch

        several_gpus = torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return "deepspeed_zero2" if several_gpus and not self.spec.adapters else "ddp"

    def validate(self, world_size: int = 1) -> None:
        """Raise ``ConfigError`` listing every problem."""
        problems = []
        hints = get_type_hints(TrainConfig)
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            allowed = _literal_choices(hint)
            if allowed and value not in allowed:
                problems.append(f"{f.name}={value!r}: choose one of {', '.join(map(repr, allowed))}")
        if not self.train_data:
            problems.append("train_data: required (a jsonl file)")
        elif not Path(self.train_data).is_file():
            problems.append(f"train_data={self.train_data!r}: file not found")
        if self.val_data and not Path(self.val_data).is_file():
            problems.append(f"val_data={self.val_data!r}: file not found")
        if self.system is not None and not (isinstance(self.system, str) and self.system.strip()):
            problems.append(f"system={self.system!r}: expected a non-empty string (or null for none)")
        if not self.image_root:
            problems.append("image_root: required (the folder image paths are relative to)")
        elif not Path(self.image_root).is_dir():
            problems.append(f"image_root={self.image_root!r}: not a directory")
        for f in fields(self):  # nan and inf pass every comparison below; refuse them first
            values = getattr(self, f.name) if f.name == "adam_betas" else [getattr(self, f.name)]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                problems.append(f"{f.name}={getattr(self, f.name)!r}: must be a finite number")
        problems += _output_dir_problems(self.output_dir)
        for name in ("num_crops", "max_length", "per_device_batch_size", "global_batch_size", "lora_rank",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be at least 1")
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)}: must be positive")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps}: must be at least 1")
        if self.log_every < 1:
            problems.append(f"log_every={self.log_every}: must be at least 1")
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            problems.append(f"eval_max_samples={self.eval_max_samples}: must be at least 1 (or null for all)")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers}: must not be negative")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha={self.lora_alpha}: must be positive")
        if not all(0 <= b < 1 for b in self.adam_betas):
            problems.append(f"adam_betas={list(self.adam_betas)}: each must be in [0, 1)")
        if self.overwrite and self.resume is not None:
            problems.append(f"overwrite=true with resume={self.resume!r}: choose one (overwrite deletes the run)")
        if self.keep_last < 1:
            problems.append(f"keep_last={self.keep_last}: keep at least 1 checkpoint")
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            problems.append(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} device(s) = {per_step}"
            )
        if self.precision == "fp16" and self.attention == "flash_attention_2":
            problems.append("precision=fp16 with attention=flash_attention_2: flash attention needs bf16 (or use sdpa)")
        problems += self.spec.problems()
        if self.spec.quantize_base and self.resolved_engine != "ddp":
            problems.append(f"a quantised base (strategy={self.strategy}) runs on ddp only, not engine={self.engine}")
        from phi3v.tasks import TASKS

        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: choose one of {', '.join(sorted(TASKS))}")
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))

    def gradient_accumulation_steps(self, world_size: int) -> int:
        return self.global_batch_size // (self.per_device_batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML."""
        from phi3v.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _literal_choices(hint: Any) -> tuple | None:
    return get_args(hint) if get_origin(hint) is Literal else None


def _coerce(name: str, raw: str, hint: Any) -> Any:
    """Turn a ``key=value`` string into the field's type (YAML syntax: numbers, lists, null, true/false).

    A text field (``str``, ``str | None``) takes the text as written unless YAML reads it as a string or null:
    ``system=Answer: one word`` stays that text (YAML would read a mapping), ``system=yes`` is not ``True``.
    """
    text_field = hint is str or (get_origin(hint) is not None and set(get_args(hint)) == {str, type(None)})
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        if text_field:
            return raw
        raise
    if text_field and value is not None and not isinstance(value, str):
        return raw
    return value


def _floats(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string and ``2`` as an int; give float fields floats."""
    accepts_float = hint is float or float in get_args(hint)
    if accepts_float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (or defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigError: for unknown keys, bad override syntax or values of the wrong type (all at once).
    """
    data: dict[str, Any] = {}
    problems = []
    if path is not None:
        loaded = _read_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    hints = get_type_hints(TrainConfig)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(f"override {item!r}: expected key=value")
            continue
        if key not in hints:
            problems.append(f"override {key!r}: unknown setting")
            continue
        data[key] = _coerce(key, raw, hints[key])
    data = {k: _floats(v, hints[k]) if k in hints else v for k, v in data.items()}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        problems.append(f"unknown setting(s) {unknown}" + (f" in {path}" if path else ""))
    for key in set(data) & set(hints):
        problem = _type_problem(key, data[key], hints[key])
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
    if "adam_betas" in data:
        data["adam_betas"] = tuple(float(b) for b in data["adam_betas"])
    return TrainConfig(**{k: v for k, v in data.items() if k in hints})


def _read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path``; ``ConfigError`` naming the file (and line) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from err


def _output_dir_problems(output_dir: str) -> list[str]:
    """Why a run could not write into ``output_dir`` (a file in the way, no write permission), found up front."""
    path = Path(output_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return [f"output_dir={output_dir!r}: {path} is a file, not a folder"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"output_dir={output_dir!r}: {path} is not writable"]
    return []


def _type_problem(key: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the field's type, or ``None``."""
    return None if _fits(value, hint) else f"{key}={value!r}: expected {_describe(hint)}"


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return True  # validate() checks the choices and names them
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(hint)
        if origin is tuple and Ellipsis not in args:
            return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_fits(v, args[0]) for v in value)
    if origin is not None:  # a union such as `int | None`
        return any(_fits(value, option) for option in get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "")
