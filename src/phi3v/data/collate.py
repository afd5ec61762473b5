"""Samples -> a padded batch.

Every image of the batch is stacked in one ``pixel_values`` tensor, sample after sample, which is the order their
placeholder runs appear in the flattened batch. Images may have different crop grids: each keeps ``C+1`` slots and
its ``image_sizes`` entry tells the model which slots are real, so padding slots never run through CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from phi3v.processing.chat import IGNORE_INDEX
from phi3v.processing.processor import Sample


def collate(
    samples: Sequence[Sample | None],
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, torch.Tensor | int | None]:
    """Pad ``samples`` into one batch.

    Args:
        samples: Encoded samples; ``None`` entries (samples dropped for length) are skipped and counted.
        pad_token_id: Id written into padding.
        padding_side: ``"right"`` for training, ``"left"`` for generation.

    Returns:
        ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` (1 on real tokens; built from lengths, so a real
        ``<|endoftext|>`` equal to the pad id stays visible), ``labels`` ``[B, L]`` (-100 on padding),
        ``pixel_values`` ``[n, C+1, 3, S, S]`` and ``image_sizes`` ``[n, 2]`` (``None`` without images), and
        ``num_dropped``.

    Raises:
        ValueError: if every sample was dropped, or samples disagree on the number of crop slots.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError(f"all {len(samples)} samples of the batch were dropped; nothing to collate")
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

    with_images = [s for s in kept if s.num_images]
    pixel_values = image_sizes = None
    if with_images:
        slots = {s.pixel_values.shape[1:] for s in with_images}
        if len(slots) > 1:
            raise ValueError(f"samples have different crop-slot shapes {sorted(slots)}; use one num_crops per batch")
        pixel_values = torch.cat([s.pixel_values for s in with_images])
        image_sizes = torch.cat([s.image_sizes for s in with_images])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "num_dropped": len(samples) - len(kept),
    }
