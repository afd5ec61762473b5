"""DocVQA, from any of the three shapes the reference recipe and the original release use.

* the_cauldron ``docvqa`` (``images`` + ``texts[{user, assistant}]``, one row per document): one record per
  question; the first ``--val-size`` rows form the val split, as in the reference recipe;
* the DocVQA mini set (``image``, ``query``, ``answers``; splits train/test): the prompt
  ``{question}\\nAnswer briefly.`` with the first answer as target;
* the original release: ``{train,val,test}_v1.0.json`` with ``data[{questionId, question, image, answers}]`` and
  images relative to the json file. The official test split has no answers; its questions are counted and left out.

Every reference answer is kept in ``references`` for ANLS.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert import hf
from phi3v.data.convert.common import (
    ConversionError,
    StagedOutput,
    image_extension,
    require,
    safe_relative,
    single_turn,
    source_image,
)
from phi3v.tasks import get_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-size", type=int, help="the_cauldron: rows held out as val")


def convert(out: StagedOutput, src: str | os.PathLike, *, val_size: int = 500) -> None:
    """Convert a DocVQA copy (any of the three shapes) into ``out``.

    Args:
        out: Where records and images go.
        src: A ``save_to_disk`` folder, parquet/arrow files, or the folder of the original ``*_v1.0.json``.
        val_size: the_cauldron: the first rows held out as val (the reference recipe's 500).
    """
    src = Path(src)
    originals = sorted(src.glob("*_v1.0.json")) if src.is_dir() else []
    if originals:
        _convert_original(originals, out)
        return
    task = get_task("docvqa")
    for split, dataset in hf.load_splits(src).items():
        if hf.cauldron_rows(dataset):
            dataset = hf.undecoded(dataset, "images")
            for row_index, row in enumerate(tqdm(dataset, desc=split, unit="doc")):
                target = "val" if split == "train" and row_index < val_size else split
                image = hf.image_bytes(row["images"][0], f"{src} {split} row {row_index}", src)
                path = out.save_image(f"{out.name}/{split}/{row_index:07d}{image_extension(image)}", image)
                for q, text in enumerate(row["texts"]):
                    record = single_turn(f"{split}-{row_index:07d}-{q}", "docvqa", [path], text["user"],
                                         text["assistant"])  # fmt: skip
                    out.add(target, record)
        elif {"image", "query", "answers"} <= set(dataset.column_names):
            dataset = hf.undecoded(dataset, "image")
            for row_index, row in enumerate(tqdm(dataset, desc=split, unit="q")):
                image = hf.image_bytes(row["image"], f"{src} {split} row {row_index}", src)
                path = out.save_image(f"{out.name}/{split}/{row_index:07d}{image_extension(image)}", image)
                query = row["query"]
                question = query.get("en") if isinstance(query, dict) else query
                answers = [a for a in row["answers"] if a.strip()]
                if not answers:
                    raise ConversionError(f"{src} {split} row {row_index}: no answers")
                record = single_turn(f"{split}-{row_index:07d}", "docvqa", [path], task.prompt(question),
                                     answers[0], answers)  # fmt: skip
                out.add(split, record)
        else:
            raise ConversionError(f"{src} ({split}): columns {dataset.column_names} are not a DocVQA schema")


def _convert_original(files: list[Path], out: StagedOutput) -> None:
    task = get_task("docvqa")
    copied: dict[Path, str] = {}
    for file in files:
        split = {"train": "train", "val": "val", "test": "test"}.get(file.name.split("_")[0])
        if split is None:
            raise ConversionError(f"{file}: expected train_v1.0.json, val_v1.0.json or test_v1.0.json")
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(f"{file}: not a UTF-8 JSON file ({err})") from None
        entries = document.get("data") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConversionError(f"{file}: no 'data' list")
        unanswered = 0
        for n, entry in enumerate(tqdm(entries, desc=split, unit="q")):
            where = f"{file} data[{n}]"
            answers = [str(a) for a in require(entry, "question", where) and (entry.get("answers") or [])
                       if str(a).strip()]  # fmt: skip
            if not answers:
                unanswered += 1
                continue
            relative = safe_relative(require(entry, "image", where), where)
            source = file.parent / relative
            if source not in copied:
                copied[source] = out.save_image(
                    f"{out.name}/{split}/{relative}", source_image(file.parent, relative, where)
                )
            record = single_turn(f"{split}-{require(entry, 'questionId', where)}", "docvqa", [copied[source]],
                                 task.prompt(entry["question"]), answers[0], answers)  # fmt: skip
            out.add(split, record)
        if unanswered:
            print(f"{file.name}: {unanswered} question(s) without answers left out (the official test set hides them)")
