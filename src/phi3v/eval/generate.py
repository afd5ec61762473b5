"""Answers from a model: batched greedy generation (KV cache, left padding), label-set scoring by log-likelihood,
and one-off questions. Evaluation (``evaluate.py``) and the ``generate`` command both use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from phi3v.model import without_adapters
from phi3v.processing import Conversation, Turn
from phi3v.processing.chat import ANSWER_SUFFIX
from phi3v.processing.processor import MODEL_INPUTS, Phi3VProcessor


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model sharded by FSDP2 (``fully_shard``): its forward passes are collective, so every rank must
    run as many as the others (``evaluate`` pads the ranks' prompts; generation runs with ``synced_gpus``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def whole_root(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2, the root unit's parameters (embeddings, final norm, output head, projector) gathered for the
    block; elsewhere nothing.

    The root's forward hooks gather them only when the root module itself is called, but PEFT's ``generate`` calls
    the inner model, and label scoring calls the embedding layers directly. The decoder layers and the CLIP tower
    are units of their own and gather themselves when called.
    """
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    streamer=None,
) -> list[str]:
    """Greedy answers to the last turn of each conversation, in order (its answer, if any, is not shown to
    the model: generation-mode rendering stops after the last prompt).

    Args:
        streamer: A transformers streamer that prints tokens as they come (use with ``batch_size=1``).
    """
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        rows = generate_tokens(model, processor, conversations[start : start + batch_size], max_new_tokens, streamer)
        answers += [processor.decode(row) for row in rows]
    return answers


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 64,
    streamer=None,
    **generate_kwargs,
) -> list[list[int]]:
    """The new token ids of each conversation's answer, generated as one left-padded batch.

    Greedy unless ``generate_kwargs`` say otherwise (``do_sample``, ``temperature``, ``top_p``,
    ``stopping_criteria``: the server passes its sampling settings through here). A row ends at its first
    ``<|end|>`` / ``<|endoftext|>``, which is kept; the padding after it is not.

    Returns:
        Per conversation, the generated ids (at most ``max_new_tokens``).
    """
    device = next(p for p in model.parameters()).device
    dtype = without_adapters(model).dtype
    samples = [processor.encode(c, generation=True) for c in conversations]
    batch = processor.collate(samples, padding_side="left")
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if batch[k] is not None}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    # Sharded (FSDP2): a rank whose rows are done keeps running forward passes until every rank's are (transformers
    # all-reduces a "done" flag each step), so that the layers' all-gathers pair up across ranks.
    settings = {"do_sample": False, "synced_gpus": is_sharded(model), **generate_kwargs}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.eos_token_ids,
        pad_token_id=processor.pad_token_id,
        streamer=streamer,
        **settings,
    )
    width = inputs["input_ids"].shape[1]
    ends = set(processor.eos_token_ids)
    rows = []
    for row in output[:, width:].tolist():
        end = next((k for k, token in enumerate(row) if token in ends), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


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
    system: str | None = None,
) -> str:
    """Answer one question about some images (greedy). With ``stream``, tokens are printed as they come; ``system``
    is the system message (``<|system|>\n{system}<|end|>\n`` before the question)."""
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    conversation = Conversation([Turn(question, list(images))], system)
    return generate_answers(model, processor, [conversation], 1, max_new_tokens, streamer)[0]
