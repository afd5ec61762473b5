"""Fixture builders: sources in their real formats, written by the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from phi3v.data.convert import run


def png_bytes(colour=(10, 20, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_video(path: Path, frames: int = 12, size: int = 32) -> None:
    """A small MPEG-4 AVI whose frame k is filled with grey level 20 * k."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def convert(source: str, out: Path, **kwargs) -> list[Path]:
    """Run a converter through the library call (typed keyword arguments, the converter's own defaults)."""
    return run(source, out, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
