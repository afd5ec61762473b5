"""Paths stay inside their roots (issue 14, finding 5): the shared helper, and training, evaluation and ``data check``
refusing real symbolic links (to a file and to a folder) that lead out of the image root."""

import json
import os

import pytest
from PIL import Image

from phi3v.data.check import check_file
from phi3v.data.dataset import DataError, JsonlDataset
from phi3v.data.paths import PathEscapeError, resolve_inside
from phi3v.processing import Phi3VProcessor


@pytest.fixture
def linked(tmp_path):
    """An image root with a link to an image outside it, a link to a folder outside it, and a link inside it."""
    root, outside = tmp_path / "images", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(outside / "secret.png")
    Image.new("RGB", (20, 10), (0, 200, 0)).save(root / "ok.png")
    os.symlink(outside / "secret.png", root / "file-link.png")
    os.symlink(outside, root / "folder-link")
    os.symlink(root / "ok.png", root / "inside-link.png")
    return root


def _jsonl(path, images):
    path.write_text(
        "\n".join(
            json.dumps(
                {"id": str(k), "source": "t", "conversations": [{"images": [image], "user": "?", "assistant": "x"}]}
            )
            for k, image in enumerate(images)
        )
        + "\n"
    )
    return path


def test_the_helper_follows_links_inside_and_refuses_links_out(linked):
    assert resolve_inside(linked, "inside-link.png") == (linked / "ok.png").resolve()
    for relative in ("file-link.png", "folder-link/secret.png"):
        with pytest.raises(PathEscapeError, match=f"'{relative}' resolves outside the image root {linked}"):
            resolve_inside(linked, relative)
    with pytest.raises(PathEscapeError, match="escapes the image root"):
        resolve_inside(linked, "../outside/secret.png")
    with pytest.raises(PathEscapeError, match="is absolute"):
        resolve_inside(linked, str(linked.parent / "outside" / "secret.png"))


def test_training_items_refuse_links_out_of_the_image_root(linked, tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", ["inside-link.png", "file-link.png", "folder-link/secret.png"])
    dataset = JsonlDataset(path, linked, processor=Phi3VProcessor.tiny(num_crops=1))
    assert dataset[0].pixel_values.shape[0] == 1  # a link that stays inside is followed
    for index, relative in ((1, "file-link.png"), (2, "folder-link/secret.png")):
        with pytest.raises(DataError, match=rf"{path}:{index + 1} \(id {index}\): image '{relative}' resolves outside"):
            dataset[index]
        with pytest.raises(ValueError, match="resolves outside"):  # header reads (length filtering) check too
            dataset.image_size(relative)


def test_evaluation_conversations_refuse_links_out_of_the_image_root(linked, tmp_path):
    """``evaluate`` opens images through ``JsonlDataset.conversation``."""
    dataset = JsonlDataset(_jsonl(tmp_path / "val.jsonl", ["inside-link.png", "folder-link/secret.png"]), linked)
    assert dataset.conversation(0).turns[0].images[0].getpixel((0, 0)) == (0, 200, 0)
    with pytest.raises(ValueError, match=r"'folder-link/secret\.png' resolves outside the image root"):
        dataset.conversation(1)


def test_data_check_refuses_links_out_of_the_image_root(linked, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["inside-link.png", "file-link.png", "folder-link/secret.png"])
    report = check_file(path, linked, Phi3VProcessor.tiny(num_crops=1), progress=False)
    assert report.samples == 1
    assert [p.split(": ", 1)[0] for p in report.problems] == [f"{path}:2", f"{path}:3"]
    assert all("resolves outside the image root" in p for p in report.problems)
