"""Hateful memes, from the_cauldron ``hateful_memes`` or the original release.

* the_cauldron (``images`` + ``texts``): the first text of each row, as in the reference recipe; the first
  ``val_size`` rows form the val split (the reference recipe's ``train[:500]``);
* the original release: ``train.jsonl``, ``dev_seen.jsonl`` / ``dev_unseen.jsonl`` (or phase 1's ``dev.jsonl``) and
  ``test*.jsonl``, rows ``{id, img, label, text}`` with ``img`` relative to the folder; rows without a label are
  counted and left out.

Exactly one validation split is written, chosen by ``val_split``:

* ``"reference"`` (default): the first ``val_size`` memes of ``train.jsonl``, the reference recipe's choice (it
  holds out ``train[:500]`` of its the_cauldron copy and never reads a dev file); the dev files are not converted,
  and the converter says so;
* ``"dev_seen"`` / ``"dev_unseen"``: that dev file, the literature's validation sets (Kiela et al. 2020 report
  dev_seen). The two share 400 memes, so they are never merged; the other one is not converted.

A meme id is written at most once per split (repeats are counted and reported), so no score counts a meme twice.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, get_args

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
    source_image,
)
from phi3v.tasks import get_task

ValSplit = Literal["reference", "dev_seen", "dev_unseen"]
VAL_SPLITS: tuple[str, ...] = get_args(ValSplit)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-size", type=int, help="memes of train held out as val (val split 'reference')")
    parser.add_argument("--val-split", choices=VAL_SPLITS, help="the one validation split")


def _split_of(name: str) -> str | None:
    for prefix, split in (("train", "train"), ("dev", "val"), ("val", "val"), ("test", "test")):
        if name.startswith(prefix):
            return split
    return None


def convert(
    out: StagedOutput, src: str | os.PathLike, *, val_size: int = 500, val_split: ValSplit = "reference"
) -> None:
    """Convert hateful memes into ``out``.

    Args:
        out: Where records and images go.
        src: A the_cauldron copy (``save_to_disk`` folder or parquet/arrow files), or the original release's folder.
        val_size: With ``val_split="reference"``: the first memes of the training file held out as val.
        val_split: Which memes form the one validation split (see the module docstring).
    """
    if val_split not in VAL_SPLITS:
        raise ConversionError(f"--val-split {val_split!r}: choose one of {', '.join(VAL_SPLITS)}")
    src = Path(src)
    originals = sorted(p for p in src.glob("*.jsonl") if _split_of(p.name)) if src.is_dir() else []
    if originals:
        _convert_original(originals, out, val_size, val_split)
        return
    if val_split != "reference":
        raise ConversionError(f"{src}: --val-split {val_split} needs the original release's {val_split}.jsonl")
    for split, dataset in hf.load_splits(src).items():
        if not hf.cauldron_rows(dataset):
            raise ConversionError(f"{src} ({split}): columns {dataset.column_names} are not the_cauldron's")
        dataset = hf.undecoded(dataset, "images")
        for row_index, row in enumerate(tqdm(dataset, desc=split, unit="meme")):
            target = "val" if split == "train" and row_index < val_size else split
            image = hf.image_bytes(row["images"][0], f"{src} {split} row {row_index}", src)
            path = out.save_image(f"{out.name}/{split}/{row_index:07d}{image_extension(image)}", image)
            text = row["texts"][0]
            out.add(target, single_turn(f"{split}-{row_index:07d}", "hateful_memes", [path], text["user"],
                                        text["assistant"]))  # fmt: skip


def _convert_original(files: list[Path], out: StagedOutput, val_size: int, val_split: str) -> None:
    task = get_task("hateful_memes")
    names = {file.stem: file for file in files}
    if val_split != "reference":
        dev = names.get(val_split) or (names.get("dev") if val_split == "dev_seen" else None)
        if dev is None:
            raise ConversionError(f"--val-split {val_split}: no {val_split}.jsonl in {files[0].parent}")
    else:
        dev = None
    if "train" not in names and val_split == "reference":
        raise ConversionError(f"{files[0].parent}: no train.jsonl to hold val memes out of (or pass --val-split)")
    left_out = [f.name for f in files if _split_of(f.name) == "val" and f != dev]
    written: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    repeated: dict[str, int] = {}
    for file in files:
        split = _split_of(file.name)
        if split == "val" and file != dev:
            continue
        unlabelled = 0
        for where, row in jsonl_rows(file, "meme"):
            if isinstance(row, dict) and row.get("label") is None:
                unlabelled += 1
                continue
            meme = str(require(row, "id", where))
            target = split
            if split == "train" and val_split == "reference" and len(written["val"]) < val_size:
                target = "val"
            if meme in written[target]:  # e.g. test_seen and test_unseen, or a repeated row
                repeated[target] = repeated.get(target, 0) + 1
                continue
            written[target].add(meme)
            relative = safe_relative(require(row, "img", where), where)
            path = out.save_image(f"{out.name}/{relative}", source_image(file.parent, relative, where))
            if row["label"] not in (0, 1, "0", "1"):
                raise ConversionError(f"{where}: label {row['label']!r} is not 0 or 1")
            answer = "yes" if int(row["label"]) == 1 else "no"
            record_id = f"{file.stem}-{meme}"
            out.add(target, single_turn(record_id, "hateful_memes", [path], task.prompt(require(row, "text", where)),
                                        answer))  # fmt: skip
        if unlabelled:
            print(f"{file.name}: {unlabelled} row(s) without a label left out")
    for split, count in repeated.items():
        print(f"{split}: {count} meme(s) already written to this split left out (each meme is scored once)")
    chosen = f"{dev.name}" if dev is not None else f"the first {val_size} memes of train.jsonl (the reference's choice)"
    print(f"validation split: {chosen}" + (f"; not converted: {', '.join(left_out)}" if left_out else ""))
