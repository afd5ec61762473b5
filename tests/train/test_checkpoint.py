"""Checkpoint pieces that run in one process: the pickle-free nested-state round trip."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3v.train.checkpoint import flatten, unflatten


def test_nested_state_round_trips_through_safetensors_and_json(tmp_path):
    import json

    state = {
        "base_optimizer_state": {"state": {0: {"exp_avg": torch.arange(4.0), "step": torch.tensor(3.0)}},
                                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None}]},
        "single_partition_of_fp32_groups": [torch.ones(3), torch.zeros(0)],
        "loss_scaler": {"cur_scale": 65536.0, "dynamic": True},
        "ds_version": "0.19.8",
    }  # fmt: skip
    tensors, skeleton = flatten(state)
    save_file(tensors, tmp_path / "s.safetensors")
    (tmp_path / "s.json").write_text(json.dumps(skeleton))
    back = unflatten(load_file(tmp_path / "s.safetensors"), json.loads((tmp_path / "s.json").read_text()))

    assert list(back["base_optimizer_state"]["state"]) == [0]  # int keys stay int
    assert torch.equal(back["base_optimizer_state"]["state"][0]["exp_avg"], torch.arange(4.0))
    assert back["base_optimizer_state"]["param_groups"][0]["betas"] == [0.9, 0.95]
    assert back["single_partition_of_fp32_groups"][1].shape == (0,)
    assert back["loss_scaler"] == {"cur_scale": 65536.0, "dynamic": True}
    assert back["ds_version"] == "0.19.8"


def test_objects_that_would_need_pickle_are_refused():
    with pytest.raises(TypeError, match=r"/scaler: a object cannot be stored without pickle"):
        flatten({"scaler": object()})


def test_a_checkpoint_moved_aside_by_a_killed_resave_is_put_back(tmp_path):
    from phi3v.train.checkpoint import remove_staging

    root = tmp_path / "checkpoints"
    (root / ".old-step-0000003").mkdir(parents=True)  # killed between moving step 3 aside and renaming the new one
    (root / ".old-step-0000003" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step-0000003").mkdir()  # the new one, never finished
    (root / ".old-step-0000005").mkdir()  # killed after the new step 5 was in place
    (root / "step-0000005").mkdir()
    remove_staging(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000005"]
    assert (root / "step-0000003" / "trainer_state.json").read_text() == "{}"


def test_resuming_a_zero2_checkpoint_on_another_engine_names_both(digits, tmp_path):
    from phi3v.train.checkpoint import CheckpointError, checkpoint_dir, write_manifest
    from phi3v.train.loop import train
    from tests.train.conftest import tiny_config

    settings = dict(max_steps=4, save_every=2, keep_last=3)
    train(tiny_config(digits, tmp_path, **settings))
    folder = checkpoint_dir(tmp_path / "run", 2)
    save_file({"x": torch.zeros(1)}, folder / "zero-rank0.safetensors")  # as DeepSpeed's partition would be
    (folder / "manifest.json").unlink()
    write_manifest(folder)
    with pytest.raises(CheckpointError, match=r"written with engine deepspeed_zero2 .*this run's engine is ddp"):
        train(tiny_config(digits, tmp_path, resume=str(folder), **settings))
