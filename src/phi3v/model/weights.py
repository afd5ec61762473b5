"""Official checkpoint format: an explicit key map with shape checks, safetensors only.

Loading accepts exactly the official key set (spec §2.7):

* ``model.vision_embed_tokens.wte.weight`` is an alias of ``model.embed_tokens.weight`` (the official module
  shares one embedding); it is used only when ``model.embed_tokens.weight`` is absent;
* CLIP layers past the one Phi-3-V reads (layer 23 of CLIP-L) and ``post_layernorm`` are not built; their
  tensors are kept aside and written back on save, so a phi3v checkpoint has the complete official key set;
* buffers some exporters include (``rotary_emb.inv_freq``, ``embeddings.position_ids``) are recomputed.

Anything else missing, unexpected or of the wrong shape raises, naming the tensors. Pickled weights are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi3v.model.configuration import Phi3VConfig
from phi3v.utils import atomic_write_text, stage_file

if TYPE_CHECKING:
    from phi3v.model.modeling import Phi3VForCausalLM

logger = logging.getLogger("phi3v")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WTE_ALIAS = "model.vision_embed_tokens.wte.weight"
EMBED_KEY = "model.embed_tokens.weight"
VISION_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."
_RECOMPUTED_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")
_VISION_LAYER = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
# Files that may be downloaded from the hub: weights as safetensors, configs, tokenizer and processor files.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
PROCESSOR_PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]  # no weights


def _is_unused_official(key: str, layers_built: int) -> bool:
    """CLIP tensors the official checkpoint has but Phi-3-V never computes with."""
    if key.startswith(VISION_PREFIX + "post_layernorm."):
        return True
    match = _VISION_LAYER.match(key)
    return match is not None and int(match.group(1)) >= layers_built


def local_checkpoint(path_or_id: str | os.PathLike) -> Path | None:
    """The local directory ``path_or_id`` names, ``None`` if it is a hub id.

    Raises:
        ValueError: if it names a file.
        FileNotFoundError: for a path (not a hub id) that does not exist.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    return None


def resolve_checkpoint(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    patterns: list[str] | None = None,
    **hub: object,
) -> Path:
    """A local checkpoint directory, downloading a hub id where needed (``patterns``, by default safetensors,
    json and tokenizer files: never code or pickles; ``hub``: ``cache_dir``, ``local_files_only``, ``token``)."""
    local = local_checkpoint(path_or_id)
    if local is not None:
        return local
    text = str(path_or_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns or HUB_ALLOW_PATTERNS, **hub))
    except Exception as err:  # offline, unknown repo, ...: say both things we tried
        raise FileNotFoundError(
            f"{text} is neither a local directory nor a hub repository that could be downloaded ({err})"
        ) from err


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory.

    Raises:
        FileNotFoundError: when there are none (naming pickled weights found instead: they are never loaded).
    """
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
        return [directory / name for name in files]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {pickles}: phi3v never loads pickled weights; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {directory}{hint}")


def iter_checkpoint(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(key, tensor)`` of a safetensors checkpoint, one shard open at a time, on CPU."""
    for file in weight_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def check_loading_info(source: str | os.PathLike, info: dict, config: Phi3VConfig, shapes: bool = True) -> None:
    """Raise unless transformers' loader filled every tensor from the checkpoint and found nothing foreign.

    Args:
        source: The checkpoint path or hub id (for the message).
        info: ``output_loading_info`` of ``PreTrainedModel.from_pretrained``.
        config: The loaded model's config (how many CLIP layers are built).
        shapes: Also refuse mis-shaped tensors (not when the caller asked transformers to re-initialise them).

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped tensors.
    """
    layers_built = config.vision_layers_used
    missing = sorted(k for k in info.get("missing_keys", ()) if not _RECOMPUTED_BUFFERS.search(k))
    # transformers drops the unexpected keys that `_keys_to_ignore_on_load_unexpected` names; what is left, and
    # the CLIP layers it would wrongly hide (a layer the model builds is never "unexpected"), is foreign.
    unexpected = sorted(
        k for k in info.get("unexpected_keys", ()) if not (_is_unused_official(k, layers_built) or k == WTE_ALIAS)
    )
    bad_shapes = [
        f"{key}: checkpoint {tuple(ckpt)}, model {tuple(model)}"
        for key, ckpt, model in (info.get("mismatched_keys", ()) if shapes else ())
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} with the wrong shape: {_preview(bad_shapes)}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {config.model_type}: " + "; ".join(problems))


def read_unused_official(source: str | os.PathLike, model: Phi3VForCausalLM, **hub: object) -> dict[str, torch.Tensor]:
    """The official CLIP tensors Phi-3-V never computes with (past the layer it reads, and post_layernorm).

    They are not built, but kept so that saving writes the complete official key set; in the vision tower's dtype.

    Args:
        source: The checkpoint directory or hub id (already in the local cache after loading).
        model: The loaded model.
        **hub: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for a hub id.
    """
    directory = resolve_checkpoint(source, patterns=["*.safetensors", "*.json"], **hub)
    dtype = model.model.vision_embed_tokens.img_processor.vision_model.pre_layrnorm.weight.dtype
    if not dtype.is_floating_point:  # a quantised tower: keep the unused tensors in the compute dtype
        dtype = model.dtype
    unused = {}
    for file in weight_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if _is_unused_official(key, model.config.vision_layers_used):
                    tensor = f.get_tensor(key)
                    unused[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if unused:
        logger.info(
            "%s: %d CLIP tensors past layer %d and post_layernorm are unused by Phi-3-V; not built, kept for saving",
            source,
            len(unused),
            model.config.vision_layers_used - 1,
        )
    return unused


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size such as 5GB or 500MB")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * units[unit])


def save_pretrained(
    model: Phi3VForCausalLM,
    directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None,
    max_shard_size: int | str,
) -> None:
    """Write the model in the official layout.

    All shards are first written under temporary names; only then is the old checkpoint in ``directory`` taken
    apart (``config.json`` first) and the new one put in place, ``config.json`` last. A crash at any point leaves
    either the old checkpoint or a directory without ``config.json``, which no loader mistakes for a checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(state_dict if state_dict is not None else model.state_dict())
    vision_dtype = tensors[VISION_PREFIX + "pre_layrnorm.weight"].dtype
    for key, tensor in model.unused_official_weights.items():
        tensors.setdefault(key, tensor.to(vision_dtype))

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    staged: list[tuple[str, Path]] = []
    try:
        for name, keys in zip(names, shards, strict=True):
            shard = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}  # one shard on CPU at a time
            tmp = stage_file(directory, lambda path, shard=shard: save_file(shard, path, metadata={"format": "pt"}))
            staged.append((tmp, directory / name))
    except BaseException:
        for tmp, _ in staged:
            os.unlink(tmp)
        raise

    for old in (directory / "config.json", directory / INDEX_FILE):
        old.unlink(missing_ok=True)
    for tmp, final in staged:
        os.replace(tmp, final)
    # Shards of an earlier save with another shard count would otherwise be picked up by other loaders.
    for stale in directory.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
        }
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    atomic_write_text(directory / "generation_config.json", model.generation_config.to_json_string())
    float_dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    model.config.save_official(directory, dtype=max(set(float_dtypes), key=float_dtypes.count))
