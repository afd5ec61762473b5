"""LLaVA-style json (a list, or jsonl): ``image`` (a path or a list), ``conversations[{from, value}]``.

``<image>`` tags in a human turn become that turn's ``<|image_k|>`` tags, images assigned in order. A record with
images but no tag gets its images on the first turn (tags are then prefixed by the processor). Human and gpt turns
must alternate, starting with a human turn.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert.common import ConversionError, StagedOutput, source_image
from phi3v.data.schema import Record, check_image_path
from phi3v.processing.chat import Turn
from phi3v.processing.image import ImageError, load_image

HUMAN, GPT = ("human", "user"), ("gpt", "assistant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--seed", type=int)


def _load(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConversionError(f"{path}:{number}: invalid JSON ({err.msg})") from err
    if not isinstance(data, list):
        raise ConversionError(f"{path}: expected a JSON list of records")
    return data


def to_record(item: dict, index: int, where: str) -> Record:
    """One LLaVA item as a generic record (image paths unchanged)."""
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    messages = item.get("conversations")
    if not isinstance(messages, list) or len(messages) < 2 or len(messages) % 2:
        raise ConversionError(f"{where}: conversations must be human/gpt pairs")
    turns, next_image = [], 0
    for k in range(0, len(messages), 2):
        human, gpt = messages[k], messages[k + 1]
        if not isinstance(human, dict) or not isinstance(gpt, dict):
            raise ConversionError(f"{where}: turn {k // 2 + 1}: messages must be objects with 'from' and 'value'")
        if human.get("from") not in HUMAN or gpt.get("from") not in GPT:
            raise ConversionError(
                f"{where}: turn {k // 2 + 1} is {human.get('from')!r}/{gpt.get('from')!r}, expected human/gpt"
            )
        text = str(human.get("value", ""))
        n_tags = text.count("<image>")
        for tag in range(1, n_tags + 1):
            text = text.replace("<image>", f"<|image_{tag}|>", 1)
        turns.append(Turn(text, images[next_image : next_image + n_tags], str(gpt.get("value", ""))))
        next_image += n_tags
    if next_image == 0 and images:
        turns[0].images = images
    elif next_image != len(images):
        raise ConversionError(f"{where}: {next_image} <image> tag(s) for {len(images)} image(s)")
    record_id = str(item.get("id", index))
    return Record(record_id, "llava", turns, [turns[-1].assistant])


def convert(
    out: StagedOutput,
    src: str | os.PathLike,
    *,
    image_folder: str | os.PathLike,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> None:
    """Convert a LLaVA-style json or jsonl file into ``out``.

    Args:
        out: Where records and images go.
        src: The json (a list) or jsonl file.
        image_folder: The folder the records' image paths are relative to.
        val_fraction: The share of records held out as val (seeded).
        seed: Seeds the hold-out draw.
    """
    src, folder = Path(src), Path(image_folder)
    items = _load(src)
    rng = random.Random(seed)
    val = set(rng.sample(range(len(items)), round(len(items) * val_fraction)))
    copied: set[str] = set()
    for index, item in enumerate(tqdm(items, desc="records", unit="rec")):
        where = f"{src} record {index}"
        if not isinstance(item, dict):
            raise ConversionError(f"{where}: expected an object, got {type(item).__name__}")
        record = to_record(item, index, where)
        for turn in record.turns:
            for k, path in enumerate(turn.images):
                if reason := check_image_path(path):
                    raise ConversionError(f"{where}: {reason}")
                relative = f"{out.name}/{path}"
                if relative not in copied:
                    data = source_image(folder, path, where)
                    try:
                        load_image(io.BytesIO(data))  # a full decode: truncated files are refused too
                    except ImageError as err:
                        raise ConversionError(f"{where}: {path}: {err}") from err
                    out.image_file(relative).write_bytes(data)
                    copied.add(relative)
                turn.images[k] = relative
        out.add("val" if index in val else "train", record)
