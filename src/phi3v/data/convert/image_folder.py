"""An image-classification folder: ``root/<class>/*.jpg``, or ``root/{train,val,test}/<class>/*.jpg``.

Without split folders, a seeded random ``--val-fraction`` / ``--test-fraction`` of each class is held out. Images
are copied byte for byte after a full decode check. The class list goes into ``{name}_meta.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert.common import SPLITS, ConversionError, StagedOutput, single_turn
from phi3v.data.paths import PathEscapeError, real_inside
from phi3v.processing.image import ImageError, load_image
from phi3v.tasks import get_task

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _classes(folder: Path) -> dict[str, list[Path]]:
    classes = {d.name: _images(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    return {name: files for name, files in classes.items() if files}


def convert(
    out: StagedOutput,
    src: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
) -> None:
    """Convert an image-classification folder into ``out``.

    Args:
        out: Where records and images go.
        src: ``root/<class>/*.jpg`` or ``root/{train,val,test}/<class>/*.jpg``.
        val_fraction: Without split folders: the share of each class held out as val.
        test_fraction: Without split folders: the share of each class held out as test.
        seed: Seeds the hold-out draw.
        skip_bad: Skip (and count) unreadable images instead of stopping.
    """
    root = Path(src)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory (expected {root}/<class>/*.jpg)")
    if set(SPLITS) & {d.name for d in root.iterdir() if d.is_dir()}:
        layout = {split: _classes(root / split) for split in SPLITS if (root / split).is_dir()}
    else:
        rng = random.Random(seed)
        layout = {split: {} for split in SPLITS}
        for name, files in _classes(root).items():
            files = files[:]
            rng.shuffle(files)
            n_val, n_test = round(len(files) * val_fraction), round(len(files) * test_fraction)
            layout["val"][name] = sorted(files[:n_val])
            layout["test"][name] = sorted(files[n_val : n_val + n_test])
            layout["train"][name] = sorted(files[n_val + n_test :])
    classes = sorted({name for split in layout.values() for name in split})
    if not classes:
        raise ConversionError(f"{root}: no class folders with images (expected {root}/<class>/*.jpg)")
    task = get_task("image_classification")
    prompt = task.prompt(classes)
    skipped = 0
    for split, by_class in layout.items():
        items = [(name, f) for name in sorted(by_class) for f in by_class[name]]
        for n, (name, file) in enumerate(tqdm(items, desc=split, unit="img")):
            try:
                real = real_inside(root, file)  # a link out of the folder is refused, never skipped
            except PathEscapeError as err:
                raise ConversionError(str(err)) from None
            try:
                load_image(real)
            except ImageError:
                if not skip_bad:
                    raise
                skipped += 1
                continue
            relative = f"{out.name}/{split}/{name}/{file.name}"
            shutil.copyfile(real, out.image_file(relative))
            out.add(split, single_turn(f"{split}-{n:08d}", out.name, [relative], prompt, name))
    out.add_json(f"{out.name}_meta.json", {"task": task.name, "labels": classes, "skipped_unreadable": skipped})
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (--skip-bad)")
