"""Where the ``gpu``-marked tests run.

On a machine with CUDA they run there. ``PHI3V_GPU_TESTS_ON_CPU=1`` (set by ``benchmarks/gpu/run.sh --dry-run``)
runs on the CPU those whose check still means something there (precision, attention, fused AdamW); the others
skip. Without either they skip, so ``pytest -m gpu`` on a laptop reports them as skipped, not passed.
"""

from __future__ import annotations

import os

import pytest
import torch


def gpu_device(cpu_ok: bool = True) -> torch.device:
    """The CUDA device, or the CPU in a dry run when ``cpu_ok``; skips the test otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if cpu_ok and os.environ.get("PHI3V_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device" + ("" if cpu_ok else " (not meaningful on a CPU)"))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (METHOD: bf16 lands between 1e-3 and 1e-2 per op)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm())


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (not meaningful on a CPU)"
)
"""For tests whose fixtures cost time: skip before building them."""
