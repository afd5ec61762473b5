"""A small real dataset (scikit-learn digits) and configs for the tiny model."""

from __future__ import annotations

import pytest

from phi3v.data.convert import run
from phi3v.train.config import TrainConfig


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    run("digits", out, limit=240)
    return out


def tiny_config(digits, tmp_path, **changes) -> TrainConfig:
    settings = dict(
        model="tiny", train_data=str(digits / "digits_train.jsonl"), image_root=str(digits / "images"),
        task="digits", strategy="full", precision="fp32", num_crops=1, max_length=128, per_device_batch_size=4,
        global_batch_size=8, max_steps=6, lr=2e-3, warmup_steps=1, log_every=1, num_workers=0,
        gradient_checkpointing=False, output_dir=str(tmp_path / "run"), lora_rank=4, lora_alpha=8,
    )  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)
