"""Converters read nothing outside their source folder and publish no non-image (issue 14, findings 5, 11, 12).

Each converter gets a real symbolic link that leads out of ``--src`` (or out of its image folder) and must refuse
it before anything is published: ``OUT`` then holds no jsonl and no image.
"""

import json
import os

import datasets
import pytest
from PIL import Image

from phi3v.data.convert.common import ConversionError
from tests.data.convert.conftest import convert, png_bytes, read_jsonl, write_video


@pytest.fixture
def outside(tmp_path):
    """A folder beside the source: a system-like text file and a real image."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "photo.png").write_bytes(png_bytes((1, 2, 3)))
    return folder


def _nothing_published(out):
    return not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".staging")]


def _memes(src, rows):
    (src / "img").mkdir(parents=True, exist_ok=True)
    (src / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_hateful_memes_refuses_a_link_to_a_non_image_before_publishing(tmp_path, outside):
    """The finding's probe: ``img/link.png`` -> a system file."""
    src = tmp_path / "src"
    _memes(src, [{"id": 1, "img": "img/1.png", "label": 0, "text": "a"}, {"id": 2, "img": "img/link.png", "label": 1,
                                                                          "text": "b"}])  # fmt: skip
    (src / "img" / "1.png").write_bytes(png_bytes())
    os.symlink(outside / "passwd", src / "img" / "link.png")
    with pytest.raises(ConversionError, match=r"train\.jsonl:2: 'img/link\.png' resolves outside the source folder"):
        convert("hateful_memes", tmp_path / "out", src=src)
    assert _nothing_published(tmp_path / "out")
    # inside --src but not an image: refused too, naming the row
    (src / "img" / "link.png").unlink()
    (src / "img" / "link.png").write_text("not an image")
    with pytest.raises(ConversionError, match=r"train\.jsonl:2: img/link\.png is not an image"):
        convert("hateful_memes", tmp_path / "out", src=src)
    assert _nothing_published(tmp_path / "out")


def test_docvqa_refuses_a_folder_link_out_of_src(tmp_path, outside):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "documents")
    entry = {"questionId": 1, "question": "Q?", "image": "documents/photo.png", "answers": ["A"]}
    (src / "train_v1.0.json").write_text(json.dumps({"data": [entry]}))
    with pytest.raises(ConversionError, match=r"data\[0\]: 'documents/photo\.png' resolves outside the source folder"):
        convert("docvqa", tmp_path / "out", src=src)
    assert _nothing_published(tmp_path / "out")


def test_nlvr2_refuses_a_linked_image_out_of_the_image_folder(tmp_path, outside):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "train-1-0-img0.png").write_bytes(png_bytes())
    os.symlink(outside / "photo.png", src / "images" / "train-1-0-img1.png")
    (src / "train.json").write_text(json.dumps({"identifier": "train-1-0-0", "sentence": "S", "label": "True"}) + "\n")
    with pytest.raises(ConversionError, match=r"train\.json:1: .*train-1-0-img1\.png' resolves outside"):
        convert("nlvr2", tmp_path / "out", src=src)
    assert _nothing_published(tmp_path / "out")


def test_llava_refuses_a_link_out_of_the_image_folder(tmp_path, outside):
    folder = tmp_path / "imgs"
    folder.mkdir()
    os.symlink(outside / "passwd", folder / "a.png")
    talk = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "l.json").write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": talk}]))
    with pytest.raises(ConversionError, match=r"record 0: 'a\.png' resolves outside the source folder"):
        convert("llava", tmp_path / "out", src=tmp_path / "l.json", image_folder=folder)
    assert _nothing_published(tmp_path / "out")


def test_image_folder_refuses_a_link_out_of_src_even_with_skip_bad(tmp_path, outside):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "1.png").write_bytes(png_bytes())
    os.symlink(outside / "photo.png", src / "cat" / "2.png")
    with pytest.raises(ConversionError, match=r"2\.png' resolves outside the source folder"):
        convert("image_folder", tmp_path / "out", src=src, skip_bad=True)
    assert _nothing_published(tmp_path / "out")


def test_ucf101_refuses_a_linked_video_out_of_src(tmp_path):
    write_video(tmp_path / "elsewhere" / "v_Archery_g01_c01.avi", frames=8)
    (tmp_path / "src" / "train" / "Archery").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "v_Archery_g01_c01.avi", tmp_path / "src" / "train" / "Archery" / "v.avi")
    with pytest.raises(ConversionError, match=r"video '.*v\.avi' resolves outside the source folder"):
        convert("ucf101", tmp_path / "out", src=tmp_path / "src")
    assert _nothing_published(tmp_path / "out")


def _cauldron_with_cells(cells):
    features = datasets.Features(
        {"images": datasets.List(datasets.Image()), "texts": datasets.List({"user": datasets.Value("string"),
                                                                            "assistant": datasets.Value("string")})}
    )  # fmt: skip
    return datasets.Dataset.from_dict(
        {"images": [[cell] for cell in cells], "texts": [[{"user": "Hateful?", "assistant": "no"}] for _ in cells]},
        features=features,
    )


def test_parquet_image_cells_never_read_outside_src(tmp_path, outside):
    """Finding 12: a cell with only a ``path`` is read only inside ``--src``; a non-image cell names its row."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "inside.png")
    cells = [{"bytes": None, "path": str(src / "inside.png")}, {"bytes": None, "path": str(outside / "photo.png")}]
    _cauldron_with_cells(cells).to_parquet(src / "train-0.parquet")
    with pytest.raises(ConversionError, match=r"train row 1: .*photo\.png' resolves outside the source folder"):
        convert("hateful_memes", tmp_path / "out", src=src, val_size=0)
    assert _nothing_published(tmp_path / "out")
    (src / "train-0.parquet").unlink()
    _cauldron_with_cells([*cells[:1], {"bytes": b"plain text, no image", "path": None}]).to_parquet(
        src / "train-0.parquet"
    )
    with pytest.raises(ConversionError, match=r"train row 1: the image cell is not an image"):
        convert("hateful_memes", tmp_path / "out", src=src, val_size=0)
    assert _nothing_published(tmp_path / "out")
    _cauldron_with_cells(cells[:1]).to_parquet(src / "train-0.parquet")
    convert("hateful_memes", tmp_path / "out", src=src, val_size=0)  # a path inside --src is read
    assert len(read_jsonl(tmp_path / "out" / "hateful_memes_train.jsonl")) == 1
