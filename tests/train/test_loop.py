"""The recipe end to end on the tiny model and real digit scans."""

import json

import pytest
import torch
from safetensors.torch import load_file

from phi3v import Phi3VForCausalLM
from phi3v.train.checkpoint import CheckpointError, find_resumable, list_checkpoints, verify
from phi3v.train.loop import GlobalBatchSampler, TrainingError, audit_gradients, train
from phi3v.train.strategy import STRATEGIES, component
from tests.train.conftest import tiny_config


def _weights(path):
    return load_file(path / "model.safetensors") if (path / "model.safetensors").exists() else None


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_lowers_the_loss_and_changes_only_its_parameters(digits, tmp_path, strategy):
    config = tiny_config(digits, tmp_path, strategy=strategy, max_steps=8, lr=3e-3)
    summary = train(config)
    losses = summary["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    assert (final / "preprocessor_config.json").exists() and (final / "tokenizer.json").exists()
    if STRATEGIES[strategy].adapters:
        adapter = load_file(final / "adapter_model.safetensors")
        assert adapter and all("lora_" in k for k in adapter)
        return
    from phi3v import build_model

    before = build_model("tiny", seed=config.seed).state_dict()
    after = Phi3VForCausalLM.from_pretrained(final).state_dict()
    spec = STRATEGIES[strategy]
    trains = {"vision": spec.vision, "projector": spec.projector, "language": spec.language}
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if name == "model.embed_tokens.weight" or "sub_GN" in name or "glb_GN" in name:
            continue  # rows of unseen tokens stay put; separators may or may not move in 8 steps
        if not trains[component(name)]:
            assert not changed, f"{strategy}: frozen {name} changed"
    assert any(not torch.equal(before[n], after[n]) for n in before if trains[component(n)])


def test_run_directory_has_config_logs_and_checkpoints(digits, tmp_path):
    config = tiny_config(digits, tmp_path, strategy="lora", max_steps=4, save_every=1, keep_last=2,
                         val_data=str(digits / "digits_val.jsonl"), eval_every=2, eval_max_samples=4)  # fmt: skip
    summary = train(config)
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "tensorboard").is_dir()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval/accuracy" in r] == [2, 4]
    # the last evaluation's predictions, for the report's gallery, and the versions it ran with
    assert len((run / "eval" / "training" / "predictions.jsonl").read_text().splitlines()) == 4
    assert json.loads((run / "environment.json").read_text())["versions"]["torch"] == torch.__version__
    kept = [p.name for p in list_checkpoints(run)]
    best = summary["best_checkpoint"].rsplit("/", 1)[-1]
    assert kept[:2] == ["step-0000004", "step-0000003"] and best in kept and len(kept) <= 3
    for folder in list_checkpoints(run):
        verify(folder)


def test_sampler_steps_do_not_depend_on_the_number_of_processes(digits, tmp_path):
    one = tiny_config(digits, tmp_path, per_device_batch_size=2, global_batch_size=8)
    whole = list(GlobalBatchSampler(40, one, world=1, rank=0, start_step=0, total_steps=3))
    ranks = [list(GlobalBatchSampler(40, one, world=2, rank=r, start_step=0, total_steps=3)) for r in (0, 1)]
    for step in range(3):
        single = sorted(i for batch in whole[step * 4 : step * 4 + 4] for i in batch)
        split = sorted(i for r in ranks for batch in r[step * 2 : step * 2 + 2] for i in batch)
        assert single == split
    resumed = list(GlobalBatchSampler(40, one, world=1, rank=0, start_step=2, total_steps=3))
    assert resumed == whole[8:]


def test_audit_finds_missing_and_unexpected_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    model(torch.randn(3, 2)).sum().backward()
    model[1].weight.grad = torch.ones(2, 2)
    with pytest.raises(TrainingError, match=r"0\.bias: gradient is all zeros|1\.weight: frozen but got a gradient"):
        model[0].bias.grad.zero_()
        audit_gradients(model, lambda p: p.grad)


def test_long_samples_are_dropped_up_front_and_counted(digits, tmp_path, caplog):
    import logging

    with (
        caplog.at_level(logging.INFO, logger="phi3v"),
        pytest.raises(TrainingError, match=r"0 samples, fewer than one global batch"),
    ):
        train(tiny_config(digits, tmp_path, max_length=10, drop_long_samples=True))
    assert any("dropped 168 of 168 samples longer than max_length 10" in r.message for r in caplog.records)
    with pytest.raises(Exception, match=r"digits_train\.jsonl:\d+ \(id train-\d+\): a sample of \d+ tokens cut"):
        train(tiny_config(digits, tmp_path, max_length=10, output_dir=str(tmp_path / "r2")))


def test_a_global_batch_without_supervised_tokens_stops_the_run(digits, tmp_path, monkeypatch):
    from phi3v.train import loop

    original = loop.collate

    def no_labels(samples, pad_token_id, **kwargs):
        batch = original(samples, pad_token_id, **kwargs)
        batch["labels"][:] = -100
        return batch

    monkeypatch.setattr(loop, "collate", no_labels)
    with pytest.raises(TrainingError, match="step 1: the global batch has no supervised token"):
        train(tiny_config(digits, tmp_path, max_steps=1))


def test_corrupted_latest_checkpoint_is_skipped(digits, tmp_path):
    train(tiny_config(digits, tmp_path, strategy="lora", max_steps=3, save_every=1, keep_last=3))
    run = tmp_path / "run"
    latest = list_checkpoints(run)[0]
    data = bytearray((latest / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (latest / "trainable.safetensors").write_bytes(bytes(data))
    assert find_resumable(run) == list_checkpoints(run)[1]
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors: content differs from the manifest"):
        verify(latest)
    (list_checkpoints(run)[1] / "manifest.json").unlink()
    assert find_resumable(run) == list_checkpoints(run)[2]


def test_resume_refuses_other_settings_and_logs_the_lr_a_step_uses(digits, tmp_path):
    config = tiny_config(digits, tmp_path, strategy="lora", max_steps=2, save_every=1, warmup_steps=4, lr=1e-3)
    train(config)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * 1 / 5, 1e-3 * 2 / 5])  # warmup: (step + 1) / (warmup + 1)
    changed = tiny_config(digits, tmp_path, strategy="lora", max_steps=4, lr=5e-4, warmup_steps=4, resume="auto")
    with pytest.raises(TrainingError, match=r"other settings \(max_steps: 2 -> 4, lr: 0\.001 -> 0\.0005\)"):
        train(changed)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        train(tiny_config(digits, tmp_path, strategy="lora", resume=str(tmp_path / "nowhere")))


def test_a_first_step_without_images_is_audited_on_the_language_side_only(tmp_path, digits):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"id": str(i), "source": "t", "conversations": [
        {"user": f"Say {i}.", "assistant": str(i)}]}) for i in range(16)) + "\n")  # fmt: skip
    summary = train(tiny_config(digits, tmp_path, train_data=str(text), max_steps=2))
    assert len(summary["losses"]) == 2


def test_uint8_crops_and_compiled_layers_give_the_same_losses(digits, tmp_path, caplog):
    """Float crops from the workers vs uint8 ones finished in the loop, and eager vs ``torch.compile``d layers
    (inductor, with activation checkpointing): the same losses within 1e-5."""
    settings = dict(max_steps=2, gradient_checkpointing=True)
    plain = train(tiny_config(digits, tmp_path, uint8_pixels=False, output_dir=str(tmp_path / "a"), **settings))
    shipped = train(tiny_config(digits, tmp_path, uint8_pixels=True, output_dir=str(tmp_path / "b"), **settings))
    with caplog.at_level("INFO", logger="phi3v"):
        compiled = train(tiny_config(digits, tmp_path, compile=True, output_dir=str(tmp_path / "c"), **settings))
    assert "torch.compile: 4 layers" in caplog.text  # 2 decoder + 2 CLIP layers of the tiny model
    assert shipped["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-5)


def test_packing_gives_the_same_losses(digits, tmp_path):
    plain = train(tiny_config(digits, tmp_path, max_steps=3, output_dir=str(tmp_path / "a")))
    packed = train(tiny_config(digits, tmp_path, max_steps=3, packing=True, output_dir=str(tmp_path / "b")))
    assert packed["losses"] == pytest.approx(plain["losses"], rel=1e-4)
