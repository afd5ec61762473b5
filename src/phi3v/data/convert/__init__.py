"""Converters from raw datasets to the generic jsonl format: one module per source, one registry."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from phi3v.data.convert import digits, docvqa, hateful_memes, image_folder, llava, nlvr2, ucf101
from phi3v.data.convert.common import ConversionError, StagedOutput

SOURCES: dict[str, ModuleType] = {
    "ucf101": ucf101,
    "docvqa": docvqa,
    "hateful_memes": hateful_memes,
    "nlvr2": nlvr2,
    "llava": llava,
    "image_folder": image_folder,
    "digits": digits,
}


def options(source: str) -> list[str]:
    """The keyword arguments the named source's ``convert`` takes (``src`` included)."""
    return [name for name in inspect.signature(_module(source).convert).parameters if name != "out"]


def run(source: str, out: str | os.PathLike, name: str | None = None, **kwargs: Any) -> list[Path]:
    """Convert with the named source's converter into ``out``; all or nothing.

    Args:
        source: A key of ``SOURCES``.
        out: Output folder.
        name: Dataset name in the file names (default: ``source``).
        **kwargs: The converter's own typed keyword arguments (``src=...``, ``val_size=...``; see ``options``).

    Returns:
        The published data files.

    Raises:
        ConversionError: for an unknown source or option, or a source that cannot be converted.
    """
    module = _module(source)
    unknown = sorted(set(kwargs) - set(options(source)))
    if unknown:
        raise ConversionError(f"{source} converter: unknown option(s) {unknown}; known: {', '.join(options(source))}")
    with StagedOutput(out, name or source) as staged:
        module.convert(staged, **kwargs)
        written = staged.commit()
        print(staged.summary(written))
    return written


def _module(source: str) -> ModuleType:
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[source]


def check_written(files: list, out_dir, num_crops: int, processor=None) -> bool:
    """Run ``phi3v data check`` on each written jsonl file; print the reports. True when all are clean.

    Token counts use ``processor`` when given, else the official image geometry and phi3v's small tokenizer.
    """
    from pathlib import Path

    from phi3v.data.check import check_file
    from phi3v.processing import Phi3VImageProcessor, Phi3VProcessor, build_tiny_tokenizer

    note = f" (num_crops {num_crops})"
    if processor is None:
        image_processor = Phi3VImageProcessor(num_crops=num_crops)
        processor = Phi3VProcessor(image_processor, build_tiny_tokenizer(), image_token_id=32044)
        note = f" (num_crops {num_crops}; text counted with phi3v's small tokenizer)"
    clean = True
    for file in files:
        if file.suffix != ".jsonl":
            continue
        report = check_file(file, Path(out_dir) / "images", processor, progress=False)
        report.tokenizer_note = note
        for problem in report.problems:
            print(problem)
        print(report.summary())
        clean = clean and report.ok
    return clean


__all__ = ["SOURCES", "ConversionError", "StagedOutput", "check_written", "options", "run"]
