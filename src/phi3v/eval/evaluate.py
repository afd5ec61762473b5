"""Evaluation: answers from ``generate.py`` (generation or label-set scoring), scored by the task.

The training loop's evaluation calls ``evaluate`` too, so the number logged during training is the number the
final evaluation reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from phi3v.data.dataset import JsonlDataset
from phi3v.eval.generate import generate_answers, is_sharded, label_scores, whole_root
from phi3v.processing.processor import Phi3VProcessor
from phi3v.tasks import Task
from phi3v.utils import atomic_write, atomic_write_text


@dataclass
class Evaluation:
    """Predictions and the task's metrics (overall, and per ``source`` when the samples come from several)."""

    metrics: dict[str, float]
    predictions: list[dict]
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)


def evaluate(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    dataset: JsonlDataset,
    task: Task,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_samples: int | None = None,
    labels: Sequence[str] | None = None,
) -> Evaluation:
    """Answer every sample of ``dataset`` (sharded over ranks when distributed) and score with ``task``.

    Args:
        model: The model (a PEFT model works too).
        processor: Its processor.
        dataset: The samples; the last turn's answer is the one to produce.
        task: Scores the answers.
        batch_size: Prompts per generation batch.
        max_new_tokens: Longest answer.
        max_samples: Evaluate only the first ones.
        labels: Label-set scoring instead of generation: each candidate is scored by log-likelihood and the best
            one is the answer; tasks with a positive label also get AUROC.

    Returns:
        The same ``Evaluation`` on every rank.

    Under FSDP2 (sharded forward passes, collective) every rank answers as many prompts as the busiest one, so in as
    many batches: its list is padded with copies of a prompt, whose answers are dropped.
    """
    modes = [(module, module.training) for module in model.modules()]  # each module's own, given back after
    model.eval()
    try:
        return _evaluate(model, processor, dataset, task, batch_size, max_new_tokens, max_samples, labels)
    finally:
        for module, training in modes:
            module.train(training)


def _evaluate(model, processor, dataset, task, batch_size, max_new_tokens, max_samples, labels) -> Evaluation:
    indices = list(range(len(dataset)))[:max_samples]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = indices[rank::world]
    conversations = [dataset.conversation(i) for i in mine]
    if is_sharded(model) and indices:
        busiest = -(-len(indices) // world)  # ceil(n / world): the first n % world ranks hold one more
        filler = conversations[0] if conversations else dataset.conversation(indices[0])
        conversations += [filler] * (busiest - len(mine))
    positive_scores: list[float | None] = [None] * len(conversations)
    with whole_root(model):
        if labels:
            answers = []
            for k, conversation in enumerate(conversations):
                scores = torch.tensor(label_scores(model, processor, conversation, labels))
                answers.append(labels[int(scores.argmax())])
                if task.positive in labels:
                    positive_scores[k] = float(scores.softmax(0)[labels.index(task.positive)])
        else:
            answers = generate_answers(model, processor, conversations, batch_size, max_new_tokens)
    answers, positive_scores = answers[: len(mine)], positive_scores[: len(mine)]  # the padding's answers dropped
    local = []
    for i, answer, positive in zip(mine, answers, positive_scores, strict=True):
        record = dataset.records[i]
        entry = {"id": record.id, "source": record.source, "prompt": record.turns[-1].user, "prediction": answer,
                 "references": record.references, "score": task.sample_score(answer, record.references),
                 "images": [str(dataset.image_root / path) for path in record.image_paths]}  # fmt: skip
        if positive is not None:
            entry["positive_score"] = positive
        local.append(entry)
    if world > 1:
        gathered: list[list[dict]] = [[] for _ in range(world)]
        # Keyed by sample index, not record id: ids may repeat, and every sample keeps its prediction.
        dist.all_gather_object(gathered, list(zip(mine, local, strict=True)))
        by_index = dict(pair for part in gathered for pair in part)
        predictions = [by_index[i] for i in indices]
    else:
        predictions = local
    metrics = _score(task, predictions)
    sources = sorted({p["source"] for p in predictions})
    by_source = {}
    if len(sources) > 1:
        by_source = {s: _score(task, [p for p in predictions if p["source"] == s]) for s in sources}
    return Evaluation(metrics, predictions, by_source)


def _score(task: Task, predictions: list[dict]) -> dict[str, float]:
    positives = [p.get("positive_score") for p in predictions]
    return task.score(
        [p["prediction"] for p in predictions],
        [p["references"] for p in predictions],
        positive_scores=positives if positives and all(v is not None for v in positives) else None,
    )


def write_evaluation(
    evaluation: Evaluation,
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    samples: dict[str, int | str] | None = None,
) -> list:
    """``predictions.jsonl``, ``metrics.json`` and, for label-set scoring, ``confusion_matrix.png``.

    ``metrics.json`` holds the task's metrics, ``by_source`` when there are several sources, and ``samples`` when
    given: how many were evaluated, and what the length policy dropped or kept longer than ``max_length``
    (``data.dataset.apply_length_policy``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in evaluation.predictions)
    atomic_write_text(out / "predictions.jsonl", lines)
    metrics = {**evaluation.metrics, **({"by_source": evaluation.by_source} if evaluation.by_source else {})}
    if samples is not None:
        metrics["samples"] = {"evaluated": len(evaluation.predictions), **samples}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    written = [out / "predictions.jsonl", out / "metrics.json"]
    if labels:
        written.append(confusion_matrix_png(evaluation, labels, out / "confusion_matrix.png"))
    return written


def confusion_matrix_png(evaluation: Evaluation, labels: Sequence[str], path: Path) -> Path:
    """A confusion matrix (rows: reference, columns: prediction) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {label: k for k, label in enumerate(labels)}
    counts = torch.zeros(len(labels), len(labels), dtype=torch.long)
    for p in evaluation.predictions:
        truth = p["references"][0]
        if truth in index and p["prediction"] in index:
            counts[index[truth], index[p["prediction"]]] += 1
    size = max(4, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    for (r, c), value in zip(torch.cartesian_prod(torch.arange(len(labels)), torch.arange(len(labels))).tolist(),
                             counts.flatten().tolist(), strict=True):  # fmt: skip
        if value:
            ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, save)
    plt.close(fig)
    return path
