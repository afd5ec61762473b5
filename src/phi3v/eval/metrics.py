"""Task metrics as pure functions.

ANLS follows the standard DocVQA definition: per reference, ``NL = levenshtein(a, p) / max(len(a), len(p))``
after lower-casing and collapsing whitespace; the score is ``1 - NL`` when ``NL < threshold`` (0.5) and 0
otherwise; each question takes its best reference; the result is the mean over questions. The reference recipe's
variant differs in two ways: it keeps case (``"Paris"`` vs ``"paris"`` scores 0.8, not 1.0) and strips trailing
periods; ``anls(..., case_sensitive=True)`` reproduces the former.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import Levenshtein

_SPACES = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return _SPACES.sub(" ", text).strip()


def anls_score(
    prediction: str, references: Sequence[str], threshold: float = 0.5, case_sensitive: bool = False
) -> float:
    """ANLS of one prediction against all of its references (the best one counts).

    An empty prediction scores 0 against non-empty references.
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    best = 0.0
    p = normalize_whitespace(prediction)
    p = p if case_sensitive else p.lower()
    for reference in references:
        a = normalize_whitespace(reference)
        a = a if case_sensitive else a.lower()
        longest = max(len(a), len(p))
        if longest == 0:
            best = max(best, 1.0)
            continue
        distance = Levenshtein.distance(a, p) / longest
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def anls(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    threshold: float = 0.5,
    case_sensitive: bool = False,
) -> float:
    """Mean ANLS over questions."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scores = [anls_score(p, r, threshold, case_sensitive) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references (compare normalised strings)."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(p in set(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``positives`` (scikit-learn).

    Raises:
        ValueError: when only one class is present (AUROC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    if len(set(positives)) < 2:
        raise ValueError("AUROC needs both positive and negative examples")
    return float(roc_auc_score(list(positives), list(scores)))


def _same_length(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
