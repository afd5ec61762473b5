"""Training strategies as data: each component is ``frozen``, trains ``lora`` adapters, or trains ``full``, and the
base may be quantised (``StrategySpec``; the four named strategies are presets of it, in ``config.py``). One
function applies a spec; no code branches on a strategy's name.

Components:
    vision     the CLIP tower (``model.vision_embed_tokens.img_processor``)
    projector  the 2-layer MLP and the ``glb_GN`` / ``sub_GN`` separators
    language   everything else: token embedding, decoder layers, final norm, ``lm_head``
    adapters   LoRA matrices added by PEFT

``frozen_vision`` differs from the reference recipe's ``--freeze_vision_model``: there, freezing
``vision_embed_tokens`` also froze the token embedding, because the official module shares it as ``wte``. Here
the token embedding belongs to the language model and trains with it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from phi3v.train.config import STRATEGIES, StrategySpec, TrainConfig

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

logger = logging.getLogger("phi3v")

VISION_PREFIX = "model.vision_embed_tokens.img_processor."
PROJECTOR_PREFIXES = ("model.vision_embed_tokens.img_projection.", "model.vision_embed_tokens.glb_GN",
                      "model.vision_embed_tokens.sub_GN")  # fmt: skip
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def component(name: str) -> str:
    """The component a parameter name belongs to (names as in the base model, PEFT prefixes removed)."""
    name = name.removeprefix("base_model.model.")
    if "lora_" in name:
        return "adapters"
    if name.startswith(VISION_PREFIX):
        return "vision"
    if name.startswith(PROJECTOR_PREFIXES):
        return "projector"
    return "language"


def lora_target_regex(config: TrainConfig) -> str:
    """PEFT ``target_modules`` regex for the components that train ``lora``: the configured language-model modules
    (``lora_targets``), CLIP's attention and MLP projections, the projector's two linear layers."""
    spec = config.spec
    patterns = []
    if spec.language == "lora":
        language = "|".join(t for t in config.lora_targets if t != "lm_head")
        patterns += [rf"model\.layers\.\d+\.(self_attn|mlp)\.({language})"] if language else []
        patterns += ["lm_head"] if "lm_head" in config.lora_targets else []
    if spec.vision == "lora":
        patterns.append(r"model\.vision_embed_tokens\.img_processor\..*\.(" + "|".join(VISION_LORA_TARGETS) + ")")
    if spec.projector == "lora":
        patterns.append(r"model\.vision_embed_tokens\.img_projection\.(0|2)")
    return "^(" + "|".join(patterns) + ")$"


QLORA_SKIP_MODULES = ("lm_head",)
"""Modules a 4-bit base keeps in its float dtype: the output head only, as in the reference recipe (spec §4.2: its
``BitsAndBytesConfig`` names no module, so transformers quantises every linear layer but the output head; the CLIP
tower and the projector are 4-bit too)."""


def quantization_config(config: TrainConfig) -> BitsAndBytesConfig | None:
    """How the frozen base is read for a spec with ``quantize_base`` (``None`` otherwise): the one place that says
    it. NF4 with double quantisation, computing in the run's precision (bf16 on GPUs), ``QLORA_SKIP_MODULES`` kept.

    Unlike the reference recipe, the quantisation constants are quantised too (double quantisation: about 0.37 bit
    per weight less, as in the QLoRA paper), and PEFT's ``prepare_model_for_kbit_training`` runs before the
    adapters are added (see ``apply_strategy``).
    """
    if not config.spec.quantize_base:
        return None
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


def apply_strategy(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze and add adapters as ``config.spec`` says; returns the model to train.

    A spec with ``quantize_base`` needs a base that was read 4-bit (``from_pretrained(...,
    quantization_config=quantization_config(config))``, or ``build_model`` with it for a preset): the full-precision
    weights are never all in memory. It then goes through PEFT's ``prepare_model_for_kbit_training``, which casts
    the parameters still in 16-bit floats (norms, embeddings, ``lm_head``, biases) to float32; phi3v's own
    activation checkpointing is turned on by the caller, not there.

    Raises:
        ValueError: for a spec that cannot train (see ``StrategySpec.problems``), or ``quantize_base`` with a base
            that was not loaded 4-bit.
    """
    spec: StrategySpec = config.spec
    problems = spec.problems()
    if problems:
        raise ValueError(f"strategy {config.strategy!r}: " + "; ".join(problems))
    if spec.quantize_base:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError(
                f"strategy {config.strategy!r} quantises the base, but the model was not loaded 4-bit: load it with "
                "quantization_config=phi3v.train.strategy.quantization_config(config)"
            )
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        import bitsandbytes as bnb

        quantised = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        logger.info("4-bit NF4 base: %d linear layers quantised, %s kept", quantised, ", ".join(QLORA_SKIP_MODULES))
    trains = {"vision": spec.vision == "full", "projector": spec.projector == "full",
              "language": spec.language == "full", "adapters": True}  # fmt: skip
    for name, param in model.named_parameters():
        param.requires_grad_(trains[component(name)])
    if spec.adapters:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(config),
            init_lora_weights="gaussian",
        )
        model = get_peft_model(model, lora)
    return model


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per component (4-bit weights counted as their element count)."""
    counts = {c: {"trainable": 0, "total": 0} for c in ("vision", "projector", "language", "adapters")}
    for name, param in model.named_parameters():
        n = param.numel() * (2 if param.dtype == torch.uint8 else 1)  # packed NF4: two weights per byte
        counts[component(name)]["total"] += n
        if param.requires_grad:
            counts[component(name)]["trainable"] += n
    return counts


__all__ = [
    "QLORA_SKIP_MODULES",
    "STRATEGIES",
    "StrategySpec",
    "apply_strategy",
    "component",
    "lora_target_regex",
    "parameter_counts",
    "quantization_config",
]
