"""Phi3VProcessor: text and images in, model inputs out.

It joins the image processor (``image.py``), the tokenizer (``tokenizer.py``) and the chat rendering
(``chat.py``), and reads and writes the official processor files so a fine-tuned directory is self-contained:
``preprocessor_config.json``, the tokenizer files and the chat template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from phi3v.processing.chat import IGNORE_INDEX, Conversation, Rendered, Turn, check_tags, render, tokenize_prompt
from phi3v.processing.image import Phi3VImageProcessor, load_image
from phi3v.processing.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids, write_tokenizer_files
from phi3v.utils import atomic_write_text

PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
OFFICIAL_IMAGE_TOKEN_ID = 32044  # <|image|> in the Phi-3-V vocabulary (vLLM uses the same id)


class TruncationError(ValueError):
    """A sample longer than ``max_length`` that cannot be cut without losing an image or every answer."""


@dataclass
class Sample:
    """One encoded conversation.

    Attributes:
        input_ids: ``[L]`` long; image positions hold the image token id.
        labels: ``[L]`` long, -100 where no loss is taken.
        pixel_values: ``[n, C+1, 3, S, S]`` float32 in placeholder order, or ``None`` without images.
        image_sizes: ``[n, 2]`` long padded HD sizes, or ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


class Phi3VProcessor:
    """Tokenizer + HD image processor + chat template of Phi-3-V.

    Args:
        image_processor: The HD image transform.
        tokenizer: A Phi-3 tokenizer (``<|end|>`` and ``<|endoftext|>`` as single tokens).
        image_token_id: Id of image positions; default the tokenizer's ``<|image|>``, else 32044.
    """

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer, image_token_id: int | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self.image_token_id = image_token_id or self.special.image or OFFICIAL_IMAGE_TOKEN_ID
        self.pad_token_id = self.special.pad

    # ---- construction and files ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_crops: int | None = None) -> Phi3VProcessor:
        """Load the processor files of a checkpoint directory (or hub id where a network exists).

        Args:
            path: Directory with ``preprocessor_config.json`` and the tokenizer files.
            num_crops: Override the saved ``num_crops`` (official advice: 16 for one image, 4 for several).
        """
        from phi3v.model.weights import PROCESSOR_PATTERNS, resolve_checkpoint

        directory = resolve_checkpoint(path, patterns=PROCESSOR_PATTERNS)
        config_file = directory / PREPROCESSOR_FILE
        if not config_file.exists():
            raise FileNotFoundError(f"no {PREPROCESSOR_FILE} in {directory}")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
            image_processor = Phi3VImageProcessor.from_dict(data, num_crops=num_crops)
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{config_file}: {err}") from err
        return cls(image_processor, load_tokenizer(directory), data.get("image_token_id"))

    @classmethod
    def tiny(cls, num_crops: int = 4) -> Phi3VProcessor:
        """The processor of the ``tiny`` model preset (56-pixel crops, the tiny tokenizer)."""
        from phi3v.model.presets import preset_config

        config = preset_config("tiny")
        image_processor = Phi3VImageProcessor(num_crops=num_crops, crop_size=config.crop_size)
        return cls(image_processor, build_tiny_tokenizer(), config.image_token_id)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer files (with the chat template)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.image_processor.to_dict() | {"image_token_id": self.image_token_id}
        write_tokenizer_files(self.tokenizer, directory)
        atomic_write_text(directory / PREPROCESSOR_FILE, json.dumps(data, indent=2) + "\n")

    # ---- encoding ---------------------------------------------------------------------------------------------

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _images(self, images: Sequence[Any]) -> list[Image.Image]:
        return [image if isinstance(image, Image.Image) else load_image(image) for image in images]

    def render(
        self,
        conversation: Conversation,
        generation: bool = False,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Rendered:
        """Token ids and labels only; image-token counts come from image sizes, no pixels are processed.

        Args:
            conversation: The conversation (images as PIL images or paths).
            generation: As for ``encode``.
            image_sizes: ``(width, height)`` of each image, when known; otherwise read from the images.
        """
        sizes = image_sizes if image_sizes is not None else [self._image_size(i) for i in conversation.images]
        counts = [self.image_processor.num_image_tokens(w, h) for w, h in sizes]
        return render(conversation, self._tokenize, counts, self.image_token_id, generation)

    @staticmethod
    def _image_size(image: Any) -> tuple[int, int]:
        if isinstance(image, Image.Image):
            return image.size
        return load_image(image).size

    def encode(
        self,
        conversation: Conversation | Sequence[dict],
        *,
        generation: bool = False,
        max_length: int | None = None,
        on_overflow: Literal["error", "drop"] = "error",
        uint8_pixels: bool = False,
    ) -> Sample | None:
        """Encode a conversation into a ``Sample``.

        Args:
            conversation: A ``Conversation`` or the generic jsonl ``conversations`` list.
            generation: Stop after the last turn's prompt (for generation); otherwise every turn needs an answer.
            max_length: Cut samples longer than this; a cut may never fall inside or before an image span.
            on_overflow: What to do with a sample that cannot be cut: ``"error"`` raises ``TruncationError``,
                ``"drop"`` returns ``None`` (the collator counts it).
            uint8_pixels: Keep the crops uint8 (see ``Phi3VImageProcessor.finish``), for data-loader workers
                that ship them to a GPU.

        Returns:
            The sample, or ``None`` when dropped.
        """
        if not isinstance(conversation, Conversation):
            conversation = Conversation.from_record(conversation)
        images = self._images(conversation.images)
        resolved = Conversation([Turn(t.user, [], t.assistant) for t in conversation.turns], conversation.system)
        start = 0
        for turn, resolved_turn in zip(conversation.turns, resolved.turns, strict=True):
            resolved_turn.images = images[start : start + len(turn.images)]
            start += len(turn.images)
        rendered = self.render(resolved, generation)
        if max_length is not None and len(rendered.input_ids) > max_length:
            problem = _truncation_problem(rendered, max_length, generation)
            if problem:
                if on_overflow == "drop":
                    return None
                raise TruncationError(problem)
            rendered.input_ids = rendered.input_ids[:max_length]
            rendered.labels = rendered.labels[:max_length]
        sample = Sample(torch.tensor(rendered.input_ids), torch.tensor(rendered.labels))
        if images:
            processed = self.image_processor([images[i] for i in rendered.image_order], uint8=uint8_pixels)
            sample.pixel_values = processed["pixel_values"]
            sample.image_sizes = processed["image_sizes"]
        return sample

    def prompt(self, text: str, images: Sequence[Any] = (), system: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for one question about some images, ready for ``model.generate(**inputs)``.

        Example:
            >>> processor = Phi3VProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct", num_crops=16)
            >>> inputs = processor.prompt("What is in this photo?", [Image.open("photo.jpg")])
            >>> output = model.generate(**inputs, max_new_tokens=64, eos_token_id=processor.eos_token_ids)
        """
        sample = self.encode(Conversation([Turn(text, list(images))], system), generation=True)
        batch = self.collate([sample], padding_side="left")
        return {k: batch[k] for k in MODEL_INPUTS if batch[k] is not None}

    def __call__(
        self,
        conversations: str | Conversation | Sequence[Conversation],
        images: Sequence[Any] = (),
        generation: bool = False,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Encode and collate (right padding to train, left to generate).

        Args:
            conversations: One conversation (a ``Conversation`` or a jsonl ``conversations`` list) or a list of
                them; or, as the official processor takes it, a prompt string
                already in the chat template with ``<|image_k|>`` tags (then ``images`` are its images and the
                result is the generation input of that prompt).
            images: The images of a prompt string.
            generation: Render for generation (the last turn's prompt ends the sequence).
            **kwargs: ``max_length`` and ``on_overflow``, as for ``encode``.
        """
        if isinstance(conversations, str):
            return self._encode_prompt_text(conversations, images)
        if isinstance(conversations, Conversation) or (
            conversations and isinstance(conversations, Sequence) and isinstance(conversations[0], dict)
        ):  # one conversation, possibly as a jsonl `conversations` list
            conversations = [conversations]
        samples = [self.encode(c, generation=generation, **kwargs) for c in conversations]
        return self.collate(samples, padding_side="left" if generation else "right")

    def _encode_prompt_text(self, text: str, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        images = self._images(images)
        check_tags(text, len(images), "prompt")
        counts = [self.image_processor.num_image_tokens(*image.size) for image in images]
        ids, order, _ = tokenize_prompt(text, self._tokenize, counts, self.image_token_id)
        sample = Sample(torch.tensor(ids), torch.full((len(ids),), IGNORE_INDEX))
        if images:
            processed = self.image_processor([images[i] for i in order])
            sample.pixel_values, sample.image_sizes = processed["pixel_values"], processed["image_sizes"]
        batch = self.collate([sample], padding_side="left")
        return {k: batch[k] for k in MODEL_INPUTS if batch[k] is not None}

    def collate(self, samples: Sequence[Sample | None], padding_side: Literal["left", "right"] = "right") -> dict:
        """Pad samples into a batch; see ``phi3v.data.collate.collate``."""
        from phi3v.data.collate import collate

        return collate(samples, self.pad_token_id, padding_side)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer: ``<|end|>`` and ``<|endoftext|>`` (the configs' ``eos_token_id: 2`` is stale)."""
        return [self.special.end, self.special.endoftext]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of generated ids, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def _truncation_problem(rendered: Rendered, max_length: int, generation: bool) -> str | None:
    """Why ``rendered`` cannot be cut at ``max_length``, or ``None`` if it can."""
    length = len(rendered.input_ids)
    for k, (start, end) in enumerate(rendered.image_spans):
        if end > max_length:
            return (
                f"a sample of {length} tokens cut at max_length {max_length} would cut image {k + 1}'s tokens "
                f"[{start}, {end}); raise max_length, lower num_crops or drop such samples"
            )
    if generation:
        return f"a prompt of {length} tokens is longer than max_length {max_length}"
    if all(label == IGNORE_INDEX for label in rendered.labels[1:max_length]):
        return f"a sample of {length} tokens cut at max_length {max_length} keeps no answer token to train on"
    return None
