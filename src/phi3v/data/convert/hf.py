"""Reading Hugging Face ``datasets`` copies on disk: ``save_to_disk`` folders or parquet/arrow data files.

Images are read as their encoded bytes (no decode and re-encode), so they are copied exactly.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from phi3v.data.convert.common import ConversionError, source_image
from phi3v.data.paths import check_image_bytes

_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


def _split_of(path: Path, root: Path) -> str:
    """The split a data file belongs to, from a ``train``/``validation``/``test`` word in its path.

    Raises:
        ConversionError: when no part of the path names a split (a guess could mix test data into training).
    """
    for part in reversed([*path.relative_to(root).parts[:-1], path.name]):
        for word in re.split(r"[-_.]", part):
            if word in _SPLIT_NAMES:
                return _SPLIT_NAMES[word]
    raise ConversionError(
        f"{path}: cannot tell which split this file holds; name it train-*, validation-* or test-* "
        "(or put it in a train/, validation/ or test/ folder)"
    )


def load_splits(src: str | Path) -> dict[str, Any]:
    """``split -> datasets.Dataset`` from a ``save_to_disk`` folder or a folder of parquet/arrow files.

    Split names map to ``train`` / ``val`` / ``test`` (``validation`` and ``dev`` are ``val``).
    """
    try:
        import datasets
    except ImportError as err:
        raise ConversionError("reading Hugging Face datasets needs: pip install 'phi3v[data]'") from err
    src = Path(src)
    if (src / "dataset_dict.json").exists() or (src / "state.json").exists():
        loaded = datasets.load_from_disk(str(src))
        if isinstance(loaded, datasets.Dataset):
            return {"train": loaded}
        return {_SPLIT_NAMES.get(name, name): ds for name, ds in loaded.items()}
    for builder, suffix in (("parquet", ".parquet"), ("arrow", ".arrow")):
        files = sorted(src.rglob(f"*{suffix}")) if src.is_dir() else ([src] if src.suffix == suffix else [])
        if files:
            root = src if src.is_dir() else src.parent
            data_files: dict[str, list[str]] = {}
            for file in files:
                data_files.setdefault(_split_of(file, root), []).append(str(file))
            return dict(datasets.load_dataset(builder, data_files=data_files))
    raise ConversionError(f"{src}: neither a datasets save_to_disk folder nor parquet/arrow files")


def undecoded(dataset: Any, column: str) -> Any:
    """``dataset`` with the image column ``column`` (an image or a list of images) left as encoded bytes."""
    feature = copy.deepcopy(dataset.features[column])
    inner = getattr(feature, "feature", feature)
    if not hasattr(inner, "decode"):
        raise ConversionError(f"column {column!r} is {feature}, not an image column")
    inner.decode = False
    return dataset.cast_column(column, feature)


def image_bytes(value: dict, where: str, src: str | Path) -> bytes:
    """The encoded bytes of an undecoded image cell, checked to be an image.

    A cell without bytes may name a file in ``path``; it is read only when it lies inside the source folder
    ``src`` (a relative path is taken relative to it), after resolving symbolic links.

    Raises:
        ConversionError: naming the row (``where``) for a path outside ``src``, a missing file, or bytes that are
            not an image.
    """
    data = value.get("bytes") if isinstance(value, dict) else None
    if data:
        try:
            check_image_bytes(data, f"{where}: the image cell")
        except ValueError as err:
            raise ConversionError(str(err)) from None
        return data
    path = value.get("path") if isinstance(value, dict) else None
    if path:
        src = Path(src)
        return source_image(src if src.is_dir() else src.parent, path, where)
    raise ConversionError(f"{where}: image has neither bytes nor a path")


def cauldron_rows(dataset: Any) -> bool:
    """Whether ``dataset`` has the_cauldron's schema (``images`` + ``texts[{user, assistant}]``)."""
    return {"images", "texts"} <= set(dataset.column_names)
