import json

import pytest
import torch
from PIL import Image

from phi3v.cli import main
from phi3v.data.dataset import JsonlDataset
from phi3v.eval.evaluate import evaluate, write_evaluation
from phi3v.eval.generate import generate_answers, label_scores
from phi3v.eval.inference import load_for_inference
from phi3v.tasks import get_task


@pytest.fixture
def loaded(lora_run):
    return load_for_inference(lora_run / "final" / "base", lora_run / "final")


def test_batched_generation_equals_one_by_one(loaded, digits):
    model, processor = loaded
    dataset = JsonlDataset(digits / "digits_pair_val.jsonl", digits / "images")
    conversations = [dataset.conversation(i) for i in range(5)]
    batched = generate_answers(model, processor, conversations, batch_size=5, max_new_tokens=6)
    single = [generate_answers(model, processor, [c], batch_size=1, max_new_tokens=6)[0] for c in conversations]
    assert batched == single


def test_label_scores_are_the_log_likelihood_of_each_answer(loaded, digits):
    model, processor = loaded
    conversation = JsonlDataset(digits / "digits_val.jsonl", digits / "images").conversation(0)
    labels = ["3", "7", "yes"]
    scores = label_scores(model, processor, conversation, labels)
    for label, score in zip(labels, scores, strict=True):  # reference: one plain forward per label
        from phi3v.processing import Conversation, Turn

        turn = conversation.turns[-1]
        sample = processor.encode(Conversation([Turn(turn.user, turn.images, label)]))
        logits = model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
                       image_sizes=sample.image_sizes).logits[0]  # fmt: skip
        supervised = (sample.labels != -100).nonzero()[:, 0]
        logprobs = torch.log_softmax(logits[supervised - 1].float(), -1)
        want = logprobs.gather(-1, sample.labels[supervised][:, None]).sum()
        assert score == pytest.approx(float(want), abs=1e-3)


def test_label_set_evaluation_with_auroc_and_outputs(loaded, digits, tmp_path):
    model, processor = loaded
    dataset = JsonlDataset(digits / "digits_pair_val.jsonl", digits / "images")
    task = get_task("hateful_memes")  # the same yes/no label set, with AUROC on "yes"
    result = evaluate(model, processor, dataset, task, max_samples=12, labels=["no", "yes"])
    assert list(result.metrics) == ["accuracy", "auroc", "accuracy_reference_recipe"]
    assert 0 <= result.metrics["auroc"] <= 1
    assert all(p["prediction"] in ("no", "yes") and 0 <= p["positive_score"] <= 1 for p in result.predictions)
    assert result.metrics["accuracy"] == pytest.approx(sum(p["score"] for p in result.predictions) / 12)
    written = write_evaluation(result, tmp_path / "out", ["no", "yes"])
    assert [p.name for p in written] == ["predictions.jsonl", "metrics.json", "confusion_matrix.png"]
    assert Image.open(written[2]).format == "PNG"
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) >= {"id", "prompt", "prediction", "references", "score"}


def test_eval_and_generate_commands(lora_run, digits, tmp_path, capsys):
    args = ["--model", str(lora_run / "final" / "base"), "--adapter", str(lora_run / "final")]
    assert main(["eval", *args, "--data", str(digits / "digits_val.jsonl"), "--image-root", str(digits / "images"),
                 "--task", "digits", "--out", str(tmp_path / "ev"), "--max-samples", "4"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(metrics) == ["accuracy", "accuracy_reference_recipe"]
    image = digits / "images" / "digits" / "0000.png"
    assert main(["generate", *args, "--image", str(image), "--no-stream", "--max-new-tokens", "3", "Which?"]) == 0
    with pytest.raises(SystemExit):
        main(["eval", *args])  # missing --data: argparse explains
    assert "error" in capsys.readouterr().err


def test_eval_spreads_over_ranks_under_torchrun_and_keeps_duplicate_ids(lora_run, digits, tmp_path):
    """Two ranks give the one-rank predictions, in order, also when records share an id (here six different
    samples, all with the id ``same``: a gather keyed by id would keep one of them six times)."""
    import subprocess
    import sys

    records = [json.loads(line) for line in (digits / "digits_val.jsonl").read_text().splitlines()[:6]]
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("".join(json.dumps({**r, "id": "same"}) + "\n" for r in records))
    args = ["--model", str(lora_run / "final" / "base"), "--adapter", str(lora_run / "final"),
            "--data", str(doubled), "--image-root", str(digits / "images"), "--task", "digits",
            "--max-new-tokens", "4"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "phi3v", "eval", *args, "--out", str(tmp_path / "one")], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "phi3v", "eval", *args, "--out", str(tmp_path / "two")],
                   check=True, capture_output=True)  # fmt: skip
    one = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert one == (tmp_path / "two" / "predictions.jsonl").read_text()
    references = [json.loads(line)["references"] for line in one.splitlines()]
    assert references == [r["references"] for r in records]
    assert len(set(map(str, references))) > 1  # the samples differ, so a collapsed gather would show
    assert (tmp_path / "one" / "metrics.json").read_text() == (tmp_path / "two" / "metrics.json").read_text()


def test_eval_modules_import_along_the_data_flow():
    """generate.py answers; evaluate.py scores what it answers; inference.py loads. None imports back up."""
    import ast
    from pathlib import Path

    import phi3v.eval

    def imports(name):
        tree = ast.parse((Path(phi3v.eval.__file__).parent / f"{name}.py").read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {m.rsplit(".", 1)[-1] for m in found if m.startswith("phi3v.eval")}

    assert imports("generate") == set()
    assert imports("inference") == set()
    assert imports("evaluate") == {"generate"}


def test_a_mixed_file_is_scored_per_source_too(loaded, digits, tmp_path):
    model, processor = loaded
    lines = []
    for name, source in (("digits_val", "one"), ("digits_pair_val", "pair")):
        for line in (digits / f"{name}.jsonl").read_text().splitlines()[:4]:
            lines.append(json.dumps({**json.loads(line), "source": source}))
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    dataset = JsonlDataset(tmp_path / "mixed.jsonl", digits / "images")
    result = evaluate(model, processor, dataset, get_task("generic"), max_new_tokens=3)
    assert [p["source"] for p in result.predictions] == ["one"] * 4 + ["pair"] * 4
    assert [len(p["images"]) for p in result.predictions] == [1] * 4 + [2] * 4
    assert all(Image.open(path).format == "PNG" for p in result.predictions for path in p["images"])
    for source, part in (("one", result.predictions[:4]), ("pair", result.predictions[4:])):
        assert result.by_source[source]["accuracy"] == pytest.approx(sum(p["score"] for p in part) / 4)
    write_evaluation(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["by_source"] == result.by_source


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """The tiny model and its processor, saved (no training: these tests count samples, not answers)."""
    from phi3v import build_model
    from phi3v.processing import Phi3VProcessor

    out = tmp_path_factory.mktemp("untrained")
    build_model("tiny").save_pretrained(out)
    Phi3VProcessor.tiny(num_crops=1).save_pretrained(out)
    return out


def _lengthened(digits, tmp_path, field, lines):
    """The first 10 digits validation records, with a 600-character prompt or answer on the given lines (the tiny
    model's samples are 80 tokens with num_crops 1: these are far over max_length 128, the others under)."""
    records = [json.loads(line) for line in (digits / "digits_val.jsonl").read_text().splitlines()[:10]]
    for line in lines:
        turn = records[line - 1]["conversations"][-1]
        turn[field] = turn[field] + " Look closely." * 40 if field == "user" else "7" * 600
    path = tmp_path / f"long_{field}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_eval_applies_train_s_length_policy_and_counts_what_it_drops(untrained, digits, tmp_path, capsys):
    """Exactly 3 prompts are too long: error names each with file, line and id; drop evaluates the other 7 and
    counts 3 in metrics.json and on stdout; truncate never cuts a prompt, so it stops too."""
    path, records = _lengthened(digits, tmp_path, "user", (2, 5, 9))
    args = ["eval", "--model", str(untrained), "--data", str(path), "--image-root", str(digits / "images"),
            "--task", "digits", "--max-new-tokens", "2", "--max-length", "128"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "error")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phi3v: error: 3 sample(s) of {path} cannot be used")
    for line in (2, 5, 9):
        assert f"{path}:{line} (id {records[line - 1]['id']}): " in err
    assert err.count("longer than max_length 128 (on_overflow: error") == 3 and not (tmp_path / "error").exists()

    assert main([*args, "--on-overflow", "drop", "--out", str(tmp_path / "drop")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "drop" / "metrics.json").read_text())
    assert metrics["samples"] == {"evaluated": 7, "max_length": 128, "on_overflow": "drop", "dropped": 3,
                                  "truncated": 0, "bad_images": 0}  # fmt: skip
    predicted = [json.loads(line)["id"] for line in (tmp_path / "drop" / "predictions.jsonl").read_text().splitlines()]
    assert predicted == [r["id"] for n, r in enumerate(records, 1) if n not in (2, 5, 9)]
    assert "evaluated 7 sample(s); longer than max_length 128 (on_overflow: drop): 3 dropped, 0 truncated" in out

    assert main([*args, "--on-overflow", "truncate", "--out", str(tmp_path / "truncate")]) == 2
    err = capsys.readouterr().err
    assert err.count("never cuts a prompt to evaluate") == 3 and f"{path}:5 (id {records[4]['id']}): " in err


def test_eval_truncate_keeps_a_sample_whose_prompt_fits_and_counts_it(untrained, digits, tmp_path, capsys):
    """Exactly 2 answers are too long, their prompts fit: truncate evaluates all 10 (2 counted as truncated), drop
    evaluates 8; --on-overflow alone is refused."""
    path, _ = _lengthened(digits, tmp_path, "assistant", (3, 7))
    args = ["eval", "--model", str(untrained), "--data", str(path), "--image-root", str(digits / "images"),
            "--task", "digits", "--max-new-tokens", "2", "--max-length", "128"]  # fmt: skip
    for policy, evaluated, dropped, truncated in (("truncate", 10, 0, 2), ("drop", 8, 2, 0)):
        assert main([*args, "--on-overflow", policy, "--out", str(tmp_path / policy)]) == 0
        samples = json.loads((tmp_path / policy / "metrics.json").read_text())["samples"]
        assert (samples["evaluated"], samples["dropped"], samples["truncated"]) == (evaluated, dropped, truncated)
        assert f"{dropped} dropped, {truncated} truncated" in capsys.readouterr().out
    assert main([*args[:-2], "--on-overflow", "drop"]) == 2
    want = "phi3v: error: --on-overflow drop needs --max-length N (the length it applies to)\n"
    assert capsys.readouterr().err == want
