"""Command line of GLUE fine-tuning (the module docstring of ettin_jax.glue describes it).

    python -m ettin_jax.glue (--checkpoint=RUN_DIR | --hf=HF_DIR) --task=TASK|all
        --data_dir=GLUE_DIR --workdir=OUT_DIR [--lrs=1e-5,3e-5 --epochs=1,2,3 --seeds=0,1]
"""
from __future__ import annotations

import os

from absl import flags

from ettin_jax import cli
from ettin_jax import sharding as sharding_lib
from ettin_jax.glue.classifier import POOLINGS
from ettin_jax.glue.finetune import FinetuneOptions, load_backbone, run_specs, run_task
from ettin_jax.glue.results import markdown_table, read_summaries, record_backbone, write_json
from ettin_jax.glue.tasks import TASKS, load_task_data, select_tasks


def _number_list(flag: str, kind: type) -> list:
    """The comma-separated numbers of --<flag>; raises cli.UserError naming it."""
    text = getattr(flags.FLAGS, flag)
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise cli.UserError(f"--{flag}={text!r}: expected comma-separated "
                            f"{'numbers' if kind is float else 'integers'}") from None
    if not values:
        raise cli.UserError(f"--{flag}={text!r}: empty list")
    return values


def main(argv):
    f = flags.FLAGS
    tasks = select_tasks(f.task)
    # Flags, then every data file, are checked before the model loads: mistakes fail fast.
    options = FinetuneOptions(
        batch_size=f.batch_size, eval_batch_size=f.eval_batch_size, max_seq_len=f.max_seq_len,
        warmup_ratio=f.warmup_ratio, weight_decay=f.weight_decay,
        classifier_dropout=f.classifier_dropout, backbone_dropout=f.backbone_dropout, pooling=f.pooling,
        evals_per_epoch=f.evals_per_epoch, patience=f.patience,
        max_train_examples=f.max_train_examples)
    grids = {}
    for task in tasks:
        options.check_task(task)
        grids[task.name] = dict(lrs=_number_list("lrs", float) if f.lrs else task.lrs,
                                epochs=_number_list("epochs", int) if f.epochs else task.epochs,
                                seeds=_number_list("seeds", int))
        run_specs(task, **grids[task.name])       # raises ValueError for a bad grid value
    data = {task.name: load_task_data(task, f.data_dir) for task in tasks}
    backbone = load_backbone(f.checkpoint, f.hf, f.tokenizer, f.dtype)
    record_backbone(f.workdir, {"checkpoint": f.checkpoint, "hf": f.hf, "dtype": f.dtype,
                                "weights_sha256": backbone.weights_sha256})
    mesh = sharding_lib.make_mesh({"data": f.mesh_data, "fsdp": f.mesh_fsdp,
                                   "tensor": f.mesh_tensor})
    for task in tasks:
        run_task(task, backbone_factory=backbone.factory, tokenizer=backbone.tokenizer,
                 data_dir=f.data_dir, workdir=f.workdir, **grids[task.name], options=options,
                 mesh=mesh, data=data[task.name])
    # Every task this workdir has results for, not only this command's.
    summaries = read_summaries(f.workdir)
    source = {"checkpoint": f.checkpoint, "hf": f.hf}
    write_json(os.path.join(f.workdir, "results.json"), {"source": source, "tasks": summaries})
    table = markdown_table(summaries)
    with open(os.path.join(f.workdir, "results.md"), "w", encoding="utf-8") as out:
        out.write(f"# GLUE dev results of {f.checkpoint or f.hf}\n\n{table}")
    print(table)
    return 0


def define_flags():
    d = FinetuneOptions()
    cli.define_model_source_flags("fine-tune its newest checkpoint")
    flags.adopt_module_key_flags(cli)
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
    flags.DEFINE_float("backbone_dropout", d.backbone_dropout, "rate of every dropout in the "
                       "backbone (embedding, attention output, MLP) while fine-tuning; 0 as "
                       "Ettin's released configs, so a --checkpoint and its export fine-tune "
                       "alike; negative: the source's own rates")
    flags.DEFINE_enum("pooling", "", ["", *POOLINGS], "cls | mean (encoders), last | mean "
                      "(decoders); default: the encoder config's classifier_pooling (cls unless "
                      "it says mean), last for decoders")
    flags.DEFINE_integer("evals_per_epoch", d.evals_per_epoch, "dev evaluations per epoch")
    flags.DEFINE_integer("patience", d.patience, "stop a run after this many evaluations "
                         "without a better dev score (0: never stop early)")
    flags.DEFINE_integer("max_train_examples", 0, "> 0: train on the first N examples only (smoke runs)")
    flags.DEFINE_integer("mesh_data", -1, "mesh data-parallel axis (-1 = all remaining devices)")
    flags.DEFINE_integer("mesh_fsdp", 1, "mesh fsdp axis (parameters split)")
    flags.DEFINE_integer("mesh_tensor", 1, "mesh tensor axis")
    flags.mark_flags_as_required(["data_dir", "workdir"])


if __name__ == "__main__":
    cli.run(main, define_flags, usage=__doc__)
