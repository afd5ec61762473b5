"""Small shared helpers: atomic file writes, and where the official code lives."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

# Microsoft's hub repository; `auto_map` entries of the files phi3v writes point there, so that
# `trust_remote_code=True` loaders (transformers 4.x, vLLM) find the original code.
OFFICIAL_REPO = "microsoft/Phi-3.5-vision-instruct"


def stage_file(folder: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Write a new file under a temporary name in ``folder`` and flush it to disk.

    Args:
        folder: Where the file will live (the final rename must stay on one filesystem).
        write: Called with the temporary path; it must write the whole file there.

    Returns:
        The temporary path, for the caller to ``os.replace`` into place.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create ``path`` through a temporary file in the same folder, so readers never see a partial file.

    Args:
        path: Final file path.
        write: Called with the temporary path; it must write the whole file there.
    """
    path = os.fspath(path)
    os.replace(stage_file(os.path.dirname(path) or ".", write), path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: changing the umask is not thread-safe


def environment() -> dict:
    """Versions and hardware of this process, for the run's ``environment.json`` and the report."""
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for package in ("phi3v", "torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "versions": versions,
        "hardware": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpus": gpus,
            "cuda": torch.version.cuda if gpus else None,
        },
    }
