"""One clear line per data error (issue 14, findings 8 and 13)."""

import json
import re

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from phi3v.data.dataset import DataError, JsonlDataset, read_records
from phi3v.processing import Phi3VProcessor


def _line(rid, image):
    return json.dumps({"id": rid, "source": "t", "conversations": [{"images": [image], "user": "?", "assistant": "x"}]})


def test_a_bad_image_in_a_loader_worker_is_one_line(tmp_path):
    """PyTorch re-raises a worker's error as "Caught DataError in DataLoader worker process 0 ... Original
    Traceback ..."; the user sees the worker's own message."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "train.jsonl"
    path.write_text(_line("a", "ok.png") + "\n" + _line("b", "gone.png") + "\n")
    dataset = JsonlDataset(path, tmp_path, processor=Phi3VProcessor.tiny(num_crops=1))
    loader = DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and "worker" not in message and "Traceback" not in message
    assert message.startswith(f"{path}:2 (id b): ") and message.endswith("gone.png: image file not found")


def test_non_utf8_bytes_in_a_training_file_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line("a", "ok.png").encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 (invalid continuation byte at byte 11 of the line)"


def _tiny_run(tmp_path):
    """8 one-image samples and a config for 2 steps of the tiny model with one data-loader worker process."""
    import numpy as np

    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(_line(f"s{k}", f"{k}.png") + "\n" for k in range(8)))
    config = tmp_path / "c.yaml"
    settings = {"model": "tiny", "train_data": str(data), "image_root": str(tmp_path), "strategy": "full",
                "precision": "fp32", "num_crops": 1, "max_length": 64, "per_device_batch_size": 2,
                "global_batch_size": 4, "max_steps": 2, "warmup_steps": 1, "num_workers": 1,
                "gradient_checkpointing": False, "output_dir": str(tmp_path / "run")}  # fmt: skip
    config.write_text(json.dumps(settings))  # JSON is YAML
    return data, config


# What `phi3v train` writes to stderr on the way: its setup log, the step-0 counts and the progress bar.
_RUN_LOG = re.compile(r"^(strategy \w+ on |(vision|projector|language|adapters) +trainable |step=0 |train: )")

# The subprocess damages line 6's image after the up-front check, so that it breaks in the worker process.
_DAMAGED_AFTER_SCREENING = """
import sys
from phi3v.cli import main
from phi3v.data.dataset import JsonlDataset
screen = JsonlDataset.screen
def screen_then_damage(self, *args, **kwargs):
    result = screen(self, *args, **kwargs)
    image = sys.argv[2]
    data = open(image, "rb").read()
    open(image, "wb").write(data[:60])
    return result
JsonlDataset.screen = screen_then_damage
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.parametrize("when", ["before the run", "in a loader worker"])
def test_phi3v_train_reports_a_bad_image_in_one_line_naming_file_and_line(tmp_path, when):
    """The real command with num_workers=1: a truncated PNG on line 6, found by the up-front check or (damaged
    after it) in the worker process, whose error PyTorch re-raises in 48 lines; the user sees one."""
    import subprocess
    import sys

    data, config = _tiny_run(tmp_path)
    image = tmp_path / "5.png"
    if when == "before the run":
        image.write_bytes(image.read_bytes()[:60])
        command = [sys.executable, "-m", "phi3v", "train", str(config)]
    else:
        command = [sys.executable, "-c", _DAMAGED_AFTER_SCREENING, str(config), str(image)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line and not _RUN_LOG.match(line)]
    assert lines == [f"phi3v: error: {data}:6 (id s5): {image}: cannot read image (image file is truncated)"]
    if when == "in a loader worker":
        assert "step=0 " in done.stderr  # the run had started: the error came from the worker
    assert "Traceback" not in done.stderr and "worker" not in done.stderr
