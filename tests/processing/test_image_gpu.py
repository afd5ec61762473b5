"""The uint8 crop path on the training device. Marked ``gpu``; see ``tests/gpu.py`` for where it runs."""

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.processing.image import Phi3VImageProcessor
from tests.gpu import gpu_device

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("num_crops", [4, 16])
def test_uint8_crops_finished_on_the_device_equal_the_cpu_float_path(num_crops):
    """What workers ship (uint8 crops, no global view), finished on the device, against the processor's own float
    path on the CPU: normalisation, the bicubic global view from the reassembled image, zeroed empty slots."""
    device = gpu_device()
    processor = Phi3VImageProcessor(num_crops=num_crops)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 500), (900, 200), (800, 1200), (2200, 1700)]]  # fmt: skip
    want = processor(images)
    shipped = processor(images, uint8=True)
    assert shipped["pixel_values"].dtype == torch.uint8
    finished = processor.finish(shipped["pixel_values"].to(device), shipped["image_sizes"])
    assert finished.device.type == device.type and finished.dtype == torch.float32
    # bicubic resampling on another device may round differently in the last bits; crops are exact
    torch.testing.assert_close(finished[:, 1:].cpu(), want["pixel_values"][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(finished[:, 0].cpu(), want["pixel_values"][:, 0], rtol=0, atol=1e-4)
