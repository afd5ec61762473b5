"""Adapters know their base (issue 14, findings 9 and 10): a recorded identity, a refused mismatch, refused pickles."""

import json
import shutil

import pytest
import torch

from phi3v.adapter_base import IDENTITY_FILE, AdapterBaseError, fingerprint
from phi3v.cli import main
from phi3v.eval.inference import load_for_inference
from phi3v.export import export
from phi3v.model import build_model


def test_the_fingerprint_tells_bases_apart_but_not_dtypes():
    a, b = build_model("tiny", seed=0), build_model("tiny", seed=1)
    fa, fb = fingerprint(a.config, a.state_dict()), fingerprint(b.config, b.state_dict())
    fa16 = fingerprint(a.config, a.to(torch.bfloat16).state_dict())
    assert fa["config_sha256"] == fb["config_sha256"]  # same architecture
    differ = [n for n in fa["tensors"] if abs(fa["tensors"][n]["probe"] - fb["tensors"][n]["probe"]) > 0.05]
    # every randomly initialised tensor is a chance to tell the seeds apart; one difference refuses the adapter
    # (constant tensors, norms at 1 and biases at 0, cannot differ; a random pair lands within 0.05 about 3% of
    # the time, so most but not all of the 27 random tensors differ: 26 do)
    assert "model.embed_tokens.weight" in differ and len(differ) >= 20
    assert max(abs(fa["tensors"][n]["probe"] - fa16["tensors"][n]["probe"]) for n in fa["tensors"]) < 0.01


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The same tiny architecture with other weights (seed 1)."""
    out = tmp_path_factory.mktemp("other-base") / "m"
    assert main(["model", "init", "--preset", "tiny", "--seed", "1", "--out", str(out), "--no-verify"]) == 0
    return out


def test_training_records_the_base_and_export_refuses_another(lora_run, other_base, tmp_path, caplog):
    adapter = lora_run / "final"
    record = json.loads((adapter / IDENTITY_FILE).read_text())
    assert record["base"] == "tiny" and record["tensors"]["model.embed_tokens.weight"]["shape"][0] > 0
    with pytest.raises(AdapterBaseError, match=r"trained on base 'tiny', not on .*m': tensor .* holds other weights"):
        export(other_base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    export(other_base, adapter, tmp_path / "forced", force=True)  # told to: a warning, and it goes ahead
    assert (tmp_path / "forced" / "model.safetensors").exists()
    assert "--force: using it anyway" in caplog.text
    model, _ = load_for_inference(adapter / "base", adapter, dtype="bfloat16")  # its own base, in another dtype
    assert model is not None


def test_eval_and_generate_refuse_another_base_in_one_line(lora_run, other_base, digits, tmp_path, capsys):
    args = ["--model", str(other_base), "--adapter", str(lora_run / "final")]
    data = ["--data", str(digits / "digits_val.jsonl"), "--image-root", str(digits / "images"), "--task", "digits"]
    assert main(["eval", *args, *data, "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --force" in err and not (tmp_path / "ev").exists()
    assert main(["generate", *args, "--no-stream", "--max-new-tokens", "1", "Which?"]) == 2
    assert "was trained on base 'tiny'" in capsys.readouterr().err


def test_pickled_adapter_files_never_reach_torch_load(lora_run, tmp_path, monkeypatch, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "final", adapter, ignore=shutil.ignore_patterns("base"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2)}, adapter / "adapter_model.bin")  # a real pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(AdapterBaseError, match=r"pickled adapter file\(s\) \['adapter_model.bin'\]"):
        load_for_inference(lora_run / "final" / "base", adapter)
    assert main(["export", "--model", str(lora_run / "final" / "base"), "--adapter", str(adapter),
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "phi3v never loads pickles" in capsys.readouterr().err
