"""What a GLUE workdir records and reports: result and summary files (written atomically),
the backbone the workdir belongs to, a task's grid summary and the results table."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ettin_jax.glue.tasks import TASKS, Task


def write_json(path: str, value):
    """Writes atomically, so that an interrupted run never leaves a half file to resume from."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def score_rank(score: float) -> float:
    """Orders scores with NaN (e.g. the correlation of constant predictions) below all others."""
    return -math.inf if math.isnan(score) else score


# Options added after runs were recorded without them: what those runs did. Before
# backbone_dropout a backbone kept its source's own dropout rates.
OPTIONS_BEFORE = {"backbone_dropout": -1.0}


def check_same_options(result: dict, now: dict, path: str, *, finished: bool = True):
    """A finished run (its result.json at `path`) is reused, and an unfinished one (the
    progress of its checkpoint) resumed, only under the options it ran with, `now`
    (FinetuneOptions as a dict): the run's directory name holds only its learning rate, epochs
    and seed. Raises ValueError naming each changed option."""
    recorded = result.get("options", {})
    if recorded:
        recorded = {**{k: v for k, v in OPTIONS_BEFORE.items() if k in now}, **recorded}
    changed = [f"{k}: {v!r} -> {now[k]!r}" for k, v in sorted(recorded.items())
               if k in now and v != now[k]]
    if changed:
        raise ValueError(f"{path} {'finished' if finished else 'was started'} with other "
                         f"options ({'; '.join(changed)}); use another --workdir for these "
                         "options, or delete that run to redo it")


BACKBONE_NAME = "backbone.json"


def record_backbone(workdir: str, record: dict):
    """Ties `workdir` to one backbone: records `record` (source, dtype, weights_sha256) on
    first use; raises ValueError when a later command brings other weights or another dtype
    (its finished runs would be read back as this backbone's results)."""
    path = os.path.join(workdir, BACKBONE_NAME)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read ({e}); it names the backbone whose runs "
                             "--workdir holds. Restore it, or use a new --workdir") from None
        changed = [f"{k}: {old.get(k)!r} -> {record[k]!r}" for k in ("weights_sha256", "dtype")
                   if old.get(k) != record[k]]
        if changed:
            raise ValueError(
                f"--workdir={workdir} holds fine-tuning runs of another backbone (recorded in "
                f"{path}: checkpoint {old.get('checkpoint')!r}, hf {old.get('hf')!r}); "
                f"{'; '.join(changed)}. Use a new --workdir for this one")
        return
    os.makedirs(workdir, exist_ok=True)
    write_json(path, record)


def read_summaries(workdir: str) -> list[dict]:
    """The summary of every task with one in `workdir` (each task's latest grid), in TASKS
    order: a workdir's results cover the tasks of every command run there."""
    summaries = []
    for name in TASKS:
        path = os.path.join(workdir, name, "summary.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                summaries.append(json.load(f))
    return summaries


def summarize(task: Task, results: list[dict]) -> dict:
    """Grid points with their seeds' mean and std of every metric; the best point by mean score."""
    points = {}
    for r in results:
        points.setdefault((r["lr"], r["epochs"]), []).append(r)
    grid = []
    for (lr, epochs), runs in sorted(points.items()):
        per_metric = {}
        for split in task.dev_files:
            for metric in task.metrics:
                values = [r["best"]["metrics"][split][metric] for r in runs]
                per_metric[f"{split}/{metric}"] = {"mean": float(np.mean(values)),
                                                   "std": float(np.std(values))}
        scores = [r["best"]["score"] for r in runs]
        grid.append({"lr": lr, "epochs": epochs, "seeds": sorted(r["seed"] for r in runs),
                     "score": float(np.mean(scores)), "score_std": float(np.std(scores)),
                     "metrics": per_metric})
    best = max(grid, key=lambda g: score_rank(g["score"]))
    return {"task": task.name, "metrics": list(task.metrics), "dev_splits": list(task.dev_files),
            "best": best, "grid": grid}


def markdown_table(summaries: list[dict]) -> str:
    lines = ["| task | metric | dev (mean ± std over seeds) | lr | epochs | seeds |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        best = s["best"]
        for key, value in best["metrics"].items():
            lines.append(f"| {s['task']} | {key} | {value['mean']:.2f} ± {value['std']:.2f} | "
                         f"{best['lr']:g} | {best['epochs']} | {len(best['seeds'])} |")
    scores = [s["best"]["score"] for s in summaries]
    lines.append(f"\nMean task score over {len(scores)} task(s): {np.mean(scores):.2f}")
    return "\n".join(lines) + "\n"
