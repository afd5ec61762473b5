"""A dataset over a generic jsonl file: records are parsed once up front, images are opened only per item."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

from phi3v.data.paths import PathEscapeError, resolve_inside
from phi3v.data.schema import Record, parse_record
from phi3v.processing.chat import Conversation
from phi3v.processing.image import ImageError, load_image
from phi3v.processing.processor import Phi3VProcessor, Sample


class DataError(ValueError):
    """A problem in a data file; the message names the file and line.

    Raised in a data-loader worker, it reaches the main process re-created by PyTorch with a message of many lines
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); the constructor takes the
    original message back out of it, so the user sees the one line the worker raised.
    """

    def __init__(self, message: str = ""):
        marker = f"{DataError.__module__}.DataError: "
        if message.startswith("Caught DataError in DataLoader worker process") and marker in message:
            message = message.rsplit(marker, 1)[1].rstrip("\n")
        super().__init__(message)


def read_records(path: str | os.PathLike) -> list[Record]:
    """Parse every line of a jsonl file.

    Raises:
        DataError: listing every bad line (``file:line: problem``); run ``phi3v data check`` for images too.
    """
    records, problems = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start} of the line)")
                continue
            if not text.strip():
                continue
            record, found = _parse_line(text, number)
            problems += [f"{path}:{number}: {p}" for p in found]
            if record is not None:
                records.append(record)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} problem(s) in {path}:\n{shown}")
    return records


def _parse_line(text: str, number: int) -> tuple[Record | None, list[str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [f"invalid JSON ({err.msg} at column {err.colno})"]
    return parse_record(obj, number)


class JsonlDataset(Dataset):
    """Samples of a generic jsonl file, images opened only when an item is read.

    Args:
        path: The jsonl file.
        image_root: Folder the image paths are relative to.
        processor: When given, items are encoded ``Sample``\\ s; otherwise ``Conversation``\\ s with PIL images.
        max_length: Passed to ``Phi3VProcessor.encode``.
        on_overflow: ``"error"`` or ``"drop"`` for samples longer than ``max_length`` (dropped items are ``None``,
            which the collator counts).
        system: Optional system message for every conversation.
        uint8_pixels: Encode crops as uint8 for ``Phi3VImageProcessor.finish`` on the device (training).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        processor: Phi3VProcessor | None = None,
        max_length: int | None = None,
        on_overflow: Literal["error", "drop"] = "error",
        system: str | None = None,
        uint8_pixels: bool = False,
    ):
        self.path = Path(path)
        self.image_root = Path(image_root)
        self.processor = processor
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.system = system
        self.uint8_pixels = uint8_pixels
        self.records = read_records(self.path)

    def __len__(self) -> int:
        return len(self.records)

    def image_size(self, relative: str) -> tuple[int, int]:
        """``(width, height)`` of an image as ``load_image`` will return it, from its header only."""
        try:
            path = resolve_inside(self.image_root, relative)
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
                    width, height = height, width
        except PathEscapeError as err:
            raise ImageError(f"image {err}") from None
        except (OSError, ValueError) as err:
            raise ImageError(f"{self.image_root / relative}: cannot read image ({err})") from err
        return width, height

    def drop_long(self) -> int:
        """Remove the samples longer than ``max_length`` (counted from image headers and the tokenizer, without
        decoding pixels); returns how many were removed. Needs a processor."""
        if self.processor is None or self.max_length is None:
            return 0
        kept = []
        for record in self.records:
            conversation = record.conversation()
            sizes = [self.image_size(p) for p in record.image_paths]
            try:
                rendered = self.processor.render(conversation, image_sizes=sizes)
            except ValueError as err:
                raise DataError(f"{self.path}:{record.line} (id {record.id}): {err}") from err
            if len(rendered.input_ids) <= self.max_length:
                kept.append(record)
        dropped = len(self.records) - len(kept)
        self.records = kept
        return dropped

    def conversation(self, index: int) -> Conversation:
        """The conversation of item ``index`` with its images opened."""
        record = self.records[index]
        conversation = record.conversation(None, self.system)
        for turn in conversation.turns:
            turn.images = [self._open(relative) for relative in turn.images]
        return conversation

    def _open(self, relative: str) -> Image.Image:
        """An image of the file, opened only when it lies inside the image root (symbolic links resolved)."""
        try:
            return load_image(resolve_inside(self.image_root, relative))
        except PathEscapeError as err:
            raise ImageError(f"image {err}") from None

    def __getitem__(self, index: int) -> Sample | Conversation | None:
        record = self.records[index]
        try:
            conversation = self.conversation(index)
            if self.processor is None:
                return conversation
            return self.processor.encode(
                conversation, max_length=self.max_length, on_overflow=self.on_overflow, uint8_pixels=self.uint8_pixels
            )
        except ValueError as err:  # ImageError, TruncationError, tag problems
            raise DataError(f"{self.path}:{record.line} (id {record.id}): {err}") from err
