"""``phi3v report RUN [RUN2 ...]``: one self-contained HTML page about one or several training runs.

What it reads from each run folder (all written by ``phi3v train``; anything missing is said so on the page):

- ``log.jsonl``: loss and learning rate per logged step; ``eval/<metric>`` and, when the validation file mixes
  several sources, ``eval/<source>/<metric>`` at each evaluation during training;
- ``eval/training/``: the predictions of the last evaluation during training;
- ``eval/<name>/`` (and any ``--eval`` folder): evaluations after training (``phi3v eval --out``);
- ``summary.json``: steps, best metric, dropped or truncated sample counts (read by key, whatever is there);
- ``config.yaml`` and ``environment.json`` (versions, hardware).

The page has the per-task metrics and curves, a gallery of predictions (images as small inline thumbnails, errors
first, at most ``gallery`` per run, filterable by task and by right or wrong), confusion matrices for tasks with a
label set, and, for several runs, their numbers side by side with the config values that differ highlighted.
Images and plots are inlined, so the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from phi3v.tasks import TASKS, Task, exact_answer
from phi3v.train.runlog import read_log
from phi3v.utils import atomic_write_text

GALLERY = 60  # predictions shown per run
THUMBNAIL = 112  # longest side of a gallery image, pixels
LENGTH_WORDS = ("drop", "trunc", "skip", "overflow", "cut", "long")


@dataclass
class EvalFolder:
    """One evaluation's files: ``metrics.json`` and ``predictions.jsonl``."""

    name: str
    path: Path
    metrics: dict[str, float]
    by_source: dict[str, dict[str, float]]
    predictions: list[dict]
    task: str | None  # the task that scored it, when known
    during_training: bool = False


@dataclass
class Run:
    """What the report reads from a run folder."""

    path: Path
    log: list[dict]
    summary: dict
    config: dict
    config_text: str
    environment: dict
    evaluations: list[EvalFolder] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def eval_records(self) -> list[dict]:
        return [r for r in self.log if any(k.startswith("eval/") for k in r)]


def load_run(run_dir: str | os.PathLike, extra_evals: list[str | os.PathLike] = ()) -> Run:
    """Read a run folder (see the module docstring); ``extra_evals`` are evaluation folders kept elsewhere."""
    path = Path(run_dir)
    log_file = path / "log.jsonl"
    if not log_file.exists():
        raise FileNotFoundError(f"{log_file}: not found; is {path} a phi3v training run?")
    log = read_log(log_file)  # a torn last line (a killed run) is dropped with a warning
    summary = _json(path / "summary.json")
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").exists() else ""
    config = yaml.safe_load(config_text) or {} if config_text else {}
    run = Run(path, log, summary, config, config_text, _json(path / "environment.json"))
    folders = sorted(p.parent for p in (path / "eval").glob("*/metrics.json")) + [Path(p) for p in extra_evals]
    for folder in folders:
        if not (folder / "metrics.json").exists():
            raise FileNotFoundError(f"{folder}: no metrics.json (not an evaluation folder from phi3v eval)")
        during = folder.parent == path / "eval" and folder.name == "training"
        task = folder.name if folder.name in TASKS else config.get("task") if during else None
        metrics = _json(folder / "metrics.json")
        by_source = metrics.pop("by_source", {})
        metrics.pop("samples", None)  # counts (evaluated, dropped, truncated), not metrics
        predictions = _jsonl(folder / "predictions.jsonl")
        step = run.eval_records[-1]["step"] if during and run.eval_records else None
        name = f"during training (step {step})" if during else folder.name
        run.evaluations.append(EvalFolder(name, folder, metrics, by_source, predictions, task, during))
    return run


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from err
    return records


# -- Numbers -------------------------------------------------------------------------------------------------------


def task_metrics(run: Run) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {"during training": {metric: value}, "after training": {...}}}``.

    During training: the last evaluation logged; the whole validation set is named after the configured task
    (``all`` for ``generic``), each source after itself. After training: each evaluation folder.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    if run.eval_records:
        last = run.eval_records[-1]
        for key, value in last.items():
            if not key.startswith("eval/"):
                continue
            parts = key.split("/")
            task = _overall(run) if len(parts) == 2 else parts[1]
            table.setdefault(task, {}).setdefault(f"during training (step {last['step']})", {})[parts[-1]] = value
    for evaluation in run.evaluations:
        if evaluation.during_training:
            continue
        label = f"after training ({evaluation.name})"
        task = evaluation.task or evaluation.name
        table.setdefault(task, {})[label] = evaluation.metrics
        for source, values in evaluation.by_source.items():
            table.setdefault(source, {})[label] = values
    return table


def _overall(run: Run) -> str:
    task = run.config.get("task")
    return "all" if task in (None, "generic") else str(task)


def curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Each task's main metric over the evaluations during training: ``{task: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in run.eval_records:
        for key, value in record.items():
            parts = key.split("/")
            if key.startswith("eval/") and parts[-1] == _main_metric(record, parts):
                series.setdefault(_overall(run) if len(parts) == 2 else parts[1], []).append((record["step"], value))
    return series


def _main_metric(record: dict, parts: list[str]) -> str:
    """The first metric logged for that task (a task's main metric comes first)."""
    prefix = "/".join(parts[:-1]) + "/"
    return next(k[len(prefix) :] for k in record if k.startswith(prefix) and "/" not in k[len(prefix) :])


def length_counts(run: Run) -> dict[str, object]:
    """Dropped or truncated sample counts, by key, from ``summary.json`` (one level of nesting) and the log."""
    found: dict[str, object] = {}
    for key, value in run.summary.items():
        if isinstance(value, dict):
            found.update({f"{key}.{k}": v for k, v in value.items() if _length_key(k) or _length_key(key)})
        elif _length_key(key) and isinstance(value, int | float | str) and not isinstance(value, bool):
            found[key] = value
    if not found:
        logged = [r["dropped"] for r in run.log if "dropped" in r]
        if logged:
            found["dropped (log)"] = logged[-1]
    return found


def _length_key(key: str) -> bool:
    return any(word in key.lower() for word in LENGTH_WORDS)


def confusion(evaluation: EvalFolder, task: Task) -> tuple[list[str], list[list[int]]]:
    """Rows: reference label; columns: predicted label, then ``other`` for answers outside the label set."""
    labels = list(task.labels or ())
    index = {label: k for k, label in enumerate(labels)}
    counts = [[0] * (len(labels) + 1) for _ in labels]
    for p in evaluation.predictions:
        truth = exact_answer(p["references"][0]) if p.get("references") else None
        if truth in index:
            counts[index[truth]][index.get(exact_answer(p["prediction"]), len(labels))] += 1
    return labels, counts


def gallery_items(run: Run, cap: int) -> tuple[list[dict], int]:
    """Up to ``cap`` predictions: errors first (lowest score), the tasks taken in turn so each shows.

    Predictions after training are preferred; the last evaluation during training is used when there are none.
    Returns the chosen ones (each with ``task`` and ``evaluation`` set) and how many there were in all.
    """
    after = [e for e in run.evaluations if not e.during_training]
    sources = after or [e for e in run.evaluations if e.during_training]
    pool = []
    for evaluation in sources:
        for p in evaluation.predictions:
            task = p.get("source") if evaluation.by_source else evaluation.task or evaluation.name
            pool.append({**p, "task": task or evaluation.name, "evaluation": evaluation.name})
    by_task: dict[str, list[dict]] = {}
    for p in sorted(pool, key=lambda p: p.get("score", 0.0)):
        by_task.setdefault(p["task"], []).append(p)
    chosen: list[dict] = []
    queues = [list(q) for q in by_task.values()]
    while len(chosen) < cap and any(queues):
        for q in queues:
            if q and len(chosen) < cap:
                chosen.append(q.pop(0))
    chosen.sort(key=lambda p: p.get("score", 0.0))  # stable: equal scores keep the tasks in turn
    return chosen, len(pool)


# -- HTML ----------------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;max-width:72em;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.2em .7em;text-align:left;border-bottom:1px solid #eee}
th{background:#f6f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.diff{background:#fff3b0} .note{color:#666;font-size:.9em} pre{background:#f6f6f6;padding:.8em;overflow:auto}
.cards{display:flex;flex-wrap:wrap;gap:.6em} .card{border:1px solid #ddd;border-left:4px solid #c33;padding:.4em;
width:15em;font-size:.85em} .card.right{border-left-color:#3a3} .card.partly{border-left-color:#e90}
.card img{image-rendering:pixelated;height:56px;margin:0 2px 2px 0;border:1px solid #eee}
.card .q{color:#555} .card b{font-weight:600} .missing{display:inline-block;width:56px;height:56px;background:#eee}
.cm td{text-align:center;min-width:2.2em} .plots img{max-width:100%}
"""

SCRIPT = """
function filterGallery(){
  const task=document.getElementById('f-task').value, verdict=document.getElementById('f-verdict').value;
  let shown=0;
  for(const card of document.querySelectorAll('.card')){
    const ok=(task==='all'||card.dataset.task===task)&&(verdict==='all'||
      (verdict==='wrong'?card.dataset.verdict!=='right':card.dataset.verdict==='right'));
    card.style.display=ok?'':'none'; if(ok) shown++;
  }
  document.getElementById('f-count').textContent=shown+' shown';
}
"""


def write_report(
    run_dirs: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    evals: list[str | os.PathLike] = (),
    gallery: int = GALLERY,
) -> Path:
    """Write the HTML report of one or several runs; returns its path.

    Args:
        run_dirs: One run folder or several (compared side by side).
        out: The HTML file (default ``RUN/report/index.html`` for one run, ``phi3v-report.html`` for several).
        evals: Evaluation folders outside the run folder (one run only).
        gallery: Predictions shown per run.
    """
    dirs = [run_dirs] if isinstance(run_dirs, str | os.PathLike) else list(run_dirs)
    if not dirs:
        raise ValueError("phi3v report needs at least one run folder")
    if evals and len(dirs) > 1:
        raise ValueError("--eval folders go with one run; with several, put them under RUN/eval/<name>/")
    if gallery < 0:
        raise ValueError(f"gallery must be 0 or more, got {gallery}")
    runs = [load_run(d, evals if k == 0 else ()) for k, d in enumerate(dirs)]
    names = _unique_names(runs)
    target = (
        Path(out) if out else (Path(dirs[0]) / "report" / "index.html" if len(dirs) == 1 else Path("phi3v-report.html"))
    )
    title = f"phi3v report: {', '.join(names)}"
    sections = [
        f"<h1>{_e(title)}</h1><p class='note'>written {datetime.datetime.now():%Y-%m-%d %H:%M} from "
        f"{', '.join(_e(str(r.path)) for r in runs)}</p>",
        _summary_section(runs, names),
        _metrics_section(runs, names),
        _curves_section(runs, names),
        _confusion_section(runs, names),
        _gallery_section(runs, names, gallery),
        _config_section(runs, names),
        _environment_section(runs, names),
    ]
    head = f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
    page = f"{head}<style>{STYLE}</style></head><body>{''.join(sections)}<script>{SCRIPT}</script></body></html>\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    return target


def _unique_names(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    return [
        n if names.count(n) == 1 else f"{n} ({r.path.resolve().parent.name})" for n, r in zip(names, runs, strict=True)
    ]


def _e(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(f"<tr class='{(classes or [''] * len(rows))[k]}'>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for k, row in enumerate(rows))  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_section(runs: list[Run], names: list[str]) -> str:
    rows = []
    keys = ["steps", "final loss", "best metric", "dropped / truncated samples", "output"]
    for run in runs:
        counts = length_counts(run)
        values = {
            "steps": run.summary.get("steps", max((r.get("step", 0) for r in run.log), default=0)),
            "final loss": next((r["loss"] for r in reversed(run.log) if "loss" in r), None),
            "best metric": run.summary.get("best"),
            "dropped / truncated samples": ", ".join(f"{k}: {_fmt(v)}" for k, v in counts.items()) or "not recorded",
            "output": run.summary.get("final", "(no summary.json: the run did not finish)"),
        }
        rows.append([_e(_fmt(values[k])) for k in keys])
    return "<h2>Summary</h2>" + _table(["run", *keys], [[_e(n), *r] for n, r in zip(names, rows, strict=True)])


def _metrics_section(runs: list[Run], names: list[str]) -> str:
    per_run = [task_metrics(r) for r in runs]
    columns = []  # (run index, when): the evaluations during training first, then those after
    for k, table in enumerate(per_run):
        whens = list(dict.fromkeys(w for values in table.values() for w in values))
        columns += [(k, w) for w in sorted(whens, key=lambda w: (not w.startswith("during"), w))]
    tasks = sorted({t for m in per_run for t in m}, key=lambda t: (t != "all", t))
    rows = []
    for task in tasks:
        metrics = sorted({k for m in per_run for when in m.get(task, {}).values() for k in when},
                         key=lambda k: (k not in ("accuracy", "anls"), k))  # fmt: skip
        for metric in metrics:
            values = [per_run[k].get(task, {}).get(when, {}).get(metric) for k, when in columns]
            rows.append([_e(task), _e(metric), *(f"<span class='num'>{_e(_fmt(v))}</span>" for v in values)])
    if not rows:
        return "<h2>Metrics per task</h2><p class='note'>no evaluation in these runs (set val_data)</p>"
    header = ["task", "metric", *(f"{_e(names[k])}: {_e(when)}" for k, when in columns)]
    return "<h2>Metrics per task</h2>" + _table(header, rows)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curves_section(runs: list[Run], names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for run, name in zip(runs, names, strict=True):
        for ax, key in zip(axes, ("loss", "lr"), strict=True):
            points = [(r["step"], r[key]) for r in run.log if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=name)
    for ax, title in zip(axes, ("training loss", "learning rate"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    images.append((_png(fig), "training loss and learning rate"))
    plt.close(fig)
    series = [curves(r) for r in runs]
    tasks = sorted({t for s in series for t in s}, key=lambda t: (t != "all", t))
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(min(3.6 * len(tasks), 14), 3), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for s, run, name in zip(series, runs, names, strict=True):
                if task in s:
                    line = ax.plot(*zip(*s[task], strict=True), marker=".", label=name)[0]
                    after = task_metrics(run).get(task, {})
                    finals = [v for w, v in after.items() if w.startswith("after")]
                    if finals and s[task]:  # the evaluation after training, at the last step
                        value = next(iter(finals[0].values()))
                        ax.plot([s[task][-1][0]], [value], "*", markersize=11, color=line.get_color())
            ax.set_title(task)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        if len(runs) > 1:
            axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        images.append((_png(fig), "main metric per task during training (star: after training)"))
        plt.close(fig)
    body = "".join(f"<p><img src='{src}' alt='{_e(alt)}'><br><span class='note'>{_e(alt)}</span></p>"
                   for src, alt in images)  # fmt: skip
    return f"<h2>Curves</h2><div class='plots'>{body}</div>"


def _confusion_section(runs: list[Run], names: list[str]) -> str:
    parts = []
    for run, name in zip(runs, names, strict=True):
        for evaluation in run.evaluations:
            for task_name, subset in _label_subsets(evaluation):
                labels, counts = confusion(subset, TASKS[task_name])
                if not any(map(any, counts)):
                    continue
                peak = max(max(row) for row in counts) or 1
                head = "".join(f"<th>{_e(label)}</th>" for label in labels) + "<th>other</th>"
                rows = "".join(
                    f"<tr><th>{_e(label)}</th>" + "".join(_cell(c, peak) for c in row) + "</tr>"
                    for label, row in zip(labels, counts, strict=True)
                )
                parts.append(f"<div><b>{_e(name)}: {_e(task_name)}</b> <span class='note'>({_e(evaluation.name)}; "
                             f"rows: reference, columns: prediction)</span><table class='cm'><tr><th></th>{head}</tr>"
                             f"{rows}</table></div>")  # fmt: skip
    if not parts:
        return ""
    return "<h2>Confusion matrices</h2><div style='display:flex;flex-wrap:wrap;gap:2em'>" + "".join(parts) + "</div>"


def _cell(count: int, peak: int) -> str:
    ink = "#fff" if count > peak / 2 else "#222"
    return f"<td style='background:rgba(40,90,200,{count / peak:.2f});color:{ink}'>{count or ''}</td>"


def _label_subsets(evaluation: EvalFolder):
    """``(task name, evaluation)`` pairs for each task with a label set in the evaluation."""
    if evaluation.by_source:
        for source in evaluation.by_source:
            if source in TASKS and TASKS[source].labels:
                subset = [p for p in evaluation.predictions if p.get("source") == source]
                yield source, EvalFolder(source, evaluation.path, {}, {}, subset, source)
    elif evaluation.task in TASKS and TASKS[evaluation.task].labels:
        yield evaluation.task, evaluation


def _gallery_section(runs: list[Run], names: list[str], cap: int) -> str:
    cards, tasks, notes, cache = [], set(), [], {}
    for run, name in zip(runs, names, strict=True):
        items, total = gallery_items(run, cap)
        notes.append(f"{_e(name)}: {len(items)} of {total} predictions")
        for p in items:
            tasks.add(p["task"])
            score = float(p.get("score", 0.0))
            verdict = "right" if score >= 1.0 else "partly" if score > 0 else "wrong"
            images = "".join(_thumbnail(path, cache) for path in p.get("images", []))
            refs = " | ".join(p.get("references") or [])
            cards.append(
                f"<div class='card {verdict}' data-task='{_e(p['task'])}' data-verdict='{verdict}'>"
                f"<div>{images}</div><div class='note'>{_e(name) + ' · ' if len(runs) > 1 else ''}{_e(p['task'])} · "
                f"{_e(p.get('id', ''))}</div><div class='q'>{_e(p.get('prompt', ''))}</div>"
                f"<div>prediction: <b>{_e(p.get('prediction', ''))}</b></div><div>reference: {_e(refs)}</div>"
                f"<div>score: {score:.3g} ({verdict})</div></div>"
            )  # fmt: skip
    if not cards:
        return "<h2>Predictions</h2><p class='note'>no predictions saved in these runs</p>"
    options = "".join(f"<option value='{_e(t)}'>{_e(t)}</option>" for t in sorted(tasks))
    controls = (f"<p>task <select id='f-task' onchange='filterGallery()'><option value='all'>all</option>{options}"
                "</select> answers <select id='f-verdict' onchange='filterGallery()'><option value='all'>all</option>"
                "<option value='wrong'>wrong or partly right</option><option value='right'>right</option></select> "
                f"<span id='f-count'>{len(cards)} shown</span></p>")  # fmt: skip
    cap_note = (f"<p class='note'>{'; '.join(notes)}: errors first, at most {cap} per run (<code>phi3v report "
                "--gallery N</code>); the tasks take turns so each shows.</p>")  # fmt: skip
    return f"<h2>Predictions</h2>{cap_note}{controls}<div class='cards' id='gallery'>{''.join(cards)}</div>"


def _thumbnail(path: str, cache: dict[str, str]) -> str:
    """An ``<img>`` with the image inlined as a small PNG or JPEG (a grey box when the file is gone)."""
    if path not in cache:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if max(image.size) > THUMBNAIL:
                    image.thumbnail((THUMBNAIL, THUMBNAIL))
                buffer = io.BytesIO()
                photo = image.width * image.height > 64 * 64  # JPEG for photos, PNG for small sharp scans
                image.save(buffer, format="JPEG" if photo else "PNG", quality=80)
                kind = "jpeg" if photo else "png"
                cache[path] = (
                    f"<img src='data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}' alt=''>"
                )
        except (OSError, ValueError):
            cache[path] = f"<span class='missing' title='{_e(path)}: not found'></span>"
    return cache[path]


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_section(runs: list[Run], names: list[str]) -> str:
    flats = [_flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    parts = ["<h2>Config</h2>"]
    if len(runs) > 1:
        if differ:
            rows = [[_e(k), *(_e(_fmt(f.get(k, "(unset)"))) for f in flats)] for k in differ]
            parts.append("<p>Settings that differ between the runs:</p>" + _table(["setting", *map(_e, names)], rows,
                                                                                   ["diff"] * len(rows)))  # fmt: skip
        else:
            parts.append("<p>The runs have the same settings.</p>")
        rows = [[_e(k), *(_e(_fmt(f.get(k, "(unset)"))) for f in flats)] for k in keys]
        marks = ["diff" if k in differ else "" for k in keys]
        parts.append(
            f"<details><summary>all settings</summary>{_table(['setting', *map(_e, names)], rows, marks)}</details>"
        )
    else:
        parts.append(f"<pre>{_e(runs[0].config_text) or '(no config.yaml)'}</pre>")
    return "".join(parts)


def _environment_section(runs: list[Run], names: list[str]) -> str:
    rows = []
    for run, name in zip(runs, names, strict=True):
        env = run.environment
        if not env:
            rows.append([_e(name), "not recorded (environment.json is written by newer phi3v)", ""])
            continue
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        hw = env.get("hardware", {})
        hardware = f"{hw.get('cpu', '?')} × {hw.get('cpu_count', '?')} CPU cores; " + (
            f"{len(hw['gpus'])} GPU: {', '.join(hw['gpus'])} (CUDA {hw.get('cuda')})" if hw.get("gpus") else "no GPU"
        ) + f"; {hw.get('platform', '')}"  # fmt: skip
        rows.append([_e(name), _e(versions), _e(hardware)])
    return "<h2>Environment</h2>" + _table(["run", "versions", "hardware"], rows)
