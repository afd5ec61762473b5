import pytest

from phi3v.tasks import TASKS, get_task


def test_docvqa_reports_the_standard_anls_and_the_recipe_variant_beside_it():
    docvqa = get_task("docvqa")
    assert docvqa.prompt("What is the total?") == "What is the total?\nAnswer briefly."
    # The cases: standard ANLS (hand-worked) 0.75, 0.75, 0; the recipe strips periods and keeps case.
    result = docvqa.score(["Inc", ".28", "."], [["Inc."], ["0.28"], [""]])
    assert list(result) == ["anls", "anls_reference_recipe"]  # the standard metric first
    assert result["anls"] == pytest.approx((0.75 + 0.75 + 0.0) / 3)
    assert result["anls_reference_recipe"] == pytest.approx((0.75 + 0.0 + 0.0) / 3)  # ".28" -> "28": 2 edits of 4
    assert docvqa.sample_score("Inc", ["Inc."]) == pytest.approx(0.75)
    assert docvqa.score(["PARIS"], [["paris"]]) == {"anls": 1.0, "anls_reference_recipe": 0.0}


def test_label_tasks_report_exact_accuracy_and_the_recipe_accuracy_beside_it():
    memes = get_task("hateful_memes")
    result = memes.score([" yes", "Yes.", "no", "NO"], [["yes"], ["yes"], ["yes"], ["no"]],
                         positive_scores=[0.9, 0.8, 0.2, 0.1])  # fmt: skip
    assert list(result) == ["accuracy", "auroc", "accuracy_reference_recipe"]
    assert result["accuracy"] == pytest.approx(1 / 4)  # only " yes" matches exactly (surrounding space removed)
    assert result["accuracy_reference_recipe"] == pytest.approx(3 / 4)
    assert result["auroc"] == pytest.approx(1.0)  # yes-scores 0.9, 0.8, 0.2 against no-score 0.1
    assert memes.sample_score("Yes.", ["yes"]) == 0.0 and memes.sample_score("yes\n", ["yes"]) == 1.0
    assert get_task("nlvr2").labels == ("false", "true")
    assert get_task("ucf101").prompt(["A", "B"]) == "Classify the video into one of the following classes: A, B."
    assert get_task("digits").labels == tuple("0123456789")


def test_every_task_scores_a_perfect_answer_one():
    for task in TASKS.values():
        metric = task.score(["x"], [["x"]])
        assert set(metric.values()) == {1.0}, task.name


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'vqa'; choose one of"):
        get_task("vqa")
