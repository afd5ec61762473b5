"""Tasks: each owns its prompt, answer normalisation, metric and (for classification) label set.

Converters write prompts through the task, evaluation scores through it, so a task's wording and its scoring can
never drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from phi3v.eval import metrics


def strip_answer(text: str) -> str:
    """The reference recipe's cleanup: surrounding whitespace and trailing/leading periods removed."""
    return text.strip().strip(".").strip()


def classify_answer(text: str) -> str:
    """Cleanup for label answers: as ``strip_answer``, lower-cased, whitespace collapsed."""
    return re.sub(r"\s+", " ", strip_answer(text)).lower()


@dataclass(frozen=True)
class Task:
    """A task definition.

    Attributes:
        name: Registry name.
        metric: ``"anls"`` or ``"accuracy"``.
        prompt: Builds the user text from the task's fields (question, caption, class list ...).
        normalize: Applied to predictions and references before scoring.
        labels: The answer set of a classification task (``None``: open answers, or read from the dataset).
        positive: The label whose probability AUROC ranks (hateful memes: ``"yes"``).
    """

    name: str
    metric: Literal["anls", "accuracy"]
    prompt: Callable[..., str]
    normalize: Callable[[str], str]
    labels: tuple[str, ...] | None = None
    positive: str | None = None

    def sample_score(self, prediction: str, references: Sequence[str]) -> float:
        """The metric of one prediction (ANLS, or 1/0 for an exact match after normalisation)."""
        p, refs = self.normalize(prediction), [self.normalize(r) for r in references]
        if self.metric == "anls":
            return metrics.anls_score(p, refs)
        return float(p in refs)

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        positive_scores: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """The task's metric over predictions (raw model text) and their reference answers.

        Args:
            predictions: Model answers.
            references: Accepted answers of each question.
            positive_scores: For tasks with a ``positive`` label, the model's score (e.g. probability) of that
                label per question; adds ``auroc``.
        """
        preds = [self.normalize(p) for p in predictions]
        refs = [[self.normalize(r) for r in rs] for rs in references]
        if self.metric == "anls":
            return {"anls": metrics.anls(preds, refs)}
        result = {"accuracy": metrics.accuracy(preds, refs)}
        if positive_scores is not None and self.positive is not None:
            result["auroc"] = metrics.auroc(positive_scores, [self.positive in r for r in refs])
        return result


def _docvqa_prompt(question: str) -> str:
    return f"{question}\nAnswer briefly."  # the reference recipe's DocVQA prompt


def _memes_prompt(text: str) -> str:
    return f'The text on this meme reads: "{text}"\nIs this meme hateful? Answer yes or no.'


def _nlvr2_prompt(sentence: str) -> str:
    return f'Is this statement about the two images true or false? "{sentence}"\nAnswer true or false.'


def _class_list_prompt(classes: Sequence[str], what: str = "video") -> str:
    return f"Classify the {what} into one of the following classes: {', '.join(classes)}."


def _digit_prompt() -> str:
    return "Which digit is written in this image? Answer with one digit."


def _digit_pair_prompt() -> str:
    return "Do these two images show the same digit? Answer yes or no."


def _digit_video_prompt() -> str:
    return "These frames show one digit written several times. Which digit is it? Answer with one digit."


def _generic_prompt(question: str) -> str:
    return question


DIGITS = tuple(str(d) for d in range(10))

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("docvqa", "anls", _docvqa_prompt, strip_answer),
        Task("hateful_memes", "accuracy", _memes_prompt, classify_answer, ("no", "yes"), positive="yes"),
        Task("nlvr2", "accuracy", _nlvr2_prompt, classify_answer, ("false", "true")),
        Task("ucf101", "accuracy", _class_list_prompt, classify_answer),  # labels: the converted class subset
        Task("image_classification", "accuracy", lambda classes: _class_list_prompt(classes, "image"), classify_answer),
        Task("digits", "accuracy", _digit_prompt, classify_answer, DIGITS),
        Task("digits_pair", "accuracy", _digit_pair_prompt, classify_answer, ("no", "yes")),
        Task("digits_video", "accuracy", _digit_video_prompt, classify_answer, DIGITS),
        Task("generic", "accuracy", _generic_prompt, classify_answer),
    ]
}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
