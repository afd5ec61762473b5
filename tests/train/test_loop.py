"""The recipe end to end on the tiny model and real digit scans."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from phi3v import Phi3VForCausalLM
from phi3v.data.dataset import DataError
from phi3v.train.checkpoint import CheckpointError, find_resumable, list_checkpoints, verify
from phi3v.train.loop import GlobalBatchSampler, TrainingError, audit_gradients, make_scheduler, train
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
    trains = {c: getattr(spec, c) == "full" for c in ("vision", "projector", "language")}
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


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [  # warmup 2 of 6 steps, worked by hand: s / 2 during warmup, then (6 - s) / 4, 0.5 (1 + cos(pi (s - 2) / 4)), 1
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_the_schedule_is_the_reference_recipe_s_step_for_step(digits, tmp_path, schedule, factors):
    config = tiny_config(digits, tmp_path, lr=2.0, warmup_steps=2, schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(optimizer, config, total_steps=6)
    rates = []
    for _ in factors:
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * f for f in factors], abs=1e-12)


def test_audit_finds_missing_and_unexpected_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    model(torch.randn(3, 2)).sum().backward()
    audit_gradients(model, lambda p: p.grad)  # a healthy first step passes
    model[1].weight.grad = torch.ones(2, 2)
    model[0].bias.grad.zero_()
    with pytest.raises(TrainingError) as err:
        audit_gradients(model, lambda p: p.grad)
    message = str(err.value)
    assert "0.bias: gradient is all zeros" in message and "1.weight: frozen but got a gradient" in message
    assert "0.weight" not in message and "1.bias" not in message


def _data_with(tmp_path, digits, changes: dict[int, dict]):
    """A copy of the digits training file and images with some records changed: line -> fields to update."""
    images = tmp_path / "images"
    shutil.copytree(digits / "images", images)
    lines = (digits / "digits_train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for line, fields in changes.items():
        records[line - 1].update(fields)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, images, records


def test_the_length_policy_stops_drops_or_truncates_and_counts(digits, tmp_path):
    """Three samples with a 300-character answer, longer than max_length 128: on_overflow=error names each with
    file and line before any step; drop and truncate count them in summary.json, the log and the report."""
    from phi3v.report import write_report

    original = [json.loads(line) for line in (digits / "digits_train.jsonl").read_text().splitlines()]
    long = {line: {"conversations": [dict(original[line - 1]["conversations"][0], assistant="7" * 300)]}
            for line in (2, 5, 9)}  # fmt: skip
    path, images, records = _data_with(tmp_path, digits, long)
    settings = dict(train_data=str(path), image_root=str(images), max_steps=2)
    with pytest.raises(Exception, match=r"3 sample\(s\) of .*train\.jsonl cannot be used") as err:
        train(tiny_config(digits, tmp_path, output_dir=str(tmp_path / "e"), **settings))
    for line in (2, 5, 9):
        assert f"train.jsonl:{line} (id {records[line - 1]['id']}): " in str(err.value)
    assert "longer than max_length 128 (on_overflow: error" in str(err.value)
    assert not (tmp_path / "e" / "log.jsonl").exists()
    for policy, key in (("drop", "dropped"), ("truncate", "truncated")):
        run = tmp_path / policy
        summary = train(tiny_config(digits, tmp_path, on_overflow=policy, output_dir=str(run), **settings))
        other = "truncated" if key == "dropped" else "dropped"
        assert (summary[key], summary[other]) == (3, 0)
        assert json.loads((run / "summary.json").read_text())[key] == 3
        first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and (first[key], first[other]) == (3, 0)
        page = write_report(run).read_text()
        assert f"{key}: 3, " in page or f"{key}: 3<" in page  # the summary table's "dropped / truncated" cell


def test_bad_training_images_stop_the_run_up_front_or_are_skipped_and_counted(digits, tmp_path):
    path, images, records = _data_with(tmp_path, digits, {4: {"conversations": [
        dict(json.loads((digits / "digits_train.jsonl").read_text().splitlines()[3])["conversations"][0],
             images=["digits/missing.png"])]}})  # fmt: skip
    corrupt = images / records[6]["conversations"][0]["images"][0]
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated PNG
    settings = dict(train_data=str(path), image_root=str(images), max_steps=2)
    with pytest.raises(Exception, match=r"2 sample\(s\) of .*train\.jsonl cannot be used") as err:
        train(tiny_config(digits, tmp_path, output_dir=str(tmp_path / "e"), **settings))
    assert f"train.jsonl:4 (id {records[3]['id']}): " in str(err.value) and "missing.png" in str(err.value)
    assert f"train.jsonl:7 (id {records[6]['id']}): " in str(err.value)
    assert not (tmp_path / "e" / "log.jsonl").exists()  # stopped before the first step
    summary = train(tiny_config(digits, tmp_path, skip_bad_images=True, output_dir=str(tmp_path / "s"), **settings))
    assert summary["bad_images"] == 2 and summary["steps"] == 2


def test_duplicate_training_ids_are_warned_about_and_counted(digits, tmp_path, caplog):
    records = [json.loads(line) for line in (digits / "digits_train.jsonl").read_text().splitlines()]
    path, images, _ = _data_with(tmp_path, digits, {5: {"id": records[0]["id"]}, 9: {"id": records[1]["id"]}})
    with caplog.at_level("WARNING", logger="phi3v"):
        summary = train(tiny_config(digits, tmp_path, train_data=str(path), image_root=str(images), max_steps=1))
    assert summary["duplicate_ids"] == 2
    assert f"train.jsonl:5: duplicate id {records[0]['id']!r} (first on line 1)" in caplog.text


def test_a_failing_evaluation_keeps_the_trained_weights_and_names_file_and_line(digits, tmp_path, monkeypatch):
    """A validation image that vanishes during the run (a real file, removed just before the evaluation at step
    2): the run stops naming the val file and line, step 2's checkpoint is there, and resume=auto finishes."""
    from phi3v.eval import evaluate as evaluate_module

    images = tmp_path / "images"
    shutil.copytree(digits / "images", images)
    val = digits / "digits_val.jsonl"
    first = json.loads(val.read_text().splitlines()[0])
    victim = images / first["conversations"][0]["images"][0]
    real = evaluate_module.evaluate

    def remove_then_evaluate(*args, **kwargs):
        victim.rename(victim.with_suffix(".gone"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", remove_then_evaluate)
    settings = dict(strategy="lora", image_root=str(images), val_data=str(val), eval_every=2, eval_max_samples=2,
                    max_steps=3)  # fmt: skip
    with pytest.raises(TrainingError) as err:
        train(tiny_config(digits, tmp_path, **settings))
    message = str(err.value)
    assert message.startswith("step 2: evaluation on ") and f"digits_val.jsonl:1 (id {first['id']}): " in message
    assert "the weights of step step-0000002 are kept" in message
    verify(tmp_path / "run" / "checkpoints" / "step-0000002")
    monkeypatch.setattr(evaluate_module, "evaluate", real)
    victim.with_suffix(".gone").rename(victim)
    summary = train(tiny_config(digits, tmp_path, resume="auto", **settings))
    assert summary["steps"] == 3 and (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


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
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx([0.0, 1e-3 * 1 / 4])  # step / warmup
    changed = tiny_config(digits, tmp_path, strategy="lora", max_steps=4, lr=5e-4, warmup_steps=4, resume="auto")
    with pytest.raises(CheckpointError, match=r"other settings \(max_steps: 2 -> 4, lr: 0\.001 -> 0\.0005\)"):
        train(changed)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        train(tiny_config(digits, tmp_path, strategy="lora", resume=str(tmp_path / "nowhere")))


def test_a_first_step_without_images_is_audited_on_the_language_side_only(tmp_path, digits):
    """A text-only step gives the image side no gradient: the audit lets that pass (the run trains), yet still
    finds a language parameter without a gradient, and finds the image side's missing gradients when not told."""
    from phi3v import build_model
    from phi3v.train.strategy import apply_strategy

    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"id": str(i), "source": "t", "conversations": [
        {"user": f"Say {i}.", "assistant": str(i)}]}) for i in range(16)) + "\n")  # fmt: skip
    summary = train(tiny_config(digits, tmp_path, train_data=str(text), max_steps=2))
    assert len(summary["losses"]) == 2 and all(math.isfinite(x) for x in summary["losses"])

    model = apply_strategy(build_model("tiny"), tiny_config(digits, tmp_path))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    audit_gradients(model, lambda p: p.grad, skip_image_side=True)
    with pytest.raises(TrainingError, match=r"img_processor\..*: trainable but got no gradient"):
        audit_gradients(model, lambda p: p.grad)
    model.model.layers[0].mlp.down_proj.weight.grad = None
    with pytest.raises(TrainingError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: trainable but got no grad"):
        audit_gradients(model, lambda p: p.grad, skip_image_side=True)


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


def _log_steps(run):
    """The steps of the loss records (the step-0 record holds the data counts)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "dropped" in records[0]
    return [r["step"] for r in records if "loss" in r]


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(digits, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(digits, tmp_path, strategy="lora", max_steps=4, save_every=1, keep_last=10))
    before = sorted(p.name for p in list_checkpoints(run))
    with pytest.raises(
        TrainingError,
        match=r"holds another run \(checkpoints, log\.jsonl, summary\.json, final\); "
        r"continue it with resume=auto, choose a new output_dir, or replace it with overwrite=true",
    ):
        train(tiny_config(digits, tmp_path, strategy="lora", max_steps=2, save_every=1))
    assert sorted(p.name for p in list_checkpoints(run)) == before and _log_steps(run) == [1, 2, 3, 4]
    # Replaced on request: the old run's steps 3 and 4 neither survive nor prune the new run's checkpoints.
    train(tiny_config(digits, tmp_path, strategy="lora", max_steps=2, save_every=1, keep_last=10, overwrite=True))
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000001"]
    assert _log_steps(run) == [1, 2]


def test_resume_auto_without_a_usable_checkpoint_starts_afresh_with_a_fresh_log(digits, tmp_path):
    run = tmp_path / "run"
    settings = dict(strategy="lora", max_steps=3, save_every=1, keep_last=2)
    train(tiny_config(digits, tmp_path, **settings))
    for folder in list_checkpoints(run):
        (folder / "manifest.json").unlink()  # every checkpoint damaged
    summary = train(tiny_config(digits, tmp_path, resume="auto", **settings))
    assert summary["steps"] == 3 and _log_steps(run) == [1, 2, 3]  # not 1-3 twice
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000002"]
    assert sorted(p.name for p in (run / "checkpoints").glob("abandoned-*")) == [
        "abandoned-step-0000002",
        "abandoned-step-0000003",
    ]


def test_checkpoints_with_a_malformed_manifest_or_state_are_skipped_saying_why(digits, tmp_path, caplog):
    from phi3v.train.checkpoint import write_manifest

    run = tmp_path / "run"
    settings = dict(strategy="lora", max_steps=4, save_every=1, keep_last=4)
    train(tiny_config(digits, tmp_path, **settings))
    step4, step3, step2, _ = list_checkpoints(run)
    manifest = json.loads((step4 / "manifest.json").read_text())
    del manifest["trainer_state.json"]["size"]
    (step4 / "manifest.json").write_text(json.dumps(manifest))  # valid JSON, wrong shape
    (step3 / "manifest.json").write_text("[1, 2]")
    state = json.loads((step2 / "trainer_state.json").read_text())
    state["step"] = "two"
    (step2 / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(step2)  # a manifest that matches the bad state: only the state's own check can catch it
    with caplog.at_level("INFO", logger="phi3v"):
        summary = train(tiny_config(digits, tmp_path, resume="auto", **settings))
    reasons = "\n".join(r.message for r in caplog.records)
    assert "trainer_state.json: size None is not a byte count" in reasons
    assert "manifest.json: expected a mapping of file names, got list" in reasons
    assert "step: 'two' is not int" in reasons
    assert "resumed from" in caplog.text and "step-0000001 at step 1" in caplog.text
    assert summary["steps"] == 4 and _log_steps(run) == [1, 2, 3, 4]


def test_a_torn_last_log_line_is_tolerated_by_resume_and_report(digits, tmp_path):
    from phi3v.report import write_report
    from phi3v.train.runlog import LogError

    run = tmp_path / "run"
    settings = dict(strategy="lora", max_steps=3, save_every=1, keep_last=3)
    train(tiny_config(digits, tmp_path, **settings))
    # As a kill in the middle of step 3's log write leaves it: checkpoint 2 the last, step 3's line torn.
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("".join(line + "\n" for line in lines[:3]) + lines[3][:15])  # steps 0-2, torn 3
    assert write_report(run).exists()
    summary = train(tiny_config(digits, tmp_path, resume="auto", **settings))
    assert summary["steps"] == 3 and _log_steps(run) == [1, 2, 3]
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join([lines[0], '{"step": 2, "lo', lines[2]]) + "\n")
    with pytest.raises(LogError, match=r"log\.jsonl:2: not a log record"):
        write_report(run)


def test_the_config_s_system_is_the_default_of_every_record_without_one(digits, tmp_path):
    """``system`` in the config lengthens each record without its own past max_length 128, so the run stops naming
    exactly those lines; line 3's own short ``system`` wins and it fits."""
    path, images, records = _data_with(tmp_path, digits, {3: {"system": "Be brief."}})
    long_system = "You read handwritten digits and answer with the digit alone. " * 4  # 252 characters
    config = tiny_config(digits, tmp_path, train_data=str(path), image_root=str(images), system=long_system)
    with pytest.raises(DataError) as err:
        train(config)
    message = str(err.value)
    assert message.startswith(f"{len(records) - 1} sample(s) of {path} cannot be used")
    for line in (1, 2, 4):
        assert f"train.jsonl:{line} (id {records[line - 1]['id']}): " in message
    assert "train.jsonl:3 " not in message
    summary = train(tiny_config(digits, tmp_path, train_data=str(path), image_root=str(images), max_steps=1,
                                system="Be brief.", output_dir=str(tmp_path / "short")))  # fmt: skip
    assert summary["steps"] == 1


def test_validation_samples_follow_the_length_policy_as_phi3v_eval_applies_it(digits, tmp_path):
    """Exactly 2 validation answers are too long, their prompts fit: under truncate they are evaluated with their
    whole prompt and counted as val_truncated; under drop they are left out and counted as val_dropped."""
    records = [json.loads(line) for line in (digits / "digits_val.jsonl").read_text().splitlines()[:6]]
    for line in (2, 4):
        records[line - 1]["conversations"][-1]["assistant"] = "7" * 600
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in records))
    for policy, dropped, truncated, evaluated in (("truncate", 0, 2, 6), ("drop", 2, 0, 4)):
        run = tmp_path / policy
        summary = train(tiny_config(digits, tmp_path, strategy="lora", val_data=str(val), on_overflow=policy,
                                    max_steps=1, output_dir=str(run)))  # fmt: skip
        assert (summary["val_dropped"], summary["val_truncated"]) == (dropped, truncated)
        lines = (run / "eval" / "training" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == evaluated


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_training_steps_run_in_train_mode_so_checkpointing_recomputes(digits, tmp_path, monkeypatch, strategy):
    """Loaders return eval-mode models, and transformers checkpoints a layer only in train mode: every training
    forward of a decoder layer must be in train mode and, with checkpointing, start twice (the forward, then the
    recompute in backward), also after an evaluation has put the model in eval mode and back."""
    import phi3v.train.loop as loop

    calls = []  # (training, grad enabled) at each start of decoder layer 0's MLP (inside the checkpointed forward)
    original = loop.apply_strategy

    def recording(model, config):
        layer = model.model.layers[0].mlp
        layer.register_forward_pre_hook(lambda module, args: calls.append((module.training, torch.is_grad_enabled())))
        return original(model, config)

    monkeypatch.setattr(loop, "apply_strategy", recording)
    config = tiny_config(digits, tmp_path, strategy=strategy, max_steps=4, gradient_checkpointing=True,
                         val_data=str(digits / "digits_val.jsonl"), eval_every=2, eval_max_samples=2)  # fmt: skip
    train(config)
    training = [c for c in calls if c[0]]
    evaluating = [c for c in calls if not c[0]]
    assert evaluating and not any(grad for _, grad in evaluating)  # the evaluations: eval mode, no grad
    # 4 steps x 2 micro-batches (global 8, 4 per device), each layer forward started twice: forward + recompute
    assert training == [(True, True)] * (4 * 2 * 2)
