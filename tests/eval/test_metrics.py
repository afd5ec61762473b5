import pytest

from phi3v.eval.metrics import accuracy, anls, anls_score, auroc


def test_anls_hand_computed_cases():
    assert anls_score("Paris", ["paris"]) == 1.0  # case folded, as the standard ANLS does
    assert anls_score("Paris", ["paris"], case_sensitive=True) == pytest.approx(0.8)  # the reference recipe's variant
    assert anls_score("  new   york ", ["New York"]) == 1.0  # whitespace collapsed
    assert anls_score("abcd", ["abce"]) == pytest.approx(0.75)  # 1 edit in 4
    assert anls_score("ab", ["cd"]) == 0.0
    # the threshold edge: NL = 0.5 scores 0 (strictly below 0.5 counts), NL = 0.4 scores 0.6
    assert anls_score("abcd", ["abef"]) == 0.0
    assert anls_score("abcde", ["abcxy"]) == pytest.approx(0.6)
    assert anls_score("$5.00", ["five dollars", "$5.00", "5"]) == 1.0  # best of several references
    assert anls_score("", ["answer"]) == 0.0  # an empty prediction
    assert anls_score("1990.", ["1990"]) == pytest.approx(0.8)  # punctuation counts as an edit (tasks strip it first)
    assert anls(["paris", "ab"], [["Paris"], ["cd"]]) == pytest.approx(0.5)


def test_accuracy_and_auroc():
    assert accuracy(["yes", "no", "no"], [["yes"], ["yes"], ["no", "nope"]]) == pytest.approx(2 / 3)
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.5, 0.2], [True, True])
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        accuracy(["a", "b"], [["a"]])
