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
