"""Named model configurations: the two official architectures and a tiny one for tests and the demo.

``phi-3.5-vision`` and ``phi-3-vision`` are the official ``config.json`` files (stored beside this module) and
give the full 4.2B architecture with random weights: for benchmarks and shape checks, not for use without the
real weights. ``tiny`` keeps every structural feature (fused projections, longrope, CLIP tower cut at layer -2,
HD 2x2 merge, separators, projector) at a size that trains on a laptop CPU in seconds.
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from typing import TYPE_CHECKING

import torch

from phi3v.model.configuration import Phi3VConfig
from phi3v.model.modeling import Phi3VForCausalLM

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

OFFICIAL_PRESETS = ("phi-3.5-vision", "phi-3-vision")
PRESETS = (*OFFICIAL_PRESETS, "tiny")

# Rope factors of the tiny model: short and long differ so the switch at 4096 positions is observable.
_TINY_HEAD_DIM = 16

TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "su",
        "short_factor": [1.0 + 0.1 * i for i in range(_TINY_HEAD_DIM // 2)],
        "long_factor": [2.0 + 0.5 * i for i in range(_TINY_HEAD_DIM // 2)],
    },
    "sliding_window": 262144,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 500,
    "image_token_id": 511,
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,  # layer_idx -2 -> 2 layers built
        "num_attention_heads": 2,
        "image_size": 56,  # 4x4 patches -> 2x2 merged tokens per crop
        "patch_size": 14,
        "projection_dim": 32,
    },
    "img_processor": {"image_dim_out": 32, "num_img_tokens": 4},
}


def preset_config(name: str) -> Phi3VConfig:
    """The config of a named preset.

    Args:
        name: One of ``PRESETS``.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "tiny":
        return Phi3VConfig.from_official_dict(json.loads(json.dumps(TINY)))
    if name not in OFFICIAL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("phi3v.model").joinpath("official_configs", f"{name}.json").read_text(encoding="utf-8")
    return Phi3VConfig.from_official_dict(json.loads(text))


def build_model(
    preset: str | Phi3VConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    seed: int | None = 0,
    quantization_config: BitsAndBytesConfig | None = None,
) -> Phi3VForCausalLM:
    """A randomly initialised model of a preset or config.

    Args:
        preset: Preset name or a ``Phi3VConfig``.
        dtype: Parameter dtype (default float32).
        device: Where to build; ``"meta"`` gives shapes without memory.
        attn_implementation: ``"sdpa"``, ``"flash_attention_2"`` or ``"eager"``.
        seed: Seed for the initialisation (``None``: leave the RNG alone).
        quantization_config: Read the random weights through ``from_pretrained`` with this config (a 4-bit base
            for QLoRA), as a real checkpoint is read: they are built on the CPU, written to a temporary directory
            and loaded from there onto ``device``, so the full-precision model is never on ``device``. The same
            weights as without it (same seed), before quantisation.
    """
    config = preset_config(preset) if isinstance(preset, str) else preset
    if quantization_config is not None:
        if device is not None and torch.device(device).type == "meta":
            raise ValueError("quantization_config needs real weights to quantise; it cannot be used on device 'meta'")
        target = torch.device(device or "cpu")
        if target.type == "cuda" and target.index is None:  # a device map names one device
            target = torch.device("cuda", torch.cuda.current_device())
        model = build_model(config, dtype=dtype, attn_implementation=attn_implementation, seed=seed)
        with tempfile.TemporaryDirectory(prefix="phi3v-random-") as directory:
            model.save_pretrained(directory)
            del model
            model = Phi3VForCausalLM.from_pretrained(
                directory,
                dtype=dtype or torch.float32,
                attn_implementation=attn_implementation,
                quantization_config=quantization_config,
                device_map={"": target},
            )
        model.name_or_path = model.config._name_or_path = ""  # not the deleted temporary directory
        return model.eval()
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Phi3VForCausalLM(config)
    if dtype is not None:
        model.to(dtype=dtype)
        model.reset_buffers()  # rotary frequencies stay float32
    return model.eval()
