"""A tiny base model with two LoRA adapters on disk, and one in-process server on them for the whole session."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v import build_model
from phi3v.processing import Phi3VProcessor

pytest.importorskip("fastapi", reason="phi3v serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="phi3v serve needs the serve extra (fastapi, uvicorn)")


def png_data_url(seed: int, size: tuple[int, int] = (40, 32)) -> str:
    """A random RGB PNG as a data URL."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def save_png(path, seed: int, size: tuple[int, int] = (40, 32)):
    path.write_bytes(base64.b64decode(png_data_url(seed, size).split(",", 1)[1]))
    return path


@pytest.fixture(scope="session")
def served_model(tmp_path_factory):
    """``base/`` (tiny model + processor) and adapters ``a/``, ``b/`` whose LoRA weights are random (a fresh LoRA
    is zero in B, i.e. the base itself: random B makes each adapter answer differently)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("served")
    model = build_model("tiny", seed=0)
    model.save_pretrained(root / "base")
    Phi3VProcessor.tiny(num_crops=1).save_pretrained(root / "base")
    for k, name in enumerate(("a", "b")):
        peft = get_peft_model(build_model("tiny", seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj",
                              "o_proj", "gate_up_proj", "down_proj"]))  # fmt: skip
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for pname, param in peft.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        peft.save_pretrained(root / name)
    return root


class ServerThread:
    """uvicorn running an app on a free port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


SMALL_LIMITS = dict(max_body_bytes=400_000, max_image_bytes=100_000, max_image_pixels=300 * 300, max_images=3,
                    max_prompt_tokens=300, max_tokens=64, default_max_tokens=12, batch_wait_ms=50.0)  # fmt: skip


@pytest.fixture(scope="session")
def server(served_model):
    """The server on the tiny base (served as ``base``) with adapters ``a`` and ``b``, small limits."""
    from phi3v.serve import ServeConfig
    from phi3v.serve.app import create_app

    config = ServeConfig(model=str(served_model / "base"), adapters={"a": str(served_model / "a"),
                         "b": str(served_model / "b")}, model_name="base", **SMALL_LIMITS)  # fmt: skip
    with ServerThread(create_app(config)) as running:
        yield running
