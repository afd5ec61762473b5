"""Task metrics as pure functions, each computed exactly as the scorer whose numbers it is compared with.

* ``anls``: DocVQA's ANLS as the official Robust Reading Competition (RRC) scoring script computes it. Per
  reference answer ``a`` and prediction ``p``: both are lower-cased and their whitespace collapsed
  (``" ".join(s.strip().lower().split())``); ``NL = levenshtein(a', p') / max(len(A), len(P))``, where the
  length is that of the *raw* strings upper-cased, as the script measures it (0 when both are empty: ``NL = 0``);
  the question scores ``1 - min(NL)`` over its references, set to 0 when that is below the threshold 0.5
  (so ``NL = 0.5`` still scores 0.5, as in the script). ANLS is the mean over questions. Nothing else is
  normalised: periods, punctuation and unicode count as characters.
* ``anls_reference_recipe``: the reference recipe's (Phi-3 CookBook) variant, which its published DocVQA table
  uses: the prediction is cleaned with ``strip().strip(".")``, case is kept, whitespace is not collapsed,
  ``NL < 0.5`` counts (``NL = 0.5`` scores 0), an empty prediction scores 0.
* ``accuracy``: the fraction of predictions equal to one of their references (the caller normalises).
* ``auroc``: area under the ROC curve (scikit-learn's ``roc_auc_score``).
"""

from __future__ import annotations

from collections.abc import Sequence

import Levenshtein

ANLS_THRESHOLD = 0.5


def _rrc_normalize(text: str) -> str:
    """The RRC script's normalisation: surrounding whitespace removed, lower-cased, runs of whitespace -> one space."""
    return " ".join(text.strip().lower().split())


def anls_score(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against all of its references, as the RRC DocVQA script scores a question.

    Raises:
        ValueError: without references.
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    p = _rrc_normalize(prediction)
    distances = []
    for reference in references:
        # The script divides by the raw lengths (upper-cased), not the normalised ones.
        length = max(len(reference.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else Levenshtein.distance(_rrc_normalize(reference), p) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = ANLS_THRESHOLD) -> float:
    """Mean RRC ANLS over questions (0.0 for no questions)."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    return sum(anls_score(p, r, threshold) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def anls_reference_recipe_score(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The reference recipe's ANLS of one question (case-sensitive; prediction cleaned with ``strip().strip('.')``).

    Raises:
        ValueError: without references.
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    p = prediction.strip().strip(".")
    if not p:
        return 0.0
    best = 0.0
    for reference in references:
        distance = Levenshtein.distance(reference, p) / max(len(reference), len(p))
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def anls_reference_recipe(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean of ``anls_reference_recipe_score`` over questions (0.0 for no questions)."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scores = [anls_reference_recipe_score(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references (pass normalised strings)."""
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
