import pytest
import yaml

from phi3v.train.config import ConfigError, TrainConfig, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"strategy": "lora", "lr": 2e-4, "lora_rank": 32}))
    config = load_config(path, ["lr=1e-4", "max_steps=10", "lora_targets=[qkv_proj]", "val_data=null"])
    assert (config.strategy, config.lr, config.max_steps, config.lora_rank) == ("lora", 1e-4, 10, 32)
    assert config.lora_targets == ["qkv_proj"] and config.val_data is None
    config.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == config


def test_load_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lr=fast", "lora_rank=2.5", "colour=blue", "oops"])
    message = str(err.value)
    for expected in ("lr='fast'", "lora_rank=2.5", "'colour': unknown setting", "'oops': expected key=value"):
        assert expected in message


def test_validation_reports_every_problem_at_once(tmp_path):
    config = TrainConfig(train_data=str(tmp_path / "none.jsonl"), image_root="", strategy="bitfit", lr=-1,
                         global_batch_size=10, per_device_batch_size=4, precision="fp16",
                         attention="flash_attention_2", task="poetry")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config.validate(world_size=1)
    message = str(err.value)
    for expected in ("strategy='bitfit'", "none.jsonl", "image_root: required", "lr=-1", "global_batch_size=10",
                     "flash_attention_2", "task='poetry'"):  # fmt: skip
        assert expected in message, expected


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))
    assert len(configs) == 17  # 4 tasks x 4 strategies + the demo
    for path in configs:
        config = load_config(path)
        assert config.strategy in ("full", "frozen_vision", "lora", "qlora"), path


def test_more_settings_are_validated(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    config = TrainConfig(train_data=str(data), image_root=str(tmp_path), log_every=0, eval_max_samples=0,
                         num_workers=-1, lora_alpha=0, adam_betas=(0.9, 1.5))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config.validate()
    for expected in ("log_every=0", "eval_max_samples=0", "num_workers=-1", "lora_alpha=0", "adam_betas=[0.9, 1.5]"):
        assert expected in str(err.value), expected
