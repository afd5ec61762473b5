import pytest
import torch

from phi3v.processing import Sample
from phi3v.processing.collate import collate

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


def test_packed_batch_gives_the_loss_and_gradients_of_separate_samples():
    """Packing: one row, positions restarting per sample, attention kept inside each sample."""
    from phi3v import build_model
    from phi3v.processing import Phi3VProcessor

    processor = Phi3VProcessor.tiny(num_crops=4)
    from PIL import Image

    conversations = [
        [{"images": [Image.new("RGB", (90, 40), (200, 0, 0))], "user": "Colour?", "assistant": "red"}],
        [{"user": "Say hello.", "assistant": "hello there"}],
        [{"images": [Image.new("RGB", (40, 90), (0, 0, 200)), Image.new("RGB", (50, 50), (0, 200, 0))],
          "user": "Two?", "assistant": "yes"}],
    ]  # fmt: skip
    samples = [processor.encode(c) for c in conversations]
    grads = []
    for pack in (False, True):
        model = build_model("tiny").train()
        batch = processor.collate(samples) if not pack else collate(samples, processor.pad_token_id, pack=True)
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if pack:
            assert inputs["input_ids"].shape == (1, sum(len(s.input_ids) for s in samples))
            assert "attention_mask" not in inputs
        loss = model(**inputs).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
