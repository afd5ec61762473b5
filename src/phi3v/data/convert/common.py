"""What every converter shares: staged, all-or-nothing output.

A converter writes into ``OUT/.staging-NAME/`` (images under ``images/``, one jsonl per split). Only when it has
finished are the images moved into ``OUT/images/`` and then the jsonl files into ``OUT/``, each by an atomic
rename. An interrupted run therefore leaves no jsonl and no partly written image in ``OUT``; its staging folder is
wiped by the next run, which starts over.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from phi3v.data.paths import read_image_inside
from phi3v.data.schema import Record, check_image_path, parse_record
from phi3v.processing.chat import Turn

SPLITS = ("train", "val", "test")


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and what is wrong."""


class StagedOutput:
    """Collects a converter's records and images and publishes them together.

    Args:
        out_dir: Final output folder.
        name: Dataset name; the files are ``{name}_{split}.jsonl``.

    Use as a context manager: ``commit()`` publishes; leaving the block without it (an error) discards the stage.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        self.stage = self.out_dir / f".staging-{name}"
        self.counts: Counter = Counter()
        self._images: set[str] = set()
        self._ids: dict[str, set[str]] = {}
        self._files: dict[str, Any] = {}

    @property
    def images_written(self) -> int:
        return len(self._images)

    def __enter__(self) -> StagedOutput:
        if self.stage.exists():  # left by an interrupted run
            shutil.rmtree(self.stage)
        (self.stage / "images").mkdir(parents=True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for f in self._files.values():
            f.close()
        if self.stage.exists():
            shutil.rmtree(self.stage)

    def image_file(self, relative: str) -> Path:
        """Where to write the image that will live at ``OUT/images/{relative}``."""
        if reason := check_image_path(relative):
            raise ConversionError(reason)
        path = self.stage / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        self._images.add(relative)
        return path

    def save_image(self, relative: str, image: Image.Image | bytes) -> str:
        """Write an image (a PIL image, or encoded bytes kept as they are) and return its relative path."""
        target = self.image_file(relative)
        if isinstance(image, bytes):
            target.write_bytes(image)
        else:
            image.save(target)
        return relative

    def add(self, split: str, record: Record, dataset: str | None = None) -> None:
        """Append a record to ``{dataset}_{split}.jsonl`` (``dataset`` defaults to the output's name)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        file = f"{dataset or self.name}_{split}.jsonl"
        # Nothing that `phi3v data check` would reject is ever published: check before writing.
        _, problems = parse_record(record.to_json())
        if problems:
            raise ConversionError(f"record {record.id!r} for {file}: " + "; ".join(problems))
        ids = self._ids.setdefault(file, set())
        if record.id in ids:
            raise ConversionError(f"record id {record.id!r} occurs twice in {file}")
        ids.add(record.id)
        if file not in self._files:
            self._files[file] = open(self.stage / file, "w", encoding="utf-8")  # noqa: SIM115
        self._files[file].write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        self.counts[file] += 1

    def add_json(self, file: str, data: Any) -> None:
        """A small json side file (e.g. the label set), published with the jsonl files."""
        (self.stage / file).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def commit(self) -> list[Path]:
        """Publish: images first, then the json and jsonl files. Returns the published data files."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        staged_images = self.stage / "images"
        for source in sorted(p for p in staged_images.rglob("*") if p.is_file()):
            target = self.out_dir / "images" / source.relative_to(staged_images)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        written = []
        for staged in sorted(self.stage.glob("*.json*")):
            written.append(self.out_dir / staged.name)
            os.replace(staged, written[-1])
        # Split files of an earlier run of this dataset that this run did not write would be mistaken for its own.
        names = {self.name, *(f.name.rsplit("_", 1)[0] for f in written if f.suffix == ".jsonl")}
        for name in names:
            for split in SPLITS:
                stale = self.out_dir / f"{name}_{split}.jsonl"
                if stale.exists() and stale not in written:
                    stale.unlink()
                    print(f"removed {stale} (left by an earlier run; this run wrote no {split} split)")
        shutil.rmtree(self.stage)
        return written

    def summary(self, written: list[Path]) -> str:
        """What a converter prints when done."""
        lines = [f"wrote {self.images_written} image(s) under {self.out_dir / 'images'} and:"]
        for path in written:
            count = self.counts.get(path.name)
            lines.append(f"  {path}" + (f"  ({count} samples)" if count is not None else ""))
        return "\n".join(lines)


def image_extension(data: bytes) -> str:
    """File extension for encoded image bytes, from their content (``.png``, ``.jpg`` ...)."""
    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "png").lower()
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def require(row: Any, key: str, where: str) -> Any:
    """``row[key]``, or a ``ConversionError`` naming the row and the missing field."""
    if not isinstance(row, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise ConversionError(f"{where}: field {key!r} is missing")
    return row[key]


def safe_relative(path: Any, where: str) -> str:
    """A source-relative path after the same checks as image paths of the format (no absolute, no ``..``)."""
    if not isinstance(path, str) or not path:
        raise ConversionError(f"{where}: expected a relative file path, got {path!r}")
    if reason := check_image_path(path):
        raise ConversionError(f"{where}: {reason}")
    return path


def jsonl_rows(file: Path, unit: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each non-empty line of a jsonl source file, ``where`` = ``file:line``; with a progress
    bar. A line that is not JSON raises ``ConversionError`` naming it."""
    from tqdm import tqdm

    lines = file.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(tqdm(lines, desc=file.name, unit=unit), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{file}:{number}: invalid JSON ({err.msg})") from err
        yield f"{file}:{number}", row


def source_image(root: str | os.PathLike, path: str | os.PathLike, where: str) -> bytes:
    """The bytes of a source image under ``root`` (``--src`` or the image folder), refused before anything is
    staged when it resolves outside ``root`` (through ``..`` or a symbolic link) or is not an image.

    Raises:
        ConversionError: naming ``where`` (the record) and the path.
    """
    try:
        return read_image_inside(root, path, where)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def single_turn(record_id: str, source: str, images: list[str], user: str, answer: str, references=None) -> Record:
    """A one-turn record."""
    return Record(record_id, source, [Turn(user, images, answer)], list(references or [answer]))
