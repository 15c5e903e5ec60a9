"""GLUE fine-tuning of Ettin encoders and decoders, with the official dev-set metrics.

    python -m ettin_jax.glue (--checkpoint=RUN_DIR | --hf=HF_DIR) --task=TASK|all
        --data_dir=GLUE_DIR --workdir=OUT_DIR [--lrs=1e-5,3e-5 --epochs=1,2,3 --seeds=0,1]

Tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte. For every task, every (learning rate,
epochs) pair of its grid is fine-tuned once per seed from the pre-trained weights; each run
is evaluated on dev after every epoch (or `--evals_per_epoch` times per epoch) and stops
early when the task score has not improved for `--patience` evaluations. A run reports its
best evaluation. The grid point with the best mean score over seeds is the task's result.

Head (what transformers does, so that exported models fine-tune alike):
  encoder  pool (CLS token, or mean over tokens) -> dense -> gelu -> LayerNorm -> dropout
           -> classifier with bias; dense and LayerNorm start from the MLM head
           (ModernBertForSequenceClassification shares the `head.*` keys with the MLM model).
  decoder  pool (last real token, or mean) -> a freshly initialised dense -> gelu ->
           LayerNorm -> dropout -> classifier without bias (ModernBertDecoderForSequenceClassification).
Pairs are encoded as `[CLS] a [SEP] b [SEP]` (single sentences `[CLS] a [SEP]`), truncating
the longer text first; the special ids come from the model config.

Data: `--data_dir/<Task>/{train,dev}.tsv` in the official GLUE layout (CoLA/, SST-2/, MRPC/,
STS-B/, QQP/, MNLI/ with dev_matched.tsv and dev_mismatched.tsv, QNLI/, RTE/), or, where
that folder is missing, the TensorFlow Datasets builder `glue/<task>` prepared under
`--data_dir` beforehand (this module never downloads).

Metrics (x100): CoLA Matthews correlation; SST-2, QNLI, RTE, MNLI (matched and mismatched)
accuracy; MRPC and QQP F1 and accuracy; STS-B Pearson and Spearman. A task's score is the
mean of its metrics (for MNLI: on dev_matched), as on the GLUE leaderboard.

Workdir layout (re-running the same command resumes: finished runs are read back, the
unfinished one continues from its last evaluation):
  <task>/<run>/result.json     one finished run: hyper-parameters, every evaluation, the best
  <task>/<run>/checkpoint/     Orbax state of the run in progress (removed when it finishes)
  <task>/<run>/tensorboard/    train loss and learning rate, dev metrics (CLU writers)
  results.json, results.md     every task's grid, best grid point, mean and std over seeds
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ettin_jax import model as model_lib


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
    with open(path, encoding="utf-8", newline="") as f:
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


def encode(tokenizer, texts: Sequence[tuple], *, cls_id: int, sep_id: int, max_len: int):
    """`[CLS] a [SEP] (b [SEP])` token ids, longer text truncated first to fit `max_len`."""
    # One batched call per text column: the tokenizers library encodes it in parallel.
    columns = [tokenizer.encode_batch(list(column), add_special_tokens=False)
               for column in zip(*texts)]
    out = []
    for encodings in zip(*columns):
        parts = [e.ids for e in encodings]
        budget = max_len - 1 - len(parts)
        while sum(len(p) for p in parts) > budget:
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[longest].pop()
        ids = [cls_id]
        for p in parts:
            ids += p + [sep_id]
        out.append(ids)
    return out


def make_batch(rows: list[list[int]], labels: np.ndarray, batch_size: int, pad_id: int,
               length_multiple: int = 32) -> dict[str, np.ndarray]:
    """Right-padded batch of exactly `batch_size` rows (missing rows have weight 0).

    Returns input_ids, mask `[batch, seq]` int32 (seq rounded up to `length_multiple`, so few
    shapes compile), labels `[batch]`, weight `[batch]` float32.
    """
    seq = length_multiple * math.ceil(max(len(r) for r in rows) / length_multiple)
    input_ids = np.full((batch_size, seq), pad_id, np.int32)
    mask = np.zeros((batch_size, seq), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    padded_labels = np.zeros((batch_size,), labels.dtype)
    padded_labels[:len(rows)] = labels
    weight = np.zeros((batch_size,), np.float32)
    weight[:len(rows)] = 1.0
    return {"input_ids": input_ids, "mask": mask, "labels": padded_labels, "weight": weight}


# --- metrics (numpy; tests compare them with scikit-learn and SciPy) --------------------------

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


# --- model -----------------------------------------------------------------------------------

POOLINGS = ("cls", "mean", "last")


class SequenceClassifier(nnx.Module):
    """Ettin backbone + pooling + head + classifier (module docstring: "Head").

    `classifier(input_ids, mask)` -> `[batch, num_outputs]` float32; input_ids, mask
    `[batch, seq]` int32, mask 1 for tokens and 0 for right padding.
    """

    def __init__(self, backbone: model_lib.EttinModel, num_outputs: int, *, pooling: str,
                 dropout: float, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling={pooling!r}: expected one of {POOLINGS}")
        config = backbone.config
        if pooling == "cls" and config.causal:
            raise ValueError("--pooling=cls does not suit a decoder (the first token sees nothing "
                             "else); use last or mean")
        H = config.hidden_size
        c = config.initializer_cutoff_factor
        self.backbone = backbone
        self.pooling = pooling
        self.eps = config.norm_eps
        if config.causal:   # the CLM head predicts tokens; transformers starts a new one
            std_out = config.initializer_range / math.sqrt(2.0 * config.num_layers)
            self.head_dense = nnx.Param(model_lib._truncated_normal(rngs, (H, H), std_out, c))  # pylint: disable=protected-access
            self.head_norm = nnx.Param(jnp.ones((H,)))
        else:
            self.head_dense = nnx.Param(jnp.array(backbone.head_dense[...]))
            self.head_norm = nnx.Param(jnp.array(backbone.head_norm[...]))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Param(model_lib._truncated_normal(rngs, (H, num_outputs), H ** -0.5, c))  # pylint: disable=protected-access
        self.classifier_bias = None if config.causal else nnx.Param(jnp.zeros((num_outputs,)))

    def pool(self, hidden, mask):
        """hidden `[batch, seq, H]`, mask `[batch, seq]` -> `[batch, H]`."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
            return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        weights = mask.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    def __call__(self, input_ids, mask):
        hidden = self.backbone.hidden_states(input_ids, segment_ids=mask)
        dtype = self.backbone.config.compute_dtype
        pooled = self.pool(hidden, mask)
        h = jnp.dot(pooled.astype(dtype), self.head_dense[...].astype(dtype))
        h = model_lib.layer_norm(model_lib.gelu(h), self.head_norm, self.eps)
        logits = jnp.dot(self.dropout(h), self.classifier[...], preferred_element_type=jnp.float32)
        if self.classifier_bias is not None:
            logits = logits + self.classifier_bias[...]
        return logits


# --- one fine-tuning run ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One grid point and seed."""
    task: str
    lr: float
    epochs: int
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_ep{self.epochs}_seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Hyper-parameters shared by every run (flags of the same names)."""
    batch_size: int = 32
    eval_batch_size: int = 128
    max_seq_len: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    classifier_dropout: float = 0.0
    pooling: str = ""                # "" = cls for encoders, last for decoders
    evals_per_epoch: int = 1
    patience: int = 2                # evaluations without improvement before stopping
    max_train_examples: int = 0      # > 0: use only the first N training examples (smoke runs)


def learning_rate(step: int, *, peak: float, total_steps: int, warmup_ratio: float) -> float:
    """LR of update `step` (0-based), as transformers' linear schedule with warmup: rising
    linearly from 0 over warmup_ratio of the steps, then falling linearly to 0 at the end."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return peak * step / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def _loss_and_predictions(logits, batch, regression: bool):
    """Weighted mean loss over the batch's real rows, and per-row predictions."""
    weight = batch["weight"]
    if regression:
        prediction = logits[:, 0]
        per_row = jnp.square(prediction - batch["labels"].astype(jnp.float32))
    else:
        prediction = jnp.argmax(logits, axis=-1)
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(per_row * weight) / jnp.maximum(jnp.sum(weight), 1.0), prediction


class Finetuner:
    """Jitted train and eval steps of one task on a mesh, shared by every run of its grid
    (the learning rate is an argument of the step, so one compilation serves them all)."""

    def __init__(self, make_classifier: Callable[[int], SequenceClassifier], task: Task,
                 options: FinetuneOptions, mesh, pad_id: int):
        from ettin_jax import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
        from ettin_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

        self.task, self.options, self.mesh, self.pad_id = task, options, mesh, pad_id
        self.make_classifier = make_classifier
        abstract = nnx.eval_shape(lambda: make_classifier(0))
        abstract.train()
        graphdef_train, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
        abstract.eval()
        graphdef_eval, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.params_sharding = sharding_lib.param_shardings(abstract_params, mesh)
        self.batch_sharding = sharding_lib.batch_sharding(mesh)
        data_parallel = sharding_lib.data_parallel_size(mesh)
        for what, size in (("--batch_size", options.batch_size),
                           ("--eval_batch_size", options.eval_batch_size)):
            if size % data_parallel:
                raise ValueError(f"{what}={size} is not a multiple of the {data_parallel} "
                                 "data-parallel devices of the mesh")

        # AdamW as PyTorch's (decay lr * wd * p), biases and norms not decayed.
        tx = optimizer_lib.adamw(b1=options.b1, b2=options.b2, eps=options.eps,
                                 weight_decay=options.weight_decay,
                                 weight_decay_mask=optimizer_lib.weight_decay_mask(abstract_params))
        regression = task.labels is None

        def train_step(params, opt_state, rngs, batch, dropout_key, lr):
            def loss_fn(params):
                # Fresh Variables for the dropout streams: nnx refuses to mutate the ones
                # created outside this gradient trace.
                model = nnx.merge(graphdef_train, params, jax.tree.map(lambda x: x, rngs))
                nnx.reseed(model, default=dropout_key)
                loss, _ = _loss_and_predictions(model(batch["input_ids"], batch["mask"]),
                                                batch, regression)
                return loss
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params, learning_rate=lr)
            return optax.apply_updates(params, updates), opt_state, loss

        def eval_step(params, rngs, batch):
            model = nnx.merge(graphdef_eval, params, rngs)
            _, predictions = _loss_and_predictions(model(batch["input_ids"], batch["mask"]),
                                                   batch, regression)
            return predictions

        opt_sharding = sharding_lib.optimizer_shardings(tx, abstract_params, self.params_sharding,
                                                        mesh)
        replicated = sharding_lib.replicated(mesh)
        self.train_step = jax.jit(
            train_step, donate_argnums=(0, 1),
            in_shardings=(self.params_sharding, opt_sharding, None, self.batch_sharding,
                          replicated, replicated),
            out_shardings=(self.params_sharding, opt_sharding, replicated))
        self.eval_step = jax.jit(eval_step, out_shardings=replicated,
                                 in_shardings=(self.params_sharding, None, self.batch_sharding))
        self.init_optimizer = jax.jit(tx.init, out_shardings=opt_sharding)

    def init(self, seed: int):
        """(params, optimizer state, rng state) of a fresh classifier: pre-trained backbone,
        new head."""
        model = self.make_classifier(seed)
        _, params, rngs = nnx.split(model, nnx.Param, ...)
        # A copy: the train step donates its params, and the backbone factory may hand out
        # the same buffers to every run.
        params = jax.device_put(params, self.params_sharding, may_alias=False)
        return params, self.init_optimizer(params), rngs

    def to_device(self, batch: dict) -> dict:
        return jax.device_put(batch, self.batch_sharding)

    def predict(self, params, rngs, rows, labels) -> np.ndarray:
        """Predictions `[len(rows)]` (class ids, or scores for regression)."""
        size = self.options.eval_batch_size
        out = []
        for start in range(0, len(rows), size):
            batch = make_batch(rows[start:start + size], labels[start:start + size], size,
                               self.pad_id)
            predictions = np.asarray(self.eval_step(params, rngs, self.to_device(batch)))
            out.append(predictions[:len(rows[start:start + size])])
        return np.concatenate(out)


def _rank(score: float) -> float:
    """Orders scores with NaN (e.g. the correlation of constant predictions) below all others."""
    return -math.inf if math.isnan(score) else score


def _score(task: Task, metrics_by_split: dict) -> float:
    first = metrics_by_split[task.dev_files[0]]
    return float(np.mean([first[m] for m in task.metrics]))


def run_one(finetuner: Finetuner, spec: RunSpec, train: tuple, devs: dict, run_dir: str,
            writer_factory: Callable[[str], Any]) -> dict:
    """Fine-tunes one grid point and seed with early stopping; returns its result record.

    train: (rows, labels); devs: {split: (rows, labels)}. Resumes from `run_dir/checkpoint`.
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    task, options = finetuner.task, finetuner.options
    rows, labels = train
    steps_per_epoch = math.ceil(len(rows) / options.batch_size)
    total_steps = steps_per_epoch * spec.epochs
    evals_per_epoch = max(1, min(options.evals_per_epoch, steps_per_epoch))
    eval_at = {round(steps_per_epoch * (e + k / evals_per_epoch))
               for e in range(spec.epochs) for k in range(1, evals_per_epoch + 1)}
    params, opt_state, rngs = finetuner.init(spec.seed)
    progress = {"step": 0, "evaluations": [], "best": None, "evals_since_best": 0}
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoint")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})
    if manager.latest_step() is not None:
        step = manager.latest_step()
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # pylint: disable=unnecessary-lambda-assignment
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            progress=ocp.args.JsonRestore()))
        params, opt_state, progress = restored["params"], restored["opt_state"], restored["progress"]
        logging.info("%s %s: resuming at step %d of %d", task.name, spec.name, step, total_steps)

    writer = writer_factory(os.path.join(run_dir, "tensorboard"))
    base_key = jax.random.key(spec.seed)
    step, stopped_early, started = progress["step"], False, time.time()
    while step < total_steps and not stopped_early:
        epoch = step // steps_per_epoch
        order = np.random.default_rng([spec.seed, epoch]).permutation(len(rows))
        for index in range(step % steps_per_epoch, steps_per_epoch):
            chosen = order[index * options.batch_size:(index + 1) * options.batch_size]
            batch = make_batch([rows[i] for i in chosen], labels[chosen], options.batch_size,
                               finetuner.pad_id)
            lr = learning_rate(step, peak=spec.lr, total_steps=total_steps,
                               warmup_ratio=options.warmup_ratio)
            params, opt_state, loss = finetuner.train_step(
                params, opt_state, rngs, finetuner.to_device(batch),
                jax.random.fold_in(base_key, step), jnp.float32(lr))
            step += 1
            if step % 20 == 0 or step == 1:
                writer.write_scalars(step, {"train/loss": float(loss), "train/learning_rate": lr})
            if step not in eval_at:
                continue
            metrics = {name: task_metrics(task, finetuner.predict(params, rngs, *dev), dev[1])
                       for name, dev in devs.items()}
            score = _score(task, metrics)
            record = {"step": step, "epoch": step / steps_per_epoch, "score": score, "metrics": metrics}
            progress["evaluations"].append(record)
            writer.write_scalars(step, {f"{split}/{k}": v for split, m in metrics.items()
                                        for k, v in m.items()} | {"dev/score": score})
            if progress["best"] is None or _rank(score) > _rank(progress["best"]["score"]):
                progress["best"], progress["evals_since_best"] = record, 0
            else:
                progress["evals_since_best"] += 1
            logging.info("%s %s: step %d/%d epoch %.2f loss %.4f dev score %.2f (best %.2f) %s",
                         task.name, spec.name, step, total_steps, step / steps_per_epoch,
                         float(loss), score, progress["best"]["score"],
                         json.dumps({s: {k: round(v, 2) for k, v in m.items()} for s, m in metrics.items()}))
            progress["step"] = step
            stopped_early = progress["evals_since_best"] >= options.patience
            if step < total_steps and not stopped_early:
                manager.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                    progress=ocp.args.JsonSave(progress)))
            if stopped_early:
                logging.info("%s %s: no improvement in %d evaluations, stopping early",
                             task.name, spec.name, options.patience)
                break
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
    result = {"task": task.name, "lr": spec.lr, "epochs": spec.epochs, "seed": spec.seed,
              "steps": step, "total_steps": total_steps, "stopped_early": stopped_early,
              "train_examples": len(rows), "seconds": round(time.time() - started, 1),
              "best": progress["best"], "evaluations": progress["evaluations"],
              "options": dataclasses.asdict(options)}
    _write_json(os.path.join(run_dir, "result.json"), result)
    shutil.rmtree(os.path.join(run_dir, "checkpoint"), ignore_errors=True)
    return result


def _write_json(path: str, value):
    """Writes atomically, so that an interrupted run never leaves a half file to resume from."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# --- a task's grid and the results table --------------------------------------------------------

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
    best = max(grid, key=lambda g: _rank(g["score"]))
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


def run_task(task: Task, *, backbone_factory: Callable[[], model_lib.EttinModel], tokenizer,
             data_dir: str, workdir: str, lrs: Sequence[float], epochs: Sequence[int],
             seeds: Sequence[int], options: FinetuneOptions, mesh=None,
             writer_factory: Callable[[str], Any] | None = None,
             data: tuple[Split, dict[str, Split]] | None = None) -> dict:
    """Fine-tunes `task` over the grid lrs x epochs x seeds; returns its summary (and writes
    every run's result under workdir/<task>/). `data`: load_task_data's result, if read already."""
    from ettin_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

    if writer_factory is None:
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
        writer_factory = lambda logdir: metric_writers.create_default_writer(  # pylint: disable=unnecessary-lambda-assignment
            logdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if mesh is None:
        mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    config = nnx.eval_shape(backbone_factory).config
    pooling = options.pooling or ("last" if config.causal else "cls")

    def make_classifier(seed: int) -> SequenceClassifier:
        return SequenceClassifier(backbone_factory(), task.num_outputs, pooling=pooling,
                                  dropout=options.classifier_dropout, rngs=nnx.Rngs(seed))

    finetuner = Finetuner(make_classifier, task, options, mesh, config.pad_token_id)

    train, devs = data or load_task_data(task, data_dir)
    if options.max_train_examples:
        train = Split(train.texts[:options.max_train_examples],
                      train.labels[:options.max_train_examples], train.source)
    logging.info("%s: %d training examples from %s; dev %s", task.name, len(train.texts),
                 train.source, {k: len(v.texts) for k, v in devs.items()})

    def encoded(split: Split):
        return (encode(tokenizer, split.texts, cls_id=config.cls_token_id,
                       sep_id=config.sep_token_id, max_len=options.max_seq_len), split.labels)

    train_rows, dev_rows = encoded(train), {k: encoded(v) for k, v in devs.items()}
    results = []
    for lr in lrs:
        for num_epochs in epochs:
            for seed in seeds:
                spec = RunSpec(task.name, float(lr), int(num_epochs), int(seed))
                run_dir = os.path.join(workdir, task.name, spec.name)
                done = os.path.join(run_dir, "result.json")
                if os.path.exists(done):
                    with open(done, encoding="utf-8") as f:
                        result = json.load(f)
                    logging.info("%s %s: done before (score %.2f), skipping", task.name,
                                 spec.name, result["best"]["score"])
                else:
                    os.makedirs(run_dir, exist_ok=True)
                    result = run_one(finetuner, spec, train_rows, dev_rows, run_dir, writer_factory)
                results.append(result)
    summary = summarize(task, results)
    summary["pooling"] = pooling
    summary["objective"] = "clm" if config.causal else "mlm"
    _write_json(os.path.join(workdir, task.name, "summary.json"), summary)
    return summary


# --- command line ------------------------------------------------------------------------------

def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


MODEL_SOURCE_FLAGS = ("checkpoint", "hf", "tokenizer", "dtype")


def define_model_source_flags(checkpoint_use: str = "its newest checkpoint"):
    """--checkpoint / --hf / --tokenizer / --dtype, the flags `load_model` reads (glue and
    generate). A tool other than glue declares them key flags so that its --help lists them."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("checkpoint", None, f"a training run's workdir: {checkpoint_use}")
    flags.DEFINE_string("hf", None, "a transformers directory (config.json + model.safetensors)")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory or tokenizer.json (default: the "
                        "one saved with the run or the transformers directory)")
    flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "compute dtype of the matmuls "
                      "(parameters stay float32); default: the model config's")


def load_model(checkpoint: str | None, hf_dir: str | None, tokenizer_path: str | None,
               dtype: str = ""):
    """(model in eval mode, tokenizer) from a training run's newest checkpoint or a
    transformers directory; the GLUE and generation command lines share it.

    tokenizer_path: None = the tokenizer saved with the run or the directory.
    dtype: compute dtype ("float32", "bfloat16"); "" keeps the model config's.
    """
    from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    from ettin_jax import hf as hf_lib  # pylint: disable=import-outside-toplevel

    if bool(checkpoint) == bool(hf_dir):
        raise ValueError("give exactly one of --checkpoint=RUN_DIR or --hf=HF_DIR")
    if checkpoint:
        from ettin_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
        model, _, saved_tokenizer = checkpoint_lib.restore_for_export(checkpoint)
    else:
        model, _ = hf_lib.load_hf(hf_dir)
        saved_tokenizer = hf_dir if os.path.exists(os.path.join(hf_dir, "tokenizer.json")) else None
    if dtype:
        model.config = dataclasses.replace(model.config, dtype=dtype)
        model.config.validate()
    tokenizer_path = tokenizer_path or saved_tokenizer
    if not tokenizer_path:
        raise ValueError(f"{checkpoint or hf_dir}: no tokenizer saved with the model; pass --tokenizer")
    return model, tokenizer_lib.load(tokenizer_path)


def load_backbone(checkpoint: str | None, hf_dir: str | None, tokenizer_path: str | None,
                  dtype: str = ""):
    """(factory of fresh backbones in train mode, tokenizer); arguments as load_model's."""
    model, tokenizer = load_model(checkpoint, hf_dir, tokenizer_path, dtype)
    graphdef, state = nnx.split(model)
    state = jax.device_get(state)   # host copies: every run starts from the same weights

    def factory():
        backbone = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
        backbone.train()
        return backbone
    return factory, tokenizer


def main(argv):
    from absl import flags  # pylint: disable=import-outside-toplevel
    if len(argv) > 1:
        raise app_usage_error(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        tasks = list(TASKS.values()) if f.task == "all" else [get_task(t) for t in f.task.split(",")]
        # Every file is read (and checked) before the model loads, so bad data fails fast.
        data = {task.name: load_task_data(task, f.data_dir) for task in tasks}
        backbone_factory, tokenizer = load_backbone(f.checkpoint, f.hf, f.tokenizer, f.dtype)
        options = FinetuneOptions(
            batch_size=f.batch_size, eval_batch_size=f.eval_batch_size, max_seq_len=f.max_seq_len,
            warmup_ratio=f.warmup_ratio, weight_decay=f.weight_decay,
            classifier_dropout=f.classifier_dropout, pooling=f.pooling,
            evals_per_epoch=f.evals_per_epoch, patience=f.patience,
            max_train_examples=f.max_train_examples)
        from ettin_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
        mesh = sharding_lib.make_mesh({"data": f.mesh_data, "fsdp": f.mesh_fsdp,
                                       "tensor": f.mesh_tensor})
        summaries = []
        for task in tasks:
            summaries.append(run_task(
                task, backbone_factory=backbone_factory, tokenizer=tokenizer,
                data_dir=f.data_dir, workdir=f.workdir,
                lrs=_float_list(f.lrs) if f.lrs else task.lrs,
                epochs=_int_list(f.epochs) if f.epochs else task.epochs,
                seeds=_int_list(f.seeds), options=options, mesh=mesh, data=data[task.name]))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    source = {"checkpoint": f.checkpoint, "hf": f.hf}
    _write_json(os.path.join(f.workdir, "results.json"), {"source": source, "tasks": summaries})
    table = markdown_table(summaries)
    with open(os.path.join(f.workdir, "results.md"), "w", encoding="utf-8") as out:
        out.write(f"# GLUE dev results of {f.checkpoint or f.hf}\n\n{table}")
    print(table)
    return 0


def app_usage_error(message):
    from absl import app  # pylint: disable=import-outside-toplevel
    return app.UsageError(message)


def define_flags():
    from absl import flags  # pylint: disable=import-outside-toplevel
    d = FinetuneOptions()
    define_model_source_flags("fine-tune its newest checkpoint")
    flags.DEFINE_string("task", "all", f"comma-separated GLUE tasks ({', '.join(TASKS)}) or 'all'")
    flags.DEFINE_string("data_dir", None, "GLUE TSV folders (CoLA/, SST-2/, ...) or a TFDS data_dir "
                        "with glue/* prepared")
    flags.DEFINE_string("workdir", None, "where results, run states and TensorBoard logs go; "
                        "re-running resumes")
    flags.DEFINE_string("lrs", "", "comma-separated learning rates (default: the task's grid)")
    flags.DEFINE_string("epochs", "", "comma-separated epoch counts (default: the task's grid)")
    flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds; each grid point runs once per seed")
    flags.DEFINE_integer("batch_size", d.batch_size, "training batch size (global)")
    flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "evaluation batch size (global)")
    flags.DEFINE_integer("max_seq_len", d.max_seq_len, "tokens per example incl. [CLS]/[SEP]")
    flags.DEFINE_float("warmup_ratio", d.warmup_ratio, "linear warmup share of the steps, then linear decay to 0")
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay (times the LR, as PyTorch)")
    flags.DEFINE_float("classifier_dropout", d.classifier_dropout, "dropout before the classifier")
    flags.DEFINE_enum("pooling", "", ["", *POOLINGS], "cls | mean (encoders), last | mean "
                      "(decoders); default cls for encoders, last for decoders")
    flags.DEFINE_integer("evals_per_epoch", d.evals_per_epoch, "dev evaluations per epoch")
    flags.DEFINE_integer("patience", d.patience, "stop a run after this many evaluations without a better dev score")
    flags.DEFINE_integer("max_train_examples", 0, "> 0: train on the first N examples only (smoke runs)")
    flags.DEFINE_integer("mesh_data", -1, "mesh data-parallel axis (-1 = all remaining devices)")
    flags.DEFINE_integer("mesh_fsdp", 1, "mesh fsdp axis (parameters split)")
    flags.DEFINE_integer("mesh_tensor", 1, "mesh tensor axis")
    flags.mark_flags_as_required(["data_dir", "workdir"])


if __name__ == "__main__":
    from absl import app as absl_app
    define_flags()
    absl_app.run(main)
