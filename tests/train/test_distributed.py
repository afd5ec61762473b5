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
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def _losses(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["losses"]


def _torchrun(config_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return _run([*launcher, "-m", "phi3v", "train", str(config_path)])


def _weights(run_dir):
    final = run_dir / "final"
    name = "model.safetensors" if (final / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(final / name)


# Tolerance: the same samples per step and a token-weighted loss, so 1 and 2 processes differ only in the order of
# float sums (all-reduce, reduce-scatter): 1e-5 relative on the loss, 1e-5 absolute on the final weights.
ENGINE_CASES = [
    ("full", "ddp", 4),
    ("lora", "ddp", 4),
    ("qlora", "ddp", 4),  # the 4-bit base read on each process's device
    ("full", "deepspeed_zero2", 2),  # batch 2 per device: 2 accumulation steps of 2 x 2 samples
    ("lora", "deepspeed_zero2", 4),
    ("full", "fsdp2", 2),
    ("lora", "fsdp2", 4),
]


ENGINE_TYPES = {"ddp": "MULTI_CPU", "deepspeed_zero2": "DEEPSPEED", "fsdp2": "FSDP"}


def _evaluations(run_dir):
    """The evaluation records of the run's log, and the last evaluation's predictions."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    predictions = (run_dir / "eval" / "training" / "predictions.jsonl").read_text().splitlines()
    return [r for r in log if "eval/accuracy" in r], [json.loads(line)["prediction"] for line in predictions]


# FSDP2 units of the tiny model (2 decoder layers), by module name ("" is the root), without and with PEFT's wrapper.
FSDP2_UNITS = {
    "full": ["", "model.layers.0", "model.layers.1", "model.vision_embed_tokens.img_processor"],
    "lora": ["", "base_model.model.model.layers.0", "base_model.model.model.layers.1",
             "base_model.model.model.vision_embed_tokens.img_processor"],
}  # fmt: skip


@pytest.mark.parametrize(("strategy", "engine", "per_device"), ENGINE_CASES)
def test_two_processes_match_one_with_the_same_global_batch(digits, tmp_path, strategy, engine, per_device):
    # FSDP2 also evaluates during training (17 prompts: 9 on rank 0, 8 on rank 1, so 2 batches of 8 against 1):
    # sharded generation must neither hang nor change the metric.
    evaluation = {}
    if engine == "fsdp2":
        evaluation = dict(val_data=str(digits / "digits_val.jsonl"), eval_every=3, eval_max_samples=17)
    one = _write_config(tiny_config(digits, tmp_path, strategy=strategy, output_dir=str(tmp_path / "one"),
                                    **evaluation), tmp_path / "one.yaml")  # fmt: skip
    two = _write_config(tiny_config(digits, tmp_path, strategy=strategy, engine=engine,
                                    per_device_batch_size=per_device, output_dir=str(tmp_path / "two"),
                                    **evaluation), tmp_path / "two.yaml")  # fmt: skip
    _run([sys.executable, "-m", "phi3v", "train", str(one)])
    log = _torchrun(two).stderr
    assert f"on {ENGINE_TYPES[engine]} ({engine}), 2 process(es)" in log  # the engine ran; no silent fallback
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
    want, got = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] - got[key]).abs().max() <= 1e-5, key
    if engine == "fsdp2":
        layout = json.loads((tmp_path / "two" / "summary.json").read_text())["fsdp2"]
        assert layout["units"] == FSDP2_UNITS[strategy]  # each decoder layer and the CLIP tower its own unit
        total, per_rank = layout["param_bytes"], layout["local_param_bytes"]
        assert sum(per_rank) == total and len(per_rank) == 2
        assert all(0.45 * total <= n <= 0.55 * total for n in per_rank), (per_rank, total)  # about half each
        evals_one, predictions_one = _evaluations(tmp_path / "one")
        evals_two, predictions_two = _evaluations(tmp_path / "two")
        assert [r["step"] for r in evals_two] == [3, 6]
        assert evals_two == evals_one and predictions_two == predictions_one
        assert len(predictions_two) == 17


@pytest.mark.parametrize("engine", ["deepspeed_zero2", "fsdp2"])
def test_sharded_engines_resume_exactly(digits, tmp_path, engine):
    """Resuming from step 3's checkpoint reproduces steps 4-6 and the final weights bit for bit; this fails if
    the sharded optimizer state (ZeRO partitions, FSDP2 DTensor moments) is not restored."""
    settings = dict(strategy="full", engine=engine, per_device_batch_size=2, save_every=1, keep_last=6)
    reference = tmp_path / "ref"
    _torchrun(_write_config(tiny_config(digits, tmp_path, output_dir=str(reference), **settings),
                            tmp_path / "ref.yaml"))  # fmt: skip
    step3 = reference / "checkpoints" / "step-0000003"
    expected = {"deepspeed_zero2": ["zero-rank0.safetensors", "zero-rank1.safetensors"],
                "fsdp2": ["optimizer.safetensors"]}[engine]  # fmt: skip
    assert all((step3 / name).exists() for name in expected)

    resumed = tmp_path / "resumed"
    _torchrun(_write_config(tiny_config(digits, tmp_path, output_dir=str(resumed), resume=str(step3), **settings),
                            tmp_path / "resumed.yaml"))  # fmt: skip
    assert _losses(resumed) == _losses(reference)
    want, got = _weights(reference), _weights(resumed)
    for key in want:
        assert (want[key] == got[key]).all(), key


def test_deepspeed_checkpoint_needs_the_same_number_of_processes(digits, tmp_path):
    settings = dict(strategy="full", engine="deepspeed_zero2", max_steps=2, save_every=1)
    first = tmp_path / "first"
    _torchrun(_write_config(tiny_config(digits, tmp_path, output_dir=str(first), **settings), tmp_path / "a.yaml"))
    again = _write_config(tiny_config(digits, tmp_path, output_dir=str(tmp_path / "again"), per_device_batch_size=8,
                                      resume=str(first / "checkpoints" / "step-0000001"), **settings),
                          tmp_path / "b.yaml")  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    result = subprocess.run([*launcher, "-m", "phi3v", "train", str(again)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode != 0
    assert "written by 2 processes" in result.stderr and "resume with 2, not 1" in result.stderr


def test_accelerate_launch_runs_deepspeed_like_torchrun(digits, tmp_path):
    config = _write_config(tiny_config(digits, tmp_path, engine="deepspeed_zero2", max_steps=3,
                                       output_dir=str(tmp_path / "acc")), tmp_path / "acc.yaml")  # fmt: skip
    reference = _write_config(tiny_config(digits, tmp_path, max_steps=3, output_dir=str(tmp_path / "one")),
                              tmp_path / "one.yaml")  # fmt: skip
    _run([sys.executable, "-m", "phi3v", "train", str(reference)])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "phi3v", "train",
          str(config)])  # fmt: skip
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "acc")
    assert len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)


def test_sharded_engines_need_a_launcher(digits, tmp_path):
    config = _write_config(tiny_config(digits, tmp_path, engine="fsdp2"), tmp_path / "c.yaml")
    result = subprocess.run([sys.executable, "-m", "phi3v", "train", str(config)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 2
    assert "engine=fsdp2 shards the training state across processes" in result.stderr


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


def test_ctrl_c_ends_with_one_line_and_no_torn_checkpoint(digits, tmp_path):
    """SIGINT (Ctrl-C) sent while a checkpoint is being assembled: one line on stderr, exit 130, no ``.tmp-step-*``
    folder left, every finished checkpoint verifies, and resume=auto continues."""
    from phi3v.train.checkpoint import list_checkpoints, verify

    run = tmp_path / "run"
    config = _write_config(tiny_config(digits, tmp_path, strategy="full", max_steps=20, save_every=1, keep_last=2,
                                       resume="auto"), tmp_path / "c.yaml")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "phi3v", "train", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    staging = run / "checkpoints" / ".tmp-step-0000003"
    while process.poll() is None and not staging.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]
    assert lines[-1] == "phi3v: interrupted" and "Traceback" not in err, err[-2000:]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    for folder in list_checkpoints(run):
        verify(folder)
    _run([sys.executable, "-m", "phi3v", "train", str(config)])
    assert len(_losses(run)) == 20
