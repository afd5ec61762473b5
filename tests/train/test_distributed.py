"""Multi-process and crash behaviour through the real command line (torchrun, gloo on the CPU)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from tests.train.conftest import tiny_config


def _write_config(config, path):
    data = config.to_dict()
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=600, **kwargs)


def _losses(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["losses"]


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(digits, tmp_path, strategy):
    one = _write_config(tiny_config(digits, tmp_path, strategy=strategy, output_dir=str(tmp_path / "one")),
                        tmp_path / "one.yaml")  # fmt: skip
    two = _write_config(tiny_config(digits, tmp_path, strategy=strategy, output_dir=str(tmp_path / "two")),
                        tmp_path / "two.yaml")  # fmt: skip
    _run([sys.executable, "-m", "phi3v", "train", str(one)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "phi3v", "train", str(two)])
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    # Same samples per step, token-weighted loss: only the order of float sums differs between 1 and 2 processes.
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)


def test_sigkill_then_resume_continues_exactly(digits, tmp_path):
    settings = dict(strategy="full", max_steps=30, save_every=1, keep_last=2)
    reference = _write_config(tiny_config(digits, tmp_path, output_dir=str(tmp_path / "ref"), **settings),
                              tmp_path / "ref.yaml")  # fmt: skip
    _run([sys.executable, "-m", "phi3v", "train", str(reference)])

    crashed = tmp_path / "crash"
    config = _write_config(tiny_config(digits, tmp_path, output_dir=str(crashed), resume="auto", **settings),
                           tmp_path / "crash.yaml")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "phi3v", "train", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    target = crashed / "checkpoints" / "step-0000004"
    deadline = time.monotonic() + 300
    while process.poll() is None and not (target / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (crashed / "summary.json").exists()

    _run([sys.executable, "-m", "phi3v", "train", str(config)])
    assert _losses(crashed) == _losses(tmp_path / "ref")
    want = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    got = load_file(crashed / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] == got[key]).all(), key
