import json
import os

import numpy as np
import pytest
from PIL import Image

from phi3v.cli import main
from phi3v.data.check import check_file
from phi3v.data.dataset import DataError, JsonlDataset, read_records
from phi3v.processing import Conversation, Phi3VProcessor, Sample


def _turn(images, user="What is it?", assistant="a cat"):
    return {"images": images, "user": user, "assistant": assistant}


def _record(rid, images=("ok.png",), **turn):
    return {"id": rid, "source": "test", "conversations": [_turn(list(images), **turn)]}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "ok.png")
    Image.new("RGB", (30, 30)).save(root / "big.png")
    (root / "corrupt.png").write_bytes((root / "big.png").read_bytes()[:60])
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "link.png")
    lines = [
        json.dumps(_record("a")),  # 1 fine
        '{"id": "b", "source": ',  # 2 bad JSON
        json.dumps({"id": "c", "conversations": [_turn(["ok.png"])]}),  # 3 missing source
        json.dumps({"id": "d", "source": "t", "conversations": [_turn("ok.png")]}),  # 4 images not a list
        json.dumps(_record("e", ["missing.png"])),  # 5 missing image
        json.dumps(_record("f", ["corrupt.png"])),  # 6 corrupt image
        json.dumps(_record("g", ["../outside.png"])),  # 7 escapes the root
        json.dumps(_record("h", ["/etc/passwd"])),  # 8 absolute
        json.dumps(_record("i", ["ok.png"], user="<|image_1|> and <|image_2|>")),  # 9 tags do not match
        json.dumps(_record("j", assistant="  ")),  # 10 empty answer
        json.dumps(_record("a", ["big.png"])),  # 11 duplicate id
        json.dumps(_record("k", ["link.png"])),  # 12 symlink out of the root
        json.dumps(_record("l", ["ok.png", "big.png"], user="Two: <|image_2|> <|image_1|>")),  # 13 fine
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root


EXPECTED = {
    2: "invalid JSON",
    3: "source: missing",
    4: "conversations[0].images: expected a list",
    5: "image file not found",
    6: "cannot read image",
    7: "escapes the image root",
    8: "is absolute",
    9: "image tags ['<|image_1|>', '<|image_2|>'] do not match its 1 image(s)",
    10: "conversations[0].assistant: empty answer",
    11: "duplicate id 'a' (first on line 1)",
    12: "resolves outside the image root",
}


def test_every_defect_is_reported_at_its_line(data):
    path, root = data
    report = check_file(path, root, Phi3VProcessor.tiny(num_crops=4), max_length=60, progress=False,
                        on_overflow="drop")  # fmt: skip
    by_line = {}
    for problem in report.problems:
        location, message = problem.split(": ", 1)
        assert location.startswith(f"{path}:")
        by_line.setdefault(int(location.rsplit(":", 1)[1]), []).append(message)
    assert set(by_line) == set(EXPECTED)
    for line, expected in EXPECTED.items():
        assert any(expected in message for message in by_line[line]), (line, by_line[line])
    assert report.samples == 2 and report.images_per_sample == {1: 1, 2: 1}
    assert len(report.token_lengths) == 2 and report.truncated == sum(n > 60 for n in report.token_lengths)


def test_cli_exits_non_zero_and_prints_statistics(data, capsys):
    path, root = data
    assert main(["data", "check", str(path), "--image-root", str(root), "--preset", "tiny", "--max-length", "60",
                 "--on-overflow", "drop"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert f"{path}:6: " in out and "2 valid sample(s), 11 problem(s)" in out and "tokens per sample" in out


def test_a_clean_file_passes(data, tmp_path, capsys):
    _, root = data
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(_record("x")) + "\n" + json.dumps(_record("y", ["big.png"])) + "\n")
    assert main(["data", "check", str(clean), "--image-root", str(root), "--num-crops", "4"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_dataset_opens_images_lazily_and_names_bad_lines(data, tmp_path):
    path, root = data
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        read_records(path)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(_record(r, imgs)) for r, imgs in [("x", ["ok.png"]), ("y", ["big.png"])]))
    dataset = JsonlDataset(good, root)
    item = dataset[1]
    assert isinstance(item, Conversation) and item.turns[0].images[0].size == (30, 30)
    encoded = JsonlDataset(good, root, processor=Phi3VProcessor.tiny())
    assert isinstance(encoded[0], Sample) and encoded[0].pixel_values.shape[0] == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_record("z", ["ok.png"], user="<|image_1|>")) + "\n")
    short = JsonlDataset(broken, root, processor=Phi3VProcessor.tiny(), max_length=5)
    with pytest.raises(DataError, match=rf"{broken}:1 \(id z\): a sample of \d+ tokens cut at max_length 5"):
        short[0]


def test_damaged_files_and_roots_are_reported_not_crashed_on(tmp_path):
    processor = Phi3VProcessor.tiny(num_crops=4)
    report = check_file(tmp_path, tmp_path, processor, progress=False)
    assert report.problems == [f"{tmp_path}: not a file"]
    path = tmp_path / "d.jsonl"
    bad = json.dumps(_record("x", assistant=""))
    path.write_bytes(json.dumps(_record("x")).encode() + b"\n" + b'{"id": "\xff"}\n' + bad.encode() + b"\n")
    report = check_file(path, tmp_path / "no-such-root", processor, progress=False)
    messages = "\n".join(report.problems)
    assert "no-such-root: image root is not a directory" in messages
    assert f"{path}:2: not UTF-8" in messages
    assert f"{path}:3: conversations[0].assistant: empty answer" in messages
    assert f"{path}:3: duplicate id 'x' (first on line 1)" in messages


def test_an_empty_file_fails_the_check(tmp_path, capsys):
    for content in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        assert main(["data", "check", str(path), "--image-root", str(tmp_path), "--preset", "tiny"]) == 1
        assert f"{path}: no samples (the file is empty or holds only blank lines)" in capsys.readouterr().out


def test_dataset_names_the_line_of_a_missing_image(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_record("x", ["gone.png"])) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1 \(id x\): .*gone\.png: image file not found"):
        JsonlDataset(path, tmp_path)[0]


def test_data_check_applies_train_s_length_policy(data, tmp_path, capsys):
    """The same on_overflow as train: error makes a long sample a problem at its line; drop and truncate count it."""
    _, root = data
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(_record("x")) + "\n" + json.dumps(_record("y", assistant="a long answer " * 20)) + "\n")
    args = ["data", "check", str(path), "--image-root", str(root), "--preset", "tiny", "--max-length", "150"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: " in out and "longer than max_length 150 (on_overflow: error" in out
    assert "1 problem(s)" in out and "longer than max_length 150: 1 (on_overflow: error, each stops a run)" in out
    assert main([*args, "--on-overflow", "drop"]) == 0
    assert "longer than max_length 150: 1 (on_overflow: drop, dropped)" in capsys.readouterr().out
    assert main([*args, "--on-overflow", "truncate"]) == 0  # cut inside the answer: allowed
    assert "longer than max_length 150: 1 (on_overflow: truncate, truncated)" in capsys.readouterr().out
    assert main([*args[:-1], "5", "--on-overflow", "truncate"]) == 1  # a cut through the image is not
    assert f"{path}:1: a sample of" in capsys.readouterr().out


def test_a_bad_system_field_is_named_with_file_line_and_value(data, tmp_path, capsys):
    _, root = data
    path = tmp_path / "system.jsonl"
    values = {2: 42, 3: "", 4: "   ", 5: None, 6: ["Be brief."]}
    lines = [dict(_record("ok"), system="Be brief.")]
    lines += [dict(_record(f"bad{n}"), system=value) for n, value in values.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["data", "check", str(path), "--image-root", str(root), "--preset", "tiny"]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = [f"{path}:{n}: system: expected a non-empty string, got {value!r}" for n, value in values.items()]
    assert out[:5] == expected
    assert out[5] == f"{path}: 1 valid sample(s), 5 problem(s)"
    with pytest.raises(DataError, match=rf"^5 problem\(s\) in {path}:\n{path}:2: system: expected a non-empty"):
        read_records(path)  # what train and eval read: the same problems


def test_data_check_counts_the_system_in_the_token_lengths(data, tmp_path, capsys):
    """``--system`` (the run's default) lengthens the records without their own ``system``, as training does."""
    _, root = data
    path = tmp_path / "system.jsonl"
    path.write_text(json.dumps(dict(_record("own"), system="Be brief.")) + "\n" + json.dumps(_record("none")) + "\n")
    args = ["data", "check", str(path), "--image-root", str(root), "--preset", "tiny", "--max-length", "150"]
    assert main(args) == 0
    capsys.readouterr()
    long_system = "You read handwritten digits and answer with the digit alone. " * 4  # 252 characters
    assert main([*args, "--system", long_system]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:2: ") and "longer than max_length 150 (on_overflow: error" in out[0]
    assert out[1] == f"{path}: 2 valid sample(s), 1 problem(s)"  # line 1's own system wins: it fits
