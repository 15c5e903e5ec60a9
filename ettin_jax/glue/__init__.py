"""GLUE fine-tuning of Ettin encoders and decoders, with the official dev-set metrics.

    python -m ettin_jax.glue (--checkpoint=RUN_DIR | --hf=HF_DIR) --task=TASK|all
        --data_dir=GLUE_DIR --workdir=OUT_DIR [--lrs=1e-5,3e-5 --epochs=1,2,3 --seeds=0,1]

Tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte. For every task, every (learning rate,
epochs) pair of its grid is fine-tuned once per seed from the pre-trained weights; each run
is evaluated on dev after every epoch (or `--evals_per_epoch` times per epoch) and stops
early when the task score has not improved for `--patience` evaluations (0: never). A run
reports its best evaluation. The grid point with the best mean score over seeds is the task's
result.

Modules: `tasks` (task specs, reading TSV / TFDS data), `batches` (tokenising, padded
batches), `metrics` (the official metrics), `classifier` (SequenceClassifier), `finetune`
(the jitted steps, one run, a task's grid, the backbone), `results` (what a workdir records:
result and summary files, its backbone, the results table), `__main__` (the command line).

Head (what transformers does, so that exported models fine-tune alike):
  encoder  pool (CLS token, or mean over tokens) -> dense -> gelu -> LayerNorm -> dropout
           -> classifier with bias; dense and LayerNorm start from the MLM head
           (ModernBertForSequenceClassification shares the `head.*` keys with the MLM model).
  decoder  pool (last real token, or mean) -> a freshly initialised dense -> gelu ->
           LayerNorm -> dropout -> classifier without bias (ModernBertDecoderForSequenceClassification).
The backbone's own dropouts are all `--backbone_dropout` (0.0, as Ettin's released configs;
negative keeps the source's), so a run's checkpoint (attn_out_dropout 0.1) and its export
fine-tune alike.
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
unfinished one continues from its last evaluation; a finished run is read back only under the
options it ran with, and a workdir holds the runs of one backbone, named by its weights):
  backbone.json                the backbone's source, dtype and sha256 of its weights
  <task>/<run>/result.json     one finished run: hyper-parameters, every evaluation, the best
  <task>/<run>/checkpoint/     Orbax state of the run in progress (removed when it finishes)
  <task>/<run>/tensorboard/    train loss and learning rate, dev metrics (CLU writers)
  <task>/summary.json          the task's grid of its latest command: mean and std over seeds
  results.json, results.md     every task with a summary: best grid point, mean and std
"""
from __future__ import annotations
