import json

import torch

from phi3v import Phi3VForCausalLM
from phi3v.cli import main


def test_model_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["model", "init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    assert "weights identical" in capsys.readouterr().out
    model = Phi3VForCausalLM.from_pretrained(tmp_path / "m")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_model_info_counts_components_of_the_full_architecture(capsys):
    assert main(["model", "info", "--preset", "phi-3.5-vision"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vision_layers_built"] == 23 and info["state_dict_keys"] == 574
    assert info["parameters"]["projector"] == 4096 * 3072 + 3072 + 3072 * 3072 + 3072 + 2 * 4096


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["model", "info", "--path", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_builds_the_converters_keyword_arguments(tmp_path, capsys):
    """Options not given keep the converter's own defaults (shown in the help); given ones arrive typed."""
    from phi3v.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["convert"]
    digits_help = help_text._subparsers._group_actions[0].choices["digits"].format_help()
    assert "frames per digits_video clip (default 4)" in digits_help
    assert main(["convert", "digits", "--out", str(tmp_path), "--limit", "200", "--frames", "3", "--no-check"]) == 0
    lines = (tmp_path / "digits_train.jsonl").read_text().splitlines()
    assert len(lines) == 200 - 2 * int(200 * 0.15)  # default fractions 0.15 / 0.15
    clip = json.loads((tmp_path / "digits_video_train.jsonl").read_text().splitlines()[0])
    assert len(clip["conversations"][0]["images"]) == 3
