"""Shared fixtures: the tiny model and inputs with images of chosen crop grids."""

from __future__ import annotations

import pytest
import torch

from phi3v import build_model, num_image_tokens


@pytest.fixture
def tiny():
    """A freshly initialised tiny model in eval mode (float32, SDPA)."""
    return build_model("tiny", seed=0)


def image_batch(model, grids, num_crops=4, seed=0):
    """Random ``pixel_values`` / ``image_sizes`` for images with the given ``(h, w)`` crop grids.

    Padding slots beyond ``1 + h*w`` are zero, as the official processor makes them.
    """
    gen = torch.Generator().manual_seed(seed)
    s = model.config.crop_size
    pixel_values = torch.zeros(len(grids), num_crops + 1, 3, s, s)
    for i, (h, w) in enumerate(grids):
        pixel_values[i, : 1 + h * w] = torch.randn(1 + h * w, 3, s, s, generator=gen)
    image_sizes = torch.tensor([[h * s, w * s] for h, w in grids])
    return pixel_values, image_sizes


def prompt_ids(model, texts_and_grids, image_id=-1):
    """Token ids with image placeholder runs: items are lists of ints (text) or ``(h, w)`` grids (an image).

    ``image_id=-1`` numbers the runs -1, -2, ... like the official processor; any other value is used as is.
    """
    ids, k = [], 0
    for item in texts_and_grids:
        if isinstance(item, tuple):
            k += 1
            n = num_image_tokens(*item, model.config.merged_grid)
            ids += [(-k if image_id == -1 else image_id)] * n
        else:
            ids += list(item)
    return torch.tensor(ids)
