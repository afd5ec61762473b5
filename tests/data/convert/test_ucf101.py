import json

import pytest

from phi3v.data.convert.common import ConversionError
from tests.data.convert.conftest import convert, read_jsonl, write_video

CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]


def _official(root):
    for cls in CLASSES:
        for group in (1, 2, 8, 9, 10):
            write_video(root / "UCF-101" / cls / f"v_{cls}_g{group:02d}_c01.avi")


def test_official_layout_without_split_files(tmp_path):
    _official(tmp_path / "src")
    convert("ucf101", tmp_path / "out", src=tmp_path / "src")
    train = read_jsonl(tmp_path / "out" / "ucf101_train.jsonl")
    val = read_jsonl(tmp_path / "out" / "ucf101_val.jsonl")
    test = read_jsonl(tmp_path / "out" / "ucf101_test.jsonl")
    assert (len(train), len(val), len(test)) == (6, 3, 6)  # groups 8-9 | 10 (last training group) | 1-2
    assert all("_g10_" in r["conversations"][0]["images"][0] for r in val)
    record = train[0]
    assert record["id"] == "train-0000000000" and record["source"] == "ucf101"
    turn = record["conversations"][0]
    assert turn["user"] == "Classify the video into one of the following classes: ApplyEyeMakeup, Archery, Basketball."
    assert turn["images"] == [f"train/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.{k}.jpg" for k in range(8)]
    assert turn["assistant"] == "ApplyEyeMakeup"
    assert val[0]["id"] == "val-0000000006" and test[-1]["id"] == "test-0000000014"
    assert (tmp_path / "out" / "images" / turn["images"][7]).exists()


def test_frames_are_the_reference_indices(tmp_path):
    """12 frames, 8 wanted: arange(0, 12, 1.5).astype(int) = 0 1 3 4 6 7 9 10; frame k has grey level 20k."""
    from PIL import Image

    write_video(tmp_path / "src" / "train" / "Archery" / "clip.avi", frames=12)
    convert("ucf101", tmp_path / "out", src=tmp_path / "src")
    images = read_jsonl(tmp_path / "out" / "ucf101_train.jsonl")[0]["conversations"][0]["images"]
    levels = [Image.open(tmp_path / "out" / "images" / p).convert("L").getpixel((16, 16)) for p in images]
    assert [round(level / 20) for level in levels] == [0, 1, 3, 4, 6, 7, 9, 10]


def test_official_split_lists_and_class_subset(tmp_path):
    _official(tmp_path / "src")
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    videos = [f"{c}/v_{c}_g{g:02d}_c01.avi" for c in CLASSES for g in (1, 2, 8, 9, 10)]
    (lists / "testlist01.txt").write_text("\n".join(v for v in videos if "_g01_" in v) + "\n")
    (lists / "trainlist01.txt").write_text("\n".join(f"{v} 1" for v in videos if "_g01_" not in v) + "\n")
    convert(
        "ucf101",
        tmp_path / "out",
        src=tmp_path / "src" / "UCF-101",
        split_dir=lists,
        classes="Archery,Basketball",
        frames=4,
    )
    test = read_jsonl(tmp_path / "out" / "ucf101_test.jsonl")
    train = read_jsonl(tmp_path / "out" / "ucf101_train.jsonl")
    assert len(test) == 2 and len(train) == 6 and len(test[0]["conversations"][0]["images"]) == 4
    assert test[0]["conversations"][0]["user"].endswith("classes: Archery, Basketball.")
    with pytest.raises(ConversionError, match=r"--classes names unknown class\(es\) \['Bowling'\]"):
        convert("ucf101", tmp_path / "out2", src=tmp_path / "src", classes="Bowling")


def test_split_folder_layout_of_the_reference_recipe(tmp_path):
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for cls in CLASSES[:2]:
            for i in range(n):
                write_video(tmp_path / "src" / split / cls / f"v_{cls}_g0{i + 1}_c01.avi", frames=9)
    written = convert("ucf101", tmp_path / "out", src=tmp_path / "src")
    assert sorted(p.name for p in written) == [
        "ucf101_meta.json", "ucf101_test.jsonl", "ucf101_train.jsonl", "ucf101_val.jsonl"
    ]  # fmt: skip
    assert [len(read_jsonl(tmp_path / "out" / f"ucf101_{s}.jsonl")) for s in ("train", "val", "test")] == [4, 2, 2]


def test_an_undecodable_video_is_named(tmp_path):
    bad = tmp_path / "src" / "train" / "Archery" / "broken.avi"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a video")
    with pytest.raises(ConversionError, match=r"broken\.avi: cannot decode video"):
        convert("ucf101", tmp_path / "out", src=tmp_path / "src")
    assert not list((tmp_path / "out").glob("*.jsonl")) and not (tmp_path / "out" / ".staging-ucf101").exists()


def test_frame_counts_that_do_not_divide_evenly(tmp_path):
    """17 frames, 7 wanted: floor(k * 17 / 7) = 0 2 4 7 9 12 14 (the reference's arange adds an 8th index)."""
    from PIL import Image

    write_video(tmp_path / "src" / "train" / "Archery" / "clip.avi", frames=12)
    convert("ucf101", tmp_path / "out", src=tmp_path / "src", frames=7)
    images = read_jsonl(tmp_path / "out" / "ucf101_train.jsonl")[0]["conversations"][0]["images"]
    levels = [Image.open(tmp_path / "out" / "images" / p).convert("L").getpixel((16, 16)) for p in images]
    assert [round(level / 20) for level in levels] == [k * 12 // 7 for k in range(7)]
    with pytest.raises(ConversionError, match="--frames 0"):
        convert("ucf101", tmp_path / "out", src=tmp_path / "src", frames=0)
    with pytest.raises(ConversionError, match="12 frames, fewer than the 20 to sample"):
        convert("ucf101", tmp_path / "out", src=tmp_path / "src", frames=20)


def test_class_order_and_indices_follow_class_ind(tmp_path):
    """Code-point order puts JumpRope before JumpingJack; classInd.txt (the official numbering) does not."""
    for cls in ("JumpRope", "JumpingJack", "Archery"):
        write_video(tmp_path / "src" / "train" / cls / f"v_{cls}_g01_c01.avi", frames=2)
    (tmp_path / "classInd.txt").write_text("1 Archery\n2 Basketball\n3 JumpingJack\n4 JumpRope\n")
    convert("ucf101", tmp_path / "out", src=tmp_path / "src", frames=1, class_index=tmp_path / "classInd.txt")
    meta = json.loads((tmp_path / "out" / "ucf101_meta.json").read_text())
    assert meta["labels"] == ["Archery", "JumpingJack", "JumpRope"]
    assert meta["class_index"] == {"Archery": 1, "JumpingJack": 3, "JumpRope": 4}
    record = read_jsonl(tmp_path / "out" / "ucf101_train.jsonl")[0]
    assert record["conversations"][0]["user"].endswith("classes: Archery, JumpingJack, JumpRope.")
    # without classInd.txt: case-insensitive order, the same for UCF-101's names; no indices are invented
    convert("ucf101", tmp_path / "plain", src=tmp_path / "src", frames=1)
    meta = json.loads((tmp_path / "plain" / "ucf101_meta.json").read_text())
    assert meta["labels"] == ["Archery", "JumpingJack", "JumpRope"] and "class_index" not in meta
    (tmp_path / "bad.txt").write_text("1 Archery\n2 JumpingJack\n")
    with pytest.raises(ConversionError, match=r"bad\.txt: no index for class folder\(s\) \['JumpRope'\]"):
        convert("ucf101", tmp_path / "bad", src=tmp_path / "src", frames=1, class_index=tmp_path / "bad.txt")
    (tmp_path / "bad.txt").write_text("1 Archery\nJumpingJack\n")
    with pytest.raises(ConversionError, match=r"bad\.txt:2: expected 'INDEX ClassName', got 'JumpingJack'"):
        convert("ucf101", tmp_path / "bad", src=tmp_path / "src", frames=1, class_index=tmp_path / "bad.txt")
