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
from phi3v.processing import Conversation, Phi3VImageProcessor, Phi3VProcessor, Turn

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Conversation",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageProcessor",
    "Phi3VModel",
    "Phi3VProcessor",
    "Turn",
    "__version__",
    "build_model",
    "num_image_tokens",
    "preset_config",
]
