"""Converters from raw datasets to the generic jsonl format: one module per source, one registry."""

from __future__ import annotations

import argparse
from types import ModuleType

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


def run(source: str, args: argparse.Namespace) -> list:
    """Convert ``args.src`` into ``args.out`` with the named source's converter; all or nothing.

    Returns:
        The published data files.
    """
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    with StagedOutput(args.out, args.name or source) as out:
        SOURCES[source].convert(args, out)
        written = out.commit()
        print(out.summary(written))
    return written


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


__all__ = ["SOURCES", "ConversionError", "StagedOutput", "check_written", "run"]
