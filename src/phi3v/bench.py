"""``phi3v bench``: training throughput on DocVQA-shaped synthetic samples with random weights.

A sample is one document image on a 4x4 crop grid (``num_crops`` 16), text up to about 2,450 tokens in all, and a
4-token answer, like the reference recipe's DocVQA speed table. The step is phi3v's (supervised-position loss, no
CLIP work on padding crops, batches, optional packing); ``--reference`` runs the reference recipe's settings in
the same process instead (batch 1, full activation checkpointing, full-vocabulary loss, CLIP on every crop slot)
so the two can be compared as a ratio.

Model FLOPs per sample follow shared/reference/performance.md §2: 3 x forward, forward = 2 x parameters x tokens
for the language model and for CLIP (23 layers, every real crop of 577 tokens), plus causal attention.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from phi3v.model import build_model, num_image_tokens, without_adapters
from phi3v.processing.image import Phi3VImageProcessor
from phi3v.train.config import TrainConfig
from phi3v.train.strategy import apply_strategy


@dataclass
class BenchResult:
    """What one benchmark run measured."""

    preset: str
    strategy: str
    settings: str
    device: str
    batch_size: int
    packing: bool
    tokens_per_sample: int
    steps_timed: int
    seconds_per_step: float
    samples_per_s: float
    tokens_per_s: float
    model_tflop_per_sample: float
    achieved_tflops: float
    mfu: float | None
    peak_tflops: float | None
    peak_memory_gib: float
    data_wait_s_per_step: float


def _synthetic_batch(model, batch_size: int, tokens: int, answer: int, num_crops: int, generator):
    config = model.config
    s, g = config.crop_size, config.merged_grid
    h = w = 4
    image_tokens = num_image_tokens(h, w, g)
    text = max(8, tokens - image_tokens)
    vocab = min(config.vocab_size, 32000) - 64
    ids, labels = [], []
    for _ in range(batch_size):
        body = torch.randint(3, vocab, (text,), generator=generator)
        row = torch.cat([body[:4], torch.full((image_tokens,), config.image_token_id), body[4:]])
        label = torch.full_like(row, -100)
        label[-answer:] = row[-answer:]
        ids.append(row)
        labels.append(label)
    # uint8 crops as the data-loader workers ship them (slot 0, the global view, is made on the device)
    pixel_values = torch.zeros(batch_size, num_crops + 1, 3, s, s, dtype=torch.uint8)
    pixel_values[:, 1 : 1 + h * w] = torch.randint(0, 256, (batch_size, h * w, 3, s, s), generator=generator)
    image_sizes = torch.tensor([[h * s, w * s]] * batch_size)
    return torch.stack(ids), torch.stack(labels), pixel_values, image_sizes


def model_flops_per_sample(model, tokens: int, crops: int) -> float:
    """Training FLOPs of one sample (3 x forward), performance.md §2."""
    config = model.config
    base = without_adapters(model)
    vision = sum(p.numel() for p in base.model.vision_embed_tokens.img_processor.parameters())
    projector = sum(p.numel() for p in base.model.vision_embed_tokens.img_projection.parameters())
    language = sum(p.numel() for p in base.parameters()) - vision - projector
    clip_tokens = crops * ((config.crop_size // config.vision_config.patch_size) ** 2 + 1)
    d, layers = config.hidden_size, config.num_hidden_layers
    vd, vlayers = config.vision_config.hidden_size, config.vision_layers_used
    forward = 2 * language * tokens + 2 * tokens * tokens * d * layers  # causal attention: half of 4*T^2*d
    forward += 2 * vision * clip_tokens + 4 * crops * (clip_tokens / crops) ** 2 * vd * vlayers
    forward += 2 * projector * crops * config.merged_grid**2
    return 3 * forward


def run_bench(
    preset: str = "tiny",
    strategy: str = "full",
    batch_size: int = 2,
    steps: int = 5,
    warmup: int = 2,
    tokens: int = 2450,
    num_crops: int = 16,
    reference: bool = False,
    packing: bool = False,
    peak_tflops: float | None = None,
    device: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
) -> BenchResult:
    """Time ``steps`` optimizer steps after ``warmup`` and report throughput and memory."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_ = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
              "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]  # fmt: skip
    config = TrainConfig(strategy=strategy, precision="fp32", lora_rank=16, lora_alpha=32)
    model = build_model(preset, device=device, dtype=dtype_ if config.spec.adapters else None)
    model = apply_strategy(model, config)
    base = without_adapters(model)
    if reference:
        batch_size, packing = 1, False
        base.model.vision_embed_tokens.skip_padding_crops = False
    if reference or device.startswith("cuda"):  # full checkpointing: the reference's; on a GPU, memory needs it
        base.enable_activation_checkpointing()
    if compile and not reference:
        base.compile_layers()
    images = Phi3VImageProcessor(num_crops=num_crops, crop_size=model.config.crop_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.startswith("cuda"))
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype_ == torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timings, waits = [], []
    for step in range(warmup + steps):
        fetch = time.perf_counter()
        ids, labels, pixel_values, image_sizes = _synthetic_batch(model, batch_size, tokens, 4, num_crops, generator)
        if reference:  # the reference's workers ship normalised float crops
            pixel_values = images.finish(pixel_values, image_sizes).to(dtype_)
        inputs = {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}
        if packing:
            inputs["input_ids"] = ids.reshape(1, -1)
            inputs["position_ids"] = torch.arange(ids.shape[1]).repeat(batch_size)[None]
            labels = labels.reshape(1, -1)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        labels = labels.to(device)
        waited = time.perf_counter() - fetch
        _sync(device)
        start = time.perf_counter()
        if not reference:  # normalisation and the global view on the device, inside the timed step
            inputs["pixel_values"] = images.finish(inputs["pixel_values"], image_sizes).to(dtype_)
        with autocast:
            if reference:  # logits at every position, then the loss over the whole vocabulary
                logits = model(**inputs).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            else:
                loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
            waits.append(waited)
    seconds = sum(timings) / len(timings)
    tokens_per_sample = ids.shape[1]
    flops = model_flops_per_sample(model, tokens_per_sample, 1 + 16)
    samples_per_s = batch_size / seconds
    achieved = flops * samples_per_s / 1e12
    if device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:  # peak resident memory of the process (Linux reports KiB)
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return BenchResult(
        preset=preset, strategy=strategy, settings="reference" if reference else "phi3v",
        device=_device_name(device), batch_size=batch_size, packing=packing, tokens_per_sample=tokens_per_sample,
        steps_timed=steps, seconds_per_step=seconds, samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * tokens_per_sample, model_tflop_per_sample=flops / 1e12,
        achieved_tflops=achieved, mfu=achieved / peak_tflops if peak_tflops else None, peak_tflops=peak_tflops,
        peak_memory_gib=memory, data_wait_s_per_step=sum(waits) / len(waits),
    )  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(results: list[BenchResult]) -> str:
    """A markdown table of results."""
    head = (
        "| settings | strategy | batch | packing | samples/s | tokens/s | TFLOP/s | MFU | peak mem GiB | data wait s |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        rows.append(
            f"| {r.settings} | {r.strategy} | {r.batch_size} | {r.packing} | {r.samples_per_s:.3g} | "
            f"{r.tokens_per_s:.4g} | {r.achieved_tflops:.3g} | {mfu} | {r.peak_memory_gib:.2f} | "
            f"{r.data_wait_s_per_step:.3g} |"
        )
    return "\n".join(rows)


def write_results(results: list[BenchResult], path: str | Path) -> None:
    from phi3v.utils import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(r) for r in results], indent=2) + "\n")
