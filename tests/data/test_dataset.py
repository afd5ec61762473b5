"""One clear line per data error (issue 14, findings 8 and 13)."""

import json

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
