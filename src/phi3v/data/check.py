"""``phi3v data check``: every problem of a jsonl file with its file:line, and statistics.

Problems reported: bad JSON, missing or mistyped fields (a ``system`` that is not a non-empty string included), image
paths that are absolute or escape the image root (also through symbolic links), missing, truncated or unreadable
images, ``<|image_k|>`` tags that do not match the image count, empty answers and duplicate ids. Images are decoded
completely (in threads), once per distinct path.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from phi3v.data.paths import PathEscapeError, resolve_inside
from phi3v.data.schema import Record, parse_record
from phi3v.processing.chat import render
from phi3v.processing.image import ImageError, load_image
from phi3v.processing.processor import Phi3VProcessor, truncation_problem


@dataclass
class CheckReport:
    """What ``check_file`` found."""

    path: Path
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    images_per_sample: Counter = field(default_factory=Counter)
    token_lengths: list[int] = field(default_factory=list)
    max_length: int | None = None
    on_overflow: str = "error"
    tokenizer_note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def truncated(self) -> int:
        """Samples longer than ``max_length``."""
        return 0 if self.max_length is None else sum(n > self.max_length for n in self.token_lengths)

    def summary(self) -> str:
        """A human-readable summary with the statistics."""
        lines = [f"{self.path}: {self.samples} valid sample(s), {len(self.problems)} problem(s)"]
        if self.images_per_sample:
            spread = ", ".join(f"{n}: {c}" for n, c in sorted(self.images_per_sample.items()))
            lines.append(f"  images per sample (count: samples): {spread}")
        if self.token_lengths:
            lengths = sorted(self.token_lengths)
            p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
            lines.append(
                f"  tokens per sample: min {lengths[0]}, median {statistics.median(lengths):.0f}, "
                f"p95 {p95}, max {lengths[-1]}{self.tokenizer_note}"
            )
            if self.max_length is not None:
                fate = {"error": "each stops a run", "drop": "dropped", "truncate": "truncated"}[self.on_overflow]
                lines.append(f"  longer than max_length {self.max_length}: {self.truncated} "
                             f"(on_overflow: {self.on_overflow}, {fate})")  # fmt: skip
        return "\n".join(lines)


def check_file(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    processor: Phi3VProcessor,
    max_length: int | None = None,
    workers: int = 8,
    progress: bool = True,
    on_overflow: str = "error",
    system: str | None = None,
) -> CheckReport:
    """Check a jsonl file and its images.

    Args:
        path: The jsonl file.
        image_root: Folder the image paths are relative to.
        processor: Gives the token counts (its tokenizer and ``num_crops``).
        max_length: Count the samples longer than this.
        on_overflow: The length policy as ``train`` applies it (``JsonlDataset.screen``): under ``error`` each
            longer sample is a problem; under ``truncate`` one that cannot be cut is; ``drop`` only counts them.
        workers: Threads decoding images.
        progress: Show a progress bar.
        system: The default system message of the run (counted in the lengths of records without their own).
    """
    path, image_root = Path(path), Path(image_root)
    report = CheckReport(path, max_length=max_length, on_overflow=on_overflow)
    if not path.is_file():
        report.problems.append(f"{path}: not a file")
        return report
    root_ok = image_root.is_dir()
    if not root_ok:
        report.problems.append(f"{image_root}: image root is not a directory (images are not checked)")
    records: list[Record] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.problems.append(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                report.problems.append(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            record, problems = parse_record(obj, number)
            report.problems += [f"{path}:{number}: {p}" for p in problems]
            record_id = str(obj["id"]) if isinstance(obj, dict) and "id" in obj else None
            if record_id is not None:
                if record_id in first_line:
                    report.problems.append(
                        f"{path}:{number}: duplicate id {record_id!r} (first on line {first_line[record_id]})"
                    )
                    continue
                first_line[record_id] = number
            if record is not None:
                records.append(record)
    if not records and not report.problems:
        report.problems.append(f"{path}: no samples (the file is empty or holds only blank lines)")
    if not root_ok:
        report.samples = len(records)
        report.problems.sort(key=_line_of)
        return report

    # Decode every distinct image once.
    sizes: dict[str, tuple[int, int] | str] = {}
    distinct = sorted({p for r in records for p in r.image_paths})

    def inspect(relative: str) -> tuple[str, tuple[int, int] | str]:
        try:
            return relative, load_image(resolve_inside(image_root, relative)).size
        except PathEscapeError as err:
            return relative, f"image {err}"
        except (ImageError, ValueError, OSError) as err:  # e.g. a NUL byte in the path
            return relative, f"image {relative!r}: {err}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect, distinct)
        for relative, size in tqdm(results, total=len(distinct), desc="images", disable=not progress, unit="img"):
            sizes[relative] = size

    tokenize = processor._tokenize
    for record in records:
        bad = [(p, sizes[p]) for p in record.image_paths if isinstance(sizes[p], str)]
        if bad:
            report.problems += [f"{path}:{record.line}: {message}" for _, message in bad]
            continue
        counts = [processor.image_processor.num_image_tokens(*sizes[p]) for p in record.image_paths]
        rendered = render(record.conversation(None, system), tokenize, counts, processor.image_token_id)
        length = len(rendered.input_ids)
        if max_length is not None and length > max_length:
            if on_overflow == "error":
                report.problems.append(f"{path}:{record.line}: {length} tokens, longer than max_length {max_length} "
                                       "(on_overflow: error; or choose drop or truncate)")  # fmt: skip
            elif on_overflow == "truncate" and (cut := truncation_problem(rendered, max_length, generation=False)):
                report.problems.append(f"{path}:{record.line}: {cut}")
        report.samples += 1
        report.images_per_sample[len(record.image_paths)] += 1
        report.token_lengths.append(length)
    report.problems.sort(key=_line_of)
    return report


def _line_of(problem: str) -> int:
    """The line number of a ``file:line: message`` problem (0 for file-level problems)."""
    location = problem.split(": ", 1)[0]
    tail = location.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
