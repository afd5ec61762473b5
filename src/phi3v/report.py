"""``phi3v report RUN_DIR``: an HTML page with the loss, learning-rate and metric curves and the final numbers."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from phi3v.train.runlog import read_log
from phi3v.utils import atomic_write, atomic_write_text


def _read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a phi3v training run?")
    return read_log(path)


def _plot(records: list[dict], keys: list[str], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/report/index.html`` and its PNG plots; returns the HTML path."""
    run = Path(run_dir)
    records = _read_log(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    metric_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    plots = [
        _plot(records, ["loss"], "training loss", out / "loss.png"),
        _plot(records, ["lr"], "learning rate", out / "lr.png"),
        _plot(records, metric_keys, "evaluation", out / "metrics.png"),
    ]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    evaluations = [r for r in records if any(k.startswith("eval/") for k in r)]
    final = {k: v for k, v in (evaluations[-1] if evaluations else {}).items() if k != "step"}
    rows = {
        "steps": summary.get("steps", max((r["step"] for r in records), default=0)),
        "final loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        **final,
        "best metric": summary.get("best"),
        "best checkpoint": summary.get("best_checkpoint"),
        "samples dropped for length": summary.get("dropped"),
        "samples truncated to max_length": summary.get("truncated"),
        "samples skipped for a bad image": summary.get("bad_images"),
        "samples with a duplicate id": summary.get("duplicate_ids"),
        "output": summary.get("final"),
    }
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    images = "".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in plots if p is not None)
    config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>phi3v run report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:2em}"
        "pre{background:#f4f4f4;padding:1em}</style></head><body>"
        f"<h1>Run {html.escape(run.name)}</h1><table>{table}</table>{images}"
        f"<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>\n"
    )
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
