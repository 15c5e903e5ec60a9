"""The comparison report of `python -m ettin_jax.compare`: charts, summary.md, index.html.

Every chart is a PNG plus a JSON file of the same name with the points drawn,
{run name: {"x": [...], "y": [...]}}, taken unchanged from metrics.jsonl (lines without the
field are skipped; a chart no run has data for is left out).

summary.md / index.html, one row per run:
  tokens, steps         tokens_seen and step of the last logged line
  final / best eval     eval_loss of the last line that has one / the lowest eval_loss
  mean tokens/s         mean tokens_per_sec over the logged lines after the first; the first
                        line's window includes compilation (all lines when there is only one)
  GLUE <task>           the task's best grid point's score (mean over seeds, x100) from the run's
                        GLUE results.json; GLUE mean: the mean over the tasks that run has,
                        with their count, since runs may have been evaluated on other tasks
"""
from __future__ import annotations

import dataclasses
import html
import json
import os

import numpy as np

MISSING = "–"


@dataclasses.dataclass(frozen=True)
class Chart:
    name: str              # file stem: <name>.png, <name>.json
    title: str
    x: str                 # metrics.jsonl field on the x axis
    y: str
    objective: str = ""    # only runs of this objective ("" = all)
    log_y: bool = False


CHARTS = (
    Chart("loss", "Training loss", x="tokens_seen", y="loss"),
    Chart("eval_loss", "Eval loss", x="tokens_seen", y="eval_loss"),
    Chart("accuracy", "MLM accuracy (masked tokens)", x="tokens_seen", y="accuracy",
          objective="mlm"),
    Chart("perplexity", "CLM perplexity", x="tokens_seen", y="perplexity", objective="clm",
          log_y=True),
    Chart("learning_rate", "Learning rate", x="tokens_seen", y="learning_rate"),
    Chart("throughput", "Throughput (tokens/s)", x="step", y="tokens_per_sec"),
)


def series(runs, chart: Chart) -> dict[str, dict[str, list]]:
    """{run name: {"x": [...], "y": [...]}} of the lines carrying both of the chart's fields."""
    out = {}
    for run in runs:
        if chart.objective and run.objective != chart.objective:
            continue
        points = [(r[chart.x], r[chart.y]) for r in run.records if chart.x in r and chart.y in r]
        if points:
            out[run.name] = {"x": [p[0] for p in points], "y": [p[1] for p in points]}
    return out


def _plot(chart: Chart, data: dict, runs, path: str) -> None:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    # A bare Figure renders with the Agg canvas: no pyplot state, no display needed.
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    objective = {run.name: run.objective for run in runs}
    for name, points in data.items():
        ax.plot(points["x"], points["y"], label=f"{name} ({objective[name]})",
                linestyle="-" if objective[name] == "mlm" else "--", linewidth=1.4)
    ax.set_title(chart.title)
    ax.set_xlabel("tokens seen" if chart.x == "tokens_seen" else chart.x)
    ax.set_ylabel(chart.y)
    if chart.log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_charts(runs, out_dir: str) -> list[Chart]:
    """Writes <name>.png and <name>.json for every chart with data; returns those charts."""
    written = []
    for chart in CHARTS:
        data = series(runs, chart)
        if not data:
            # An earlier report in out_dir may have had this chart: it is not these runs'.
            for ext in ("png", "json"):
                stale = os.path.join(out_dir, f"{chart.name}.{ext}")
                if os.path.isfile(stale):
                    os.remove(stale)
            continue
        with open(os.path.join(out_dir, f"{chart.name}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        _plot(chart, data, runs, os.path.join(out_dir, f"{chart.name}.png"))
        written.append(chart)
    return written


def _last(records, key):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def run_summary(run) -> dict:
    """The numbers of one table row (module docstring); None where the run has no data."""
    # null: a non-finite value (writers.JsonlWriter)
    evals = [r["eval_loss"] for r in run.records if r.get("eval_loss") is not None]
    speeds = [r["tokens_per_sec"] for r in run.records if r.get("tokens_per_sec") is not None]
    glue = {t["task"]: float(t["best"]["score"]) for t in run.glue_tasks or []}
    return {"run": run.name, "size": run.size, "objective": run.objective, "phase": run.phase,
            "tokens": _last(run.records, "tokens_seen"), "steps": run.records[-1]["step"],
            "final_eval_loss": evals[-1] if evals else None,
            "best_eval_loss": min(evals) if evals else None,
            "mean_tokens_per_sec": float(np.mean(speeds[1:] or speeds)) if speeds else None,
            "glue": glue, "glue_mean": float(np.mean(list(glue.values()))) if glue else None}


def _fmt(value, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def table(runs) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text cells) shared by summary.md and index.html."""
    summaries = [run_summary(run) for run in runs]
    tasks = list(dict.fromkeys(t for s in summaries for t in s["glue"]))
    header = ["run", "size", "objective", "phase", "tokens", "steps", "final eval loss",
              "best eval loss", "mean tokens/s"] + [f"GLUE {t}" for t in tasks]
    if tasks:
        header.append("GLUE mean")
    rows = []
    for s in summaries:
        row = [s["run"], s["size"], s["objective"], s["phase"], _fmt(s["tokens"], ",.0f"),
               str(s["steps"]), _fmt(s["final_eval_loss"], ".4f"),
               _fmt(s["best_eval_loss"], ".4f"), _fmt(s["mean_tokens_per_sec"], ",.0f")]
        row += [_fmt(s["glue"].get(t), ".2f") for t in tasks]
        if tasks:
            mean = s["glue_mean"]
            row.append(MISSING if mean is None else f"{mean:.2f} ({len(s['glue'])} tasks)")
        rows.append(row)
    return header, rows


def summary_markdown(runs, charts: list[Chart], data_lines: list[str]) -> str:
    header, rows = table(runs)
    lines = ["# Ettin run comparison", "", "## Data", ""] + [f"- {line}" for line in data_lines]
    lines += ["", "## Runs", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", "## Charts", ""]
    lines += [f"- [{c.title}]({c.name}.png) (data: [{c.name}.json]({c.name}.json))"
              for c in charts]
    return "\n".join(lines) + "\n"


def index_html(runs, charts: list[Chart], data_lines: list[str]) -> str:
    esc = html.escape
    header, rows = table(runs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Ettin run comparison</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "figure{display:inline-block;margin:1em}</style></head><body>",
             "<h1>Ettin run comparison</h1>", "<h2>Data</h2><ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in data_lines]
    parts += ["</ul>", "<h2>Runs</h2><table>",
              "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts += ["</table>", '<p><a href="summary.md">summary.md</a></p>', "<h2>Charts</h2>"]
    for c in charts:
        parts.append(f'<figure><img src="{c.name}.png" alt="{esc(c.title)}" width="700">'
                     f'<figcaption>{esc(c.title)} (<a href="{c.name}.json">data</a>)'
                     "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(runs, out_dir: str, *, data_lines: list[str]) -> str:
    """Writes charts, summary.md and index.html into out_dir; returns index.html's path."""
    os.makedirs(out_dir, exist_ok=True)
    charts = write_charts(runs, out_dir)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(runs, charts, data_lines))
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(index_html(runs, charts, data_lines))
    return index
