"""The run's ``log.jsonl``: one JSON object per line (``{"step": s, ...}``), appended as the run goes.

A process killed while appending leaves a torn last line; readers drop it with a warning (the step it described is
run again after a resume). A bad line anywhere else is damage, reported with its file and line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from phi3v.utils import atomic_write_text

logger = logging.getLogger("phi3v")


class LogError(ValueError):
    """A ``log.jsonl`` that cannot be read; the message names the file and line."""


def read_log(path: Path) -> list[dict]:
    """The records of ``path`` in order; a torn (unterminated, unparsable) last line is dropped with a warning.

    Raises:
        LogError: a line other than the last is not a JSON object with an integer ``step``.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise LogError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise ValueError("not an object with an integer step")
        except ValueError as err:
            if number == len(lines):  # no newline after it: the write was cut short
                logger.warning("%s:%d: ignoring a torn last line (%s)", path, number, err)
                break
            raise LogError(f"{path}:{number}: not a log record ({err})") from err
        records.append(record)
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (a resumed run writes the later ones again); no file: nothing."""
    if path.exists():
        kept = [r for r in read_log(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
