"""Tasks: each owns its prompt, answer normalisation, metrics and (for classification) label set.

Converters write prompts through the task, evaluation scores through it, so a task's wording and its scoring can
never drift apart. Each task reports its standard metric first, under its standard name, computed as the
standard scorer does (see ``phi3v.tasks.metrics``); the reference recipe's friendlier variant follows under its
own name (``*_reference_recipe``), never in its place:

==============  =========================================  ===================================================
task            standard metric                            beside it
==============  =========================================  ===================================================
docvqa          ``anls`` (RRC script)                      ``anls_reference_recipe``
hateful_memes   ``accuracy``, ``auroc`` (label-set runs)   ``accuracy_reference_recipe``
others          ``accuracy``                               ``accuracy_reference_recipe``
==============  =========================================  ===================================================

``accuracy`` is an exact match of the answer with a reference after removing surrounding whitespace only (what
generation leaves around the answer); ``accuracy_reference_recipe`` first applies the recipe's
``strip().strip(".").lower()`` to both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from phi3v.tasks import metrics


def exact_answer(text: str) -> str:
    """The standard metrics' view of an answer: surrounding whitespace removed, nothing else."""
    return text.strip()


def recipe_answer(text: str) -> str:
    """The reference recipe's cleanup of label answers: ``strip().strip(".").lower()``."""
    return text.strip().strip(".").lower()


@dataclass(frozen=True)
class Task:
    """A task definition.

    Attributes:
        name: Registry name.
        metric: ``"anls"`` or ``"accuracy"``: the standard metric, reported first.
        prompt: Builds the user text from the task's fields (question, caption, class list ...).
        labels: The answer set of a classification task (``None``: open answers, or read from the dataset).
        positive: The label whose probability AUROC ranks (hateful memes: ``"yes"``).
    """

    name: str
    metric: Literal["anls", "accuracy"]
    prompt: Callable[..., str]
    labels: tuple[str, ...] | None = None
    positive: str | None = None

    def sample_score(self, prediction: str, references: Sequence[str]) -> float:
        """The standard metric of one prediction (its ANLS, or 1/0 for an exact match)."""
        if self.metric == "anls":
            return metrics.anls_score(prediction, references)
        return float(exact_answer(prediction) in {exact_answer(r) for r in references})

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        positive_scores: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """The task's metrics over predictions (raw model text) and their reference answers.

        Args:
            predictions: Model answers.
            references: Accepted answers of each question.
            positive_scores: For tasks with a ``positive`` label, the model's score (e.g. probability) of that
                label per question; adds ``auroc``.

        Returns:
            The standard metric first, then ``auroc`` (when scored), then the reference recipe's variant.
        """
        if self.metric == "anls":
            return {
                "anls": metrics.anls(predictions, references),
                "anls_reference_recipe": metrics.anls_reference_recipe(predictions, references),
            }
        exact = [[exact_answer(r) for r in rs] for rs in references]
        result = {"accuracy": metrics.accuracy([exact_answer(p) for p in predictions], exact)}
        if positive_scores is not None and self.positive is not None:
            result["auroc"] = metrics.auroc(positive_scores, [self.positive in rs for rs in exact])
        recipe = [[recipe_answer(r) for r in rs] for rs in references]
        result["accuracy_reference_recipe"] = metrics.accuracy([recipe_answer(p) for p in predictions], recipe)
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
        Task("docvqa", "anls", _docvqa_prompt),
        Task("hateful_memes", "accuracy", _memes_prompt, ("no", "yes"), positive="yes"),
        Task("nlvr2", "accuracy", _nlvr2_prompt, ("false", "true")),
        Task("ucf101", "accuracy", _class_list_prompt),  # labels: the converted classes (ucf101_meta.json)
        Task("image_classification", "accuracy", lambda classes: _class_list_prompt(classes, "image")),
        Task("digits", "accuracy", _digit_prompt, DIGITS),
        Task("digits_pair", "accuracy", _digit_pair_prompt, ("no", "yes")),
        Task("digits_video", "accuracy", _digit_video_prompt, DIGITS),
        Task("generic", "accuracy", _generic_prompt),
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
