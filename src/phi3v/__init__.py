"""phi3v: native fine-tuning toolkit for Phi-3.5-vision and Phi-3-vision."""

from phi3v.model import (
    PRESETS,
    Phi3VConfig,
    Phi3VForCausalLM,
    Phi3VModel,
    build_model,
    num_image_tokens,
    preset_config,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "__version__",
    "build_model",
    "num_image_tokens",
    "preset_config",
]
