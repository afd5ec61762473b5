"""``phi3v report`` on runs written by hand (every expected number is in the files below), and its page in Chromium."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from phi3v.cli import main
from phi3v.report import confusion, curves, gallery_items, length_counts, load_run, task_metrics, write_report
from phi3v.tasks import TASKS
from tests.chromium import browser  # noqa: F401 - the fixture


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root, name="run", lr=0.003):
    """A finished run: 4 steps, evaluations at steps 2 and 4 on a validation file mixing two tasks, the last
    one's predictions, and an evaluation of ``digits`` after training."""
    run = root / name
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for digit, shade in ((3, 40), (5, 200)):
        Image.new("L", (8, 8), shade).save(images / f"{digit}.png")
    _jsonl(run / "log.jsonl", [
        {"step": 1, "loss": 2.0, "lr": lr, "dropped": 1}, {"step": 2, "loss": 1.5, "lr": lr, "dropped": 3},
        {"step": 2, "eval/accuracy": 0.5, "eval/digits/accuracy": 0.25, "eval/digits_pair/accuracy": 0.75},
        {"step": 4, "loss": 0.75, "lr": lr, "dropped": 3},
        {"step": 4, "eval/accuracy": 0.625, "eval/digits/accuracy": 0.5, "eval/digits_pair/accuracy": 0.75},
    ])  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"steps": 4, "losses": [2.0, 1.8, 1.5, 0.75], "dropped": 3,
                                                  "length_policy": {"policy": "truncate", "truncated": 2},
                                                  "final": str(run / "final"), "best": 0.625}))  # fmt: skip
    (run / "config.yaml").write_text(f"model: tiny\ntask: generic\nlr: {lr}\nstrategy: lora\n")
    (run / "environment.json").write_text(json.dumps({"versions": {"torch": "9.9.9"}, "hardware": {
        "cpu": "x86_64", "cpu_count": 2, "gpus": ["Imaginary GPU"], "cuda": "12.8", "platform": "Linux"}}))  # fmt: skip
    img3, img5 = str(images / "3.png"), str(images / "5.png")
    _jsonl(run / "eval" / "training" / "predictions.jsonl", [
        {"id": "t1", "source": "digits", "prompt": "Which digit?", "prediction": "3", "references": ["3"], "score": 1.0,
         "images": [img3]},
        {"id": "t2", "source": "digits_pair", "prompt": "Same digit?", "prediction": "no", "references": ["yes"],
         "score": 0.0, "images": [img3, img5]},
    ])  # fmt: skip
    (run / "eval" / "training" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "by_source": {
        "digits": {"accuracy": 1.0}, "digits_pair": {"accuracy": 0.0}}}))  # fmt: skip
    after = root / f"{name}-eval" / "digits"
    _jsonl(after / "predictions.jsonl", [
        {"id": "d1", "prompt": "Which digit?", "prediction": "3", "references": ["3"], "score": 1.0, "images": [img3]},
        {"id": "d2", "prompt": "Which digit?", "prediction": "5", "references": ["3"], "score": 0.0, "images": [img3]},
        {"id": "d3", "prompt": "Which <b>digit</b>?", "prediction": "banana", "references": ["5"], "score": 0.0,
         "images": [img5, str(images / "gone.png")]},
    ])  # fmt: skip
    (after / "metrics.json").write_text(json.dumps({"accuracy": 1 / 3}))
    return run, after


def test_numbers_read_from_the_run(tmp_path):
    run_dir, after = make_run(tmp_path)
    run = load_run(run_dir, [after])
    assert task_metrics(run) == {
        "all": {"during training (step 4)": {"accuracy": 0.625}},
        "digits": {"during training (step 4)": {"accuracy": 0.5}, "after training (digits)": {"accuracy": 1 / 3}},
        "digits_pair": {"during training (step 4)": {"accuracy": 0.75}},
    }
    assert curves(run) == {"all": [(2, 0.5), (4, 0.625)], "digits": [(2, 0.25), (4, 0.5)],
                           "digits_pair": [(2, 0.75), (4, 0.75)]}  # fmt: skip
    assert length_counts(run) == {"dropped": 3, "length_policy.truncated": 2}
    digits = next(e for e in run.evaluations if e.name == "digits")
    labels, counts = confusion(digits, TASKS["digits"])
    assert labels == [str(d) for d in range(10)]
    expected = [[0] * 11 for _ in range(10)]
    expected[3][3], expected[3][5], expected[5][10] = 1, 1, 1  # 3->3, 3->5, 5->"banana" (other)
    assert counts == expected
    chosen, total = gallery_items(run, cap=2)
    assert total == 3 and [p["id"] for p in chosen] == ["d2", "d3"]  # the errors, not the right one


def test_report_page_is_self_contained_with_every_section(tmp_path, capsys):
    run_dir, after = make_run(tmp_path)
    assert main(["report", str(run_dir), "--eval", str(after), "--gallery", "2"]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert str(run_dir / "report" / "index.html") in capsys.readouterr().out
    for text in ("Metrics per task", "digits_pair", "0.625", "Confusion matrices", "2 of 3 predictions",
                 "at most 2 per run", "dropped: 3, length_policy.truncated: 2", "torch 9.9.9", "Imaginary GPU",
                 "Which &lt;b&gt;digit&lt;/b&gt;?", "banana", "class='missing'", "data:image/png;base64,"):  # fmt: skip
        assert text in page, text
    assert "http://" not in page and "https://" not in page and "src='/" not in page  # nothing to fetch
    assert page.count("class='card ") == 2 and "Which <b>digit" not in page


def test_several_runs_side_by_side_with_config_differences(tmp_path):
    first, _ = make_run(tmp_path / "a", "run")
    second, _ = make_run(tmp_path / "b", "run", lr=0.001)
    page = write_report([first, second], tmp_path / "both.html").read_text()
    assert "run (a)" in page and "run (b)" in page
    diff = page[page.index("Settings that differ") : page.index("</table>", page.index("Settings that differ"))]
    assert "<td>lr</td><td>0.003</td><td>0.001</td>" in diff and "strategy" not in diff
    with pytest.raises(ValueError, match="--eval folders go with one run"):
        write_report([first, second], tmp_path / "x.html", evals=[tmp_path])


def test_report_of_a_folder_that_is_no_run(tmp_path):
    assert main(["report", str(tmp_path)]) == 2


def test_report_gallery_filters_in_chromium(tmp_path, browser):  # noqa: F811
    run_dir, after = make_run(tmp_path)
    page = write_report(run_dir, evals=[after])
    browser.get(page.as_uri())
    cards = browser.find_elements("css selector", ".card")
    assert len(cards) == 3 and all(c.is_displayed() for c in cards)
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    browser.find_element("css selector", "#f-verdict option[value='right']").click()
    assert [c.get_attribute("data-verdict") for c in cards if c.is_displayed()] == ["right"]
    assert browser.find_element("id", "f-count").text == "1 shown"
    browser.find_element("css selector", "#f-verdict option[value='wrong']").click()
    assert sum(c.is_displayed() for c in cards) == 2
