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
from transformers import GenerationConfig

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


def resolve_checkpoint(
    path_or_id: str | os.PathLike, revision: str | None = None, patterns: list[str] | None = None
) -> Path:
    """A local checkpoint directory, downloading a hub id where needed (``patterns``, by default safetensors,
    json and tokenizer files: never code or pickles)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns or HUB_ALLOW_PATTERNS))
    except Exception as err:  # offline, unknown repo, ...: say both things we tried
        raise FileNotFoundError(
            f"{text} is neither a local directory nor a hub repository that could be downloaded ({err})"
        ) from err


def _weight_files(directory: Path) -> list[Path]:
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
    for file in _weight_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def load_pretrained(
    cls: type[Phi3VForCausalLM],
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    attn_implementation: str,
    revision: str | None,
) -> Phi3VForCausalLM:
    """Build the model on the meta device, materialise it on ``device`` and fill it from the checkpoint."""
    directory = resolve_checkpoint(path_or_id, revision)
    config = Phi3VConfig.from_json_file(directory / "config.json")
    config._attn_implementation = attn_implementation
    if isinstance(dtype, str):
        dtype = config.dtype if dtype == "auto" else getattr(torch, dtype)
    dtype = dtype or config.dtype or torch.float32
    device = torch.device(device or "cpu")

    with torch.device("meta"):
        model = cls(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.reset_buffers()

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layers_built = config.vision_layers_used
    state: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    alias: torch.Tensor | None = None
    unexpected, bad_shapes, misshaped = [], [], set()
    for key, tensor in iter_checkpoint(directory):
        if key == WTE_ALIAS:
            alias = tensor
        elif _RECOMPUTED_BUFFERS.search(key):
            continue
        elif _is_unused_official(key, layers_built):
            unused[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif key not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != expected[key]:
            bad_shapes.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {expected[key]}")
            misshaped.add(key)
        else:
            state[key] = tensor
    if EMBED_KEY not in state and alias is not None:
        if tuple(alias.shape) != expected[EMBED_KEY]:
            bad_shapes.append(f"{WTE_ALIAS}: checkpoint {tuple(alias.shape)}, model {expected[EMBED_KEY]}")
            misshaped.add(EMBED_KEY)
        else:
            state[EMBED_KEY] = alias
    missing = sorted(set(expected) - set(state) - misshaped)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_preview(sorted(unexpected))}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} with the wrong shape: {_preview(bad_shapes)}")
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit {config.model_type}: " + "; ".join(problems))

    model.load_state_dict(state, strict=True)
    if unused:
        logger.info(
            "%s: %d CLIP tensors past layer %d and post_layernorm are unused by Phi-3-V; not built, kept for saving",
            directory,
            len(unused),
            layers_built - 1,
        )
    model.unused_official_weights = unused
    gen_file = directory / "generation_config.json"
    if gen_file.exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    return model


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
