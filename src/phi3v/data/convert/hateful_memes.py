"""Hateful memes, from the_cauldron ``hateful_memes`` or the original release.

* the_cauldron (``images`` + ``texts``): the first text of each row, as in the reference recipe; the first
  ``--val-size`` rows form the val split;
* the original release: ``train.jsonl``, ``dev*.jsonl``, ``test*.jsonl`` rows ``{id, img, label, text}`` with
  ``img`` relative to the folder; rows without a label are counted and left out.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert import hf
from phi3v.data.convert.common import (
    ConversionError,
    StagedOutput,
    image_extension,
    jsonl_rows,
    require,
    safe_relative,
    single_turn,
)
from phi3v.tasks import get_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-size", type=int, help="the_cauldron: rows held out as val")


def _split_of(name: str) -> str | None:
    for prefix, split in (("train", "train"), ("dev", "val"), ("val", "val"), ("test", "test")):
        if name.startswith(prefix):
            return split
    return None


def convert(out: StagedOutput, src: str | os.PathLike, *, val_size: int = 500) -> None:
    src = Path(src)
    originals = sorted(p for p in src.glob("*.jsonl") if _split_of(p.name)) if src.is_dir() else []
    if originals:
        _convert_original(originals, out)
        return
    for split, dataset in hf.load_splits(src).items():
        if not hf.cauldron_rows(dataset):
            raise ConversionError(f"{src} ({split}): columns {dataset.column_names} are not the_cauldron's")
        dataset = hf.undecoded(dataset, "images")
        for row_index, row in enumerate(tqdm(dataset, desc=split, unit="meme")):
            target = "val" if split == "train" and row_index < val_size else split
            image = hf.image_bytes(row["images"][0], f"{src} {split} row {row_index}")
            path = out.save_image(f"{out.name}/{split}/{row_index:07d}{image_extension(image)}", image)
            text = row["texts"][0]
            out.add(target, single_turn(f"{split}-{row_index:07d}", "hateful_memes", [path], text["user"],
                                        text["assistant"]))  # fmt: skip


def _convert_original(files: list[Path], out: StagedOutput) -> None:
    task = get_task("hateful_memes")
    for file in files:
        split = _split_of(file.name)
        unlabelled = 0
        for where, row in jsonl_rows(file, "meme"):
            if isinstance(row, dict) and row.get("label") is None:
                unlabelled += 1
                continue
            relative = safe_relative(require(row, "img", where), where)
            image = file.parent / relative
            if not image.exists():
                raise ConversionError(f"{where}: image {image} not found")
            path = out.save_image(f"{out.name}/{relative}", image.read_bytes())
            if row["label"] not in (0, 1, "0", "1"):
                raise ConversionError(f"{where}: label {row['label']!r} is not 0 or 1")
            answer = "yes" if int(row["label"]) == 1 else "no"
            # dev_seen and dev_unseen share ids: the file name keeps them apart
            record_id = f"{file.stem}-{require(row, 'id', where)}"
            out.add(split, single_turn(record_id, "hateful_memes", [path], task.prompt(require(row, "text", where)),
                                       answer))  # fmt: skip
        if unlabelled:
            print(f"{file.name}: {unlabelled} row(s) without a label left out")
