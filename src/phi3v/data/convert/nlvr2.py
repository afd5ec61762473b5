"""NLVR2 (two images per statement), from the_cauldron ``nlvr2`` or the original release.

* the_cauldron (``images`` = the two images, ``texts`` = several questions about them): one multi-turn record per
  row with both images on the first turn, every turn trained on, as in the reference recipe; the first
  ``--val-size`` rows form the val split;
* the original release: ``train.json``, ``dev.json``, ``test1.json`` (one JSON object per line:
  ``identifier``, ``sentence``, ``label``) with the images ``{identifier minus its last -N}-img0.png`` and
  ``-img1.png`` anywhere under ``--image-dir`` (default ``SRC/images``).
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
    single_turn,
)
from phi3v.data.schema import Record
from phi3v.processing.chat import Turn
from phi3v.tasks import get_task

_ORIGINAL = {"train.json": "train", "dev.json": "val", "test1.json": "test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-size", type=int, help="the_cauldron: rows held out as val")
    parser.add_argument("--image-dir", help="original release: folder holding the images")


def convert(
    out: StagedOutput, src: str | os.PathLike, *, val_size: int = 500, image_dir: str | os.PathLike | None = None
) -> None:
    src = Path(src)
    originals = [src / name for name in _ORIGINAL if (src / name).exists()] if src.is_dir() else []
    if originals:
        _convert_original(originals, Path(image_dir) if image_dir else src / "images", out)
        return
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
                image = hf.image_bytes(cell, where)
                paths.append(
                    out.save_image(f"{out.name}/{split}/{row_index:07d}-img{k}{image_extension(image)}", image)
                )
            turns = [Turn(t["user"], [], t["assistant"]) for t in row["texts"]]
            turns[0].images = paths
            out.add(target, Record(f"{split}-{row_index:07d}", "nlvr2", turns, [turns[-1].assistant]))


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
                    out.save_image(relative, by_name[name].read_bytes())
                    copied.add(relative)
                paths.append(relative)
            answer = str(require(row, "label", where)).strip().lower()
            if answer not in ("true", "false"):
                raise ConversionError(f"{where}: label {row['label']!r} is not True/False")
            sentence = require(row, "sentence", where)
            record = single_turn(f"{split}-{identifier}", "nlvr2", paths, task.prompt(sentence), answer)
            out.add(split, record)
