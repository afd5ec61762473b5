"""QLoRA on CUDA: bitsandbytes 4-bit layers that really quantise and still learn. Marked ``gpu``; see
``tests/gpu.py`` for where it runs."""

import pytest
import torch

from phi3v import build_model
from phi3v.train.config import TrainConfig
from phi3v.train.loop import make_optimizer
from phi3v.train.strategy import apply_strategy
from tests.conftest import image_batch, prompt_ids
from tests.gpu import gpu_device

pytestmark = pytest.mark.gpu


def test_qlora_step_on_cuda_has_a_real_loss_that_falls_on_a_learnable_batch():
    """Users of other trainers report QLoRA runs whose loss is 0.0 from the start (labels lost, or an NF4 layer
    that outputs zeros). One fixed batch, 20 steps: every loss finite and well above 0, the last under half the
    first; the 4-bit weights stay as they were and only the adapters move."""
    import bitsandbytes as bnb

    device = gpu_device(cpu_ok=False)
    config = TrainConfig(strategy="qlora", precision="bf16", lora_rank=8, lora_alpha=16, lr=2e-3, warmup_steps=0)
    model = build_model("tiny", dtype=torch.bfloat16, device=device)
    model = apply_strategy(model, config).train()
    qkv = model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, bnb.nn.Linear4bit) and qkv.weight.quant_state is not None
    assert qkv.weight.device.type == "cuda" and qkv.weight.dtype == torch.uint8
    packed_before = qkv.weight.detach().clone()
    optimizer, _ = make_optimizer(model, config)

    pixel_values, image_sizes = image_batch(model, [(1, 2), (2, 1)])
    ids = prompt_ids(model, [[1, 5, 6], (1, 2), [7, 8], (2, 1), [9, 10, 11, 12, 13, 14]])[None].repeat(2, 1)
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    inputs = dict(input_ids=ids.to(device), pixel_values=pixel_values.repeat(2, 1, 1, 1, 1).to(device, torch.bfloat16),
                  image_sizes=image_sizes.repeat(2, 1).to(device), labels=labels.to(device))  # fmt: skip
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert min(losses) > 0.05, losses  # random-weight tiny model: about ln(512) = 6.2 at the start
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(qkv.weight, packed_before)
