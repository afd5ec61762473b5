"""The generic jsonl format (spec §5) and its parser.

One JSON object per line::

    {"id": "train-0000000001", "source": "ucf101",
     "conversations": [{"images": ["train/Archery/v_Archery_g01_c01.0.jpg", ...],
                        "user": "Classify the video into one of the following classes: ...",
                        "assistant": "Archery"}],
     "references": ["Archery"]}

* ``system`` (optional) is the conversation's system message, a non-empty string, rendered with the official
  template before the first user turn (``<|system|>\n{system}<|end|>\n``) and never trained on. A record without
  one takes the run's default (``system`` in the training config, ``--system`` of ``phi3v eval``), if any.
* ``images`` are paths relative to an image root; a turn may have any number (a video is a list of frames).
* ``user`` may hold ``<|image_k|>`` tags; without tags, tags for all of the turn's images are prefixed.
* ``conversations`` may have several turns; every turn's answer is trained on.
* ``references`` (optional) are all accepted answers of the last turn, for evaluation (ANLS takes the best).

``parse_record`` turns one decoded line into a ``Record`` or a list of problems, each naming the field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from phi3v.processing.chat import IMAGE_TAG, Conversation, Turn

KNOWN_FIELDS = {"id", "source", "system", "conversations", "references"}
TURN_FIELDS = {"images", "user", "assistant"}


@dataclass
class Record:
    """One parsed line of a jsonl file.

    Attributes:
        id: Unique sample id.
        source: Where the sample comes from (dataset name).
        turns: The conversation's turns; image paths are relative to the image root.
        references: Accepted answers of the last turn (defaults to its answer).
        line: 1-based line number in the file it came from.
        system: The record's own system message, or ``None``.
    """

    id: str
    source: str
    turns: list[Turn]
    references: list[str] = field(default_factory=list)
    line: int = 0
    system: str | None = None

    @property
    def image_paths(self) -> list[str]:
        return [path for turn in self.turns for path in turn.images]

    def to_json(self) -> dict[str, Any]:
        """The record as a jsonl object."""
        data: dict[str, Any] = {"id": self.id, "source": self.source}
        if self.system is not None:
            data["system"] = self.system
        data |= {
            "conversations": [{"images": t.images, "user": t.user, "assistant": t.assistant} for t in self.turns],
        }
        if self.references:
            data["references"] = self.references
        return data

    def conversation(self, image_root: str | os.PathLike | None = None, system: str | None = None) -> Conversation:
        """The conversation, with image paths resolved against ``image_root`` (not opened).

        Args:
            image_root: Folder the image paths are joined to (``None``: kept relative).
            system: The run's default system message: used when the record has none (the record's own wins).
        """
        root = Path(image_root) if image_root is not None else None
        turns = [Turn(t.user, [root / p if root is not None else p for p in t.images], t.assistant) for t in self.turns]
        return Conversation(turns, self.system if self.system is not None else system)


def check_image_path(path: str) -> str | None:
    """Why an image path is not allowed (absolute, or escaping the image root), or ``None``."""
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"[A-Za-z]:[\\/]", path):  # a POSIX root or a Windows drive
        return f"image path {path!r} is absolute; paths must be relative to the image root"
    depth = 0
    for part in pure.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return f"image path {path!r} escapes the image root"
    return None


def parse_record(obj: Any, line: int = 0) -> tuple[Record | None, list[str]]:
    """Parse one decoded jsonl object.

    Returns:
        ``(record, problems)``: the record (``None`` if it cannot be built) and every problem found, each
        naming the field, e.g. ``conversations[1].assistant: empty answer``.
    """
    problems: list[str] = []
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    for name in ("id", "source"):
        value = obj.get(name)
        if name not in obj:
            problems.append(f"{name}: missing")
        elif not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
            problems.append(f"{name}: expected a non-empty string, got {value!r}")
    system = obj.get("system")
    if "system" in obj and not (isinstance(system, str) and system.strip()):
        problems.append(f"system: expected a non-empty string, got {_short(system)}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        problems.append(f"unknown field(s) {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
    conversations = obj.get("conversations")
    turns: list[Turn] = []
    if not isinstance(conversations, list) or not conversations:
        problems.append(f"conversations: expected a non-empty list, got {_short(conversations)}")
    else:
        for i, raw in enumerate(conversations):
            turn, turn_problems = _parse_turn(raw, f"conversations[{i}]")
            problems += turn_problems
            if turn is not None:
                turns.append(turn)
    references = obj.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        problems.append(f"references: expected a list of strings, got {_short(references)}")
        references = []
    if problems:
        return None, problems
    record = Record(str(obj["id"]), str(obj["source"]), turns, list(references), line, system)
    if not record.references:
        record.references = [turns[-1].assistant]
    return record, []


def _parse_turn(raw: Any, where: str) -> tuple[Turn | None, list[str]]:
    if not isinstance(raw, dict):
        return None, [f"{where}: expected an object with images/user/assistant, got {_short(raw)}"]
    problems = []
    unknown = sorted(set(raw) - TURN_FIELDS)
    if unknown:
        problems.append(f"{where}: unknown field(s) {unknown}; allowed: {sorted(TURN_FIELDS)}")
    images = raw.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        problems.append(f"{where}.images: expected a list of relative paths, got {_short(images)}")
        images = []
    for k, path in enumerate(images):
        if reason := check_image_path(path):
            problems.append(f"{where}.images[{k}]: {reason}")
    user = raw.get("user")
    if not isinstance(user, str):
        problems.append(f"{where}.user: expected a string, got {_short(user)}")
    elif IMAGE_TAG.search(user):
        tags = sorted(int(k) for k in IMAGE_TAG.findall(user))
        if tags != list(range(1, len(images) + 1)):
            problems.append(
                f"{where}.user: image tags {[f'<|image_{k}|>' for k in tags]} do not match its "
                f"{len(images)} image(s); use <|image_1|> to <|image_{len(images)}|> once each, or no tags"
            )
    if not user and not images and isinstance(user, str):
        problems.append(f"{where}.user: empty question without images")
    assistant = raw.get("assistant")
    if not isinstance(assistant, str):
        problems.append(f"{where}.assistant: expected a string, got {_short(assistant)}")
    elif not assistant.strip():
        problems.append(f"{where}.assistant: empty answer")
    if problems:
        return None, problems
    return Turn(user, list(images), assistant), []


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
