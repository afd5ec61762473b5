"""A tiny LoRA run on digits, trained once for the evaluation, export and report tests."""

import pytest

from phi3v.train.loop import train
from tests.train.conftest import digits, tiny_config  # noqa: F401 - the digits fixture is shared


@pytest.fixture(scope="session")
def lora_run(digits, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lora-run")
    config = tiny_config(digits, root, strategy="lora", max_steps=12, lr=5e-3, eval_every=6,
                         val_data=str(digits / "digits_val.jsonl"), eval_max_samples=6)  # fmt: skip
    train(config)
    return root / "run"
