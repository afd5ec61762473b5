import pytest
import torch

from phi3v.data.collate import collate
from phi3v.processing import Sample

PAD = 500


def _sample(ids, n_images=0, slots=5):
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:2] = -100
    if not n_images:
        return Sample(ids, labels)
    return Sample(ids, labels, torch.randn(n_images, slots, 3, 56, 56), torch.tensor([[56, 56]] * n_images))


def test_right_and_left_padding():
    samples = [_sample([1, 5, 6, 7]), _sample([1, 8])]
    right = collate(samples, PAD, "right")
    assert right["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, PAD, PAD]]
    assert right["labels"][1].tolist() == [-100, -100, -100, -100]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    left = collate(samples, PAD, "left")
    assert left["input_ids"].tolist() == [[1, 5, 6, 7], [PAD, PAD, 1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_a_real_endoftext_equal_to_the_pad_id_stays_visible():
    batch = collate([_sample([1, 5, PAD]), _sample([1, 5, 6, 7, PAD])], PAD)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0, 2] == PAD


def test_images_of_text_and_image_samples_are_stacked_in_sample_order():
    samples = [_sample([1, 2, 3], 2), _sample([1, 2]), _sample([1, 2, 3, 4], 1)]
    batch = collate(samples, PAD)
    assert batch["pixel_values"].shape == (3, 5, 3, 56, 56)
    assert torch.equal(batch["pixel_values"][2], samples[2].pixel_values[0])
    samples[2].image_sizes = torch.tensor([[112, 56]])
    assert collate(samples, PAD)["image_sizes"].tolist() == [[56, 56], [56, 56], [112, 56]]
    assert collate([_sample([1, 2])], PAD)["pixel_values"] is None


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="all 2 samples of the batch were dropped"):
        collate([None, None], PAD)
    with pytest.raises(ValueError, match="different crop-slot shapes"):
        collate([_sample([1, 2], 1, slots=5), _sample([1, 2], 1, slots=17)], PAD)
