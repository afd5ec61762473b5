"""Processing: the HD image transform, the tokenizer, chat rendering with loss masks, collation, the processor."""

from phi3v.processing.chat import IGNORE_INDEX, Conversation, Turn, render, template_text
from phi3v.processing.collate import Sample, collate
from phi3v.processing.image import (
    ImageError,
    Phi3VImageProcessor,
    hd_geometry,
    load_image,
    num_image_tokens_for_size,
)
from phi3v.processing.processor import Phi3VProcessor, TruncationError
from phi3v.processing.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, load_tokenizer, special_ids

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "Conversation",
    "ImageError",
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "Sample",
    "TruncationError",
    "Turn",
    "build_tiny_tokenizer",
    "collate",
    "hd_geometry",
    "load_image",
    "load_tokenizer",
    "num_image_tokens_for_size",
    "render",
    "special_ids",
    "template_text",
]
