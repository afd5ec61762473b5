"""Engine settings that need no processes: FSDP2's mixed-precision policy per precision."""

import pytest
import torch

from phi3v.train.engine import mixed_precision_policy


def test_bf16_computes_in_bf16_and_reduces_in_fp32_while_fp32_casts_nothing():
    bf16 = mixed_precision_policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp16 = mixed_precision_policy("fp16")
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)
    fp32 = mixed_precision_policy("fp32")
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)  # the parameters' own dtype throughout


def test_an_unknown_precision_is_named():
    with pytest.raises(ValueError, match=r"precision='int8': expected bf16, fp16 or fp32"):
        mixed_precision_policy("int8")


def _one_rank_without_images(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 trains on an image sample, rank 1 on a text-only one, through ``shard_fsdp2``: rank 1 must run the
    sharded CLIP tower on the blank crop (else the tower's collectives would not pair up and both would hang)."""
    import os

    import torch.distributed as dist

    from phi3v import build_model
    from phi3v.train.engine import shard_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_model("tiny", seed=0) if rank == 0 else build_model("tiny", device="meta", seed=None)
    model = shard_fsdp2(model, "fp32", torch.device("cpu")).train()
    batch = _batches()[rank]
    loss = model(**batch).loss
    loss.backward()
    tower = model.model.vision_embed_tokens.img_processor
    grads = {n: p.grad.full_tensor() for n, p in tower.named_parameters()}  # FSDP2: averaged over the ranks
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.destroy_process_group()


def _batches() -> list[dict]:
    """An image sample (rank 0) and a text-only one (rank 1), as the processor builds them."""
    from PIL import Image

    from phi3v.processing import Phi3VProcessor
    from phi3v.processing.chat import Conversation, Turn
    from phi3v.processing.collate import collate

    processor = Phi3VProcessor.tiny(num_crops=1)
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    with_image = processor.encode(Conversation([Turn("<|image_1|>\nWhat colour?", [image], "red")]))
    text_only = processor.encode(Conversation([Turn("Say yes.", [], "yes")]))
    batches = []
    for sample in (with_image, text_only):
        batch = collate([sample], pad_token_id=processor.pad_token_id)
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes")})
    return batches


def test_fsdp2_rank_without_images_runs_the_tower_on_a_blank_crop(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from phi3v import build_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_one_rank_without_images, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    # The unsharded model on both samples: the mean of the two losses' gradients, which FSDP2's reduce-scatter
    # gives; the text-only sample adds nothing to the tower's gradient (its blank crop is weighted 0).
    model = build_model("tiny", seed=0).train()
    image_batch, text_batch = _batches()
    image_loss = model(**image_batch).loss
    (image_loss + model(**text_batch).loss).div(2).backward()
    tower = model.model.vision_embed_tokens.img_processor
    assert torch.allclose(got["loss"], image_loss.detach(), rtol=1e-5)
    for name, param in tower.named_parameters():
        assert torch.allclose(got["grads"][name], param.grad, rtol=1e-4, atol=1e-7), name
