"""Phi3VProcessor: text and images in, model inputs out; a transformers ``ProcessorMixin``.

It joins the image processor (``image.py``), the tokenizer (``tokenizer.py``), the chat rendering (``chat.py``)
and collation (``collate.py``). Two ways in:

* the official one, ``processor(text, images, return_tensors="pt")`` with a prompt already in the chat template
  (``<|image_k|>`` tags for the images), as in the model card, returning a ``BatchFeature``;
* phi3v's own, conversations (``Conversation`` or the jsonl ``conversations`` list) rendered with loss masks for
  training (``encode``, ``processor(conversations)``), and ``prompt()`` for one question.

Image positions hold ``<|image|>`` (32044), where the official processor writes -1, -2, ...; phi3v's model reads
both (``modeling.py``). Files are read and written in the official layout: ``preprocessor_config.json`` and the
tokenizer files, which Microsoft's processor code (transformers 4.x, vLLM) loads as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from phi3v.processing.chat import (
    IGNORE_INDEX,
    Conversation,
    Rendered,
    Turn,
    check_tags,
    render,
    template_text,
    tokenize_prompt,
)
from phi3v.processing.collate import Sample, collate
from phi3v.processing.image import Phi3VImageProcessor, load_image
from phi3v.processing.tokenizer import END, build_tiny_tokenizer, load_tokenizer, special_ids, write_tokenizer_files
from phi3v.utils import atomic_write_text

PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
OFFICIAL_IMAGE_TOKEN_ID = 32044  # <|image|> in the Phi-3-V vocabulary (vLLM uses the same id)
# Arguments that say where the files are, and those transformers' Auto classes and pipelines pass along (for the
# model, or about remote code); anything else unknown raises.
_HUB_ARGUMENTS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
_PASSED_ALONG = (
    "trust_remote_code",
    "_from_auto",
    "_from_pipeline",
    "use_fast",
    "code_revision",
    "dtype",
    "torch_dtype",
)


class TruncationError(ValueError):
    """A sample longer than ``max_length`` that cannot be cut without losing an image or every answer."""


class Phi3VProcessor(ProcessorMixin):
    """Tokenizer + HD image processor + chat template of Phi-3-V.

    Args:
        image_processor: The HD image transform.
        tokenizer: A Phi-3 tokenizer (``<|end|>`` and ``<|endoftext|>`` as single tokens).
        chat_template: Unused beyond transformers' bookkeeping: the tokenizer's template is the official one.
        image_token_id: Id of image positions; default the tokenizer's ``<|image|>``, else 32044.

    Example:
        >>> import phi3v  # registers the Auto classes: no trust_remote_code
        >>> from transformers import AutoProcessor
        >>> processor = AutoProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct", num_crops=4)
        >>> messages = [{"role": "user", "content": "<|image_1|>\\nWhat is shown?"}]
        >>> prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        >>> inputs = processor(prompt, [image], return_tensors="pt")
    """

    image_processor_class = "Phi3VImageProcessor"
    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: Any,
        chat_template: str | None = None,
        image_token_id: int | None = None,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or tokenizer.chat_template)
        self.special = special_ids(tokenizer)
        self.image_token_id = image_token_id or self.special.image or OFFICIAL_IMAGE_TOKEN_ID
        self.pad_token_id = self.special.pad

    # ---- construction and files ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, num_crops: int | None = None, **kwargs: Any
    ) -> Phi3VProcessor:
        """Load the processor files of a checkpoint directory (or hub id where a network exists; no weights).

        Args:
            pretrained_model_name_or_path: Directory with ``preprocessor_config.json`` and ``tokenizer.json``.
            num_crops: Override the saved ``num_crops`` (official advice: 16 for one image, 4 for several).
            **kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for a hub id.

        Raises:
            TypeError: for other arguments, and ``trust_remote_code=True`` (phi3v is the code).
            FileNotFoundError, ValueError: for missing or broken files, naming them.
        """
        from phi3v.model.weights import PROCESSOR_PATTERNS, resolve_checkpoint

        unknown = sorted(set(kwargs) - set(_HUB_ARGUMENTS) - set(_PASSED_ALONG))
        if unknown:
            raise TypeError(f"Phi3VProcessor.from_pretrained got unsupported arguments: {unknown}")
        if kwargs.get("trust_remote_code") and not (kwargs.get("_from_auto") or kwargs.get("_from_pipeline")):
            raise TypeError("phi3v runs no remote code: drop trust_remote_code=True (importing phi3v is enough)")
        hub = {k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs}
        directory = resolve_checkpoint(
            pretrained_model_name_or_path, hub.pop("revision", None), patterns=PROCESSOR_PATTERNS, **hub
        )
        config_file = directory / PREPROCESSOR_FILE
        if not config_file.exists():
            raise FileNotFoundError(f"no {PREPROCESSOR_FILE} in {directory}")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("the top level is not a JSON object")
            image_processor = Phi3VImageProcessor.from_dict(data, num_crops=num_crops)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{config_file}: {err}") from err
        return cls(image_processor, load_tokenizer(directory), image_token_id=data.get("image_token_id"))

    @classmethod
    def tiny(cls, num_crops: int = 4) -> Phi3VProcessor:
        """The processor of the ``tiny`` model preset (56-pixel crops, the tiny tokenizer)."""
        from phi3v.model.presets import preset_config

        config = preset_config("tiny")
        image_processor = Phi3VImageProcessor(num_crops=num_crops, crop_size=config.crop_size)
        return cls(image_processor, build_tiny_tokenizer(), image_token_id=config.image_token_id)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the official processor files: ``preprocessor_config.json`` and the tokenizer files.

        Returns:
            The paths written.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("phi3v does not push to the hub; upload the saved directory with `hf upload`")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.image_processor.to_dict() | {"image_token_id": self.image_token_id}
        write_tokenizer_files(self.tokenizer, directory)
        atomic_write_text(directory / PREPROCESSOR_FILE, json.dumps(data, indent=2) + "\n")
        names = (PREPROCESSOR_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        return [str(directory / name) for name in names]

    # ---- phi3v's conversations ------------------------------------------------------------------------------

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if isinstance(backend, tokenizers.Tokenizer) and backend.truncation is None and backend.padding is None:
            # The fast tokenizer's own pipeline without transformers' Python around it (a third to a fifth of the
            # time; three calls per sample, in every loader step and up-front check). transformers re-sets the
            # backend's truncation and padding on each call; when a caller left them set, its own call is used.
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
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
            problem = truncation_problem(rendered, max_length, generation)
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

    def prompt(self, text: str, images: Sequence[Any] = (), system: str | None = None) -> BatchFeature:
        """Model inputs for one question about some images, ready for ``model.generate(**inputs)``.

        Example:
            >>> processor = Phi3VProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct", num_crops=16)
            >>> inputs = processor.prompt("What is in this photo?", [Image.open("photo.jpg")])
            >>> output = model.generate(**inputs, max_new_tokens=64, eos_token_id=processor.eos_token_ids)
        """
        sample = self.encode(Conversation([Turn(text, list(images))], system), generation=True)
        return self._model_inputs([sample])

    def collate(self, samples: Sequence[Sample | None], padding_side: Literal["left", "right"] = "right") -> dict:
        """Pad samples into a batch; see ``phi3v.processing.collate.collate``."""
        return collate(samples, self.pad_token_id, padding_side)

    def _model_inputs(self, samples: Sequence[Sample], return_tensors: str | None = "pt") -> BatchFeature:
        batch = self.collate(samples, padding_side="left")
        return BatchFeature({k: batch[k] for k in MODEL_INPUTS if batch[k] is not None}, tensor_type=return_tensors)

    # ---- the transformers processor call --------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | Conversation | Sequence[Conversation] | Sequence[dict] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        generation: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Encode prompts (the official way) or conversations (phi3v's way) into a ``BatchFeature``.

        Args:
            text: A prompt string already in the chat template with ``<|image_k|>`` tags, or a list of them
                (left-padded into one batch); or one conversation (a ``Conversation`` or a jsonl
                ``conversations`` list) or a list of them.
            images: The images of a prompt (a list; for a list of prompts, a list of lists, one per prompt).
                Unused with conversations, which carry their images.
            return_tensors: ``"pt"`` (default) or ``None``; the values are torch tensors either way.
            generation: For conversations: render for generation (left padding, the last prompt ends the
                sequence) instead of training (right padding, labels).
            **kwargs: ``max_length`` and ``on_overflow`` for conversations, as for ``encode``.

        Returns:
            ``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_sizes`` (when there are images); for
            conversations also ``labels`` and ``num_dropped``.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: phi3v returns torch tensors ('pt')")
        if text is None:
            raise ValueError("Phi3VProcessor needs text: a prompt string, a list of them, or conversations")
        if isinstance(text, str) or (isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text)):
            if kwargs:
                raise TypeError(f"Phi3VProcessor got unsupported arguments for a prompt: {sorted(kwargs)}")
            return self._encode_prompts(text, images, return_tensors)
        if isinstance(text, Conversation) or (text and isinstance(text, Sequence) and isinstance(text[0], dict)):
            text = [text]  # one conversation, possibly as a jsonl `conversations` list
        samples = [self.encode(c, generation=generation, **kwargs) for c in text]
        batch = collate(samples, self.pad_token_id, "left" if generation else "right")
        dropped = batch.pop("num_dropped")
        out = BatchFeature({k: v for k, v in batch.items() if v is not None}, tensor_type=return_tensors)
        out["num_dropped"] = dropped
        return out

    def _encode_prompts(self, text: str | Sequence[str], images: Any, return_tensors: str | None) -> BatchFeature:
        prompts = [text] if isinstance(text, str) else list(text)
        if images is None:
            per_prompt: list[list[Any]] = [[] for _ in prompts]
        elif isinstance(images, (Image.Image, str, os.PathLike)):
            per_prompt = [[images]]
        elif len(prompts) == 1 and not any(isinstance(i, (list, tuple)) for i in images):
            per_prompt = [list(images)]
        else:
            per_prompt = [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(per_prompt)}; give one list per prompt")
        return self._model_inputs(
            [self._encode_prompt(p, i, k) for k, (p, i) in enumerate(zip(prompts, per_prompt, strict=True))],
            return_tensors,
        )

    def _encode_prompt(self, text: str, images: Sequence[Any], index: int) -> Sample:
        images = self._images(images)
        check_tags(text, len(images), "prompt" if index == 0 else f"prompt {index + 1}")
        counts = [self.image_processor.num_image_tokens(*image.size) for image in images]
        ids, order, _ = tokenize_prompt(text, self._tokenize, counts, self.image_token_id)
        sample = Sample(torch.tensor(ids), torch.full((len(ids),), IGNORE_INDEX))
        if images:
            processed = self.image_processor([images[i] for i in order])
            sample.pixel_values, sample.image_sizes = processed["pixel_values"], processed["image_sizes"]
        return sample

    def apply_chat_template(
        self,
        conversation: Sequence[dict],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | BatchFeature:
        """The official chat template, also for transformers' message format with content parts.

        A message's ``content`` is a string (with ``<|image_k|>`` tags, as in the model card) or a list of parts:
        ``{"type": "text", "text": ...}`` and ``{"type": "image", ...}``; each image part becomes
        ``<|image_k|>\\n``, numbered over the conversation, as the model card builds its prompts.

        Args:
            conversation: The messages.
            chat_template: Must be ``None``: Phi-3-V has one template.
            add_generation_prompt: End with ``<|assistant|>\\n``.
            tokenize: Return the processor's ``BatchFeature`` (images taken from the image parts' ``image``,
                ``url`` or ``path``) instead of the text.
            continue_final_message: Leave the last message open (no ``<|end|>``), to continue it.
            **kwargs: ``return_tensors`` with ``tokenize`` (the result is always a dict); others are ignored.
        """
        if chat_template is not None:
            raise ValueError("Phi-3-V has one chat template; chat_template cannot be replaced here")
        messages, images = [], []
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        images.append(part.get("image", part.get("url", part.get("path"))))
                        parts.append(f"<|image_{len(images)}|>\n")
                    elif part.get("type") == "text":
                        parts.append(part["text"])
                    else:
                        raise ValueError(f"unsupported content part type {part.get('type')!r} (text and image only)")
                content = "".join(parts)
            messages.append({"role": message["role"], "content": content})
        text = template_text(messages, add_generation_prompt and not continue_final_message)
        if continue_final_message:  # the last (assistant) message is to be continued: no end after it
            text = text.removesuffix(f"{END}\n")
        if not tokenize:
            return text
        if any(image is None for image in images):
            raise ValueError("tokenize=True needs each image part to carry its image ('image', 'url' or 'path')")
        # Pipelines pass their generation and padding arguments along; batches are always padded here.
        return self(text, images, return_tensors=kwargs.get("return_tensors", "pt"))

    # ---- decoding ----------------------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer: ``<|end|>`` and ``<|endoftext|>`` (the configs' ``eos_token_id: 2`` is stale)."""
        return [self.special.end, self.special.endoftext]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Text of generated ids; image placeholders (negative ids or ``<|image|>``) and, by default, special
        tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = [i for i in ids if i >= 0 and i != self.image_token_id]
        return self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """``decode`` of each row (e.g. ``generate``'s output after slicing off the prompt)."""
        return [self.decode(row, **kwargs) for row in sequences]

    def post_process_image_text_to_text(
        self, generated_outputs: torch.Tensor, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str]:
        """What transformers' image-text-to-text pipeline decodes with: ``batch_decode``."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(MODEL_INPUTS)


def truncation_problem(rendered: Rendered, max_length: int, generation: bool) -> str | None:
    """Why ``rendered`` cannot be cut at ``max_length``, or ``None`` if it can.

    The one rule of the ``truncate`` length policy (``encode``, ``JsonlDataset.screen``, ``phi3v data check``): a
    cut may never fall inside an image's placeholder run, a training sample must keep at least one supervised
    token, and a generation prompt is never cut.

    Args:
        rendered: The rendered conversation.
        max_length: Where the cut would fall.
        generation: ``rendered`` is a generation prompt.
    """
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
