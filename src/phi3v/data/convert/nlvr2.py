"""NLVR2 (two images per statement), from the_cauldron ``nlvr2`` or the original release.

* the_cauldron (``images`` = the two images, ``texts`` = several questions about them): one multi-turn record per
  training row with both images on the first turn, every turn trained on, as in the reference recipe; the first
  ``val_size`` rows form the val split. Val and test records keep only the first turn (``eval_turns="first"``):
  the reference recipe evaluates ``texts[0]`` alone, so a score over these records is the one it reports;
  ``eval_turns="all"`` keeps every turn (evaluation then answers the last one);
* the original release: ``train.json``, ``dev.json`` and one test file (one JSON object per line:
  ``identifier``, ``sentence``, ``label``) with the images ``{identifier minus its last -N}-img0.png`` and
  ``-img1.png`` anywhere under ``image_dir`` (default ``SRC/images``). The test split is ``test1.json``
  (``test_file="test1"``) or ``test2.json`` (``"test2"``); the other one, when present, is reported as not
  converted.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from phi3v.data.convert import hf
from phi3v.data.convert.common import (
    ConversionError,
    StagedOutput,
    image_extension,
    jsonl_rows,
    require,
    single_turn,
    source_image,
)
from phi3v.data.schema import Record
from phi3v.processing.chat import Turn
from phi3v.tasks import get_task

_ORIGINAL = {"train.json": "train", "dev.json": "val", "test1.json": "test", "test2.json": "test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-size", type=int, help="the_cauldron: rows held out as val")
    parser.add_argument("--image-dir", help="original release: folder holding the images")
    parser.add_argument("--eval-turns", choices=["first", "all"], help="the_cauldron: turns kept in val/test records")
    parser.add_argument("--test-file", choices=["test1", "test2"], help="original release: the test split's file")


def convert(
    out: StagedOutput,
    src: str | os.PathLike,
    *,
    val_size: int = 500,
    image_dir: str | os.PathLike | None = None,
    eval_turns: Literal["first", "all"] = "first",
    test_file: Literal["test1", "test2"] = "test1",
) -> None:
    """Convert NLVR2 into ``out``.

    Args:
        out: Where records and images go.
        src: A the_cauldron copy, or the original release's folder.
        val_size: the_cauldron: the first rows held out as val (the reference recipe's 500).
        image_dir: Original release: the folder holding the images (default ``SRC/images``).
        eval_turns: the_cauldron: ``"first"`` keeps only the first turn of val and test records, as the reference
            recipe scores them; ``"all"`` keeps every turn.
        test_file: Original release: ``"test1"`` or ``"test2"`` becomes the test split.
    """
    if eval_turns not in ("first", "all"):
        raise ConversionError(f"--eval-turns {eval_turns!r}: choose first or all")
    if test_file not in ("test1", "test2"):
        raise ConversionError(f"--test-file {test_file!r}: choose test1 or test2")
    src = Path(src)
    originals = [src / name for name in _ORIGINAL if (src / name).exists()] if src.is_dir() else []
    if originals:
        other = src / ("test2.json" if test_file == "test1" else "test1.json")
        if not (src / f"{test_file}.json").exists() and test_file == "test2":
            raise ConversionError(f"--test-file test2: {src / 'test2.json'} not found")
        if other.exists():
            print(f"{other.name}: not converted (the test split is {test_file}.json; pass test_file / --test-file)")
        originals = [f for f in originals if f != other]
        _convert_original(originals, Path(image_dir) if image_dir else src / "images", out)
        return
    kept_first = 0
    for split, dataset in hf.load_splits(src).items():
        if not hf.cauldron_rows(dataset):
            raise ConversionError(f"{src} ({split}): columns {dataset.column_names} are not the_cauldron's")
        dataset = hf.undecoded(dataset, "images")
        for row_index, row in enumerate(tqdm(dataset, desc=split, unit="pair")):
            where = f"{src} {split} row {row_index}"
            if len(row["images"]) != 2:
                raise ConversionError(f"{where}: {len(row['images'])} images; NLVR2 rows have exactly 2")
            target = "val" if split == "train" and row_index < val_size else split
            paths = []
            for k, cell in enumerate(row["images"]):
                image = hf.image_bytes(cell, where, src)
                paths.append(
                    out.save_image(f"{out.name}/{split}/{row_index:07d}-img{k}{image_extension(image)}", image)
                )
            turns = [Turn(t["user"], [], t["assistant"]) for t in row["texts"]]
            turns[0].images = paths
            if target != "train" and eval_turns == "first" and len(turns) > 1:
                turns = turns[:1]  # the reference recipe scores texts[0] only
                kept_first += 1
            out.add(target, Record(f"{split}-{row_index:07d}", "nlvr2", turns, [turns[-1].assistant]))
    if kept_first:
        print(f"{kept_first} multi-turn val/test record(s) cut to their first turn, as the reference recipe scores")


def _convert_original(files: list[Path], image_dir: Path, out: StagedOutput) -> None:
    if not image_dir.is_dir():
        raise ConversionError(f"{image_dir}: image folder not found (pass --image-dir)")
    by_name = {p.name: p for p in image_dir.rglob("*.png")}
    task = get_task("nlvr2")
    copied: set[str] = set()
    for file in files:
        split = _ORIGINAL[file.name]
        for where, row in jsonl_rows(file, "pair"):
            identifier = str(require(row, "identifier", where))
            stem = identifier.rsplit("-", 1)[0]
            paths = []
            for k in (0, 1):
                name = f"{stem}-img{k}.png"
                if name not in by_name:
                    raise ConversionError(f"{where}: image {name} not found under {image_dir}")
                relative = f"{out.name}/{split}/{name}"
                if relative not in copied:  # several statements share one image pair
                    out.save_image(relative, source_image(image_dir, by_name[name], where))
                    copied.add(relative)
                paths.append(relative)
            answer = str(require(row, "label", where)).strip().lower()
            if answer not in ("true", "false"):
                raise ConversionError(f"{where}: label {row['label']!r} is not True/False")
            sentence = require(row, "sentence", where)
            record = single_turn(f"{split}-{identifier}", "nlvr2", paths, task.prompt(sentence), answer)
            out.add(split, record)
