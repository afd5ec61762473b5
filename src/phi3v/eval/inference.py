"""Loading a fine-tuned model for inference.

``load_for_inference`` takes what training writes: a model directory in the official format, optionally with a
PEFT adapter directory on top. A LoRA run on the ``tiny`` preset saves its random base under ``final/base`` so the
adapter can be applied to exactly the weights it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from phi3v.adapter_base import check_base, refuse_pickles
from phi3v.model import Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor


def load_for_inference(
    model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    num_crops: int | None = None,
    force: bool = False,
) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """The model (with the adapter applied, not merged) and its processor, in eval mode.

    The processor files are read from the adapter directory when it has them (training saves them there), else
    from the model directory.

    Args:
        force: Apply an adapter to a base other than the one it recorded (``phi3v_base.json``), with a warning.

    Raises:
        AdapterBaseError: for a pickled adapter file (before anything is loaded), or a base other than the
            adapter's without ``force``.
    """
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
        refuse_pickles(adapter)
    base = Phi3VForCausalLM.from_pretrained(model, dtype=dtype, device_map=device)
    processor_dir = model
    if adapter is not None:
        from peft import PeftModel

        check_base(adapter, model, base, force=force)
        base = PeftModel.from_pretrained(base, str(adapter))
        if (Path(adapter) / "preprocessor_config.json").exists():
            processor_dir = adapter
    processor = Phi3VProcessor.from_pretrained(processor_dir, num_crops=num_crops)
    return base.eval(), processor


def read_manifest(directory: str | os.PathLike) -> dict:
    """The ``phi3v_manifest.json`` of an exported directory ({} when absent)."""
    path = Path(directory) / "phi3v_manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}
