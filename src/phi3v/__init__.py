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


def _register_auto_classes() -> None:
    """Make ``phi3_v`` directories load through transformers' Auto classes with phi3v's code, no remote code.

    transformers prefers local classes over a config's ``auto_map`` once they are registered, so the official
    ``auto_map`` (kept in what phi3v writes, for transformers 4.x and vLLM) is never followed here.
    """
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
    AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
    # Phi-3-V takes videos as frames through the image processor and has no video processor. Declaring that
    # locally stops loaders that look for one (pipelines do) from deriving one from the official `auto_map` and
    # asking to run remote code.
    # (The mapping itself: the AutoVideoProcessor class refuses to load without torchvision.)
    VIDEO_PROCESSOR_MAPPING.register(Phi3VConfig, None, exist_ok=True)


_register_auto_classes()

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
