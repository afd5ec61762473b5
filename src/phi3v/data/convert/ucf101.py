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
import re
from pathlib import Path

from tqdm import tqdm

from phi3v.data.convert.common import SPLITS, ConversionError, StagedOutput, single_turn
from phi3v.tasks import get_task

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm"}
_GROUP = re.compile(r"_g(\d+)_c\d+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--classes", default=None, help="comma-separated class subset (default: all)")
    parser.add_argument("--split-dir", default=None, help="official ucfTrainTestlist folder")
    parser.add_argument("--split-id", type=int, default=1, choices=[1, 2, 3])
    parser.add_argument("--val-groups", type=int, default=1, help="training groups held out as val (official layout)")


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)


def _group(video: Path) -> int:
    match = _GROUP.search(video.stem)
    if not match:
        raise ConversionError(f"{video}: name does not follow v_<Class>_gXX_cYY (needed to split by group)")
    return int(match.group(1))


def _read_list(path: Path) -> set[str]:
    if not path.exists():
        raise ConversionError(f"{path}: split list not found")
    return {line.split()[0].replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def collect(args: argparse.Namespace) -> dict[str, list[tuple[str, Path]]]:
    """``split -> [(class, video)]`` for either layout."""
    src = Path(args.src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if any((src / split).is_dir() for split in SPLITS):
        return {split: [(v.parent.name, v) for v in _videos(src / split)] for split in SPLITS if (src / split).is_dir()}
    root = src / "UCF-101" if (src / "UCF-101").is_dir() else src
    videos = [(v.parent.name, v) for v in _videos(root)]
    if not videos:
        raise ConversionError(f"{root}: no videos (expected <Class>/v_<Class>_gXX_cYY.avi or train/<Class>/*.avi)")
    if args.split_dir:
        tests = _read_list(Path(args.split_dir) / f"testlist0{args.split_id}.txt")
        trains = _read_list(Path(args.split_dir) / f"trainlist0{args.split_id}.txt")
        key = lambda cls, v: f"{cls}/{v.name}"  # noqa: E731
        test = [(c, v) for c, v in videos if key(c, v) in tests]
        train = [(c, v) for c, v in videos if key(c, v) in trains]
    else:
        test = [(c, v) for c, v in videos if _group(v) <= 7]
        train = [(c, v) for c, v in videos if _group(v) > 7]
    train_groups = sorted({_group(v) for _, v in train})
    held_out = set(train_groups[-args.val_groups :]) if args.val_groups else set()
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


def convert(args: argparse.Namespace, out: StagedOutput) -> None:
    if args.frames < 1:
        raise ConversionError(f"--frames {args.frames}: sample at least 1 frame")
    splits = collect(args)
    classes = sorted({c for items in splits.values() for c, _ in items})
    if args.classes:
        wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(classes))
        if unknown:
            raise ConversionError(f"--classes names unknown class(es) {unknown}; known: {', '.join(classes)}")
        classes = sorted(wanted)
        splits = {s: [(c, v) for c, v in items if c in classes] for s, items in splits.items()}
    prompt = get_task("ucf101").prompt(classes)
    index = 0
    for split in SPLITS:
        for cls, video in tqdm(splits.get(split, []), desc=split, unit="video"):
            paths = []
            for k, frame in enumerate(sample_frames(video, args.frames)):
                paths.append(out.save_image(f"{split}/{cls}/{video.stem}.{k}.jpg", frame))
            out.add(split, single_turn(f"{split}-{index:010d}", "ucf101", paths, prompt, cls))
            index += 1
    out.add_json(f"{out.name}_meta.json", {"task": "ucf101", "labels": classes, "frames": args.frames})
