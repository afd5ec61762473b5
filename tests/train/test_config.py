import math
import os

import pytest
import yaml

from phi3v.train.config import ConfigError, TrainConfig, load_config
from tests.train.conftest import tiny_config


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


def test_every_shipped_config_loads_and_validates(tmp_path):
    """Each shipped config passes validation (its data paths pointed at real files) on 1 and 8 devices, and its
    file name says its task and strategy."""
    import dataclasses
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    data.write_text("")
    configs = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))
    assert len(configs) == 17  # 4 tasks x 4 strategies + the demo
    for path in configs:
        config = load_config(path)
        if path.stem != "demo":
            task, strategy = path.stem.split("-")
            assert (config.task, config.strategy) == (task, strategy), path
        local = dataclasses.replace(config, train_data=str(data), val_data=str(data) if config.val_data else None,
                                    image_root=str(tmp_path), output_dir=str(tmp_path / "run"))  # fmt: skip
        local.validate(world_size=1)
        if path.stem != "demo":
            local.validate(world_size=8)


def test_more_settings_are_validated(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    config = TrainConfig(train_data=str(data), image_root=str(tmp_path), log_every=0, eval_max_samples=0,
                         num_workers=-1, lora_alpha=0, adam_betas=(0.9, 1.5))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config.validate()
    for expected in ("log_every=0", "eval_max_samples=0", "num_workers=-1", "lora_alpha=0", "adam_betas=[0.9, 1.5]"):
        assert expected in str(err.value), expected


def _one_line_error(argv, capsys) -> str:
    """Run the command; it must exit 2 with one ``phi3v: error:`` line on stderr and no traceback."""
    from phi3v.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phi3v: error: ") and "Traceback" not in err
    return err


def test_unreadable_configs_are_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: lora\nlr: [1e-4\nseed: 1\n")
    err = _one_line_error(["train", str(bad)], capsys)
    assert len(err.splitlines()) == 1 and f"{bad}:3:" in err and "invalid YAML" in err
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# r\xe9sum\xe9\nstrategy: lora\n".encode("latin-1"))
    err = _one_line_error(["train", str(latin)], capsys)
    assert len(err.splitlines()) == 1 and f"{latin}: not UTF-8 text" in err


def test_output_dir_below_a_file_is_refused_up_front(digits, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    config = tiny_config(digits, tmp_path, output_dir=str(tmp_path / "a-file" / "run"))
    with pytest.raises(ConfigError, match=r"output_dir=.*a-file/run'?: .*a-file is a file, not a folder"):
        config.validate()
    assert not (tmp_path / "a-file" / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir_is_refused_up_front(digits, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"locked is not writable"):
        tiny_config(digits, tmp_path, output_dir=str(locked / "run")).validate()


def test_numbers_must_be_finite(digits, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        tiny_config(digits, tmp_path, lr=math.inf, max_grad_norm=math.nan, adam_betas=(0.9, math.nan)).validate()
    for expected in ("lr=inf: must be a finite number", "max_grad_norm=nan: must be a finite number",
                     "adam_betas=(0.9, nan): must be a finite number"):  # fmt: skip
        assert expected in str(err.value), expected
    config = tiny_config(digits, tmp_path)
    path = tmp_path / "c.yaml"
    config.save(path)
    err = _one_line_error(["train", str(path), "lr=.inf"], capsys)
    assert "lr=inf: must be a finite number" in err


def test_eval_refuses_a_batch_size_of_zero(capsys):
    from phi3v.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "m", "--data", "d", "--image-root", "r", "--task", "digits", "--batch-size", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size: must be at least 1, got 0" in err and "Traceback" not in err


def test_the_system_setting_is_text_or_null_and_never_empty(tmp_path):
    assert load_config(None, ["system=yes"]).system == "yes"  # not YAML's True
    assert load_config(None, ["system=Reply: in one word"]).system == "Reply: in one word"  # not a mapping
    assert load_config(None, ["system=null"]).system is None
    path = tmp_path / "c.yaml"
    path.write_text("system: |\n  Two lines,\n  kept.\n")
    assert load_config(path).system == "Two lines,\nkept.\n"
    for value in ("", "  "):
        with pytest.raises(ConfigError, match=rf"system={value!r}: expected a non-empty string \(or null for none\)"):
            tiny_config(tmp_path, tmp_path, system=value).validate()
