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

import torch
from torch import nn

from phi3v.train.config import STRATEGIES, StrategySpec, TrainConfig

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


def quantize_base(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the decoder's and CLIP's linear layers by bitsandbytes 4-bit NF4 layers (in place).

    ``lm_head`` and the projector stay in full precision, as transformers' bitsandbytes integration keeps the output
    head. Returns the number of layers quantised.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full == "lm_head" or "img_projection" in full:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", device="meta",
            )  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, quantized.to(child.weight.device))
            count += 1
    return count


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


def quantize(model: nn.Module, config: TrainConfig) -> None:
    """Quantise the frozen base to 4-bit NF4 (the one place that does it, so the method can be swapped)."""
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    logger.info("quantised %d linear layers to 4-bit NF4", quantize_base(model, compute))


def apply_strategy(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze, quantise and add adapters as ``config.spec`` says; returns the model to train.

    Raises:
        ValueError: for a spec that cannot train (see ``StrategySpec.problems``).
    """
    spec: StrategySpec = config.spec
    problems = spec.problems()
    if problems:
        raise ValueError(f"strategy {config.strategy!r}: " + "; ".join(problems))
    trains = {"vision": spec.vision == "full", "projector": spec.projector == "full",
              "language": spec.language == "full", "adapters": True}  # fmt: skip
    for name, param in model.named_parameters():
        param.requires_grad_(trains[component(name)])
    if spec.quantize_base:
        quantize(model, config)
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


__all__ = ["STRATEGIES", "StrategySpec", "apply_strategy", "component", "lora_target_regex", "parameter_counts"]
