"""The training loop's GPU-only paths: fused AdamW and ``compile: true``. Marked ``gpu``; see ``tests/gpu.py`` for
where they run."""

import pytest
import torch

from phi3v import build_model
from phi3v.train.config import TrainConfig
from phi3v.train.loop import make_optimizer, train
from tests.gpu import gpu_device, requires_cuda
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.gpu


def test_fused_adamw_equals_unfused():
    """``make_optimizer`` fuses AdamW on CUDA; five steps with the same random gradients (weight decay on, two
    parameter groups) leave the same parameters as the plain for-loop AdamW."""
    device = gpu_device()
    config = TrainConfig(strategy="full", lr=1e-3, weight_decay=0.1)
    fused_model = build_model("tiny", device=device)
    plain_model = build_model("tiny", device=device)
    fused, _ = make_optimizer(fused_model, config)
    if device.type == "cuda":
        assert fused.defaults["fused"]
    else:  # the dry run on a CPU: fuse by hand, torch has a fused CPU AdamW too
        fused = torch.optim.AdamW(fused.param_groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                                  fused=True)  # fmt: skip
    plain, _ = make_optimizer(plain_model, config)
    plain = torch.optim.AdamW(plain.param_groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                              fused=False, foreach=False)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
            grad = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    start = build_model("tiny", device=device).parameters()
    moved = sum(bool((p != q).any()) for p, q in zip(fused_model.parameters(), start, strict=True))
    assert moved == len(list(fused_model.parameters()))  # every parameter took the steps


@requires_cuda
def test_compiled_layers_give_the_same_bf16_losses_on_cuda(digits, tmp_path):
    """``compile: true`` (inductor kernels for every decoder and CLIP layer, activation checkpointing on) against
    eager, bf16 mixed precision on CUDA, through the real loop: losses within bf16 rounding (2e-2 relative) at
    each step. A wrong graph (a guard that reuses a kernel across shapes, a lost mask) is off by far more."""
    settings = dict(max_steps=3, gradient_checkpointing=True, precision="bf16")
    plain = train(tiny_config(digits, tmp_path, output_dir=str(tmp_path / "eager"), **settings))
    compiled = train(tiny_config(digits, tmp_path, compile=True, output_dir=str(tmp_path / "compiled"), **settings))
    assert all(loss > 0 for loss in plain["losses"])
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=2e-2)
