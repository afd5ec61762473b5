import json

import pytest
import torch
from PIL import Image

from phi3v import Phi3VForCausalLM
from phi3v.cli import main
from phi3v.eval.inference import load_for_inference
from phi3v.export import ExportError, _probe_inputs, export


def test_export_merges_verifies_and_loads_back(lora_run, tmp_path):
    base, adapter = lora_run / "final" / "base", lora_run / "final"
    manifest = export(base, adapter, tmp_path / "merged", frames=4)
    assert (
        manifest["num_crops"] == 1 and manifest["frames"] == 4 and manifest["parity"]["max_abs_logit_difference"] < 1e-4
    )
    merged = Phi3VForCausalLM.from_pretrained(tmp_path / "merged")
    assert set(merged.state_dict()) == set(Phi3VForCausalLM.from_pretrained(base).state_dict())
    model, _ = load_for_inference(base, adapter)
    probe = _probe_inputs(merged)
    torch.testing.assert_close(merged(**probe).logits, model(**probe).logits, atol=1e-4, rtol=1e-4)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "phi3v_manifest.json",
    } <= files
    with pytest.raises(FileExistsError):
        export(base, adapter, tmp_path / "merged")


def test_export_refuses_a_merge_that_does_not_reproduce_the_adapter(lora_run, tmp_path, monkeypatch):
    import phi3v.export as module

    monkeypatch.setitem(module.TOLERANCE, torch.float32, -1.0)  # no merge can pass a negative tolerance
    with pytest.raises(ExportError, match="merged logits differ"):
        export(lora_run / "final" / "base", lora_run / "final", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))


def test_report_of_a_real_run_shows_its_last_evaluation_during_training(lora_run, capsys):
    assert main(["report", str(lora_run)]) == 0
    page = (lora_run / "report" / "index.html").read_text()
    saved = [
        json.loads(line) for line in (lora_run / "eval" / "training" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(saved) == 6  # eval_max_samples: the last evaluation's predictions, kept for the gallery
    assert all(Image.open(p).format == "PNG" for p in saved[0]["images"])
    assert page.startswith("<!DOCTYPE html>") and page.count("class='card ") == 6
    assert "during training (step 12)" in page and "Confusion matrices" in page  # digits has a label set
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"{summary['losses'][-1]:.4g}" in page
    environment = json.loads((lora_run / "environment.json").read_text())
    assert f"torch {environment['versions']['torch']}" in page
