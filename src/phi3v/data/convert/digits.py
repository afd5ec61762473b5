"""scikit-learn's handwritten digits (1,797 real 8x8 scans) as three small tasks shaped like the reference ones.

* ``digits``: one image, "which digit?" (single-image classification, like hateful memes' one image).
* ``digits_pair``: two images, "same digit?" (a two-image comparison, like NLVR2).
* ``digits_video``: several frames of one digit written by different people (a multi-frame clip, like UCF-101).

Splits are made over the scans, so no scan of the val or test split is seen in training, in any task.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from PIL import Image
from tqdm import tqdm

from phi3v.data.convert.common import ConversionError, StagedOutput, single_turn
from phi3v.tasks import get_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, help="frames per digits_video clip")
    parser.add_argument("--pairs-per-scan", type=int, help="digits_pair samples per scan of the train split")
    parser.add_argument(
        "--eval-pairs-per-scan",
        type=int,
        help="digits_pair samples per scan of the val and test splits (default: --pairs-per-scan)",
    )
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--limit", type=int, help="use only the first N scans (quick runs)")
    parser.add_argument("--seed", type=int)


def convert(
    out: StagedOutput,
    src: None = None,
    *,
    frames: int = 4,
    pairs_per_scan: int = 1,
    eval_pairs_per_scan: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    limit: int | None = None,
    seed: int = 0,
) -> None:
    """Write the three digits tasks into ``out``.

    Args:
        out: Where records and images go.
        src: Unused (the scans ship with scikit-learn); ``None``.
        frames: Frames per ``digits_video`` clip.
        pairs_per_scan: ``digits_pair`` samples per scan of the train split (each pairs the scan with a
            random other one: more pairs per scan give more distinct pairs to learn from).
        eval_pairs_per_scan: ``digits_pair`` samples per scan of the val and test splits; default
            ``pairs_per_scan``.
        val_fraction: Share of the scans held out as val.
        test_fraction: Share of the scans held out as test.
        limit: Use only the first ``limit`` scans (quick runs).
        seed: Seeds the split, the pairs and the clips.
    """
    if src is not None:
        raise ConversionError(f"digits reads scikit-learn's own scans; --src {src} is not used")
    for name, value in (("pairs_per_scan", pairs_per_scan), ("eval_pairs_per_scan", eval_pairs_per_scan)):
        if value is not None and value < 1:
            raise ConversionError(f"{name} must be at least 1, got {value}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    if limit:
        images, targets = images[:limit], targets[:limit]
    rng = random.Random(seed)
    order = list(range(len(images)))
    rng.shuffle(order)
    n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
    splits = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}

    paths = {}
    for index in tqdm(range(len(images)), desc="digits", unit="img"):
        pixels = np.clip(images[index] * (255 / 16), 0, 255).astype(np.uint8)  # 0..16 ink levels -> 0..255
        paths[index] = out.save_image(f"digits/{index:04d}.png", Image.fromarray(pixels, mode="L"))

    single, pair, video = get_task("digits"), get_task("digits_pair"), get_task("digits_video")
    for split, indices in splits.items():
        by_class: dict[int, list[int]] = {}
        for i in indices:
            by_class.setdefault(int(targets[i]), []).append(i)
        for i in indices:
            out.add(
                split, single_turn(f"{split}-{i:04d}", "digits", [paths[i]], single.prompt(), str(targets[i])), "digits"
            )
        per_scan = pairs_per_scan if split == "train" or eval_pairs_per_scan is None else eval_pairs_per_scan
        for n, i in enumerate(i for i in indices for _ in range(per_scan)):
            same = rng.random() < 0.5 and len(by_class[int(targets[i])]) > 1
            pool = (
                [j for j in by_class[int(targets[i])] if j != i]
                if same
                else [j for j in indices if targets[j] != targets[i]]
            )
            if not pool:
                raise ConversionError(f"the {split} split ({len(indices)} scans) is too small for digit pairs")
            j = rng.choice(pool)
            record = single_turn(f"{split}-pair-{n:04d}", "digits", [paths[i], paths[j]], pair.prompt(),
                                 "yes" if same else "no")  # fmt: skip
            out.add(split, record, "digits_pair")
        classes = [c for c, members in by_class.items() if len(members) >= frames]
        if not classes:
            raise ConversionError(
                f"the {split} split ({len(indices)} scans) has no digit with {frames} scans for a clip; "
                "use more scans (--limit) or fewer --frames"
            )
        for n in range(len(indices) // 2):
            digit = rng.choice(classes)
            clip = rng.sample(by_class[digit], frames)
            record = single_turn(f"{split}-video-{n:04d}", "digits", [paths[f] for f in clip], video.prompt(),
                                 str(digit))  # fmt: skip
            out.add(split, record, "digits_video")
