"""``phi3v bench``: training and evaluation throughput, and a per-part profile, on DocVQA-shaped synthetic samples
with random weights.

A sample is one document image on a 4x4 crop grid (``num_crops`` 16), text up to about 2,450 tokens in all, and a
4-token answer, like the reference recipe's DocVQA speed table. The step is phi3v's (supervised-position loss, no
CLIP work on padding crops, batches, optional packing); ``--reference`` runs the reference recipe's settings in
the same process instead (batch 1, full activation checkpointing, full-vocabulary loss, CLIP on every crop slot)
so the two can be compared as a ratio.

Model FLOPs per sample follow shared/reference/performance.md §2: forward = 2 x parameters x tokens for the
language model and for CLIP (23 layers, every real crop of 577 tokens), plus causal attention; training is
3 x forward for what trains, 1 x for a frozen tower that needs no gradient (frozen vision), and 2 x for frozen
weights that pass gradients on to adapters (LoRA, QLoRA). Recomputation under activation checkpointing is not
counted (MFU, not hardware utilisation).
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from phi3v.model import build_model, num_image_tokens, without_adapters
from phi3v.processing.image import Phi3VImageProcessor
from phi3v.train.config import TrainConfig
from phi3v.train.strategy import apply_strategy, quantization_config

# Training FLOPs per forward FLOP of (language + projector, vision), per strategy: see the module docstring.
FLOP_MULTIPLIERS = {"full": (3, 3), "frozen_vision": (3, 1), "lora": (2, 2), "qlora": (2, 2)}


@dataclass
class BenchResult:
    """What one training benchmark run measured."""

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
    compile: bool = False
    checkpoint_every: int = 0
    """Activation checkpointing of every n-th layer (0: none, 1: all)."""
    build_s: float = 0.0
    """Seconds to build the random-weight model and apply the strategy (quantisation, adapters)."""
    first_step_s: float = 0.0
    """Seconds of the first (untimed) step: compilation and allocator warm-up show here."""


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


def model_flops_per_sample(model, tokens: int, crops: int, strategy: str = "full") -> float:
    """Training FLOPs of one sample under ``strategy`` (performance.md §2; see the module docstring)."""
    config = model.config
    base = without_adapters(model)
    vision = sum(p.numel() for p in base.model.vision_embed_tokens.img_processor.parameters())
    projector = sum(p.numel() for p in base.model.vision_embed_tokens.img_projection.parameters())
    embedding = base.model.embed_tokens.weight.numel()  # a lookup, not a matmul (performance.md leaves it out)
    language = sum(p.numel() for p in base.parameters()) - vision - projector - embedding
    clip_tokens = crops * ((config.crop_size // config.vision_config.patch_size) ** 2 + 1)
    d, layers = config.hidden_size, config.num_hidden_layers
    vd, vlayers = config.vision_config.hidden_size, config.vision_layers_used
    language_forward = 2 * language * tokens + 2 * tokens * tokens * d * layers  # causal attention: half of 4*T^2*d
    language_forward += 2 * projector * crops * config.merged_grid**2
    vision_forward = 2 * vision * clip_tokens + 4 * crops * (clip_tokens / crops) ** 2 * vd * vlayers
    text_factor, vision_factor = FLOP_MULTIPLIERS[strategy]
    return text_factor * language_forward + vision_factor * vision_forward


class _Bench:
    """A model set up for benchmark steps: strategy applied, optimizer made, synthetic batches at hand."""

    def __init__(self, preset, strategy, device, dtype, reference, compile, checkpoint_every, num_crops):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.startswith("cuda")
        self.dtype = {"auto": torch.bfloat16 if self.cuda else torch.float32,
                      "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]  # fmt: skip
        bf16 = self.dtype == torch.bfloat16
        # full / frozen_vision: float32 master weights under bf16 autocast; LoRA: a bf16 base; QLoRA: NF4 with bf16
        config = TrainConfig(strategy=strategy, precision="bf16" if bf16 else "fp32", lora_rank=16, lora_alpha=32)
        start = time.perf_counter()
        # QLoRA: the random weights are read 4-bit through from_pretrained, as a checkpoint would be (build_s
        # includes writing them to a temporary directory first)
        model = build_model(preset, device=self.device, dtype=self.dtype if config.spec.adapters else None,
                            quantization_config=quantization_config(config))  # fmt: skip
        self.model = apply_strategy(model, config)
        _sync(self.device)
        self.build_s = time.perf_counter() - start
        self.base = without_adapters(self.model)
        self.reference = reference
        if reference:
            self.base.model.vision_embed_tokens.skip_padding_crops = False
            checkpoint_every = 1  # the reference's full activation checkpointing
        elif checkpoint_every is None:  # on a GPU memory needs it at full size; on a CPU the tiny model does not
            checkpoint_every = 1 if self.cuda else 0
        self.checkpoint_every = checkpoint_every
        if checkpoint_every:
            self.base.enable_activation_checkpointing(every_n_layers=checkpoint_every)
        self.compile = compile and not reference
        if self.compile:
            self.base.compile_layers()
        self.num_crops = num_crops
        self.images = Phi3VImageProcessor(num_crops=num_crops, crop_size=self.model.config.crop_size)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=self.cuda)
        self.generator = torch.Generator().manual_seed(0)
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    def batch(self, batch_size: int, tokens: int, packing: bool):
        """Host-side inputs of one step, moved to the device: ``(inputs, labels, image_sizes, tokens per sample)``."""
        ids, labels, pixel_values, image_sizes = _synthetic_batch(
            self.model, batch_size, tokens, 4, self.num_crops, self.generator
        )
        if self.reference:  # the reference's workers ship normalised float crops
            pixel_values = self.images.finish(pixel_values, image_sizes).to(self.dtype)
        inputs = {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}
        if packing:
            inputs["input_ids"] = ids.reshape(1, -1)
            inputs["position_ids"] = torch.arange(ids.shape[1]).repeat(batch_size)[None]
            labels = labels.reshape(1, -1)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return inputs, labels.to(self.device), image_sizes, ids.shape[1]

    def step(self, inputs, labels, image_sizes, mark=None) -> None:
        """One optimizer step; ``mark(name)`` gives a context that labels a part of it (for the profiler)."""
        mark = mark or (lambda name: contextlib.nullcontext())
        if not self.reference:  # normalisation and the global view on the device, inside the timed step
            with mark("phi3v/input"):
                inputs = {**inputs, "pixel_values": self.images.finish(inputs["pixel_values"], image_sizes)}
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self.autocast:
            if self.reference:  # logits at every position, then the loss over the whole vocabulary
                logits = self.model(**inputs).logits
                with mark("phi3v/loss"):
                    loss = F.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
                    )
            else:
                loss = self.model(**inputs, labels=labels).loss
        with mark("phi3v/backward"):
            loss.backward()
        with mark("phi3v/optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Free the model and optimizer state (the next benchmark in the process starts from empty memory)."""
        del self.model, self.base, self.optimizer
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


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
    checkpoint_every: int | None = None,
) -> BenchResult:
    """Time ``steps`` optimizer steps after ``warmup`` and report throughput and memory.

    Args:
        dtype: ``auto`` (bf16 autocast over float32 master weights on a GPU, float32 on a CPU), ``bfloat16`` or
            ``float32``.
        checkpoint_every: Activation checkpointing of every n-th layer (0: none); default all layers on a GPU,
            none on a CPU. The reference settings always checkpoint every layer.
    """
    bench = _Bench(preset, strategy, device, dtype, reference, compile, checkpoint_every, num_crops)
    try:
        if reference:
            batch_size, packing = 1, False
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats()
        timings, waits, first = [], [], 0.0
        for step in range(warmup + steps):
            fetch = time.perf_counter()
            inputs, labels, image_sizes, tokens_per_sample = bench.batch(batch_size, tokens, packing)
            waited = time.perf_counter() - fetch
            _sync(bench.device)
            start = time.perf_counter()
            bench.step(inputs, labels, image_sizes)
            _sync(bench.device)
            if step == 0:
                first = time.perf_counter() - start
            if step >= warmup:
                timings.append(time.perf_counter() - start)
                waits.append(waited)
        seconds = sum(timings) / len(timings)
        flops = model_flops_per_sample(bench.model, tokens_per_sample, 1 + 16, strategy)
        samples_per_s = batch_size / seconds
        achieved = flops * samples_per_s / 1e12
        return BenchResult(
            preset=preset, strategy=strategy, settings="reference" if reference else "phi3v",
            device=_device_name(bench.device), batch_size=batch_size, packing=packing,
            tokens_per_sample=tokens_per_sample, steps_timed=steps, seconds_per_step=seconds,
            samples_per_s=samples_per_s, tokens_per_s=samples_per_s * tokens_per_sample,
            model_tflop_per_sample=flops / 1e12, achieved_tflops=achieved,
            mfu=achieved / peak_tflops if peak_tflops else None, peak_tflops=peak_tflops,
            peak_memory_gib=_peak_memory_gib(bench.device), data_wait_s_per_step=sum(waits) / len(waits),
            compile=bench.compile, checkpoint_every=bench.checkpoint_every, build_s=bench.build_s,
            first_step_s=first,
        )  # fmt: skip
    finally:
        bench.close()


@dataclass
class EvalResult:
    """What one evaluation (batched greedy generation) benchmark measured."""

    preset: str
    device: str
    batch_size: int
    prompt_tokens: int
    """Longest prompt of a batch (shorter ones are left-padded to it, as evaluation pads them)."""
    new_tokens: int
    batches_timed: int
    seconds_per_batch: float
    samples_per_s: float
    generated_tokens_per_s: float
    peak_memory_gib: float
    build_s: float
    first_batch_s: float


def _prompt_batch(config, batch_size: int, tokens: int, num_crops: int, generator):
    """Left-padded DocVQA-shaped prompts ``[B, L]``, their attention mask and uint8 crops; row ``i`` is ``3 * i``
    text tokens shorter than the longest, so padding is exercised."""
    s, g = config.crop_size, config.merged_grid
    h = w = 4
    image_tokens = num_image_tokens(h, w, g)
    text = max(8 + 3 * batch_size, tokens - image_tokens)
    vocab = min(config.vocab_size, 32000) - 64
    width = 4 + image_tokens + (text - 4)
    ids = torch.full((batch_size, width), config.pad_token_id)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i in range(batch_size):
        body = torch.randint(3, vocab, (text - 3 * i,), generator=generator)
        row = torch.cat([body[:4], torch.full((image_tokens,), config.image_token_id), body[4:]])
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    pixel_values = torch.zeros(batch_size, num_crops + 1, 3, s, s, dtype=torch.uint8)
    pixel_values[:, 1 : 1 + h * w] = torch.randint(0, 256, (batch_size, h * w, 3, s, s), generator=generator)
    image_sizes = torch.tensor([[h * s, w * s]] * batch_size)
    return ids, mask, pixel_values, image_sizes


@torch.no_grad()
def run_eval_bench(
    preset: str = "tiny",
    batch_size: int = 8,
    batches: int = 2,
    warmup: int = 1,
    tokens: int = 2450,
    new_tokens: int = 8,
    num_crops: int = 16,
    device: str | None = None,
    dtype: str = "auto",
) -> EvalResult:
    """Time batched greedy generation (``model.generate`` with a KV cache, as ``phi3v evaluate`` runs it) of
    exactly ``new_tokens`` tokens per sample; the crops' normalisation and global view are inside the timer.

    Args:
        dtype: ``auto`` (bf16 weights on a GPU, float32 on a CPU), ``bfloat16`` or ``float32``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype_ = {"auto": torch.bfloat16 if cuda else torch.float32,
              "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]  # fmt: skip
    start = time.perf_counter()
    model = build_model(preset, device=device, dtype=dtype_)
    _sync(device)
    build_s = time.perf_counter() - start
    config = model.config
    images = Phi3VImageProcessor(num_crops=num_crops, crop_size=config.crop_size)
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timings, first = [], 0.0
    try:
        for index in range(warmup + batches):
            ids, mask, pixel_values, image_sizes = _prompt_batch(config, batch_size, tokens, num_crops, generator)
            ids, mask, pixels = ids.to(device), mask.to(device), pixel_values.to(device)
            _sync(device)
            begin = time.perf_counter()
            pixels = images.finish(pixels, image_sizes).to(dtype_)
            out = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=image_sizes.to(device),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
            )  # fmt: skip
            _sync(device)
            elapsed = time.perf_counter() - begin
            if out.shape[1] - ids.shape[1] != new_tokens:
                raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
            if index == 0:
                first = elapsed
            if index >= warmup:
                timings.append(elapsed)
        seconds = sum(timings) / len(timings)
        return EvalResult(
            preset=preset, device=_device_name(device), batch_size=batch_size, prompt_tokens=ids.shape[1],
            new_tokens=new_tokens, batches_timed=batches, seconds_per_batch=seconds,
            samples_per_s=batch_size / seconds, generated_tokens_per_s=batch_size * new_tokens / seconds,
            peak_memory_gib=_peak_memory_gib(device), build_s=build_s, first_batch_s=first,
        )  # fmt: skip
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ---- profile of one training step ------------------------------------------------------------------------------

PARTS = ("input", "clip", "projector", "decoder", "loss", "optimizer", "backward_other", "other")
"""Where ``profile_step`` puts time. ``projector`` is the whole image embedding after CLIP (2x2 merge,
separators, MLP); ``decoder`` is the token embedding, the scatter of image features, the Phi-3 layers and the
final norm; ``loss`` is what remains of the forward (the LM head at supervised positions and the cross-entropy);
``backward_other`` is backward work that maps to no forward op (gradient accumulation into ``.grad``)."""


def _label_modules(base, labels):
    """Forward hooks that open a ``record_function`` range named after each labelled module; returns handles."""
    from torch.autograd.profiler import record_function

    handles, open_ranges = [], defaultdict(list)
    for module, name in labels:

        def enter(mod, args, name=name):
            scope = record_function(name)
            scope.__enter__()
            open_ranges[id(mod)].append(scope)

        def leave(mod, args, output):
            open_ranges[id(mod)].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def attribute_profile(events, use_device: bool) -> dict[str, dict[str, float]]:
    """Milliseconds per part and phase from a profiler's ``events()``.

    Each op goes to its innermost ``phi3v/<part>`` range. Backward ops run outside those ranges; they go to the
    part of the forward op that made their autograd node (matched by sequence number and thread). Recomputation
    under activation checkpointing runs the labelled modules again, so it lands in their part, as backward.

    Args:
        events: ``torch.profiler.profile(...).events()``.
        use_device: Count device (kernel) time; else CPU self time.

    Returns:
        ``{part: {"ms": ..., "backward_ms": ...}}`` for every part of ``PARTS``: all its time, and the part of it
        spent in backward (recomputation included).
    """
    from torch.autograd import DeviceType

    def walk(event):
        """(part, in backward) of an event: innermost label, or the forward part of its autograd node."""
        part, backward, node = None, False, event
        while node is not None:
            name = node.name
            if name.startswith("autograd::engine::evaluate_function"):
                backward = True
                if part is None:
                    part = forward_part.get((node.fwd_thread, node.sequence_nr), "backward_other")
            elif name.startswith("phi3v/"):
                backward = backward or name == "phi3v/backward"
                if part is None and name != "phi3v/backward":
                    part = name.removeprefix("phi3v/")
            node = node.cpu_parent
        return part or ("backward_other" if backward else "other"), backward

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    forward_part: dict[tuple[int, int], str] = {}
    for event in cpu_events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine::evaluate_function"):
            part, backward = walk(event)
            if not backward:
                forward_part.setdefault((event.thread, event.sequence_nr), part)
    totals = {part: {"ms": 0.0, "backward_ms": 0.0} for part in PARTS}
    for event in cpu_events:
        micros = event.self_device_time_total if use_device else event.self_cpu_time_total
        if micros <= 0:
            continue
        part, backward = walk(event)
        totals[part]["ms"] += micros / 1000
        if backward:
            totals[part]["backward_ms"] += micros / 1000
    return totals


def profile_step(
    preset: str = "tiny",
    strategy: str = "full",
    batch_size: int = 1,
    tokens: int = 2450,
    num_crops: int = 16,
    warmup: int = 1,
    device: str | None = None,
    dtype: str = "auto",
    checkpoint_every: int | None = None,
) -> dict:
    """``torch.profiler`` of one phi3v training step after ``warmup`` steps, summarised per part (``PARTS``).

    Returns:
        A JSON-ready dict: the settings, ``step_s`` (wall time of the profiled step, profiler overhead included),
        ``time_basis`` (``device`` kernel time on a GPU, ``cpu`` self time otherwise), ``total_ms`` and ``parts``
        (``{part: {"ms", "backward_ms", "share"}}``, shares of ``total_ms``).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    bench = _Bench(preset, strategy, device, dtype, False, False, checkpoint_every, num_crops)
    base = bench.base
    embedding = base.model.vision_embed_tokens
    labels = [(base, "phi3v/loss"), (base.model, "phi3v/decoder"), (embedding, "phi3v/projector"),
              (embedding.img_processor, "phi3v/clip")]  # fmt: skip
    handles = _label_modules(base, labels)
    try:
        for _ in range(warmup):
            bench.step(*bench.batch(batch_size, tokens, False)[:3])
        inputs, labels_, image_sizes, tokens_per_sample = bench.batch(batch_size, tokens, False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
        _sync(bench.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            bench.step(inputs, labels_, image_sizes, mark=record_function)
            _sync(bench.device)
            step_s = time.perf_counter() - start
        parts = attribute_profile(prof.events(), use_device=bench.cuda)
        total = sum(p["ms"] for p in parts.values())
        for p in parts.values():
            p["share"] = p["ms"] / total if total else 0.0
        return {
            "preset": preset, "strategy": strategy, "device": _device_name(bench.device), "batch_size": batch_size,
            "tokens_per_sample": tokens_per_sample, "checkpoint_every": bench.checkpoint_every, "step_s": step_s,
            "time_basis": "device" if bench.cuda else "cpu", "total_ms": total, "parts": parts,
            "peak_memory_gib": _peak_memory_gib(bench.device),
        }  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
        bench.close()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident memory (Linux: KiB)


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
