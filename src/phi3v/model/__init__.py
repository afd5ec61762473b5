"""The Phi-3-V model: config, image embedding, decoder, official weight format and presets."""

from phi3v.model.configuration import Phi3VConfig
from phi3v.model.image_embedding import Phi3ImageEmbedding, num_image_tokens
from phi3v.model.modeling import Phi3VForCausalLM, Phi3VModel, without_adapters
from phi3v.model.presets import PRESETS, build_model, preset_config

__all__ = [
    "PRESETS",
    "Phi3ImageEmbedding",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "build_model",
    "num_image_tokens",
    "preset_config",
    "without_adapters",
]
