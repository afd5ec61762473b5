import json
import os
import signal
import subprocess
import sys
import time

import pytest

from phi3v.data.convert.common import ConversionError
from tests.data.convert.conftest import convert, png_bytes, read_jsonl


def test_llava_json_tags_become_per_turn_image_tags(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(png_bytes())
    items = [
        {"id": "one", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Dark."}]},
        {"id": "two", "image": ["b.png", "c.png"], "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Same."}]},
        {"id": "three", "image": "a.png", "conversations": [
            {"from": "human", "value": "No tag here."}, {"from": "gpt", "value": "Fine."}]},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(items))
    convert("llava", tmp_path / "out", src=tmp_path / "llava.json", image_folder=folder)
    one, two, three = read_jsonl(tmp_path / "out" / "llava_train.jsonl")
    assert one["conversations"][0] == {
        "images": ["llava/a.png"], "user": "<|image_1|>\nDescribe.", "assistant": "A square."
    }  # fmt: skip
    assert one["conversations"][1]["images"] == []
    assert two["conversations"][0]["user"] == "Compare <|image_1|> with <|image_2|>."
    assert three["conversations"][0]["images"] == ["llava/a.png"]
    assert (tmp_path / "out" / "images" / "llava" / "c.png").read_bytes() == png_bytes()


def test_llava_tag_count_mismatch_names_the_record_and_writes_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    items = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                  {"from": "gpt", "value": "x"}]}]  # fmt: skip
    (tmp_path / "l.json").write_text(json.dumps(items))
    with pytest.raises(ConversionError, match=r"l\.json record 0: 2 <image> tag\(s\) for 1 image\(s\)"):
        convert("llava", tmp_path / "out", src=tmp_path / "l.json", image_folder=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def _folder(root, classes=("cat", "dog"), n=10):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i:03d}.png").write_bytes(png_bytes((i, 0, 0)))


def test_image_folder_random_split_and_label_set(tmp_path):
    _folder(tmp_path / "src")
    convert("image_folder", tmp_path / "out", src=tmp_path / "src", name="pets")
    counts = [len(read_jsonl(tmp_path / "out" / f"pets_{s}.jsonl")) for s in ("train", "val", "test")]
    assert counts == [16, 2, 2]
    meta = json.loads((tmp_path / "out" / "pets_meta.json").read_text())
    assert meta["labels"] == ["cat", "dog"] and meta["task"] == "image_classification"
    record = read_jsonl(tmp_path / "out" / "pets_val.jsonl")[0]
    assert record["conversations"][0]["user"] == "Classify the image into one of the following classes: cat, dog."


def test_image_folder_split_folders_and_unreadable_images(tmp_path):
    for split in ("train", "test"):
        _folder(tmp_path / "src" / split, n=2)
    (tmp_path / "src" / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match=r"bad\.png: cannot read image"):
        convert("image_folder", tmp_path / "out", src=tmp_path / "src")
    convert("image_folder", tmp_path / "out", src=tmp_path / "src", skip_bad=True)
    assert json.loads((tmp_path / "out" / "image_folder_meta.json").read_text())["skipped_unreadable"] == 1
    assert len(read_jsonl(tmp_path / "out" / "image_folder_train.jsonl")) == 4


def test_digits_tasks_share_disjoint_splits(tmp_path):
    convert("digits", tmp_path / "out", limit=400)
    scans = {}
    for task in ("digits", "digits_pair", "digits_video"):
        for split in ("train", "val", "test"):
            for record in read_jsonl(tmp_path / "out" / f"{task}_{split}.jsonl"):
                for path in record["conversations"][0]["images"]:
                    assert scans.setdefault(path, split) == split, f"{path} in {split} and {scans[path]}"
    single = read_jsonl(tmp_path / "out" / "digits_train.jsonl")
    assert len(single) == 280 and single[0]["conversations"][0]["assistant"] in "0123456789"
    pairs = read_jsonl(tmp_path / "out" / "digits_pair_train.jsonl")
    assert 0.3 < sum(r["conversations"][0]["assistant"] == "yes" for r in pairs) / len(pairs) < 0.7
    video = read_jsonl(tmp_path / "out" / "digits_video_val.jsonl")[0]
    assert len(video["conversations"][0]["images"]) == 4


def test_digits_pairs_per_scan_differ_between_train_and_evaluation(tmp_path):
    # 400 scans: 280 train, 60 val, 60 test (15 % each held out)
    convert("digits", tmp_path / "out", limit=400, pairs_per_scan=3, eval_pairs_per_scan=1)
    counts = {
        split: len(read_jsonl(tmp_path / "out" / f"digits_pair_{split}.jsonl")) for split in ("train", "val", "test")
    }
    assert counts == {"train": 840, "val": 60, "test": 60}
    first = [r["conversations"][0]["images"][0] for r in read_jsonl(tmp_path / "out" / "digits_pair_train.jsonl")]
    assert first[0] == first[1] == first[2] != first[3]  # each scan opens 3 pairs in a row
    with pytest.raises(ConversionError, match="eval_pairs_per_scan must be at least 1, got 0"):
        convert("digits", tmp_path / "out2", limit=400, eval_pairs_per_scan=0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe to stop the converter midway")
def test_a_converter_killed_midway_leaves_nothing_and_a_rerun_completes(tmp_path):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(png_bytes((i, 0, 0)))
    os.mkfifo(folder / "5.png")  # opening it blocks: the converter stops mid-run with five images staged
    talk = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    items = [{"id": str(i), "image": f"{i}.png", "conversations": talk} for i in range(6)]
    (tmp_path / "l.json").write_text(json.dumps(items))
    command = [sys.executable, "-m", "phi3v", "convert", "llava", "--src", str(tmp_path / "l.json"),
               "--image-folder", str(folder), "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = out / ".staging-llava" / "images" / "llava"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if stage.exists() and len(list(stage.iterdir())) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the converter finished or failed before it reached the pipe"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in out.iterdir()) == [".staging-llava"]  # no jsonl, no published image
    (folder / "5.png").unlink()
    (folder / "5.png").write_bytes(png_bytes())
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sorted(p.name for p in out.iterdir()) == ["images", "llava_train.jsonl"]
    assert len(read_jsonl(out / "llava_train.jsonl")) == 6 and len(list((out / "images" / "llava").iterdir())) == 6


def test_records_are_checked_before_anything_is_published(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    talk = [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "  "}]
    (tmp_path / "l.json").write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": talk}]))
    with pytest.raises(
        ConversionError, match=r"record 'x' for llava_train\.jsonl: conversations\[0\]\.assistant: empty"
    ):
        convert("llava", tmp_path / "out", src=tmp_path / "l.json", image_folder=tmp_path)
    talk[1]["value"] = "fine"
    (tmp_path / "l.json").write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": talk}] * 2))
    with pytest.raises(ConversionError, match=r"record id 'x' occurs twice in llava_train\.jsonl"):
        convert("llava", tmp_path / "out", src=tmp_path / "l.json", image_folder=tmp_path)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_rerun_without_a_split_removes_the_stale_file(tmp_path, capsys):
    _folder(tmp_path / "src")
    convert("image_folder", tmp_path / "out", src=tmp_path / "src")
    assert (tmp_path / "out" / "image_folder_test.jsonl").exists()
    convert("image_folder", tmp_path / "out", src=tmp_path / "src", test_fraction=0)
    assert not (tmp_path / "out" / "image_folder_test.jsonl").exists()
    assert "image_folder_test.jsonl (left by an earlier run" in capsys.readouterr().out


def test_unknown_converter_options_are_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"digits converter: unknown option\(s\) \['val_size'\]"):
        convert("digits", tmp_path / "out", val_size=3)
    with pytest.raises(ConversionError, match=r"--src .* is not used"):
        convert("digits", tmp_path / "out", src=tmp_path)
