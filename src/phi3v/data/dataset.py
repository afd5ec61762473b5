"""A dataset over a generic jsonl file: records are parsed once up front, images are opened only per item."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

from phi3v.data.paths import PathEscapeError, resolve_inside
from phi3v.data.schema import Record, parse_record
from phi3v.processing.chat import Conversation
from phi3v.processing.collate import Sample
from phi3v.processing.image import ImageError, load_image
from phi3v.processing.processor import Phi3VProcessor, truncation_problem

logger = logging.getLogger("phi3v")
OnOverflow = Literal["error", "truncate", "drop"]
"""What happens to a sample longer than ``max_length``; the one length policy of ``data check``, ``train`` and
``eval`` (see ``JsonlDataset.screen``)."""


@dataclass
class Screening:
    """What ``JsonlDataset.screen`` removed or will cut."""

    dropped: int = 0
    """Samples longer than ``max_length``, removed (``on_overflow: drop``)."""
    truncated: int = 0
    """Samples longer than ``max_length``, kept to be cut at it (``on_overflow: truncate``)."""
    bad_images: int = 0
    """Samples with a missing or undecodable image, removed (``skip_bad_images``)."""
    duplicate_ids: int = 0
    """Samples whose id an earlier line already had (kept: they train, but ``data check`` flags them)."""


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
        max_length: Samples are cut at it (``screen`` decides up front which may be: see ``on_overflow`` there).
        system: The default system message, for records without their own ``system`` (a record's own wins).
        uint8_pixels: Encode crops as uint8 for ``Phi3VImageProcessor.finish`` on the device (training).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        processor: Phi3VProcessor | None = None,
        max_length: int | None = None,
        system: str | None = None,
        uint8_pixels: bool = False,
    ):
        self.path = Path(path)
        self.image_root = Path(image_root)
        self.processor = processor
        self.max_length = max_length
        self.system = system
        self.uint8_pixels = uint8_pixels
        self.records = read_records(self.path)
        self._real_paths: dict[str, Path] = {}  # relative -> real path, checked inside the root once per process

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

    def screen(
        self,
        on_overflow: OnOverflow = "error",
        skip_bad_images: bool = False,
        workers: int = 4,
        evaluation: bool = False,
    ) -> Screening:
        """Check every sample up front, before any step: images decoded (in threads, each distinct path once), token
        lengths against ``max_length`` (needs a processor), the length policy applied. Removes what is dropped or
        skipped, so that every rank keeps the same samples and no batch comes out empty.

        Args:
            on_overflow: A sample longer than ``max_length``: ``error`` stops with its file and line, ``drop``
                removes it, ``truncate`` keeps it to be cut at ``max_length`` (when the cut would split an image or
                keep no answer token, that is an error too).
            skip_bad_images: Remove a sample with a missing or undecodable image instead of stopping.
            workers: Threads decoding images.
            evaluation: The samples are evaluated, not trained on: under ``truncate`` a longer sample is kept when
                its prompt (up to the last turn's answer) fits in ``max_length``, to be evaluated with that whole
                prompt; one whose prompt does not fit is an error (a prompt is never cut).

        Returns:
            What was removed or will be cut, counted.

        Raises:
            DataError: listing every sample that stops the run (``file:line (id): problem``; one line for one).
        """
        from concurrent.futures import ThreadPoolExecutor

        def inspect(relative: str) -> tuple[str, tuple[int, int] | str]:
            try:
                return relative, self._open(relative).size
            except (ValueError, OSError) as err:  # ImageError, a NUL byte in the path
                return relative, str(err)

        distinct = sorted({p for r in self.records for p in r.image_paths})
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            sizes = dict(pool.map(inspect, distinct))
        result, kept, problems = Screening(), [], []
        seen: dict[str, int] = {}
        for record in self.records:
            if record.id in seen:
                result.duplicate_ids += 1
                if result.duplicate_ids == 1:
                    logger.warning("%s:%d: duplicate id %r (first on line %d); `phi3v data check` lists them all",
                                   self.path, record.line, record.id, seen[record.id])  # fmt: skip
            seen.setdefault(record.id, record.line)
        for record in self.records:
            where = f"{self.path}:{record.line} (id {record.id})"
            bad = [sizes[p] for p in record.image_paths if isinstance(sizes[p], str)]
            if bad:
                if not skip_bad_images:
                    problems.append(f"{where}: {bad[0]}")
                    continue
                result.bad_images += 1
                continue
            if self.processor is not None and self.max_length is not None:
                conversation = record.conversation(None, self.system)
                image_sizes = [sizes[p] for p in record.image_paths]
                try:
                    rendered = self.processor.render(conversation, image_sizes=image_sizes)
                except ValueError as err:
                    problems.append(f"{where}: {err}")
                    continue
                length = len(rendered.input_ids)
                if length > self.max_length:
                    if on_overflow == "drop":
                        result.dropped += 1
                        continue
                    if on_overflow == "error":
                        problems.append(f"{where}: {length} tokens, longer than max_length {self.max_length} "
                                        "(on_overflow: error; or choose drop or truncate)")  # fmt: skip
                        continue
                    if evaluation:
                        prompt = self.processor.render(conversation, generation=True, image_sizes=image_sizes)
                        cut = None
                        if len(prompt.input_ids) > self.max_length:
                            cut = truncation_problem(prompt, self.max_length, generation=True) + (
                                " (on_overflow: truncate never cuts a prompt to evaluate; choose drop or raise "
                                "max_length)"
                            )
                    else:
                        cut = truncation_problem(rendered, self.max_length, generation=False)
                    if cut:
                        problems.append(f"{where}: {cut}")
                        continue
                    result.truncated += 1
            kept.append(record)
        if len(problems) == 1:  # one line, as the command prints it
            raise DataError(problems[0])
        if problems:
            shown = "\n".join(problems[:20]) + (f"\n... {len(problems) - 20} more" if len(problems) > 20 else "")
            raise DataError(f"{len(problems)} sample(s) of {self.path} cannot be used:\n{shown}")
        self.records = kept
        return result

    def conversation(self, index: int) -> Conversation:
        """The conversation of item ``index`` with its images opened."""
        record = self.records[index]
        conversation = record.conversation(None, self.system)
        try:
            for turn in conversation.turns:
                turn.images = [self._open(relative) for relative in turn.images]
        except ValueError as err:  # ImageError: name the data file and line, not only the image
            raise DataError(f"{self.path}:{record.line} (id {record.id}): {err}") from err
        return conversation

    def _open(self, relative: str) -> Image.Image:
        """An image of the file, opened only when it lies inside the image root (symbolic links resolved)."""
        real = self._real_paths.get(relative)
        if real is None:
            try:
                real = resolve_inside(self.image_root, relative)
            except PathEscapeError as err:
                raise ImageError(f"image {err}") from None
            self._real_paths[relative] = real
        return load_image(real)

    def __getitem__(self, index: int) -> Sample | Conversation | None:
        record = self.records[index]
        conversation = self.conversation(index)
        if self.processor is None:
            return conversation
        try:
            return self.processor.encode(
                conversation, max_length=self.max_length, on_overflow="error", uint8_pixels=self.uint8_pixels
            )
        except ValueError as err:  # TruncationError, tag problems
            raise DataError(f"{self.path}:{record.line} (id {record.id}): {err}") from err


def apply_length_policy(
    dataset: JsonlDataset,
    processor: Phi3VProcessor,
    max_length: int,
    on_overflow: OnOverflow = "error",
    skip_bad_images: bool = False,
    workers: int = 4,
) -> dict[str, int | str]:
    """Training's length policy applied to evaluation samples (``phi3v eval --max-length``, and ``val_data`` during
    training): ``JsonlDataset.screen`` on the sample as it trains, prompt and answer, so ``max_length`` means what it
    means for ``train`` and ``data check``.

    ``error`` stops naming file, line and id; ``drop`` removes the sample. ``truncate`` keeps a sample whose prompt
    (the conversation up to the last turn's answer) fits in ``max_length``: it is evaluated with that whole prompt,
    as only its reference answer runs past ``max_length``, and counted as truncated. A prompt is never cut: one that
    does not fit stops the evaluation, naming file, line and id.

    Returns:
        ``{"max_length", "on_overflow", "dropped", "truncated", "bad_images"}`` (``bad_images``: samples removed
        for a missing or undecodable image, with ``skip_bad_images``; without it such a sample raises).

    Raises:
        DataError: listing every sample that cannot be evaluated.
    """
    dataset.processor, dataset.max_length = processor, max_length
    try:
        screened = dataset.screen(on_overflow, skip_bad_images, workers=workers, evaluation=True)
    finally:
        dataset.processor = None  # evaluation encodes the prompts itself
    return {"max_length": max_length, "on_overflow": on_overflow, "dropped": screened.dropped,
            "truncated": screened.truncated, "bad_images": screened.bad_images}  # fmt: skip
