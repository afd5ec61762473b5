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


def test_docvqa_source_json_with_a_list_at_the_top_gets_the_converters_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train_v1.0.json").write_text(json.dumps([{"questionId": 1}]))
    with pytest.raises(ConversionError, match=r"train_v1\.0\.json: no 'data' list"):
        convert("docvqa", tmp_path / "out", src=src)
    (src / "train_v1.0.json").write_bytes(b'{"data": "\xff"}')
    with pytest.raises(ConversionError, match=r"train_v1\.0\.json: not a UTF-8 JSON file"):
        convert("docvqa", tmp_path / "out", src=src)


def test_hateful_memes_original_release(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for i in (1, 2, 3):
        (src / "img" / f"{i}.png").write_bytes(png_bytes((i, i, i)))
    rows = [{"id": 1, "img": "img/1.png", "label": 1, "text": "mean words"}, {"id": 2, "img": "img/2.png", "label": 0,
            "text": "kind words"}]  # fmt: skip
    (src / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (src / "dev_seen.jsonl").write_text(json.dumps({"id": 3, "img": "img/3.png", "label": 0, "text": "hello"}))
    convert("hateful_memes", tmp_path / "out", src=src, val_split="dev_seen")
    train = read_jsonl(tmp_path / "out" / "hateful_memes_train.jsonl")
    assert [r["conversations"][0]["assistant"] for r in train] == ["yes", "no"]
    assert 'reads: "mean words"' in train[0]["conversations"][0]["user"]
    assert len(read_jsonl(tmp_path / "out" / "hateful_memes_val.jsonl")) == 1


def _release(src, files):
    """An original-release folder: ``files`` maps a jsonl name to meme ids (label = id % 2)."""
    (src / "img").mkdir(parents=True)
    for name, ids in files.items():
        rows = [{"id": i, "img": f"img/{i}.png", "label": i % 2, "text": f"meme {i}"} for i in ids]
        for i in ids:
            (src / "img" / f"{i}.png").write_bytes(png_bytes((i % 256, 0, 0)))
        (src / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_hateful_memes_writes_one_validation_split_and_never_a_meme_twice(tmp_path, capsys):
    """dev_seen and dev_unseen share memes (400 in the release; 2 here): only the chosen one becomes val."""
    src = tmp_path / "src"
    _release(src, {"train.jsonl": [1, 2, 3, 4, 5], "dev_seen.jsonl": [10, 11, 12], "dev_unseen.jsonl": [11, 12, 13, 14],
                   "test_seen.jsonl": [20, 21], "test_unseen.jsonl": [21, 22]})  # fmt: skip

    def ids(out, split):
        return [r["id"] for r in read_jsonl(out / f"hateful_memes_{split}.jsonl")]

    # default: the reference recipe's choice, the first val_size memes of train; no dev file is read
    convert("hateful_memes", tmp_path / "ref", src=src, val_size=2)
    assert ids(tmp_path / "ref", "val") == ["train-1", "train-2"]
    assert ids(tmp_path / "ref", "train") == ["train-3", "train-4", "train-5"]
    out = capsys.readouterr().out
    assert "validation split: the first 2 memes of train.jsonl" in out
    assert "not converted: dev_seen.jsonl, dev_unseen.jsonl" in out
    # meme 21 is in both test files: kept once
    assert ids(tmp_path / "ref", "test") == ["test_seen-20", "test_seen-21", "test_unseen-22"]
    assert "test: 1 meme(s) already written to this split left out" in out
    for choice, expected in (("dev_seen", [10, 11, 12]), ("dev_unseen", [11, 12, 13, 14])):
        convert("hateful_memes", tmp_path / choice, src=src, val_split=choice)
        assert ids(tmp_path / choice, "val") == [f"{choice}-{i}" for i in expected]
        assert len(ids(tmp_path / choice, "train")) == 5
    with pytest.raises(ConversionError, match="--val-split 'dev': choose one of reference, dev_seen, dev_unseen"):
        convert("hateful_memes", tmp_path / "bad", src=src, val_split="dev")


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


def test_nlvr2_evaluation_records_keep_the_first_turn_as_the_reference_scores(tmp_path, capsys):
    rows = [(2, [("Left has more?", "yes"), ("Right has dogs?", "no")]), (2, [("Same count?", "no"), ("Cats?", "yes")])]
    datasets.DatasetDict({"train": _cauldron(rows), "test": _cauldron(rows[:1])}).save_to_disk(tmp_path / "src")
    convert("nlvr2", tmp_path / "out", src=tmp_path / "src", val_size=1)
    val, train = read_jsonl(tmp_path / "out" / "nlvr2_val.jsonl"), read_jsonl(tmp_path / "out" / "nlvr2_train.jsonl")
    test = read_jsonl(tmp_path / "out" / "nlvr2_test.jsonl")
    assert [t["user"] for t in val[0]["conversations"]] == ["Left has more?"] and val[0]["references"] == ["yes"]
    assert [t["user"] for t in test[0]["conversations"]] == ["Left has more?"]
    assert len(val[0]["conversations"][0]["images"]) == 2
    assert [t["user"] for t in train[0]["conversations"]] == ["Same count?", "Cats?"]  # training keeps every turn
    assert "2 multi-turn val/test record(s) cut to their first turn" in capsys.readouterr().out
    convert("nlvr2", tmp_path / "all", src=tmp_path / "src", val_size=1, eval_turns="all")
    assert read_jsonl(tmp_path / "all" / "nlvr2_val.jsonl")[0]["references"] == ["no"]  # the last turn's answer


def test_nlvr2_test2_is_read_or_reported(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for name in ("test1-1-0", "test2-7-1"):
        for k in (0, 1):
            (src / "images" / f"{name}-img{k}.png").write_bytes(png_bytes((k, 0, 0)))
    (src / "test1.json").write_text(json.dumps({"identifier": "test1-1-0-0", "sentence": "A.", "label": "True"}))
    (src / "test2.json").write_text(json.dumps({"identifier": "test2-7-1-0", "sentence": "B.", "label": "False"}))
    convert("nlvr2", tmp_path / "one", src=src)
    assert [r["id"] for r in read_jsonl(tmp_path / "one" / "nlvr2_test.jsonl")] == ["test-test1-1-0-0"]
    assert "test2.json: not converted (the test split is test1.json" in capsys.readouterr().out
    convert("nlvr2", tmp_path / "two", src=src, test_file="test2")
    assert [r["id"] for r in read_jsonl(tmp_path / "two" / "nlvr2_test.jsonl")] == ["test-test2-7-1-0"]
    assert "test1.json: not converted" in capsys.readouterr().out


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
