"""GLUE's official dev-set metrics in numpy (tests compare them with scikit-learn and SciPy)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ettin_jax.glue.tasks import Task


def accuracy(predictions, labels) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1 (0 when there is no positive prediction or label)."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp = np.sum(p & y)
    denominator = 2 * tp + np.sum(p & ~y) + np.sum(~p & y)
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when undefined."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, predictions)), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    covariance = correct * total - predicted_counts @ true_counts
    denominator = math.sqrt((total ** 2 - predicted_counts @ predicted_counts) *
                            (total ** 2 - true_counts @ true_counts))
    return float(covariance / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denominator) if denominator else float("nan")


def average_ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0        # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


METRICS: dict[str, Callable] = {"accuracy": accuracy, "f1": f1_binary,
                                "matthews": matthews_corrcoef, "pearson": pearson,
                                "spearman": spearman}


def task_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """The task's official metrics, x100."""
    return {name: 100.0 * METRICS[name](predictions, labels) for name in task.metrics}
