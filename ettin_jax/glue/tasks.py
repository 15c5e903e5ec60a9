"""GLUE tasks: their specs (columns, labels, metrics, default grids) and reading their data
from the official TSV layout or from a prepared TensorFlow Datasets builder."""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging


class GlueDataError(ValueError):
    """A GLUE file or dataset that cannot be read as the task expects."""


# --- tasks -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    """One GLUE task: where its TSV columns are, its labels, metrics and default grid."""
    name: str                      # command-line name
    folder: str                    # folder under --data_dir in the official layout
    text_columns: tuple            # TSV header names (or column indices when header=False)
    label_column: Any
    labels: tuple | None           # TSV label strings in class-id order; None = regression
    metrics: tuple                 # first dev split's metrics make the task score
    dev_files: tuple = ("dev",)    # dev split names = TSV file stems
    header: bool = True
    tfds_texts: tuple = ()         # feature names in TFDS glue/<name>
    tfds_dev_splits: tuple = ("validation",)
    lrs: tuple = (1e-5, 3e-5, 5e-5, 8e-5)
    epochs: tuple = (1, 2, 3)
    skip_malformed_rows: bool = False

    @property
    def num_outputs(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# A small grid per task, learning rate x epochs, in the style of ModernBERT's GLUE sweep:
# few epochs for the large tasks, more for the small ones.
_SMALL_TASK_EPOCHS = (2, 5, 10)
TASKS = {t.name: t for t in [
    # CoLA's TSV has no header: source, label, original label (or blank), sentence.
    Task("cola", "CoLA", text_columns=(3,), label_column=1, labels=("0", "1"),
         metrics=("matthews",), header=False, tfds_texts=("sentence",), epochs=_SMALL_TASK_EPOCHS),
    Task("sst2", "SST-2", text_columns=("sentence",), label_column="label", labels=("0", "1"),
         metrics=("accuracy",), tfds_texts=("sentence",)),
    Task("mrpc", "MRPC", text_columns=("#1 String", "#2 String"), label_column="Quality",
         labels=("0", "1"), metrics=("f1", "accuracy"), tfds_texts=("sentence1", "sentence2"),
         epochs=_SMALL_TASK_EPOCHS),
    Task("stsb", "STS-B", text_columns=("sentence1", "sentence2"), label_column="score",
         labels=None, metrics=("pearson", "spearman"), tfds_texts=("sentence1", "sentence2"),
         epochs=_SMALL_TASK_EPOCHS),
    # A few lines of the public QQP train.tsv are cut short; they are skipped with a warning.
    Task("qqp", "QQP", text_columns=("question1", "question2"), label_column="is_duplicate",
         labels=("0", "1"), metrics=("accuracy", "f1"), tfds_texts=("question1", "question2"),
         skip_malformed_rows=True),
    Task("mnli", "MNLI", text_columns=("sentence1", "sentence2"), label_column="gold_label",
         labels=("entailment", "neutral", "contradiction"), metrics=("accuracy",),
         dev_files=("dev_matched", "dev_mismatched"), tfds_texts=("premise", "hypothesis"),
         tfds_dev_splits=("validation_matched", "validation_mismatched")),
    Task("qnli", "QNLI", text_columns=("question", "sentence"), label_column="label",
         labels=("entailment", "not_entailment"), metrics=("accuracy",),
         tfds_texts=("question", "sentence")),
    Task("rte", "RTE", text_columns=("sentence1", "sentence2"), label_column="label",
         labels=("entailment", "not_entailment"), metrics=("accuracy",),
         tfds_texts=("sentence1", "sentence2"), epochs=_SMALL_TASK_EPOCHS),
]}
STSB_RANGE = (0.0, 5.0)


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"--task={name!r}: unknown GLUE task; known: {', '.join(TASKS)} or 'all'")
    return TASKS[key]


def select_tasks(text: str) -> list[Task]:
    """--task's value: 'all' or comma-separated names, in any case (get_task's reading)."""
    if text.strip().lower() == "all":
        return list(TASKS.values())
    return [get_task(name) for name in text.split(",")]


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """Examples of one split: texts[i] is a tuple of 1 or 2 strings; labels int or float."""
    texts: list
    labels: np.ndarray
    source: str


def _parse_label(task: Task, text: str, where: str):
    text = text.strip()
    if task.labels is None:
        try:
            value = float(text)
        except ValueError:
            raise GlueDataError(f"{where}: label {text!r} is not a number") from None
        if not STSB_RANGE[0] <= value <= STSB_RANGE[1]:
            raise GlueDataError(f"{where}: label {value} is out of range {list(STSB_RANGE)}")
        return value
    if text not in task.labels:
        raise GlueDataError(f"{where}: label {text!r} is out of range; {task.folder} labels "
                            f"are {list(task.labels)}")
    return task.labels.index(text)


def read_tsv(path: str, task: Task) -> Split:
    """Reads one GLUE TSV file (official layout) of `task`."""
    # utf-8-sig: MRPC's files start with a byte-order mark (copied from msr_paraphrase_*.txt).
    with open(path, encoding="utf-8-sig", newline="") as f:
        # GLUE's TSVs contain unbalanced quotes inside sentences: no quote handling at all.
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not rows:
            raise GlueDataError(f"{path}: empty file, expected a header row")
        header, rows, first_line = rows[0], rows[1:], 2
        columns = []
        for name in (*task.text_columns, task.label_column):
            if name not in header:
                raise GlueDataError(f"{path}: missing column {name!r} (header has {header})")
            columns.append(header.index(name))
        width = len(header)
    else:
        columns = [*task.text_columns, task.label_column]
        width, first_line = max(columns) + 1, 1
    texts, labels, skipped = [], [], 0
    for line, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) < width:
            if task.skip_malformed_rows:
                skipped += 1
                continue
            raise GlueDataError(f"{path}:{line}: {len(row)} columns, expected {width}")
        texts.append(tuple(row[c] for c in columns[:-1]))
        labels.append(_parse_label(task, row[columns[-1]], f"{path}:{line}"))
    if skipped:
        logging.warning("%s: skipped %d rows with missing columns", path, skipped)
    if not texts:
        raise GlueDataError(f"{path}: no examples")
    dtype = np.float32 if task.labels is None else np.int32
    return Split(texts, np.asarray(labels, dtype), path)


def _read_tfds(task: Task, data_dir: str, split: str) -> Split:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    name = f"glue/{task.name}"
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise GlueDataError(f"{data_dir}: neither {task.folder}/ (GLUE TSV files) nor a prepared "
                            f"TFDS dataset {name} (prepare it with tfds, or download the TSVs)")
    texts, labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        texts.append(tuple(example[k].decode("utf-8") for k in task.tfds_texts))
        labels.append(example["label"])
    where = f"{builder.data_dir} [{split}]"
    labels = np.asarray(labels, np.float32 if task.labels is None else np.int32)
    if task.labels is not None and (labels.min() < 0 or labels.max() >= task.num_outputs):
        raise GlueDataError(f"{where}: labels out of range [0, {task.num_outputs})")
    return Split(texts, labels, where)


def load_task_data(task: Task, data_dir: str) -> tuple[Split, dict[str, Split]]:
    """(train split, {dev split name: split}) from TSV files, else from a prepared TFDS builder."""
    folder = os.path.join(data_dir, task.folder)
    if os.path.isdir(folder):
        def tsv(stem):
            path = os.path.join(folder, f"{stem}.tsv")
            if not os.path.exists(path):
                raise GlueDataError(f"{path}: missing ({task.folder} needs train.tsv and "
                                    f"{', '.join(s + '.tsv' for s in task.dev_files)})")
            return read_tsv(path, task)
        return tsv("train"), {stem: tsv(stem) for stem in task.dev_files}
    return (_read_tfds(task, data_dir, "train"),
            {stem: _read_tfds(task, data_dir, split)
             for stem, split in zip(task.dev_files, task.tfds_dev_splits)})
