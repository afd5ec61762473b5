"""Paths stay inside their roots: the one check that training, evaluation, ``data check`` and every converter use.

A path given relative to a root (an image root, a converter's ``--src``) is refused when it is absolute or climbs
out with ``..``, and, after every symbolic link on the way is resolved (a linked file or a linked folder), when
the real file lies outside the real root. A link that stays inside the root is followed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from phi3v.data.schema import check_image_path


class PathEscapeError(ValueError):
    """A path that leaves its root; the message names the path, the root and where it really points."""


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike, root_name: str = "image root") -> Path:
    """``root / relative`` with symbolic links resolved, refused when it is not inside ``root``.

    Args:
        root: The folder the path must stay in (itself may be a link; its real location counts).
        relative: A path relative to ``root``.
        root_name: What ``root`` is, for the message.

    Returns:
        The real path (it need not exist; opening it reports a missing file).

    Raises:
        PathEscapeError: for an absolute path, a ``..`` that climbs out, or a link that leads outside.
    """
    if reason := check_image_path(os.fspath(relative)):
        raise PathEscapeError(reason)
    return real_inside(root, Path(root) / relative, shown=os.fspath(relative), root_name=root_name)


def real_inside(
    root: str | os.PathLike, path: str | os.PathLike, shown: str | None = None, root_name: str = "source folder"
) -> Path:
    """The real location of ``path`` (found under ``root``, e.g. by a folder walk), refused outside ``root``.

    Raises:
        PathEscapeError: when ``path`` resolves outside ``root``.
    """
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise PathEscapeError(
            f"{shown or os.fspath(path)!r} resolves outside the {root_name} {os.fspath(root)} (to {real})"
        )
    return real


def read_image_inside(root: str | os.PathLike, path: str | os.PathLike, where: str) -> bytes:
    """The bytes of an image file under ``root``, checked before anyone copies them.

    Args:
        root: The converter's source folder (``--src``, ``--image-dir``, ``--image-folder``).
        path: The file, relative to ``root`` or found under it.
        where: The record it belongs to (``file:line``, ``row 3``), for the error.

    Raises:
        PathEscapeError: when the file resolves outside ``root``.
        ValueError: when it is missing or is not an image; the message starts with ``where``.
    """
    try:
        real = real_inside(root, Path(root) / path, shown=os.fspath(path))
    except PathEscapeError as err:
        raise PathEscapeError(f"{where}: {err}") from None
    if not real.exists() or real.is_dir():
        raise ValueError(f"{where}: image {real} not found" + (" (a folder)" if real.is_dir() else ""))
    data = real.read_bytes()
    check_image_bytes(data, f"{where}: {path}")
    return data


def check_image_bytes(data: bytes, what: str) -> None:
    """Refuse bytes that are not an image PIL can open.

    Raises:
        ValueError: ``"{what} is not an image (...)"``.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{what} is not an image ({type(err).__name__}: {err})") from None
