"""The steps of ``benchmarks/gpu/run.sh``, one per call, each writing its JSON file as it goes.

    python benchmarks/gpu/suite.py {env,tests,train,eval,profile} --out FILE [--dry-run] [--budget-s S]

Every step rewrites its file after each measurement, so a step stopped by its time limit still leaves what it
measured. A measurement that fails (out of memory, an error) is recorded with its error and the next one runs.
``--budget-s`` is the step's own deadline: a measurement whose estimated cost no longer fits is listed as skipped,
not started. Plans are in priority order; ``PHI3V_GPU_ONLY`` (comma-separated labels) runs only those rows, for a
second run that measures what the first skipped. ``--dry-run`` runs the same code on the tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

FULL = "phi-3.5-vision"
PEAK_TFLOPS = 790.0  # bf16 8192^3 matmul measured on this workplace's H200s (KINDS.md); datasheet 989

# (label, cost estimate in seconds on an H200, run_bench keyword arguments); the first rows answer the issue's
# targets (each strategy at batch 2, with the reference settings beside full and LoRA), then batch sizes,
# activation checkpointing and torch.compile. QLoRA rows cost more: the random base is built on the CPU, written to
# a temporary folder (8.3 GB in bf16) and read back 4-bit through from_pretrained, as a real checkpoint is (an
# estimate, not yet measured on a GPU).
TRAIN_PLAN = [
    ("full b2", 30, dict(strategy="full", batch_size=2)),
    ("full reference", 25, dict(strategy="full", reference=True)),
    ("lora b2", 25, dict(strategy="lora", batch_size=2)),
    ("lora reference", 25, dict(strategy="lora", reference=True)),
    ("qlora b2", 120, dict(strategy="qlora", batch_size=2)),
    ("frozen_vision b2", 25, dict(strategy="frozen_vision", batch_size=2)),
    ("full b4", 30, dict(strategy="full", batch_size=4)),
    ("full b1", 20, dict(strategy="full", batch_size=1)),
    ("full b2 compile", 150, dict(strategy="full", batch_size=2, compile=True)),
    ("lora b4", 25, dict(strategy="lora", batch_size=4)),
    ("qlora b4", 120, dict(strategy="qlora", batch_size=4)),
    ("full b2 no checkpointing", 25, dict(strategy="full", batch_size=2, checkpoint_every=0)),
    ("full b2 checkpoint every 2nd", 25, dict(strategy="full", batch_size=2, checkpoint_every=2)),
    ("frozen_vision b4", 30, dict(strategy="frozen_vision", batch_size=4)),
    ("qlora reference", 120, dict(strategy="qlora", reference=True)),
    ("lora b2 compile", 120, dict(strategy="lora", batch_size=2, compile=True)),
    ("lora b1", 20, dict(strategy="lora", batch_size=1)),
    ("qlora b1", 110, dict(strategy="qlora", batch_size=1)),
    ("frozen_vision b1", 20, dict(strategy="frozen_vision", batch_size=1)),
]
TRAIN_DEFAULTS = dict(preset=FULL, steps=3, warmup=2, tokens=2450, num_crops=16, peak_tflops=PEAK_TFLOPS)
DRY_TRAIN_PLAN = [
    ("full b2", 5, dict(strategy="full", batch_size=2)),
    ("full reference", 5, dict(strategy="full", reference=True)),
    ("lora b2", 5, dict(strategy="lora", batch_size=2)),
    ("qlora b2", 10, dict(strategy="qlora", batch_size=2)),
]
DRY_TRAIN_DEFAULTS = dict(preset="tiny", steps=1, warmup=0, tokens=200, num_crops=16, peak_tflops=None, device="cpu")

EVAL_PLAN = [("eval b16", 40, dict(batch_size=16)), ("eval b32", 50, dict(batch_size=32)),
             ("eval b8", 30, dict(batch_size=8))]  # fmt: skip
EVAL_DEFAULTS = dict(preset=FULL, batches=2, warmup=1, tokens=2450, new_tokens=10, num_crops=16)
DRY_EVAL_PLAN = [("eval b2", 5, dict(batch_size=2))]
DRY_EVAL_DEFAULTS = dict(preset="tiny", batches=1, warmup=0, tokens=120, new_tokens=3, num_crops=16, device="cpu")

PROFILE_PLAN = [("profile full b2", 40, dict(strategy="full", batch_size=2)),
                ("profile lora b2", 40, dict(strategy="lora", batch_size=2))]  # fmt: skip
PROFILE_DEFAULTS = dict(preset=FULL, tokens=2450, num_crops=16, warmup=1)
DRY_PROFILE_PLAN = [("profile full b1", 10, dict(strategy="full", batch_size=1))]
DRY_PROFILE_DEFAULTS = dict(preset="tiny", tokens=120, num_crops=16, warmup=0, device="cpu")


class Report:
    """A step's JSON file, rewritten (atomically) after every change."""

    def __init__(self, path: Path, step: str, dry_run: bool, budget_s: float):
        self.path = path
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.data = {"step": step, "dry_run": dry_run, "budget_s": budget_s, "finished": False,
                     "results": [], "errors": [], "skipped": []}  # fmt: skip
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def run_plan(report: Report, plan, defaults, run) -> None:
    """Run ``run(**defaults, **kwargs)`` for each plan row that fits the budget; record results and failures."""
    import torch

    only = [label.strip() for label in os.environ.get("PHI3V_GPU_ONLY", "").split(",") if label.strip()]
    if only:  # a second run measures what the first one skipped
        report.data["only"] = only
    for label, cost, kwargs in plan:
        if only and label not in only:
            continue
        if cost > report.left():
            report.data["skipped"].append({"label": label, "reason": f"budget: {report.left():.0f} s left, "
                                           f"estimated {cost} s"})  # fmt: skip
            report.write()
            continue
        print(f"[{report.data['step']}] {label} ...", flush=True)
        start = time.monotonic()
        try:
            result = run(**{**defaults, **kwargs})
            row = {"label": label, "wall_s": round(time.monotonic() - start, 1), **_as_dict(result)}
            report.data["results"].append(row)
            print(f"[{report.data['step']}] {label}: {_headline(row)}", flush=True)
        except Exception as error:  # record and go on: one failure must not cost the other measurements
            kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
            report.data["errors"].append({"label": label, "error": kind, "message": str(error)[-2000:],
                                          "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
            print(f"[{report.data['step']}] {label}: FAILED ({kind}: {str(error)[:300]})", flush=True)
            gc.collect()  # the failed run's model may hang on reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report.write()


def _as_dict(result) -> dict:
    return result if isinstance(result, dict) else asdict(result)


def _headline(row: dict) -> str:
    if "samples_per_s" in row:
        mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
        return f"{row['samples_per_s']:.3g} samples/s{mfu}, peak {row['peak_memory_gib']:.1f} GiB"
    if "parts" in row:
        return ", ".join(f"{k} {v['share']:.0%}" for k, v in row["parts"].items() if v["share"] >= 0.005)
    return ""


def step_env(report: Report, site: str | None) -> None:
    """Versions, the device, the carried wheels' unmet requirements, and the bf16 matmul ceiling."""
    from importlib import metadata

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}  # fmt: skip
    packages = {}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                 "huggingface-hub", "numpy", "triton", "pytest", "levenshtein", "rapidfuzz"):  # fmt: skip
        try:
            dist = metadata.distribution(name)
            packages[name] = {"version": dist.version, "from": str(dist.locate_file(""))}
        except metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    info["carried"], info["unmet_requirements"] = _carried(site)
    try:
        import phi3v

        info["phi3v"] = phi3v.__file__
    except Exception as error:
        info["phi3v_import_error"] = repr(error)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": props.total_memory / 2**30, "sms": props.multi_processor_count}  # fmt: skip
        info["matmul_bf16_tflops"] = _matmul_tflops(8192, 10)
    else:
        info["device"] = {"name": "cpu", "threads": torch.get_num_threads()}
        info["matmul_fp32_tflops"] = _matmul_tflops(512, 3)
    report.data["results"].append(info)
    print(json.dumps(info, indent=1, default=str), flush=True)


def _carried(site: str | None) -> tuple[list[str], list[str]]:
    """The distributions installed from ``.whl/`` and every requirement of theirs that the environment misses."""
    if not site or not Path(site).is_dir():
        return [], []
    from importlib import metadata

    from packaging.requirements import Requirement

    carried, unmet = [], []
    for dist in metadata.distributions(path=[site]):
        carried.append(f"{dist.metadata['Name']}=={dist.version}")
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} needs {requirement}: missing")
                continue
            if requirement.specifier and have not in requirement.specifier:
                unmet.append(f"{dist.metadata['Name']} needs {requirement}: found {have}")
    return sorted(carried), unmet


def _matmul_tflops(n: int, repeats: int) -> float:
    """Median rate of ``n^3`` matmuls on random data (bf16 on CUDA, float32 on a CPU), after warm-up."""
    import torch

    cuda = torch.cuda.is_available()
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(3 + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def step_tests(report: Report, dry_run: bool) -> int:
    """``pytest -m gpu`` in this process; each test's outcome goes into the report as it finishes."""
    import importlib.util

    import pytest

    class Recorder:
        def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
            if report.when == "call" or report.outcome != "passed":
                row = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                       "seconds": round(report.duration, 2)}  # fmt: skip
                if report.outcome == "failed":
                    row["message"] = str(report.longrepr)[-3000:]
                elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                    row["message"] = report.longrepr[2]
                outer.data["results"].append(row)
                outer.write()

    outer = report
    args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    if importlib.util.find_spec("pytest_timeout") and not dry_run:  # the machine has it; it loads itself
        args[:0] = ["--timeout", "150"]
    if dry_run:
        os.environ["PHI3V_GPU_TESTS_ON_CPU"] = "1"
    if os.environ.get("PHI3V_GPU_TESTS_SELECT"):  # a -k expression: the normal suite's check of the dry run
        args[:0] = ["-k", os.environ["PHI3V_GPU_TESTS_SELECT"]]
    code = int(pytest.main(args, plugins=[Recorder()]))
    outcomes = [r["outcome"] for r in report.data["results"]]
    report.data["summary"] = {o: outcomes.count(o) for o in ("passed", "failed", "skipped")}
    report.data["exit_code"] = code
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["env", "tests", "train", "eval", "profile", "summary"])
    parser.add_argument("--out", required=True, help="the step's JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start nothing after this many seconds")
    parser.add_argument("--site", default=None, help="folder the carried wheels were installed into")
    args = parser.parse_args(argv)
    if args.step == "summary":
        text = summary(Path(args.out).parent)
        Path(args.out).write_text(text)
        print(text)
        return 0
    report = Report(Path(args.out), args.step, args.dry_run, args.budget_s)
    code = 0
    if args.step == "env":
        step_env(report, args.site)
    elif args.step == "tests":
        code = step_tests(report, args.dry_run)
    else:
        from phi3v import bench

        plans = {
            "train": (DRY_TRAIN_PLAN, DRY_TRAIN_DEFAULTS, TRAIN_PLAN, TRAIN_DEFAULTS, bench.run_bench),
            "eval": (DRY_EVAL_PLAN, DRY_EVAL_DEFAULTS, EVAL_PLAN, EVAL_DEFAULTS, bench.run_eval_bench),
            "profile": (DRY_PROFILE_PLAN, DRY_PROFILE_DEFAULTS, PROFILE_PLAN, PROFILE_DEFAULTS, bench.profile_step),
        }
        dry_plan, dry_defaults, plan, defaults, run = plans[args.step]
        run_plan(report, *((dry_plan, dry_defaults) if args.dry_run else (plan, defaults)), run)
        if args.step == "train":
            report.data["ratios"] = _ratios(report.data["results"])
        code = 1 if report.data["errors"] else 0
    report.data["finished"] = True
    report.write()
    return code


def summary(directory: Path) -> str:
    """Markdown tables of the step files in ``directory`` (what RESULTS.md takes), from whatever is there."""

    def load(name):
        path = directory / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    env, tests, train = load("0-env.json"), load("1-tests.json"), load("2-train.json")
    evals, profile = load("3-eval.json"), load("4-profile.json")
    lines = ["# GPU check summary", ""]
    if env.get("results"):
        e = env["results"][0]
        lines += [f"device: {e.get('device')}; torch {e.get('torch')} (CUDA {e.get('cuda')}); transformers "
                  f"{(e.get('packages', {}).get('transformers') or {}).get('version')}; bf16 matmul "
                  f"{e.get('matmul_bf16_tflops', 'n/a')} TFLOP/s; unmet requirements: "
                  f"{e.get('unmet_requirements') or 'none'}", ""]  # fmt: skip
    if tests:
        failed = [r["test"] for r in tests.get("results", []) if r["outcome"] == "failed"]
        lines += [f"tests: {tests.get('summary', 'not finished')}; failed: {failed or 'none'}", ""]
    lines += ["| run | samples/s | tokens/s | MFU | peak GiB | s/step | first step s | build s |", "|" + "---|" * 8]
    for r in train.get("results", []):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        lines.append(f"| {r['label']} | {r['samples_per_s']:.3g} | {r['tokens_per_s']:.4g} | {mfu} | "
                     f"{r['peak_memory_gib']:.1f} | {r['seconds_per_step']:.3g} | {r['first_step_s']:.3g} | "
                     f"{r['build_s']:.3g} |")  # fmt: skip
    for key in ("errors", "skipped"):
        for r in train.get(key, []):
            lines.append(f"| {r['label']} | {key[:-1] if key == 'errors' else 'skipped'}: "
                         f"{r.get('error', r.get('reason'))} | | | | | | |")  # fmt: skip
    lines += ["", f"phi3v / reference samples/s: {train.get('ratios', {})}", ""]
    lines += ["| eval run | samples/s | generated tokens/s | prompt tokens | peak GiB |", "|" + "---|" * 5]
    for r in evals.get("results", []):
        lines.append(f"| {r['label']} | {r['samples_per_s']:.3g} | {r['generated_tokens_per_s']:.4g} | "
                     f"{r['prompt_tokens']} | {r['peak_memory_gib']:.1f} |")  # fmt: skip
    for r in evals.get("errors", []) + evals.get("skipped", []):
        lines.append(f"| {r['label']} | {r.get('error', r.get('reason'))} | | | |")
    for r in profile.get("results", []):
        lines += ["", f"profile {r['label']} ({r['time_basis']} time, {r['total_ms']:.0f} ms; step "
                  f"{r['step_s']:.2f} s wall):", "", "| part | ms | of which backward | share |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['ms']:.1f} | {v['backward_ms']:.1f} | {v['share']:.1%} |" for k, v in r["parts"].items()]
    for r in profile.get("errors", []):
        lines.append(f"profile {r['label']} failed: {r['error']}")
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict]) -> dict:
    """phi3v's samples/s over the reference settings', per strategy (the phi3v row at batch 2, eager)."""
    ratios = {}
    for row in rows:
        if row.get("settings") != "reference":
            continue
        mine = [r for r in rows if r.get("settings") == "phi3v" and r["strategy"] == row["strategy"]
                and r["batch_size"] == 2 and not r.get("compile") and r.get("checkpoint_every") in (0, 1)]  # fmt: skip
        if mine:
            ratios[row["strategy"]] = mine[0]["samples_per_s"] / row["samples_per_s"]
    return ratios


if __name__ == "__main__":
    sys.exit(main())
