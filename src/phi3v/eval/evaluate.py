"""Generation-based evaluation: batched greedy decoding with a KV cache and left padding, scored by the task.

The training loop's evaluation calls ``evaluate`` too, so the number logged during training is the number the
final evaluation reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phi3v.data.dataset import JsonlDataset
from phi3v.processing.chat import Conversation, Turn
from phi3v.processing.processor import MODEL_INPUTS, Phi3VProcessor
from phi3v.tasks import Task


@dataclass
class Evaluation:
    """Predictions and the task's metrics."""

    metrics: dict[str, float]
    predictions: list[dict]


def prompt_of(conversation: Conversation) -> Conversation:
    """The conversation up to the last user message (its answer is what the model must produce)."""
    turns = [Turn(t.user, t.images, t.assistant) for t in conversation.turns]
    turns[-1] = Turn(turns[-1].user, turns[-1].images, None)
    return Conversation(turns, conversation.system)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers to the last turn of each conversation, in order."""
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        samples = [processor.encode(prompt_of(c), generation=True) for c in chunk]
        batch = processor.collate(samples, padding_side="left")
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if batch[k] is not None}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=processor.pad_token_id,
        )
        width = inputs["input_ids"].shape[1]
        answers += [processor.decode(row[width:]) for row in output]
    return answers


def evaluate(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    dataset: JsonlDataset,
    task: Task,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_samples: int | None = None,
) -> Evaluation:
    """Generate answers for ``dataset`` (sharded over ranks when distributed) and score them with ``task``.

    Every rank returns the same ``Evaluation``.
    """
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset)))[:max_samples]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = indices[rank::world]
    answers = generate_answers(model, processor, [dataset.conversation(i) for i in mine], batch_size, max_new_tokens)
    local = [
        {
            "id": dataset.records[i].id,
            "prompt": dataset.records[i].turns[-1].user,
            "prediction": answer,
            "references": dataset.records[i].references,
        }
        for i, answer in zip(mine, answers, strict=True)
    ]
    if world > 1:
        gathered: list[list[dict]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, local)
        by_id = {p["id"]: p for part in gathered for p in part}
        predictions = [by_id[dataset.records[i].id] for i in indices]
    else:
        predictions = local
    metrics = task.score([p["prediction"] for p in predictions], [p["references"] for p in predictions])
    if was_training:
        model.train()
    return Evaluation(metrics, predictions)
