"""DocVQA, hateful memes and NLVR2 from Hugging Face on-disk copies and from their original releases."""

import json

import datasets
import pytest
from PIL import Image

from phi3v.data.convert.common import ConversionError
from tests.data.convert.conftest import convert, png_bytes, read_jsonl


def _cauldron(rows):
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                    "source": datasets.Value("string")}),
        }
    )  # fmt: skip
    return datasets.Dataset.from_dict(
        {
            "images": [
                [{"bytes": png_bytes((i, 0, 0)), "path": None} for _ in range(n)] for i, (n, _) in enumerate(rows)
            ],
            "texts": [[{"user": u, "assistant": a, "source": "x"} for u, a in texts] for _, texts in rows],
        },
        features=features,
    )


def test_docvqa_from_the_cauldron_save_to_disk(tmp_path):
    rows = [(1, [("What is the date?", "1 May"), ("Who signed?", "Ann")]), (1, [("Total?", "$5")]), (1, [("Q", "A")])]
    datasets.DatasetDict({"train": _cauldron(rows)}).save_to_disk(tmp_path / "src")
    convert("docvqa", tmp_path / "out", src=tmp_path / "src", val_size=1)
    val, train = read_jsonl(tmp_path / "out" / "docvqa_val.jsonl"), read_jsonl(tmp_path / "out" / "docvqa_train.jsonl")
    assert [r["conversations"][0]["user"] for r in val] == ["What is the date?", "Who signed?"]
    assert len(train) == 2 and train[0]["references"] == ["$5"]
    image = tmp_path / "out" / "images" / val[0]["conversations"][0]["images"][0]
    assert image.read_bytes() == png_bytes((0, 0, 0))  # copied byte for byte


def test_docvqa_mini_from_parquet_keeps_every_answer(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "query": {"en": datasets.Value("string")},
                                  "answers": datasets.List(datasets.Value("string"))})  # fmt: skip
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": png_bytes(), "path": None}], "query": [{"en": f"{split} question?"}],
             "answers": [["Fifty", "50", "fifty dollars"]]},
            features=features,
        )  # fmt: skip
        (tmp_path / "src" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(tmp_path / "src" / "data" / f"{split}-00000-of-00001.parquet")
    convert("docvqa", tmp_path / "out", src=tmp_path / "src")
    test = read_jsonl(tmp_path / "out" / "docvqa_test.jsonl")[0]
    assert test["conversations"][0]["user"] == "test question?\nAnswer briefly."
    assert test["conversations"][0]["assistant"] == "Fifty" and test["references"] == ["Fifty", "50", "fifty dollars"]


def test_docvqa_original_release(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "documents").mkdir(parents=True)
    Image.new("RGB", (50, 70)).save(src / "documents" / "doc1.png")
    entry = {"questionId": 7, "question": "Title?", "image": "documents/doc1.png", "answers": ["A title", "title"]}
    (src / "train_v1.0.json").write_text(json.dumps({"data": [entry]}))
    (src / "test_v1.0.json").write_text(json.dumps({"data": [{**entry, "questionId": 8, "answers": None}]}))
    convert("docvqa", tmp_path / "out", src=src)
    record = read_jsonl(tmp_path / "out" / "docvqa_train.jsonl")[0]
    assert record["id"] == "train-7" and record["references"] == ["A title", "title"]
    assert record["conversations"][0]["images"] == ["docvqa/train/documents/doc1.png"]
    assert not (tmp_path / "out" / "docvqa_test.jsonl").exists()
    assert "1 question(s) without answers left out" in capsys.readouterr().out


def test_hateful_memes_original_release(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for i in (1, 2, 3):
        (src / "img" / f"{i}.png").write_bytes(png_bytes((i, i, i)))
    rows = [{"id": 1, "img": "img/1.png", "label": 1, "text": "mean words"}, {"id": 2, "img": "img/2.png", "label": 0,
            "text": "kind words"}]  # fmt: skip
    (src / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (src / "dev_seen.jsonl").write_text(json.dumps({"id": 3, "img": "img/3.png", "label": 0, "text": "hello"}))
    convert("hateful_memes", tmp_path / "out", src=src)
    train = read_jsonl(tmp_path / "out" / "hateful_memes_train.jsonl")
    assert [r["conversations"][0]["assistant"] for r in train] == ["yes", "no"]
    assert 'reads: "mean words"' in train[0]["conversations"][0]["user"]
    assert len(read_jsonl(tmp_path / "out" / "hateful_memes_val.jsonl")) == 1


def test_hateful_memes_from_the_cauldron_parquet(tmp_path):
    (tmp_path / "src").mkdir()
    _cauldron([(1, [("Is it hateful?", "no")]), (1, [("Is it hateful?", "yes")])]).to_parquet(
        tmp_path / "src" / "train-00000.parquet"
    )
    convert("hateful_memes", tmp_path / "out", src=tmp_path / "src", val_size=1)
    assert read_jsonl(tmp_path / "out" / "hateful_memes_train.jsonl")[0]["conversations"][0]["assistant"] == "yes"


def test_nlvr2_from_the_cauldron_is_multi_turn_with_both_images_first(tmp_path):
    datasets.DatasetDict({"train": _cauldron([(2, [("Left has more?", "yes"), ("Right has dogs?", "no")])])}
                         ).save_to_disk(tmp_path / "src")  # fmt: skip
    convert("nlvr2", tmp_path / "out", src=tmp_path / "src", val_size=0)
    record = read_jsonl(tmp_path / "out" / "nlvr2_train.jsonl")[0]
    turns = record["conversations"]
    assert len(turns) == 2 and len(turns[0]["images"]) == 2 and turns[1]["images"] == []
    bad = _cauldron([(1, [("q", "a")])])
    datasets.DatasetDict({"train": bad}).save_to_disk(tmp_path / "bad")
    with pytest.raises(ConversionError, match="row 0: 1 images; NLVR2 rows have exactly 2"):
        convert("nlvr2", tmp_path / "out2", src=tmp_path / "bad")


def test_nlvr2_original_release_finds_left_and_right_images(tmp_path):
    src = tmp_path / "src"
    (src / "images" / "train" / "42").mkdir(parents=True)
    for k in (0, 1):
        (src / "images" / "train" / "42" / f"train-10171-0-img{k}.png").write_bytes(png_bytes((k, 0, 0)))
    (src / "train.json").write_text(json.dumps({"identifier": "train-10171-0-0", "sentence": "Two dogs.",
                                                "label": "True"}) + "\n")  # fmt: skip
    convert("nlvr2", tmp_path / "out", src=src)
    record = read_jsonl(tmp_path / "out" / "nlvr2_train.jsonl")[0]
    assert record["conversations"][0]["images"] == [
        "nlvr2/train/train-10171-0-img0.png", "nlvr2/train/train-10171-0-img1.png"
    ]  # fmt: skip
    assert record["conversations"][0]["assistant"] == "true" and '"Two dogs."' in record["conversations"][0]["user"]


def test_split_of_hf_cache_files_and_unknown_names(tmp_path):
    from phi3v.data.convert.hf import _split_of

    root = tmp_path
    assert _split_of(root / "parquet-test.arrow", root) == "test"
    assert _split_of(root / "data" / "validation-00000-of-00001.parquet", root) == "val"
    assert _split_of(root / "train" / "part.parquet", root) == "train"
    with pytest.raises(ConversionError, match=r"data\.parquet: cannot tell which split"):
        _split_of(root / "data.parquet", root)


def test_two_datasets_in_one_output_folder_keep_their_images(tmp_path):
    datasets.DatasetDict({"train": _cauldron([(1, [("Q", "A")])])}).save_to_disk(tmp_path / "doc")
    memes = _cauldron([(1, [("Hateful?", "no")])])
    memes = memes.cast_column("images", memes.features["images"])
    datasets.DatasetDict({"train": memes}).save_to_disk(tmp_path / "memes")
    convert("docvqa", tmp_path / "out", src=tmp_path / "doc", val_size=0)
    convert("hateful_memes", tmp_path / "out", src=tmp_path / "memes", val_size=0)
    doc = read_jsonl(tmp_path / "out" / "docvqa_train.jsonl")[0]["conversations"][0]["images"][0]
    meme = read_jsonl(tmp_path / "out" / "hateful_memes_train.jsonl")[0]["conversations"][0]["images"][0]
    assert doc.startswith("docvqa/") and meme.startswith("hateful_memes/") and doc != meme


def test_original_release_paths_may_not_escape(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text(json.dumps({"id": 1, "img": "../../x.png", "label": 1, "text": "t"}))
    with pytest.raises(ConversionError, match=r"train\.jsonl:1: image path '\.\./\.\./x\.png' escapes"):
        convert("hateful_memes", tmp_path / "out", src=src)
    (src / "train.jsonl").write_text(json.dumps({"id": 1, "label": 1, "text": "t"}))
    with pytest.raises(ConversionError, match=r"train\.jsonl:1: field 'img' is missing"):
        convert("hateful_memes", tmp_path / "out", src=src)
    assert not list((tmp_path / "out").glob("*"))
