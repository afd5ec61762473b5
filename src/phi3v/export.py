"""``phi3v export``: merge a LoRA adapter (vision tower and projector adapters included) into its base and write the
official format, verified.

The output directory gets official-format safetensors and ``config.json`` (loadable by the official code and by
vLLM), the processor files, and ``phi3v_manifest.json`` with the preprocessing to serve it with. Before anything
is published, the merged model's logits are compared with base + adapter on sample inputs; a difference above the
tolerance fails the export and leaves no output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from phi3v import __version__
from phi3v.eval.inference import load_for_inference
from phi3v.model import Phi3VForCausalLM, num_image_tokens
from phi3v.processing.tokenizer import CHAT_TEMPLATE
from phi3v.utils import atomic_write_text

# float32 merges differ from the unmerged computation only by rounding; half precision needs more room.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class ExportError(RuntimeError):
    """The merged model does not reproduce base + adapter; nothing was written."""


def _probe_inputs(model: Phi3VForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts with an image each (different crop grids, so different lengths), deterministic."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    s, g = config.crop_size, config.merged_grid
    grids = [(1, 2), (2, 1)]
    pixel_values = torch.zeros(2, 5, 3, s, s)
    for i, (h, w) in enumerate(grids):
        pixel_values[i, : 1 + h * w] = torch.randn(1 + h * w, 3, s, s, generator=gen)
    vocab = min(config.vocab_size, 32000) - 10
    rows = []
    for h, w in grids:
        text = torch.randint(3, vocab, (6,), generator=gen).tolist()
        rows.append(text[:3] + [config.image_token_id] * num_image_tokens(h, w, g) + text[3:])
    width = max(len(r) for r in rows)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    ids = torch.tensor([r + [config.pad_token_id] * (width - len(r)) for r in rows])  # right padding
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor([[h * s, w * s] for h, w in grids]),
    }


@torch.no_grad()
def export(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    frames: int | None = None,
    force: bool = False,
) -> dict:
    """Merge, verify, write. Returns the manifest.

    Args:
        model_dir: The base model (official format).
        adapter_dir: The PEFT adapter (as ``phi3v train`` writes it, processor files included).
        out_dir: Output directory; must not exist yet.
        dtype: Weights dtype of the export (default the base's).
        frames: Frames per video the model was trained with, recorded in the manifest.
        force: Merge onto a base other than the one the adapter recorded (with a warning).

    Raises:
        ExportError: when merged and unmerged logits differ by more than the tolerance.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    model, processor = load_for_inference(model_dir, adapter_dir, dtype=dtype, force=force)
    probe = _probe_inputs(model.get_base_model())
    probe["pixel_values"] = probe["pixel_values"].to(model.get_base_model().dtype)
    with_adapter = model(**probe).logits
    merged = model.merge_and_unload()
    merged_logits = merged(**probe).logits
    difference = float((merged_logits - with_adapter).abs().max())
    tolerance = TOLERANCE[merged.dtype]
    if not difference <= tolerance:
        raise ExportError(f"merged logits differ from base + adapter by {difference:.3g} (tolerance {tolerance})")
    manifest = {
        "phi3v_version": __version__,
        "base_model": str(model_dir),
        "adapter": str(adapter_dir),
        "num_crops": processor.image_processor.num_crops,
        "crop_size": processor.image_processor.crop_size,
        "frames": frames,
        "chat_template": processor.tokenizer.chat_template or CHAT_TEMPLATE,
        "dtype": str(merged.dtype).removeprefix("torch."),
        "parity": {"max_abs_logit_difference": difference, "tolerance": tolerance},
    }
    staging = out.parent / f".tmp-{out.name}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
        atomic_write_text(staging / "phi3v_manifest.json", json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
