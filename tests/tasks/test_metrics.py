"""The metrics against independent implementations written from the scorers' specifications, and hand-worked values.

The oracles below never call phi3v: ``rrc_anls`` follows the RRC DocVQA scoring script (lower-case, whitespace
collapsed, edit distance over the raw upper-cased lengths, ``1 - min NL``, below 0.5 -> 0, mean over questions);
``recipe_anls`` follows the reference recipe (``strip().strip('.')`` prediction, case kept, ``NL < 0.5``); AUROC is
the Mann-Whitney statistic (the probability that a random positive outranks a random negative, ties counting half).
"""

import pytest

from phi3v.tasks.metrics import accuracy, anls, anls_reference_recipe, anls_score, auroc


def levenshtein(a: str, b: str) -> int:
    """Edit distance by the textbook dynamic programme (insert, delete, substitute at cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def rrc_anls(predictions, references):
    total = 0.0
    for prediction, answers in zip(predictions, references, strict=True):
        values = []
        for answer in answers:
            gt, det = " ".join(answer.strip().lower().split()), " ".join(prediction.strip().lower().split())
            length = max(len(answer.upper()), len(prediction.upper()))
            values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
        result = 1 - min(values)
        total += 0 if result < 0.5 else result
    return total / len(predictions)


def recipe_anls(predictions, references):
    total = 0.0
    for prediction, answers in zip(predictions, references, strict=True):
        p = prediction.strip().strip(".")
        if p:
            scores = [1 - levenshtein(a, p) / max(len(a), len(p)) for a in answers]
            total += max(s if s > 0.5 else 0.0 for s in scores)
    return total / len(predictions)


def mann_whitney_auc(scores, positives):
    pos = [s for s, y in zip(scores, positives, strict=True) if y]
    neg = [s for s, y in zip(scores, positives, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# (prediction, references, hand-worked RRC ANLS)
EDGE_CASES = [
    ("Paris", ["paris"], 1.0),  # case folded
    ("  new   york ", ["New York"], 1.0),  # whitespace collapsed, distance 0
    ("Inc", ["Inc."], 0.75),  # the period is a character: 1 edit over 4
    (".28", ["0.28"], 0.75),
    (".", [""], 0.0),  # 1 edit over 1
    ("", [""], 1.0),  # both empty: NL 0
    ("", ["answer"], 0.0),
    ("abcd", ["abce"], 0.75),
    ("abcd", ["abef"], 0.5),  # NL exactly 0.5: the script zeroes only scores below 0.5
    ("abcdef", ["abcxyz"], 0.5),
    ("abcdefg", ["abcwxyz"], 0.0),  # NL 4/7 > 0.5
    ("ab  c", ["abd"], 0.6),  # 2 edits on the normalised strings, over the raw length 5
    ("$5.00", ["five dollars", "$5.00", "5"], 1.0),  # best of several references
    ("1990.", ["1990", "MCMXC"], 0.8),
    ("ß", ["s"], 0.5),  # 'ß'.upper() is 'SS': the raw length is 2, 1 edit
    ("Zürich", ["zurich"], pytest.approx(5 / 6)),  # an accent is an edit
    ("東京", ["東京都"], pytest.approx(2 / 3)),
]


@pytest.mark.parametrize(("prediction", "references", "expected"), EDGE_CASES)
def test_anls_matches_the_rrc_script_on_edge_cases(prediction, references, expected):
    assert rrc_anls([prediction], [references]) == expected  # the oracle agrees with the hand-worked value
    assert anls_score(prediction, references) == pytest.approx(rrc_anls([prediction], [references]), abs=1e-12)


def test_anls_mean_over_questions_matches_the_oracle():
    predictions = [p for p, _, _ in EDGE_CASES]
    references = [r for _, r, _ in EDGE_CASES]
    assert anls(predictions, references) == pytest.approx(rrc_anls(predictions, references), abs=1e-12)
    assert anls([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        anls(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        anls_score("a", [])


def test_the_reference_recipe_variant_is_a_separate_number():
    cases = [("Paris", ["paris"]), ("Inc", ["Inc."]), ("1990.", ["1990"]), ("abcd", ["abef"]), ("", ["x"]),
             (" . ", ["a"]), ("Zürich", ["Zurich", "ZÜRICH"])]  # fmt: skip
    predictions, references = [p for p, _ in cases], [r for _, r in cases]
    assert anls_reference_recipe(predictions, references) == pytest.approx(recipe_anls(predictions, references))
    # hand-worked: case kept (0.8), "Inc" vs "Inc." 0.75, period stripped (1.0), boundary 0, empty 0, "." -> empty 0
    assert anls_reference_recipe(["Paris"], [["paris"]]) == pytest.approx(0.8)
    assert anls_reference_recipe(["1990."], [["1990"]]) == 1.0
    assert anls_reference_recipe(["abcd"], [["abef"]]) == 0.0


def test_accuracy_and_auroc():
    assert accuracy(["yes", "no", "no"], [["yes"], ["yes"], ["no", "nope"]]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    scores = [0.9, 0.8, 0.3, 0.1, 0.8, 0.5]
    positives = [True, False, True, False, True, False]
    assert auroc(scores, positives) == pytest.approx(mann_whitney_auc(scores, positives))  # with a tie
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.5, 0.2], [True, True])
