"""``benchmarks/gpu/run.sh --dry-run``: every step of the GPU check, on the tiny model on the CPU, so the script
cannot rot between two GPU runs. (Only one ``gpu`` test runs here, to keep this quick; the full dry run runs them
all.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import suite  # noqa: E402  (benchmarks/gpu/suite.py: the plans the dry run must follow)


def test_the_gpu_script_dry_run_writes_every_step_as_the_device_tool_returns_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PHI3V_GPU_TESTS_SELECT": "fused_adamw"}
    run = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    # the device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0-env.json", "1-tests.json", "2-train.json", "3-eval.json", "4-profile.json", "run.log",
                     "summary.md"]  # fmt: skip
    assert all(p.is_file() for p in out.iterdir())
    reports = {name: json.loads((out / name).read_text()) for name in names if name.endswith(".json")}
    for name, report in reports.items():
        assert report["finished"] and report["dry_run"] and not report["errors"] and not report["skipped"], name
    assert reports["0-env.json"]["results"][0]["phi3v"].startswith(str(ROOT / "src"))
    tests = reports["1-tests.json"]
    assert tests["summary"] == {"passed": 1, "failed": 0, "skipped": 0} and tests["exit_code"] == 0
    assert "test_fused_adamw_equals_unfused" in tests["results"][0]["test"]
    train = reports["2-train.json"]
    assert [r["label"] for r in train["results"]] == [label for label, _, _ in suite.DRY_TRAIN_PLAN]
    assert all(r["samples_per_s"] > 0 and r["preset"] == "tiny" for r in train["results"])
    assert set(train["ratios"]) == {"full"} and train["ratios"]["full"] > 0
    assert reports["3-eval.json"]["results"][0]["samples_per_s"] > 0
    parts = reports["4-profile.json"]["results"][0]["parts"]
    assert parts["decoder"]["ms"] > 0 and parts["clip"]["ms"] > 0
    summary = (out / "summary.md").read_text()
    assert "| full b2 |" in summary and "| decoder |" in summary
    assert "done in" in (out / "run.log").read_text()
