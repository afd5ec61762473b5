import pytest

from phi3v.tasks import TASKS, get_task


def test_each_task_scores_with_its_own_normalisation():
    docvqa = get_task("docvqa")
    assert docvqa.prompt("What is the total?") == "What is the total?\nAnswer briefly."
    assert docvqa.score(["  $5.00. "], [["$5.00"]]) == {"anls": 1.0}
    memes = get_task("hateful_memes")
    result = memes.score(["Yes.", "no", "NO"], [["yes"], ["yes"], ["no"]], positive_scores=[0.9, 0.2, 0.1])
    assert result["accuracy"] == pytest.approx(2 / 3) and result["auroc"] == pytest.approx(1.0)
    assert get_task("nlvr2").labels == ("false", "true")
    assert get_task("ucf101").prompt(["A", "B"]) == "Classify the video into one of the following classes: A, B."
    assert get_task("digits").labels == tuple("0123456789")


def test_every_task_has_a_working_metric():
    for task in TASKS.values():
        metric = task.score(["x"], [["x"]])
        assert list(metric.values()) == [1.0], task.name


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'vqa'; choose one of"):
        get_task("vqa")
