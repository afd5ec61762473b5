"""Samples -> a padded batch.

Every image of the batch is stacked in one ``pixel_values`` tensor, sample after sample, which is the order their
placeholder runs appear in the flattened batch. Images may have different crop grids: each keeps ``C+1`` slots and
its ``image_sizes`` entry tells the model which slots are real, so padding slots never run through CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from phi3v.processing.chat import IGNORE_INDEX


@dataclass
class Sample:
    """One encoded conversation.

    Attributes:
        input_ids: ``[L]`` long; image positions hold the image token id.
        labels: ``[L]`` long, -100 where no loss is taken.
        pixel_values: ``[n, C+1, 3, S, S]`` float32 (uint8 from data-loader workers) in placeholder order, or
            ``None`` without images.
        image_sizes: ``[n, 2]`` long padded HD sizes, or ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


def collate(
    samples: Sequence[Sample | None],
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
    pack: bool = False,
) -> dict[str, torch.Tensor | int | None]:
    """Pad ``samples`` into one batch.

    Args:
        samples: Encoded samples; ``None`` entries (samples dropped for length) are skipped and counted.
        pad_token_id: Id written into padding.
        padding_side: ``"right"`` for training, ``"left"`` for generation.
        pack: Concatenate the samples into one row without padding (training only).

    Returns:
        ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` (1 on real tokens; built from lengths, so a real
        ``<|endoftext|>`` equal to the pad id stays visible), ``labels`` ``[B, L]`` (-100 on padding),
        ``pixel_values`` ``[n, C+1, 3, S, S]`` and ``image_sizes`` ``[n, 2]`` (``None`` without images), and
        ``num_dropped``. With ``pack``: one row ``[1, sum L]`` with ``position_ids`` instead of a mask.

    Raises:
        ValueError: if every sample was dropped, or samples disagree on the number of crop slots.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError(f"all {len(samples)} samples of the batch were dropped; nothing to collate")
    if pack:
        return _pack(samples, kept)
    width = max(len(s.input_ids) for s in kept)
    batch = len(kept)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, sample in enumerate(kept):
        n = len(sample.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = sample.input_ids
        labels[row, cols] = sample.labels
        attention_mask[row, cols] = 1

    pixel_values, image_sizes = _images(kept)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "num_dropped": len(samples) - len(kept),
    }


def _images(kept: Sequence[Sample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    with_images = [s for s in kept if s.num_images]
    if not with_images:
        return None, None
    slots = {s.pixel_values.shape[1:] for s in with_images}
    if len(slots) > 1:
        raise ValueError(f"samples have different crop-slot shapes {sorted(slots)}; use one num_crops per batch")
    return torch.cat([s.pixel_values for s in with_images]), torch.cat([s.image_sizes for s in with_images])


def _pack(samples: Sequence[Sample | None], kept: Sequence[Sample]) -> dict[str, torch.Tensor | int | None]:
    """All samples in one row, no padding: ``position_ids`` restart at 0 for each sample and there is no
    attention mask, from which transformers' Phi-3 builds a block-diagonal causal mask (attention never crosses
    samples). A sample's first label is always -100 (its prompt), so no loss spans a boundary."""
    input_ids = torch.cat([s.input_ids for s in kept])[None]  # [1, sum L]
    labels = torch.cat([s.labels for s in kept])[None]
    position_ids = torch.cat([torch.arange(len(s.input_ids)) for s in kept])[None]
    if any(s.labels[0] != IGNORE_INDEX for s in kept):
        raise ValueError("a packed sample starts with a supervised token; the previous sample would predict it")
    pixel_values, image_sizes = _images(kept)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "num_dropped": len(samples) - len(kept),
    }
