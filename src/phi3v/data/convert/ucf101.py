"""UCF-101 videos -> frame lists (spec §5).

Two source layouts:

* the official release: ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``. With ``--split-dir`` (the official
  ``ucfTrainTestlist`` folder) the test split is ``testlist0K.txt`` and training ``trainlist0K.txt``
  (``--split-id K``); without it, groups 1-7 are the test split, as in the official split 1. The last
  ``--val-groups`` training groups become the val split, so no actor of a val clip is seen in training;
* the reference recipe's split folders: ``{train,val,test}/<Class>/*.avi``.

From each video ``--frames`` (8) frames are taken at ``floor(k * total / frames)`` (the reference's
``arange(0, total, total / frames)``, without its extra index for some frame counts), decoded with PyAV
and saved as ``images/{split}/{Class}/{video}.{k}.jpg``. Records are numbered over train, val, test in that order
(``train-0000000000`` ...), the prompt lists the classes of the conversion.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert.common import SPLITS, ConversionError, StagedOutput, single_turn
from phi3v.data.paths import PathEscapeError, real_inside
from phi3v.tasks import get_task

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm"}
_GROUP = re.compile(r"_g(\d+)_c\d+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, help="frames sampled per video")
    parser.add_argument("--classes", help="comma-separated class subset (default: all)")
    parser.add_argument("--split-dir", help="official ucfTrainTestlist folder")
    parser.add_argument("--split-id", type=int, choices=[1, 2, 3])
    parser.add_argument("--val-groups", type=int, help="training groups held out as val (official layout)")
    parser.add_argument(
        "--class-index", help="the official classInd.txt (default: SPLIT_DIR/classInd.txt when present)"
    )


def _videos(folder: Path, src: Path) -> list[Path]:
    """The videos under ``folder``; one whose real file lies outside ``src`` (a symbolic link) is refused."""
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    for video in videos:
        try:
            real_inside(src, video)
        except PathEscapeError as err:
            raise ConversionError(f"video {err}") from None
    return videos


def _group(video: Path) -> int:
    match = _GROUP.search(video.stem)
    if not match:
        raise ConversionError(f"{video}: name does not follow v_<Class>_gXX_cYY (needed to split by group)")
    return int(match.group(1))


def _read_list(path: Path) -> set[str]:
    if not path.exists():
        raise ConversionError(f"{path}: split list not found")
    return {line.split()[0].replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def read_class_index(path: Path) -> dict[str, int]:
    """``class -> official index`` from ``classInd.txt`` (lines ``1 ApplyEyeMakeup``), in file order.

    Raises:
        ConversionError: naming the file and line of a malformed line or a repeated class or index.
    """
    if not path.is_file():
        raise ConversionError(f"{path}: class index not found")
    index: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ConversionError(f"{path}:{number}: expected 'INDEX ClassName', got {line.strip()!r}")
        if parts[1] in index or int(parts[0]) in index.values():
            raise ConversionError(f"{path}:{number}: class {parts[1]!r} or index {parts[0]} occurs twice")
        index[parts[1]] = int(parts[0])
    if not index:
        raise ConversionError(f"{path}: no classes")
    return index


def collect(
    src: str | os.PathLike, split_dir: str | os.PathLike | None = None, split_id: int = 1, val_groups: int = 1
) -> dict[str, list[tuple[str, Path]]]:
    """``split -> [(class, video)]`` for either layout (arguments as in ``convert``)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if any((src / split).is_dir() for split in SPLITS):
        return {
            split: [(v.parent.name, v) for v in _videos(src / split, src)] for split in SPLITS if (src / split).is_dir()
        }
    root = src / "UCF-101" if (src / "UCF-101").is_dir() else src
    videos = [(v.parent.name, v) for v in _videos(root, src)]
    if not videos:
        raise ConversionError(f"{root}: no videos (expected <Class>/v_<Class>_gXX_cYY.avi or train/<Class>/*.avi)")
    if split_dir:
        tests = _read_list(Path(split_dir) / f"testlist0{split_id}.txt")
        trains = _read_list(Path(split_dir) / f"trainlist0{split_id}.txt")
        key = lambda cls, v: f"{cls}/{v.name}"  # noqa: E731
        test = [(c, v) for c, v in videos if key(c, v) in tests]
        train = [(c, v) for c, v in videos if key(c, v) in trains]
    else:
        test = [(c, v) for c, v in videos if _group(v) <= 7]
        train = [(c, v) for c, v in videos if _group(v) > 7]
    train_groups = sorted({_group(v) for _, v in train})
    held_out = set(train_groups[-val_groups:]) if val_groups else set()
    return {
        "train": [(c, v) for c, v in train if _group(v) not in held_out],
        "val": [(c, v) for c, v in train if _group(v) in held_out],
        "test": test,
    }


def sample_frames(video: Path, n: int):
    """``n`` frames at ``arange(0, total, total / n)`` as RGB PIL images (the reference recipe's indices)."""
    try:
        import av
    except ImportError as err:
        raise ConversionError("decoding videos needs PyAV: pip install 'phi3v[data]'") from err
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            total = stream.frames
            if not total:  # some containers do not store the count: decode once to count
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if total < n:
                raise ConversionError(f"{video}: {total} frames, fewer than the {n} to sample")
            # floor(k * total / n): the reference's arange(0, total, total / n) in exact integer arithmetic
            wanted = {k * total // n for k in range(n)}
            frames = [f.to_image() for i, f in enumerate(container.decode(stream)) if i in wanted]
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise ConversionError(f"{video}: cannot decode video ({err})") from err
    if len(frames) != len(wanted) or not frames:
        raise ConversionError(f"{video}: decoded {len(frames)} of {len(wanted)} wanted frames ({total} in header)")
    return frames


def convert(
    out: StagedOutput,
    src: str | os.PathLike,
    *,
    frames: int = 8,
    classes: str | list[str] | None = None,
    split_dir: str | os.PathLike | None = None,
    split_id: int = 1,
    val_groups: int = 1,
    class_index: str | os.PathLike | None = None,
) -> None:
    """Convert UCF-101 videos into frame-list records in ``out``.

    Args:
        out: Where records and images go.
        src: The official release (``UCF-101/<Class>/*.avi``) or ``{train,val,test}/<Class>/*.avi``.
        frames: Frames sampled per video.
        classes: A class subset (a list, or comma-separated); default all.
        split_dir: The official ``ucfTrainTestlist`` folder.
        split_id: Which official split (1, 2, 3).
        val_groups: Official layout: the last training groups held out as val.
        class_index: The official ``classInd.txt``; default ``split_dir/classInd.txt`` when it exists. It gives the
            class order (prompt and ``ucf101_meta.json`` labels) and the official 1-based indices. Without it the
            classes are ordered case-insensitively, which is the official order for UCF-101's names (``JumpingJack``
            before ``JumpRope``) and the reference recipe's order for its 10-class subset.
    """
    if frames < 1:
        raise ConversionError(f"--frames {frames}: sample at least 1 frame")
    if split_id not in (1, 2, 3):
        raise ConversionError(f"--split-id {split_id}: the official splits are 1, 2 and 3")
    splits = collect(src, split_dir, split_id, val_groups)
    found = {c for items in splits.values() for c, _ in items}
    if class_index is None and split_dir and (Path(split_dir) / "classInd.txt").is_file():
        class_index = Path(split_dir) / "classInd.txt"
    official = read_class_index(Path(class_index)) if class_index is not None else None
    if official is not None:
        unknown = sorted(found - set(official))
        if unknown:
            raise ConversionError(f"{class_index}: no index for class folder(s) {unknown}")
        order = sorted(found, key=official.__getitem__)
    else:
        order = sorted(found, key=lambda name: (name.casefold(), name))
    if classes:
        wanted = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
        wanted = [c for c in wanted if c]
        unknown = sorted(set(wanted) - found)
        if unknown:
            raise ConversionError(f"--classes names unknown class(es) {unknown}; known: {', '.join(order)}")
        order = [c for c in order if c in wanted]
        splits = {s: [(c, v) for c, v in items if c in wanted] for s, items in splits.items()}
    prompt = get_task("ucf101").prompt(order)
    index = 0
    for split in SPLITS:
        for cls, video in tqdm(splits.get(split, []), desc=split, unit="video"):
            paths = []
            for k, frame in enumerate(sample_frames(video, frames)):
                paths.append(out.save_image(f"{split}/{cls}/{video.stem}.{k}.jpg", frame))
            out.add(split, single_turn(f"{split}-{index:010d}", "ucf101", paths, prompt, cls))
            index += 1
    meta = {"task": "ucf101", "labels": order, "frames": frames}
    if official is not None:
        meta["class_index"] = {c: official[c] for c in order}  # the official 1-based numbering
    out.add_json(f"{out.name}_meta.json", meta)
