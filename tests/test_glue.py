"""GLUE fine-tuning: metrics against scikit-learn/SciPy, the official TSV layouts, the heads
against transformers' sequence classifiers, learning on separable synthetic tasks (CLI and
in-process, encoder and decoder, classification and regression), resume, and bad inputs."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch
import transformers
from flax import nnx

from configs import ettin_tiny
from data_pipeline import tokenizer as tokenizer_lib
from ettin_jax import checkpoint, hf, model_loader
from ettin_jax import sharding as sharding_lib
from ettin_jax.glue import batches, classifier, finetune, results, tasks
from ettin_jax.glue import metrics as metrics_lib
from ettin_jax.model import EttinModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = "the a cat dog house tree river walks runs sees blue red small large over under with near".split()
POSITIVE, NEGATIVE = ["great", "good", "lovely"], ["awful", "bad", "poor"]


# --- metrics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels, predictions = rng.integers(0, 2, n), rng.integers(0, 2, n)
    assert metrics_lib.accuracy(predictions, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions), abs=1e-12)
    assert metrics_lib.f1_binary(predictions, labels) == pytest.approx(sklearn.metrics.f1_score(labels, predictions), abs=1e-12)
    assert metrics_lib.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    labels3, predictions3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
    assert metrics_lib.matthews_corrcoef(predictions3, labels3) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels3, predictions3), abs=1e-12)
    assert metrics_lib.accuracy(predictions3, labels3) == pytest.approx(sklearn.metrics.accuracy_score(labels3, predictions3), abs=1e-12)
    # Regression: continuous values, and coarse ones with many ties (Spearman's average ranks).
    x, y = rng.normal(size=n), rng.normal(size=n) + 0.3 * np.arange(n) / n
    assert metrics_lib.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics_lib.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    xt, yt = np.round(x * 2) / 2, rng.integers(0, 6, n).astype(float)
    assert metrics_lib.spearman(xt, yt) == pytest.approx(scipy.stats.spearmanr(xt, yt)[0], abs=1e-12)
    np.testing.assert_allclose(metrics_lib.average_ranks(xt), scipy.stats.rankdata(xt))


def test_metric_edge_cases_equal_sklearn():
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.ones_like(labels)
    assert metrics_lib.matthews_corrcoef(constant, labels) == sklearn.metrics.matthews_corrcoef(labels, constant) == 0.0
    no_positives = np.zeros_like(labels)
    assert metrics_lib.f1_binary(no_positives, np.zeros_like(labels)) == 0.0
    assert metrics_lib.f1_binary(constant, labels) == pytest.approx(sklearn.metrics.f1_score(labels, constant))
    scores = metrics_lib.task_metrics(tasks.get_task("mrpc"), constant, labels)
    assert scores == pytest.approx({"f1": 75.0, "accuracy": 60.0})
    # Constant regression outputs have no correlation (NaN, as SciPy says); such a grid point
    # ranks below every real one.
    assert np.isnan(metrics_lib.pearson(np.ones(5), labels)) and np.isnan(metrics_lib.spearman(np.ones(5), labels))
    runs = [{"lr": lr, "epochs": 1, "seed": 0, "best": {"score": score, "metrics": {"dev": {"pearson": score, "spearman": score}}}}
            for lr, score in ((1e-3, float("nan")), (2e-3, -5.0), (3e-3, float("nan")))]
    assert results.summarize(tasks.get_task("stsb"), runs)["best"]["lr"] == 2e-3


@pytest.mark.parametrize("total_steps,warmup_ratio", [(100, 0.06), (48, 0.06), (7, 0.0), (10, 0.5),
                                                      (10, 0.05), (100, 0.29), (100, 0.07)])
def test_learning_rate_equals_transformers_linear_schedule(total_steps, warmup_ratio):
    """The Trainer's schedule: its warmup steps for a ratio (TrainingArguments.get_warmup_steps
    reads only `warmup_steps`, a ratio when below 1), then its linear schedule."""
    warmup_steps = transformers.TrainingArguments.get_warmup_steps(
        types.SimpleNamespace(warmup_steps=warmup_ratio), total_steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    expected = []
    for _ in range(total_steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [finetune.learning_rate(s, peak=3e-5, total_steps=total_steps, warmup_ratio=warmup_ratio)
            for s in range(total_steps)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-20)


# --- data: the official layouts ----------------------------------------------------------------

# Header rows of the official GLUE files (and a sample row of each, label in official spelling).
LAYOUTS = {
    "CoLA": (None, ["gj04", "1", "", "Our friends won't buy this analysis."]),
    "SST-2": (["sentence", "label"], ["a gripping film ", "1"]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["1", "1", "2", "He said so.", "So he said."]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
               "sentence2", "score"], ["0", "main-captions", "MSRvid", "2012test", "1", "none", "none",
                                       "A plane is taking off.", "An air plane is taking off.", "5.000"]),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["1", "2", "3", "How do I \"learn\" jax?", "How to learn jax?", "1"]),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             ["0", "1", "1e", "gov", "( x )", "( y )", "(ROOT x)", "(ROOT y)", "He ran.", "He moved.",
              "entailment", "neutral"]),
    "QNLI": (["index", "question", "sentence", "label"], ["0", "Who ran?", "He ran.", "not_entailment"]),
    "RTE": (["index", "sentence1", "sentence2", "label"], ["0", "He ran.", "He moved.", "entailment"]),
}
EXPECTED = {  # task -> (texts of the sample row, class id or score)
    "cola": (("Our friends won't buy this analysis.",), 1), "sst2": (("a gripping film ",), 1),
    "mrpc": (("He said so.", "So he said."), 1),
    "stsb": (("A plane is taking off.", "An air plane is taking off."), 5.0),
    "qqp": (("How do I \"learn\" jax?", "How to learn jax?"), 1), "mnli": (("He ran.", "He moved."), 1),
    "qnli": (("Who ran?", "He ran."), 1), "rte": (("He ran.", "He moved."), 0),
}


def _write_tsv(path, header, rows, encoding="utf-8"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding=encoding) as f:
        for row in ([header] if header else []) + rows:
            f.write("\t".join(row) + "\n")


def test_reads_every_official_layout(tmp_path):
    for folder, (header, row) in LAYOUTS.items():
        task = next(t for t in tasks.TASKS.values() if t.folder == folder)
        # MRPC's official files start with a UTF-8 byte-order mark
        encoding = "utf-8-sig" if folder == "MRPC" else "utf-8"
        for stem in ("train", *task.dev_files):
            _write_tsv(str(tmp_path / folder / f"{stem}.tsv"), header, [row, row], encoding)
    for name, (texts, label) in EXPECTED.items():
        task = tasks.get_task(name)
        train, devs = tasks.load_task_data(task, str(tmp_path))
        assert train.texts == [texts, texts] and list(train.labels) == [label, label], name
        assert sorted(devs) == sorted(task.dev_files)
    assert tasks.get_task("SST-2").name == "sst2"


def test_encode_pairs_and_truncates_the_longer_text_first():
    tokenizer = _tokenizer()
    cls, sep = ettin_tiny.CLS_ID, ettin_tiny.SEP_ID

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    a, b = "the cat walks over the river near a large house", "blue dog"
    [full] = batches.encode(tokenizer, [(a, b)], cls_id=cls, sep_id=sep, max_len=64)
    assert full == [cls] + ids(a) + [sep] + ids(b) + [sep] and len(ids(a)) > 4
    [cut] = batches.encode(tokenizer, [(a, b)], cls_id=cls, sep_id=sep, max_len=len(full) - 3)
    assert cut == [cls] + ids(a)[:-3] + [sep] + ids(b) + [sep]
    [both_cut] = batches.encode(tokenizer, [(a, b)], cls_id=cls, sep_id=sep, max_len=5)
    assert both_cut == [cls] + ids(a)[:1] + [sep] + ids(b)[:1] + [sep]
    assert batches.encode(tokenizer, [("red cat",), ("dog",)], cls_id=cls, sep_id=sep, max_len=8) == [
        [cls] + ids("red cat") + [sep], [cls] + ids("dog") + [sep]]


def test_reads_prepared_tfds_builders(tmp_path):
    """Where no TSV folder exists, a glue/* dataset prepared under data_dir is read: written
    here with TFDS's own writer and the real GLUE builders' dataset info."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    data_dir = str(tmp_path)
    for name, examples in (
            ("mnli", {"train": [("p0", "h0", 2), ("p1", "h1", 0)], "validation_matched": [("p2", "h2", 1)],
                      "validation_mismatched": [("p3", "h3", 0)]}),
            ("stsb", {"train": [("a", "b", 4.5)], "validation": [("c", "d", 0.25)]}),
            ("cola", {"train": [("s0", None, 1)], "validation": [("s1", None, 0)]})):
        task = tasks.get_task(name)
        builder = tfds.builder(f"glue/{name}", data_dir=data_dir)
        if task.labels is not None:   # our label ids are TFDS's class ids
            assert builder.info.features["label"].num_classes == len(task.labels)
            if name in ("mnli", "qnli", "rte"):
                assert builder.info.features["label"].names == list(task.labels)
        os.makedirs(builder.data_dir, exist_ok=True)
        writer = tfds.core.SequentialWriter(builder.info, max_examples_per_shard=100)
        writer.initialize_splits(list(examples))
        writer.add_examples({split: [dict({k: t for k, t in zip(task.tfds_texts, (a, b))}, label=y, idx=i)
                                     for i, (a, b, y) in enumerate(rows)]
                             for split, rows in examples.items()})
        writer.close_all()
        train, devs = tasks.load_task_data(task, data_dir)
        assert train.texts == [tuple(t for t in (a, b) if t is not None) for a, b, _ in examples["train"]]
        np.testing.assert_allclose(train.labels, [y for _, _, y in examples["train"]])
        assert sorted(devs) == sorted(task.dev_files)
        for stem, split in zip(task.dev_files, task.tfds_dev_splits):
            np.testing.assert_allclose(devs[stem].labels, [y for _, _, y in examples[split]])


def test_bad_inputs_name_the_file_and_key(tmp_path):
    sst2 = tasks.get_task("sst2")
    path = str(tmp_path / "SST-2" / "train.tsv")
    _write_tsv(path, ["text", "label"], [["good", "1"]])
    with pytest.raises(tasks.GlueDataError, match=f"{path}: missing column 'sentence'"):
        tasks.read_tsv(path, sst2)
    _write_tsv(path, ["sentence", "label"], [["good", "1"], ["bad", "2"]])
    with pytest.raises(tasks.GlueDataError, match=rf"{path}:3: label '2' is out of range"):
        tasks.read_tsv(path, sst2)
    _write_tsv(path, ["sentence", "label"], [["good", "1"], ["bad"]])
    with pytest.raises(tasks.GlueDataError, match=rf"{path}:3: 1 columns, expected 2"):
        tasks.read_tsv(path, sst2)
    stsb_path = str(tmp_path / "STS-B" / "train.tsv")
    _write_tsv(stsb_path, ["sentence1", "sentence2", "score"], [["a", "b", "7.5"]])
    with pytest.raises(tasks.GlueDataError, match=rf"{stsb_path}:2: label 7.5 is out of range"):
        tasks.read_tsv(stsb_path, tasks.get_task("stsb"))
    mnli_path = str(tmp_path / "MNLI" / "train.tsv")
    _write_tsv(mnli_path, ["sentence1", "sentence2", "gold_label"], [["a", "b", "maybe"]])
    with pytest.raises(tasks.GlueDataError, match=rf"{mnli_path}:2: label 'maybe'.*entailment"):
        tasks.read_tsv(mnli_path, tasks.get_task("mnli"))
    _write_tsv(str(tmp_path / "MNLI" / "dev_matched.tsv"), ["sentence1", "sentence2", "gold_label"],
               [["a", "b", "neutral"]])
    _write_tsv(mnli_path, ["sentence1", "sentence2", "gold_label"], [["a", "b", "neutral"]])
    with pytest.raises(tasks.GlueDataError, match="dev_mismatched.tsv: missing"):
        tasks.load_task_data(tasks.get_task("mnli"), str(tmp_path))
    with pytest.raises(ValueError, match="--task='wnli': unknown GLUE task"):
        tasks.get_task("wnli")
    # 'all' is read as the names are, in any case ('ALL' was an unknown task).
    assert tasks.select_tasks(" ALL") == list(tasks.TASKS.values())
    assert tasks.select_tasks("SST-2,rte") == [tasks.TASKS["sst2"], tasks.TASKS["rte"]]
    # Neither TSVs nor a prepared TFDS dataset: the message names the folder and the builder.
    with pytest.raises(tasks.GlueDataError, match="neither RTE/.*glue/rte"):
        tasks.load_task_data(tasks.get_task("rte"), str(tmp_path / "empty"))


def test_bad_options_and_grids_name_the_flag():
    """Checked before any data or model loads (ettin_jax.glue's main builds these first)."""
    for bad, flag in ((dict(batch_size=0), "--batch_size=0"), (dict(eval_batch_size=-2), "--eval_batch_size"),
                      (dict(evals_per_epoch=0), "--evals_per_epoch"), (dict(patience=-1), "--patience"),
                      (dict(warmup_ratio=1.0), "--warmup_ratio=1.0"), (dict(max_train_examples=-5), "--max_train"),
                      (dict(backbone_dropout=1.0), "--backbone_dropout=1.0: must be below 1")):
        with pytest.raises(ValueError, match=flag):
            finetune.FinetuneOptions(**bad)
    finetune.FinetuneOptions(max_seq_len=3).check_task(tasks.get_task("sst2"))   # [CLS] a [SEP]
    with pytest.raises(ValueError, match="--max_seq_len=4: mrpc needs at least 5"):
        finetune.FinetuneOptions(max_seq_len=4).check_task(tasks.get_task("mrpc"))
    with pytest.raises(ValueError, match="max_len=4: 2 text"):
        batches.encode(_tokenizer(), [("a b", "c d")], cls_id=1, sep_id=2, max_len=4)
    rte = tasks.get_task("rte")
    assert [s.name for s in finetune.run_specs(rte, [1e-5], [1, 2], [0])] == ["lr1e-05_ep1_seed0",
                                                                             "lr1e-05_ep2_seed0"]
    for lrs, epochs, seeds, words in (([], [1], [0], "empty grid"), ([0.0], [1], [0], "--lrs"),
                                      ([1e-5], [0], [0], "--epochs"), ([1e-5], [1], [-1], "--seeds")):
        with pytest.raises(ValueError, match=words):
            finetune.run_specs(rte, lrs, epochs, seeds)


def test_a_tokenizer_saved_with_padding_encodes_as_without(tmp_path):
    """Hub tokenizer.json files often carry padding or truncation; loaded (data_pipeline's
    tokenizer.load, which model_loader uses), they encode GLUE rows as without them."""
    texts = [("the good film", "a bad one"), ("good", "bad")]
    expected = batches.encode(_tokenizer(), texts, cls_id=1, sep_id=2, max_len=32)
    padded = _tokenizer()
    padded.enable_padding(length=24, pad_id=ettin_tiny.PAD_ID)
    padded.enable_truncation(max_length=2)
    padded.save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizer_lib.load(str(tmp_path / "tokenizer.json"))
    assert loaded.padding is None and loaded.truncation is None
    assert batches.encode(loaded, texts, cls_id=1, sep_id=2, max_len=32) == expected


def test_finished_runs_are_reused_only_by_their_backbone_and_options(tmp_path):
    encoder = _tiny("mlm")
    params = nnx.state(encoder, nnx.Param)
    digest = finetune.weights_digest(params)
    assert finetune.weights_digest(jax.tree.map(np.array, params)) == digest
    assert finetune.weights_digest(nnx.state(_tiny("mlm", seed=1), nnx.Param)) != digest
    workdir = str(tmp_path / "glue")
    record = {"checkpoint": None, "hf": "/models/a", "dtype": "", "weights_sha256": digest}
    results.record_backbone(workdir, record)
    results.record_backbone(workdir, dict(record, hf="/elsewhere/a"))   # the same weights, moved
    with pytest.raises(ValueError, match="another backbone.*weights_sha256"):
        results.record_backbone(workdir, dict(record, weights_sha256="0" * 64))
    with pytest.raises(ValueError, match="dtype: '' -> 'bfloat16'"):
        results.record_backbone(workdir, dict(record, dtype="bfloat16"))
    with open(os.path.join(workdir, results.BACKBONE_NAME), "w") as f:
        f.write("[1, 2")                                                # cut short
    with pytest.raises(ValueError, match=r"backbone\.json cannot be read .* new --workdir"):
        results.record_backbone(workdir, record)
    options = dataclasses.asdict(finetune.FinetuneOptions(batch_size=16))
    results.check_same_options({"options": options}, dict(options), "r.json")
    with pytest.raises(ValueError, match=r"r.json finished with other options \(batch_size: 16 -> 8\)"):
        results.check_same_options({"options": options}, dict(options, batch_size=8), "r.json")
    # A run recorded before --backbone_dropout kept its source's dropout rates.
    before = {k: v for k, v in options.items() if k != "backbone_dropout"}
    results.check_same_options({"options": before}, dict(options, backbone_dropout=-1.0), "r.json")
    with pytest.raises(ValueError, match=r"\(backbone_dropout: -1.0 -> 0.0\)"):
        results.check_same_options({"options": before}, options, "r.json")


def test_results_cover_every_task_of_the_workdir(tmp_path):
    """Tasks fine-tuned by separate commands: results.json lists each (TASKS order)."""
    run = {"lr": 1e-5, "epochs": 1, "seed": 0}
    for name, metric in (("stsb", "pearson"), ("cola", "matthews")):
        task = tasks.get_task(name)
        best = {"score": 50.0, "metrics": {"dev": {m: 50.0 for m in task.metrics}}}
        os.makedirs(tmp_path / name)
        results.write_json(str(tmp_path / name / "summary.json"),
                           results.summarize(task, [dict(run, best=best)]))
    assert [s["task"] for s in results.read_summaries(str(tmp_path))] == ["cola", "stsb"]


def test_patience_stops_a_run_that_stops_improving_and_0_never_does(tmp_path):
    """A learning rate too small to change a prediction: every evaluation after the first scores
    the same, so patience 1 stops at the second; patience 0 runs all four."""
    rng = np.random.default_rng(3)
    rows = [[ettin_tiny.CLS_ID, int(t), ettin_tiny.SEP_ID] for t in rng.integers(10, 90, 16)]
    labels = rng.integers(0, 2, 16)
    task = tasks.get_task("sst2")
    factory = _factory(_tiny("mlm"))
    options = finetune.FinetuneOptions(batch_size=4, eval_batch_size=16, max_seq_len=8,
                                       evals_per_epoch=4)
    finetuner = finetune.Finetuner(
        lambda seed: classifier.SequenceClassifier(factory(), 2, pooling="cls", dropout=0.0,
                                                  rngs=nnx.Rngs(seed)),
        task, options, _mesh_one_device(), ettin_tiny.PAD_ID)
    for patience, steps in ((1, [1, 2]), (0, [1, 2, 3, 4])):
        # The steps do not depend on patience: one Finetuner (one compilation) serves both.
        finetuner.options = dataclasses.replace(options, patience=patience)
        result = finetune.run_one(finetuner, finetune.RunSpec("sst2", 1e-12, 1, 0), (rows, labels),
                                  {"dev": (rows, labels)}, str(tmp_path / f"p{patience}"), _Writers())
        assert [e["step"] for e in result["evaluations"]] == steps
        assert result["stopped_early"] == (patience == 1)


# --- heads against transformers -------------------------------------------------------------------

def _tiny(objective, seed=0):
    """The tiny config, weights pushed away from init so that every weight matters."""
    return _perturbed_tiny(objective, seed, noise=0.1)


def _perturbed_tiny(objective, seed, noise):
    config = ettin_tiny.get_config(objective).model
    config.attention_impl = "xla"
    # Noise from numpy: jax's eager random ops would compile a program per shape.
    model = EttinModel(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 7)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + noise * rng.standard_normal(p.shape).astype(np.float32)),
        params))
    return model


@pytest.mark.parametrize("objective,pooling", [("mlm", "cls"), ("mlm", "mean"), ("clm", "last")])
def test_head_equals_transformers_sequence_classifier(tmp_path, objective, pooling):
    backbone = _tiny(objective)
    hf.save_hf(backbone, backbone.config, str(tmp_path))
    extra = {"classifier_pooling": pooling} if objective == "mlm" else {}
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path), num_labels=3, attn_implementation="eager", **extra).eval()
    ours = classifier.SequenceClassifier(backbone, 3, pooling=pooling, dropout=0.0, rngs=nnx.Rngs(0))
    ours.eval()
    state = torch_model.state_dict()
    if objective == "mlm":   # transformers keeps the MLM head's dense and norm, as we do
        np.testing.assert_array_equal(state["head.dense.weight"].numpy().T, np.asarray(ours.head_dense[...]))
        ours.classifier_bias[...] = jnp.asarray(state["classifier.bias"].numpy())
    else:
        assert "classifier.bias" not in state
        ours.head_dense[...] = jnp.asarray(state["head.dense.weight"].numpy().T)
        ours.head_norm[...] = jnp.asarray(state["head.norm.weight"].numpy())
    ours.classifier[...] = jnp.asarray(state["classifier.weight"].numpy().T)

    rng = np.random.default_rng(0)
    lengths = [20, 13, 5]
    ids = np.full((3, 20), ettin_tiny.PAD_ID, np.int64)
    mask = np.zeros((3, 20), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, 500, n)
        ids[i, 0] = ettin_tiny.CLS_ID
        mask[i, :n] = 1
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    assert np.abs(expected).max() > 0.1


# --- learning on synthetic tasks ---------------------------------------------------------------

def _sentence(rng, positive: bool) -> str:
    words = list(rng.choice(FILLER, int(rng.integers(4, 10))))
    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if positive else NEGATIVE)))
    return " ".join(words)


def _tokenizer():
    return tokenizer_lib.train_bpe([" ".join(FILLER + POSITIVE + NEGATIVE)] * 10,
                                   vocab_size=ettin_tiny.VOCAB_SIZE, unk_id=ettin_tiny.UNK_ID)


def _write_sst2(data_dir, rng, n_train=256, n_dev=128):
    for stem, n in (("train", n_train), ("dev", n_dev)):
        labels = rng.integers(0, 2, n)
        _write_tsv(os.path.join(data_dir, "SST-2", f"{stem}.tsv"), ["sentence", "label"],
                   [[_sentence(rng, bool(y)), str(y)] for y in labels])


def test_cli_finetunes_an_encoder_beyond_chance_and_resumes(tmp_path):
    """A randomly initialised tiny encoder learns keyword sentiment: dev accuracy well above 50%.
    The subprocess sees 4 CPU devices (conftest), so the batch is split 4 ways (data parallel)."""
    rng = np.random.default_rng(0)
    data_dir, workdir, model_dir = (str(tmp_path / d) for d in ("data", "work", "model"))
    _write_sst2(data_dir, rng)
    encoder = _tiny("mlm")
    hf.save_hf(encoder, encoder.config, model_dir, tokenizer=_tokenizer())
    command = [sys.executable, "-m", "ettin_jax.glue", f"--hf={model_dir}", "--task=sst2",
               f"--data_dir={data_dir}", f"--workdir={workdir}", "--lrs=1e-3", "--epochs=3",
               "--seeds=0", "--batch_size=16", "--eval_batch_size=64", "--max_seq_len=32",
               "--dtype=float32"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    best = results["tasks"][0]["best"]
    assert best["metrics"]["dev/accuracy"]["mean"] > 85.0, best
    run_dir = os.path.join(workdir, "sst2", "lr0.001_ep3_seed0")
    with open(os.path.join(run_dir, "result.json")) as f:
        run = json.load(f)
    assert [e["step"] for e in run["evaluations"]] == [16, 32, 48][:len(run["evaluations"])]
    assert not os.path.exists(os.path.join(run_dir, "checkpoint"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run_dir, "tensorboard")))
    with open(os.path.join(workdir, "results.md")) as f:
        assert "| sst2 | dev/accuracy |" in f.read()

    # Another model's fine-tuning in this workdir would read these runs back as its own.
    other_dir = str(tmp_path / "other_model")
    other = _tiny("mlm", seed=1)
    hf.save_hf(other, other.config, other_dir, tokenizer=_tokenizer())
    refused = subprocess.run([*command[:3], f"--hf={other_dir}", *command[4:]], cwd=ROOT,
                             capture_output=True, text=True, timeout=400, env=env)
    assert refused.returncode == 1 and "holds fine-tuning runs of another backbone" in refused.stderr, \
        refused.stderr[-2000:]

    # A bad input through the CLI fails before the model loads, naming the file and column.
    _write_tsv(os.path.join(data_dir, "SST-2", "dev.tsv"), ["text", "label"], [["good", "1"]])
    bad = subprocess.run([sys.executable, "-m", "ettin_jax.glue", f"--hf={model_dir}", "--task=sst2",
                          f"--data_dir={data_dir}", f"--workdir={workdir}_2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert bad.returncode != 0
    assert "SST-2/dev.tsv: missing column 'sentence'" in bad.stderr, bad.stderr[-2000:]


def test_loads_a_backbone_from_a_training_run(tmp_path):
    encoder = _tiny("mlm")
    run, tokenizer_dir = str(tmp_path / "run"), str(tmp_path / "tokenizer")
    checkpoint.save_imported(encoder, dataclasses.asdict(encoder.config), run)
    tokenizer_lib.save(_tokenizer(), tokenizer_dir)
    factory, tokenizer, _ = finetune.load_backbone(run, None, tokenizer_dir, dtype="float32")
    backbone = factory()
    assert backbone.config.dtype == "float32" and tokenizer.token_to_id("[SEP]") == ettin_tiny.SEP_ID
    for (key, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(backbone, nnx.Param)),
                                        nnx.to_flat_state(nnx.state(encoder, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours[...]), np.asarray(theirs[...]), err_msg=str(key))
    with pytest.raises(ValueError, match="no tokenizer saved with the model; pass --tokenizer"):
        finetune.load_backbone(run, None, None)


def _mesh_one_device():
    return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _factory(model):
    graphdef, state = nnx.split(model)

    def make():
        backbone = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
        backbone.train()
        return backbone
    return make


def test_decoder_learns_a_pair_task_with_last_token_pooling(tmp_path):
    """MRPC layout; the label is carried by the second sentence's keyword."""
    rng = np.random.default_rng(1)
    data_dir = str(tmp_path / "data")
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for stem, n in (("train", 256), ("dev", 128)):
        labels = rng.integers(0, 2, n)
        _write_tsv(os.path.join(data_dir, "MRPC", f"{stem}.tsv"), header,
                   [[str(y), "1", "2", " ".join(rng.choice(FILLER, 5)), _sentence(rng, bool(y))]
                    for y in labels])
    summary = finetune.run_task(
        tasks.get_task("mrpc"), backbone_factory=_factory(_tiny("clm")), tokenizer=_tokenizer(),
        data_dir=data_dir, workdir=str(tmp_path / "work"), lrs=[1e-3], epochs=[4], seeds=[0],
        options=finetune.FinetuneOptions(batch_size=16, eval_batch_size=64, max_seq_len=32),
        mesh=_mesh_one_device(), writer_factory=_Writers())
    assert summary["pooling"] == "last" and summary["objective"] == "clm"
    metrics = summary["best"]["metrics"]
    assert metrics["dev/accuracy"]["mean"] > 80.0, metrics
    assert metrics["dev/f1"]["mean"] > 80.0, metrics


class _Writers:
    """CLU-writer stand-ins that record what a run logs; one can raise at a chosen dev step
    (an interrupted run)."""

    def __init__(self, crash_at_step=None):
        self.crash_at_step, self.created, self.scalars = crash_at_step, 0, []

    def __call__(self, logdir):
        self.created += 1
        return self

    def write_scalars(self, step, scalars):
        if "dev/score" in scalars and step == self.crash_at_step:
            raise KeyboardInterrupt(f"simulated interruption at step {step}")
        self.scalars.append((step, dict(scalars)))

    def flush(self):
        pass

    def close(self):
        pass


def test_regression_learns_resumes_exactly_and_skips_finished_runs(tmp_path):
    """STS-B layout, mean pooling: score 4.5 +- noise with a positive keyword, 0.5 +- noise with
    a negative one. A run interrupted after its second evaluation continues from the checkpoint
    of the first and ends exactly where an uninterrupted run ends (same data order and dropout);
    run_task then finds the finished run and trains nothing."""
    rng = np.random.default_rng(2)
    data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "work")
    for stem, n in (("train", 256), ("dev", 128)):
        rows = []
        for y in rng.integers(0, 2, n):
            score = float(np.clip(0.5 + 4.0 * y + rng.normal(0, 0.3), 0.0, 5.0))
            rows.append([" ".join(rng.choice(FILLER, 4)), _sentence(rng, bool(y)), f"{score:.3f}"])
        _write_tsv(os.path.join(data_dir, "STS-B", f"{stem}.tsv"), ["sentence1", "sentence2", "score"], rows)
    task, tokenizer, factory = tasks.get_task("stsb"), _tokenizer(), _factory(_tiny("mlm"))
    options = finetune.FinetuneOptions(batch_size=16, eval_batch_size=64, max_seq_len=32, pooling="mean",
                                   classifier_dropout=0.1)
    finetuner = finetune.Finetuner(
        lambda seed: classifier.SequenceClassifier(factory(), 1, pooling="mean", dropout=0.1, rngs=nnx.Rngs(seed)),
        task, options, _mesh_one_device(), ettin_tiny.PAD_ID)
    train, devs = tasks.load_task_data(task, data_dir)

    def encoded(split):
        return (batches.encode(tokenizer, split.texts, cls_id=ettin_tiny.CLS_ID, sep_id=ettin_tiny.SEP_ID,
                            max_len=32), split.labels)

    train, devs = encoded(train), {k: encoded(v) for k, v in devs.items()}
    spec = finetune.RunSpec("stsb", 5e-3, 3, 0)    # 16 steps an epoch, evaluations at 16, 32, 48
    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        finetune.run_one(finetuner, spec, train, devs, interrupted, _Writers(crash_at_step=32))
    assert os.listdir(os.path.join(interrupted, "checkpoint")) == ["16"]
    # Resumed under other options, its schedule and evaluations would mix both: refused.
    finetuner.options = dataclasses.replace(options, warmup_ratio=0.25)
    with pytest.raises(ValueError, match=r"checkpoint was started with other options "
                                         rf"\(warmup_ratio: {options.warmup_ratio!r} -> 0\.25\)"):
        finetune.run_one(finetuner, spec, train, devs, interrupted, _Writers())
    finetuner.options = options
    resumed_writers = _Writers()
    resumed = finetune.run_one(finetuner, spec, train, devs, interrupted, resumed_writers)
    reference = finetune.run_one(finetuner, spec, train, devs, os.path.join(workdir, "stsb", spec.name), _Writers())
    assert [e["step"] for e in reference["evaluations"]] == [16, 32, 48]
    assert resumed["evaluations"] == reference["evaluations"]
    assert min(step for step, _ in resumed_writers.scalars) > 16
    assert not os.path.exists(os.path.join(interrupted, "checkpoint"))
    metrics = reference["best"]["metrics"]["dev"]
    # Chance is 0; on 128 dev examples |r| > 0.3 by luck has probability < 0.1%.
    assert metrics["pearson"] > 70.0 and metrics["spearman"] > 50.0, metrics

    writers = _Writers()
    summary = finetune.run_task(task, backbone_factory=factory, tokenizer=tokenizer, data_dir=data_dir,
                            workdir=workdir, lrs=[spec.lr], epochs=[spec.epochs], seeds=[spec.seed],
                            options=options, mesh=_mesh_one_device(), writer_factory=writers)
    assert writers.created == 0
    assert summary["best"]["score"] == reference["best"]["score"]
    assert summary["best"]["metrics"]["dev/pearson"]["mean"] == metrics["pearson"]


def test_encoder_pools_as_its_config_says_unless_told(tmp_path):
    """No --pooling: an encoder pools by its config's classifier_pooling, as transformers'
    ModernBertForSequenceClassification does; an explicit pooling wins."""
    rng = np.random.default_rng(2)
    data_dir = str(tmp_path / "data")
    for stem, n in (("train", 16), ("dev", 16)):
        _write_tsv(os.path.join(data_dir, "SST-2", f"{stem}.tsv"), ["sentence", "label"],
                   [[_sentence(rng, bool(y)), str(y)] for y in rng.integers(0, 2, n)])
    encoder = _tiny("mlm")
    encoder.config = dataclasses.replace(encoder.config, classifier_pooling="mean")
    for options_pooling, expected in (("", "mean"), ("cls", "cls")):
        summary = finetune.run_task(
            tasks.get_task("sst2"), backbone_factory=_factory(encoder), tokenizer=_tokenizer(),
            data_dir=data_dir, workdir=str(tmp_path / f"work{options_pooling}"), lrs=[1e-3],
            epochs=[1], seeds=[0], mesh=_mesh_one_device(), writer_factory=_Writers(),
            options=finetune.FinetuneOptions(batch_size=16, eval_batch_size=16, max_seq_len=32,
                                             pooling=options_pooling))
        assert summary["pooling"] == expected


@pytest.mark.parametrize("backbone_dropout", [-1.0, 0.2, 0.0])
def test_every_train_step_draws_new_backbone_dropout_masks(backbone_dropout):
    """The real train step at learning rate 0 on one batch, with the head's dropout off: the
    loss follows the step's dropout key through the backbone's dropout (the run config's
    attn_out_dropout with --backbone_dropout=-1, or the flag's rate) and is the same for the
    same key. --backbone_dropout=0 (the default) turns every backbone dropout off, so a run's
    checkpoint fine-tunes as its export (attention_dropout 0.0) does."""
    config = ettin_tiny.get_config("mlm").model
    config.attention_impl = "xla"
    backbone = model_loader.new_model(config)     # as load_backbone builds it: "dropout" streams
    assert backbone.config.attn_out_dropout > 0
    factory = _factory(backbone)
    options = finetune.FinetuneOptions(batch_size=4, eval_batch_size=4, max_seq_len=24,
                                       backbone_dropout=backbone_dropout)
    finetuner = finetune.Finetuner(
        finetune.classifier_factory(factory, 2, pooling="cls", options=options),
        tasks.get_task("sst2"), options, _mesh_one_device(), ettin_tiny.PAD_ID)
    made = finetuner.make_classifier(0).backbone
    rates = {node.rate for _, node in nnx.iter_graph(made) if isinstance(node, nnx.Dropout)}
    assert rates == ({0.0, config.attn_out_dropout} if backbone_dropout < 0 else {backbone_dropout})
    assert made.config.attn_out_dropout == (config.attn_out_dropout if backbone_dropout < 0
                                            else backbone_dropout)   # the config says so too
    rng = np.random.default_rng(0)
    rows = [[ettin_tiny.CLS_ID, *map(int, rng.integers(10, 90, 20)), ettin_tiny.SEP_ID]
            for _ in range(4)]
    batch = finetuner.to_device(batches.make_batch(rows, np.array([0, 1, 0, 1], np.int32), 4,
                                                   ettin_tiny.PAD_ID))

    def loss(key):
        params, opt_state, rngs = finetuner.init(0)
        return float(finetuner.train_step(params, opt_state, rngs, batch, key,
                                          jnp.float32(0.0))[2])
    keys = [jax.random.fold_in(jax.random.key(0), step) for step in range(3)]
    losses = [loss(key) for key in keys]
    assert len(set(losses)) == (1 if backbone_dropout == 0 else 3), losses
    assert loss(keys[1]) == losses[1]


def test_dev_predictions_run_without_dropout():
    """Dev scores are predictions of the classifier in eval mode: with dropout in the backbone
    and before the head (0.5 each), the jitted eval step equals the module's eval forward
    (a regression task, so its scores show any dropout, not just a changed argmax)."""
    config = ettin_tiny.get_config("mlm").model
    config.attention_impl = "xla"
    factory = _factory(model_loader.new_model(config))
    options = finetune.FinetuneOptions(batch_size=4, eval_batch_size=4, max_seq_len=24,
                                       backbone_dropout=0.5, classifier_dropout=0.5)
    task = tasks.get_task("stsb")
    assert task.labels is None
    finetuner = finetune.Finetuner(
        finetune.classifier_factory(factory, 1, pooling="cls", options=options), task,
        options, _mesh_one_device(), ettin_tiny.PAD_ID)
    rng = np.random.default_rng(0)
    rows = [[ettin_tiny.CLS_ID, *map(int, rng.integers(10, 90, n)), ettin_tiny.SEP_ID]
            for n in (20, 7, 13, 20, 3)]        # two eval batches, the second padded
    labels = np.linspace(0.0, 5.0, len(rows)).astype(np.float32)
    params, _, rngs = finetuner.init(0)
    got = finetuner.predict(params, rngs, rows, labels)

    classifier = finetuner.make_classifier(0)
    classifier.eval()
    want = []
    for row in rows:
        batch = batches.make_batch([row], labels[:1], 1, ettin_tiny.PAD_ID)
        want.append(float(classifier(jnp.asarray(batch["input_ids"]),
                                     jnp.asarray(batch["mask"]))[0, 0]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    classifier.train()                                  # the check can fail: dropout shows
    noisy = float(classifier(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mask"]))[0, 0])
    assert abs(noisy - want[-1]) > 1e-4
