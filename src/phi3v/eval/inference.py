"""Loading a fine-tuned model for inference, label-set scoring, and one-off generation.

``load_for_inference`` takes what training writes: a model directory in the official format, optionally with a
PEFT adapter directory on top. A LoRA run on the ``tiny`` preset saves its random base under ``final/base`` so the
adapter can be applied to exactly the weights it was trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from phi3v.adapter_base import check_base, refuse_pickles
from phi3v.model import Phi3VForCausalLM, without_adapters
from phi3v.processing import Conversation, Phi3VProcessor, Turn
from phi3v.processing.chat import ANSWER_SUFFIX


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


@torch.no_grad()
def label_scores(
    model: torch.nn.Module, processor: Phi3VProcessor, conversation: Conversation, labels: Sequence[str]
) -> list[float]:
    """Log-likelihood of each candidate answer ``label<|end|>\\n<|endoftext|>`` after the conversation's prompt.

    The prompt (images included) is embedded once; each label is scored as its own continuation. Deterministic,
    and every answer is one of ``labels``.

    Returns:
        Summed log-probabilities of each label's tokens, in ``labels`` order.
    """
    base = without_adapters(model)
    device = next(model.parameters()).device
    sample = processor.encode(conversation, generation=True)  # ends after the last prompt
    pixel_values = sample.pixel_values.to(device, base.dtype) if sample.pixel_values is not None else None
    sizes = sample.image_sizes.to(device) if sample.image_sizes is not None else None
    prompt = base.model.embed(sample.input_ids[None].to(device), pixel_values, sizes)  # [1, Lp, E]
    answers = [processor.tokenizer(label + ANSWER_SUFFIX, add_special_tokens=False).input_ids for label in labels]
    width = max(len(a) for a in answers)
    ids = torch.full((len(labels), width), processor.pad_token_id, device=device)
    mask = torch.zeros(len(labels), prompt.shape[1] + width, dtype=torch.long, device=device)
    mask[:, : prompt.shape[1]] = 1
    for row, answer in enumerate(answers):
        ids[row, : len(answer)] = torch.tensor(answer, device=device)
        mask[row, prompt.shape[1] : prompt.shape[1] + len(answer)] = 1
    embeds = torch.cat([prompt.expand(len(labels), -1, -1), base.model.embed_tokens(ids)], dim=1)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()  # [n, Lp + W, V]
    start = prompt.shape[1] - 1  # the last prompt position predicts the first answer token
    logprobs = F.log_softmax(logits[:, start : start + width], dim=-1).gather(-1, ids[..., None])[..., 0]
    valid = mask[:, prompt.shape[1] :].bool()
    return (logprobs * valid).sum(-1).tolist()


def generate(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    question: str,
    images: Sequence = (),
    max_new_tokens: int = 256,
    stream: bool = False,
) -> str:
    """Answer one question about some images (greedy). With ``stream``, tokens are printed as they come."""
    from phi3v.eval.evaluate import generate_answers

    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    conversation = Conversation([Turn(question, list(images))])
    return generate_answers(model, processor, [conversation], 1, max_new_tokens, streamer)[0]


def read_manifest(directory: str | os.PathLike) -> dict:
    """The ``phi3v_manifest.json`` of an exported directory ({} when absent)."""
    path = Path(directory) / "phi3v_manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}
