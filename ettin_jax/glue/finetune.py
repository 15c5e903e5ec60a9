"""Fine-tuning on one GLUE task: the jitted steps (Finetuner), one run with early stopping and
resume (run_one), a task's grid over learning rates, epochs and seeds (run_task), and the
pre-trained backbone (load_backbone). What the runs write and report: glue/results.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ettin_jax import model as model_lib
from ettin_jax import model_loader
from ettin_jax.glue import batches, results
from ettin_jax.glue.batches import encode, make_batch
from ettin_jax.glue.classifier import SequenceClassifier
from ettin_jax.glue.metrics import task_metrics
from ettin_jax.glue.tasks import Split, Task, load_task_data


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

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"learning rate {self.lr:g}: must be positive (--lrs)")
        if self.epochs < 1:
            raise ValueError(f"{self.epochs} epochs: must be at least 1 (--epochs)")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must not be negative (--seeds)")


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
    # The backbone's embedding, attention-output and MLP dropouts while fine-tuning; < 0 keeps
    # the source's own. 0.0 as Ettin's released transformers configs (what its GLUE runs used):
    # a run's checkpoint (attn_out_dropout 0.1) and its export then fine-tune alike.
    backbone_dropout: float = 0.0
    pooling: str = ""                # "" = cls for encoders, last for decoders
    evals_per_epoch: int = 1
    patience: int = 2                # evaluations without improvement before stopping; 0: never
    max_train_examples: int = 0      # > 0: use only the first N training examples (smoke runs)

    def __post_init__(self):
        """Raises ValueError naming the option (the command-line flag of the same name)."""
        for name in ("batch_size", "eval_batch_size", "max_seq_len", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("patience", "max_train_examples", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)}: must not be negative")
        for name in ("warmup_ratio", "classifier_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be in [0, 1)")
        if not self.backbone_dropout < 1:
            raise ValueError(f"--backbone_dropout={self.backbone_dropout}: must be below 1 "
                             "(negative: the source's own rates)")

    def check_task(self, task: Task):
        """Raises ValueError when max_seq_len leaves no token of some text of `task`."""
        shortest = batches.min_seq_len(len(task.text_columns))
        if self.max_seq_len < shortest:
            raise ValueError(f"--max_seq_len={self.max_seq_len}: {task.name} needs at least "
                             f"{shortest} ([CLS], and one token and [SEP] per text)")


def learning_rate(step: int, *, peak: float, total_steps: int, warmup_ratio: float) -> float:
    """LR of update `step` (0-based), as transformers' linear schedule with warmup: rising
    linearly from 0 over warmup_ratio of the steps, then falling linearly to 0 at the end."""
    # The Trainer's warmup steps, rounded up in its very expression (so its float products,
    # e.g. 100 * 0.07 = 7.000000000000001 -> 8, round alike).
    warmup = math.ceil(total_steps * warmup_ratio)
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
        parts = model_loader.module_parts(lambda: make_classifier(0))
        graphdef_train, graphdef_eval = parts.graphdef_train, parts.graphdef_eval
        abstract_params, self.rng_layout = parts.abstract_params, parts.rng_layout
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
                # The head's stream is tagged "default", the backbone's "dropout": both are
                # re-keyed each step (the backbone's masks were the same at every step).
                nnx.reseed(model, default=dropout_key)
                model_loader.reseed_dropout(model, dropout_key)
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
        params = nnx.state(self.make_classifier(seed), nnx.Param)
        # The dropout streams are re-keyed every step (train_step); only their layout matters.
        rngs = model_loader.fresh_rng_state(self.rng_layout, seed)
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
    progress = {"step": 0, "evaluations": [], "best": None, "evals_since_best": 0,
                "options": dataclasses.asdict(options)}
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoint")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})
    if manager.latest_step() is not None:
        step = manager.latest_step()
        # Its steps, schedule and evaluations follow the options it started with: checked
        # on its progress before the arrays are read.
        saved = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        results.check_same_options(saved["progress"], progress["options"],
                                   os.path.join(run_dir, "checkpoint"), finished=False)
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # pylint: disable=unnecessary-lambda-assignment
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state))))
        params, opt_state, progress = restored["params"], restored["opt_state"], saved["progress"]
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
            best = progress["best"]
            if best is None or results.score_rank(score) > results.score_rank(best["score"]):
                progress["best"], progress["evals_since_best"] = record, 0
            else:
                progress["evals_since_best"] += 1
            logging.info("%s %s: step %d/%d epoch %.2f loss %.4f dev score %.2f (best %.2f) %s",
                         task.name, spec.name, step, total_steps, step / steps_per_epoch,
                         float(loss), score, progress["best"]["score"],
                         json.dumps({s: {k: round(v, 2) for k, v in m.items()} for s, m in metrics.items()}))
            progress["step"] = step
            stopped_early = 0 < options.patience <= progress["evals_since_best"]
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
    results.write_json(os.path.join(run_dir, "result.json"), result)
    shutil.rmtree(os.path.join(run_dir, "checkpoint"), ignore_errors=True)
    return result


# --- a task's grid --------------------------------------------------------------------------------

def run_specs(task: Task, lrs: Sequence[float], epochs: Sequence[int],
              seeds: Sequence[int]) -> list[RunSpec]:
    """The grid lrs x epochs x seeds of `task` (ValueError for a bad value)."""
    if not (lrs and epochs and seeds):
        raise ValueError(f"{task.name}: an empty grid (lrs {list(lrs)}, epochs {list(epochs)}, "
                         f"seeds {list(seeds)})")
    return [RunSpec(task.name, float(lr), int(num_epochs), int(seed))
            for lr in lrs for num_epochs in epochs for seed in seeds]


def run_task(task: Task, *, backbone_factory: Callable[[], model_lib.EttinModel], tokenizer,
             data_dir: str, workdir: str, lrs: Sequence[float], epochs: Sequence[int],
             seeds: Sequence[int], options: FinetuneOptions, mesh=None,
             writer_factory: Callable[[str], Any] | None = None,
             data: tuple[Split, dict[str, Split]] | None = None) -> dict:
    """Fine-tunes `task` over the grid lrs x epochs x seeds; returns its summary (and writes
    every run's result under workdir/<task>/). `data`: load_task_data's result, if read already."""
    from ettin_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

    if writer_factory is None:
        from ettin_jax.writers import metric_writers  # pylint: disable=import-outside-toplevel
        writer_factory = lambda logdir: metric_writers.create_default_writer(  # pylint: disable=unnecessary-lambda-assignment
            logdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if mesh is None:
        mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    config = nnx.eval_shape(backbone_factory).config
    # Encoders pool as their config says (transformers reads classifier_pooling the same way).
    pooling = options.pooling or ("last" if config.causal else config.classifier_pooling)

    make_classifier = classifier_factory(backbone_factory, task.num_outputs, pooling=pooling,
                                         options=options)
    options.check_task(task)
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
    run_results = []
    for spec in run_specs(task, lrs, epochs, seeds):
        run_dir = os.path.join(workdir, task.name, spec.name)
        done = os.path.join(run_dir, "result.json")
        if os.path.exists(done):
            with open(done, encoding="utf-8") as f:
                result = json.load(f)
            results.check_same_options(result, dataclasses.asdict(options), done)
            logging.info("%s %s: done before (score %.2f), skipping", task.name, spec.name,
                         result["best"]["score"])
        else:
            os.makedirs(run_dir, exist_ok=True)
            result = run_one(finetuner, spec, train_rows, dev_rows, run_dir, writer_factory)
        run_results.append(result)
    summary = results.summarize(task, run_results)
    summary["pooling"] = pooling
    summary["objective"] = "clm" if config.causal else "mlm"
    results.write_json(os.path.join(workdir, task.name, "summary.json"), summary)
    return summary


class Backbone(NamedTuple):
    factory: Callable[[], model_lib.EttinModel]   # a fresh backbone in train mode per call
    tokenizer: Any
    weights_sha256: str                          # of its parameters (weights_digest)


def weights_digest(params: nnx.State) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes, in path order."""
    digest = hashlib.sha256()
    for path, variable in sorted(nnx.to_flat_state(params), key=lambda item: item[0]):
        array = np.asarray(variable.get_value())
        digest.update(f"{'/'.join(map(str, path))} {array.dtype} {array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def classifier_factory(backbone_factory: Callable[[], model_lib.EttinModel], num_outputs: int,
                       *, pooling: str, options: FinetuneOptions
                       ) -> Callable[[int], SequenceClassifier]:
    """seed -> a SequenceClassifier on a new copy of the backbone, whose dropouts are all
    options.backbone_dropout unless that is negative."""
    def make(seed: int) -> SequenceClassifier:
        backbone, rate = backbone_factory(), options.backbone_dropout
        if rate >= 0:   # the modules' rates, and the config that names them
            for _, node in nnx.iter_graph(backbone):
                if isinstance(node, nnx.Dropout):
                    node.rate = rate
            backbone.config = dataclasses.replace(backbone.config, embedding_dropout=rate,
                                                  attn_out_dropout=rate, mlp_dropout=rate)
        return SequenceClassifier(backbone, num_outputs, pooling=pooling,
                                  dropout=options.classifier_dropout, rngs=nnx.Rngs(seed))
    return make


def load_backbone(checkpoint: str | None, hf_dir: str | None, tokenizer_path: str | None,
                  dtype: str = "") -> Backbone:
    """The pre-trained backbone; arguments as model_loader.load_for_inference's."""
    model, tokenizer = model_loader.load_for_inference(checkpoint, hf_dir, tokenizer_path, dtype)
    graphdef, state = nnx.split(model)
    state = jax.device_get(state)   # host copies: every run starts from the same weights

    def factory():
        backbone = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
        backbone.train()
        return backbone
    return Backbone(factory, tokenizer, weights_digest(nnx.state(model, nnx.Param)))
