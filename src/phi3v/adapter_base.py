"""What a LoRA adapter knows about its base, and the checks before an adapter is applied.

PEFT's ``adapter_config.json`` records ``base_model_name_or_path: null`` for a phi3v base, so nothing could tell an
adapter applied to the wrong base. Training therefore writes ``phi3v_base.json`` beside the adapter:

* ``base``: the base as the run named it (a path, a hub id or a preset name);
* ``config_sha256``: sha256 of the base's architecture settings (the config fields that shape the weights);
* ``tensors``: per floating-point tensor of the base, its shape and a *probe*: the correlation of its first 4,096
  values with a fixed pseudo-random +-1 vector. Quantised (integer) tensors are left out, so a QLoRA run's
  record still matches the unquantised base used for evaluation and export.

A probe is stable under a change of dtype (bf16 rounding moves it by about 0.001) while a different base (another
seed, other weights) moves it by about 1; ``PROBE_TOLERANCE`` sits between. ``check_base`` compares a loaded base
with the record; ``export``, ``eval`` and ``generate`` refuse a mismatch unless told ``--force``.

``refuse_pickles`` keeps pickled adapter files (``adapter_model.bin`` ...) from ever reaching ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from phi3v.utils import atomic_write_text

logger = logging.getLogger(__name__)

IDENTITY_FILE = "phi3v_base.json"
PROBE_LENGTH = 4096
PROBE_TOLERANCE = 0.05
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings", "rope_theta",
    "rope_scaling", "tie_word_embeddings", "img_processor",
)  # fmt: skip


class AdapterBaseError(ValueError):
    """An adapter that does not belong to the base it is applied to, or a pickled adapter file."""


def refuse_pickles(adapter_dir: str | os.PathLike) -> None:
    """Refuse an adapter folder holding pickled weights, before PEFT could ``torch.load`` them.

    Raises:
        AdapterBaseError: naming the files.
    """
    folder = Path(adapter_dir)
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterBaseError(
            f"{folder}: pickled adapter file(s) {pickles}; phi3v never loads pickles "
            "(convert them to adapter_model.safetensors)"
        )


# bitsandbytes' quantisation state of a 4/8-bit weight: not part of the unquantised base
_QUANT_STATE = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*|SCB|weight_format)$")


def _tensor_name(key: str) -> str | None:
    """A base tensor's name as the plain model has it (PEFT prefixes and ``base_layer`` removed); ``None`` for
    adapter tensors and quantisation state."""
    if "lora_" in key or "modules_to_save" in key or _QUANT_STATE.search(key):
        return None
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.(base_layer|original_module)(?=\.)", "", key)


def _probe_vector() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (PROBE_LENGTH,), generator=generator, dtype=torch.float64) * 2 - 1


def fingerprint(config: Any, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The identity record of a base: architecture hash and per-tensor shape and probe.

    Args:
        config: The base's config (a ``PretrainedConfig`` or anything with the attributes).
        state_dict: The base's tensors (a PEFT model's state dict works: adapter tensors are skipped).
    """
    settings = {}
    for name in _ARCHITECTURE_FIELDS:
        value = getattr(config, name, None)
        settings[name] = value.to_dict() if hasattr(value, "to_dict") else value
    config_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    signs = _probe_vector()
    tensors = {}
    for key, tensor in state_dict.items():
        name = _tensor_name(key)
        if name is None or not torch.is_floating_point(tensor) or tensor.device.type == "meta":
            continue
        values = tensor.detach().reshape(-1)[:PROBE_LENGTH].to("cpu", torch.float64)
        norm = float(values.norm())
        probe = float(values @ signs[: values.numel()]) / norm if norm > 0 else 0.0
        tensors[name] = {"shape": list(tensor.shape), "probe": round(probe, 6)}
    return {"config_sha256": config_hash, "tensors": tensors}


def write_identity(adapter_dir: str | os.PathLike, base: str, config: Any, state_dict: Mapping) -> Path:
    """Write ``phi3v_base.json`` beside an adapter (training calls this when it saves one)."""
    path = Path(adapter_dir) / IDENTITY_FILE
    record = {"base": str(base), **fingerprint(config, state_dict)}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def check_base(adapter_dir: str | os.PathLike, base: str | os.PathLike, model: torch.nn.Module, force: bool = False):
    """Compare a loaded base with the identity its adapter recorded.

    Args:
        adapter_dir: The adapter folder.
        base: How the user named the base (for the message).
        model: The loaded base model (before the adapter is applied).
        force: Warn instead of refusing a mismatch.

    Raises:
        AdapterBaseError: one line naming the adapter's base, the given base and the first difference.
    """
    path = Path(adapter_dir) / IDENTITY_FILE
    if not path.is_file():
        logger.warning("%s: no %s (an adapter from an older phi3v); its base cannot be verified", adapter_dir,
                       IDENTITY_FILE)  # fmt: skip
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recorded_base, recorded_hash, recorded = record["base"], record["config_sha256"], record["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdapterBaseError(f"{path}: unreadable base record ({err})") from None
    current = fingerprint(model.config, model.state_dict())
    problem = None
    if current["config_sha256"] != recorded_hash:
        problem = "its architecture settings differ"
    else:
        for name, expected in recorded.items():
            found = current["tensors"].get(name)
            if found is None:
                problem = f"it has no tensor {name}"
            elif found["shape"] != expected["shape"]:
                problem = f"tensor {name} has shape {found['shape']}, the adapter's base {expected['shape']}"
            elif abs(found["probe"] - expected["probe"]) > PROBE_TOLERANCE:
                problem = f"tensor {name} holds other weights (probe {found['probe']:.4f} vs {expected['probe']:.4f})"
            if problem:
                break
    if problem is None:
        return
    message = f"adapter {adapter_dir} was trained on base {recorded_base!r}, not on {os.fspath(base)!r}: {problem}"
    if force:
        logger.warning("%s (--force: using it anyway)", message)
        return
    raise AdapterBaseError(message + "; pass --force to apply it anyway")
