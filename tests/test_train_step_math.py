"""The arithmetic of a training step against references computed here: gradient accumulation
over micro batches, their dropout keys, the logged loss and accuracy, the eval step without
dropout, the MNTP shift, the optimizer make_optimizer builds from a config, the FLOPs of one
row (MFU), the plan's decoder window and the GLUE fine-tuning loss. Tiny config, one device,
in process."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bench.batches import make_batch
from configs import ettin_tiny
from ettin_jax import attention, losses, model_loader, optimizer, sharding, train, train_metrics
from ettin_jax import plan as plan_lib
from ettin_jax.glue import finetune
from ettin_jax.model_config import ModelConfig
from test_train_optimizer import numpy_stable_adamw

ROWS, SEQ_LEN = 4, 64
KEYS = losses.BATCH_KEYS["mlm"]


def tiny_config(*, dropout: float):
    config = ettin_tiny.get_config("mlm")
    config.train.global_batch_size, config.train.seq_len = ROWS, SEQ_LEN
    config.train.xla_options = "xla_backend_optimization_level=0"
    config.model.num_layers = 2                    # a global and a local layer: quicker compiles
    # Embedding dropout too: at init the attention branch is small, and its dropout alone
    # moves the loss by about 1e-6 of itself.
    config.model.attn_out_dropout = config.model.embedding_dropout = dropout
    return config


@pytest.fixture(scope="module")
def setups():
    """{dropout rate: (config, Setup)}, built once per rate the tests ask for."""
    built = {}

    def get(dropout):
        if dropout not in built:
            config = tiny_config(dropout=dropout)
            mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                      devices=jax.devices()[:1])
            built[dropout] = config, train.make_setup(config, mesh)
        return built[dropout]

    return get


def run_step(config, setup, host, num_micro, step=0):
    """(new params as numpy, computed TrainMetrics) of one step from the seed's fresh state."""
    batch = sharding.host_batch_to_global({k: host[k] for k in KEYS}, setup.mesh,
                                          num_micro=num_micro)
    state, metrics = setup.train_step(setup.init_state(), batch, config.optimizer.peak_lr, step)
    return jax.tree.map(np.asarray, state["params"]), metrics.compute()


def uneven_batch(config):
    """ROWS rows whose two halves (the micro batches of a 2-way split) predict different
    numbers of tokens: the second half keeps only some of its masked slots."""
    host = make_batch(config, ROWS, SEQ_LEN)
    host["mask_labels"][ROWS // 2, 3:] = losses.IGNORE
    host["mask_labels"][ROWS - 1, 7:] = losses.IGNORE
    counts = [(host["mask_labels"][rows] != losses.IGNORE).sum()
              for rows in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS))]
    assert counts[0] != counts[1] and min(counts) > 0, counts
    return host


@pytest.fixture(scope="module")
def accumulation(setups):
    """Without dropout: the reference (mean loss, accuracy and mean gradient's norm of all
    rows, from the loss function directly) and the train step's results in 1 and 2 micro
    batches."""
    config, setup = setups(0.0)
    host = uneven_batch(config)
    params = setup.init_state()["params"]
    graphdef, _, rest = nnx.split(model_loader.new_model(config.model, seed=config.seed),
                                  nnx.Param, ...)
    loss_fn = losses.loss_fn_for(config)

    def mean_loss(params):
        total, stats = loss_fn(nnx.merge(graphdef, params, rest), host)
        return total / stats["count"], stats

    (loss, stats), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
    grad_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                            for g in jax.tree.leaves(grads)))
    reference = {"loss": float(loss), "accuracy": float(stats["correct"] / stats["count"]),
                 "grad_norm": grad_norm}
    steps = {num_micro: run_step(config, setup, host, num_micro) for num_micro in (1, 2)}
    return reference, steps


def test_micro_batches_add_up_to_the_step_of_all_their_rows(accumulation):
    """Gradient accumulation sums every micro batch's gradient and prediction count: two
    micro batches that predict different numbers of tokens give the mean loss and the mean
    gradient over all the step's predictions, and the update of one batch of all the rows."""
    reference, steps = accumulation
    (one_params, one), (two_params, two) = steps[1], steps[2]
    for metrics in (one, two):
        np.testing.assert_allclose(float(metrics["loss"]), reference["loss"], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), reference["grad_norm"],
                                   rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(two_params)):
        # atol: the first step moves by about lr x sign(g), 3e-3 here
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5)


def test_logged_loss_and_accuracy_are_per_predicted_token(accumulation):
    """TrainMetrics divides the step's loss sum and correct count by its number of predicted
    tokens (not by the number of steps): the loss function's own mean and accuracy."""
    reference, steps = accumulation
    for _, metrics in steps.values():
        np.testing.assert_allclose(float(metrics["loss"]), reference["loss"], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["accuracy"]), reference["accuracy"],
                                   rtol=1e-6)


def test_packing_efficiency_is_the_share_of_real_tokens(setups):
    """packing_efficiency: the non-padding positions (segment id > 0) of the step's rows over
    all of them, here 35 of 256 padding."""
    config, setup = setups(0.0)
    host = make_batch(config, ROWS, SEQ_LEN, seed=2)
    host["segment_ids"][1, -10:] = 0
    host["segment_ids"][3, -25:] = 0
    padded = np.take_along_axis(host["segment_ids"] == 0, host["mask_positions"], 1)
    host["mask_labels"] = np.where(padded, losses.IGNORE, host["mask_labels"]).astype(np.int32)
    _, metrics = run_step(config, setup, host, num_micro=2)
    assert float(metrics["packing_efficiency"]) == pytest.approx(1 - 35 / (ROWS * SEQ_LEN))


def test_each_micro_batch_draws_its_own_dropout_masks(setups):
    """With dropout on, a step of the same rows twice (two micro batches) averages two
    different dropout masks: its loss and gradient are not those of the rows once. (With
    one key for every micro batch they would be exactly the same.)"""
    config, setup = setups(0.3)
    host = make_batch(config, ROWS // 2, SEQ_LEN)
    twice = {k: np.concatenate([v, v]) for k, v in host.items()}
    _, once = run_step(config, setup, host, num_micro=1)
    _, doubled = run_step(config, setup, twice, num_micro=2)
    assert np.isfinite(float(once["loss"])) and np.isfinite(float(doubled["loss"]))
    assert abs(float(doubled["loss"]) - float(once["loss"])) > 1e-4 * float(once["loss"])
    assert abs(float(doubled["grad_norm"]) - float(once["grad_norm"])) > 1e-4 * float(
        once["grad_norm"])


def test_eval_step_runs_the_model_without_dropout(setups):
    """The eval step of a config with dropout gives the loss and accuracy of the model in
    eval mode (nnx's deterministic switch), which differ from the model's with dropout."""
    config, setup = setups(0.3)
    host = make_batch(config, ROWS, SEQ_LEN, seed=1)
    params = setup.init_state()["params"]
    metrics = setup.eval_step(params, sharding.host_batch_to_global(
        {k: host[k] for k in KEYS}, setup.mesh)).compute()
    model = model_loader.new_model(config.model, seed=config.seed)
    nnx.update(model, jax.tree.map(np.asarray, params))
    loss_fn = nnx.jit(losses.loss_fn_for(config))
    model.eval()
    total, stats = loss_fn(model, host)
    np.testing.assert_allclose(float(metrics["loss"]), float(total / stats["count"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]),
                               float(stats["correct"] / stats["count"]), rtol=1e-6)
    model.train()
    dropped, _ = loss_fn(model, host)
    assert abs(float(dropped - total)) > 1e-4 * abs(float(total))


# --- MNTP -------------------------------------------------------------------------------------

def test_mntp_predicts_each_masked_token_from_the_position_before_it():
    """MNTP loss by hand from the full logits: the label at position p is scored by the logits
    at p - 1 of the same row; a masked document start (position 0: no predecessor of its own
    document) is not predicted, whether first in the row or not."""
    config = ettin_tiny.get_config("mlm")
    config.model.attn_out_dropout = 0.0
    model = model_loader.new_model(config.model, seed=3)
    rows, seq = 2, 32
    rng = np.random.default_rng(5)
    input_ids = rng.integers(0, ettin_tiny.UNK_ID, (rows, seq)).astype(np.int32)
    segment_ids = np.ones((rows, seq), np.int32)
    segment_ids[:, 12:] = 2                                  # a second document from column 12
    positions = np.concatenate([np.arange(12), np.arange(seq - 12)])[None].repeat(rows, 0)
    mask_positions = np.array([[0, 3, 12, 13, 30, 0], [5, 12, 20, 21, 0, 0]], np.int32)
    mask_labels = np.take_along_axis(input_ids, mask_positions, 1)
    mask_labels[0, 5] = mask_labels[1, 4:] = losses.IGNORE  # unused slots
    batch = {"input_ids": input_ids, "segment_ids": segment_ids,
             "positions": positions.astype(np.int32), "mask_positions": mask_positions,
             "mask_labels": mask_labels}

    logits = np.asarray(nnx.jit(lambda m, *args: m(*args))(
        model, input_ids, segment_ids, batch["positions"]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected, count = 0.0, 0
    for r in range(rows):
        for p, label in zip(mask_positions[r], mask_labels[r]):
            if label == losses.IGNORE or positions[r, p] == 0:
                continue
            expected -= log_probs[r, p - 1, label]
            count += 1
    assert count == 6                       # of 9 used slots, 3 are document starts

    loss_sum, stats = nnx.jit(lambda m, b: losses.mlm_loss(m, b, mntp=True))(model, batch)
    assert int(stats["count"]) == count
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)


# --- the optimizer make_optimizer builds ------------------------------------------------------

SHAPES = {"embed": (13, 8), "kernel": (8, 3, 5), "norm": (8,), "decoder_bias": (13,)}
DECAYS = {"embed": True, "kernel": True, "norm": False, "decoder_bias": False}  # recipe §3.3


def optimizer_config(**keys):
    values = dict(name="stableadamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                  peak_lr=1e-3, max_lr_fraction=1.0, grad_clip_norm=0.0)
    return ml_collections.ConfigDict(dict(values, **keys))


def run_optimizer(tx, params, grads, lrs):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g, lr in zip(grads, lrs):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p, learning_rate=lr)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    return jax.tree.map(np.asarray, p)


def random_steps(seed, scales):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
             for scale in scales]
    return params, grads


def assert_params_close(actual, expected):
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=2e-6, atol=2e-7, err_msg=k)


def test_configured_stableadamw_decays_relative_to_its_max_lr_fraction_of_peak():
    """config.optimizer's StableAdamW decays by wd x lr / (peak_lr x max_lr_fraction): with
    max_lr_fraction 0.5 (a phase starting a fresh optimizer at half the LR) the decay per step
    is twice that of max_lr = peak_lr."""
    params, grads = random_steps(0, [1.0] * 4)
    lrs = [2e-4, 5e-4, 5e-4, 3e-4]
    config = optimizer_config(max_lr_fraction=0.5)
    ours = run_optimizer(optimizer.make_optimizer(config, params), params, grads, lrs)
    expected = numpy_stable_adamw(params, grads, lrs, b1=0.9, b2=0.98, eps=1e-6, wd=0.1,
                                  max_lr=5e-4, decays=DECAYS)
    assert_params_close(ours, expected)


def test_configured_optimizers_do_not_decay_norms_or_biases():
    """Both of config.optimizer's optimizers leave 1-d tensors and biases undecayed: with a
    zero gradient on them, stableadamw and adamw leave them unchanged, while the decayed
    tensors shrink."""
    params, grads = random_steps(1, [1.0] * 3)
    for g in grads:
        g["norm"][:] = 0.0
        g["decoder_bias"][:] = 0.0
    for name in ("stableadamw", "adamw"):
        ours = run_optimizer(optimizer.make_optimizer(optimizer_config(name=name), params),
                             params, grads, [1e-3] * 3)
        for k in ("norm", "decoder_bias"):
            np.testing.assert_array_equal(ours[k], params[k], err_msg=f"{name} {k}")
        zero = {k: np.zeros_like(v) for k, v in params.items()}
        decayed_only = run_optimizer(optimizer.make_optimizer(optimizer_config(name=name), params),
                                     params, [zero] * 3, [1e-3] * 3)
        for k in ("embed", "kernel"):
            assert np.all(np.abs(decayed_only[k]) < np.abs(params[k])), f"{name} {k}"
    stable = run_optimizer(optimizer.make_optimizer(optimizer_config(), params), params, grads,
                           [1e-3] * 3)
    assert_params_close(stable, numpy_stable_adamw(params, grads, [1e-3] * 3, b1=0.9, b2=0.98,
                                                   eps=1e-6, wd=0.1, max_lr=1e-3, decays=DECAYS))


def test_grad_clip_norm_clips_the_global_norm_before_the_optimizer():
    """config.optimizer.grad_clip_norm > 0 scales each step's gradients to at most that global
    norm (all tensors together) before StableAdamW: the NumPy transcription fed with the
    clipped gradients, not with the raw ones (steps of norm far above and below the limit)."""
    params, grads = random_steps(2, [3.0, 0.05, 10.0, 0.5, 4.0])
    lrs = [1e-3] * len(grads)
    clip = 1.0
    clipped = []
    for g in grads:
        norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g.values()))
        clipped.append({k: (v * min(1.0, clip / norm)).astype(np.float32) for k, v in g.items()})
    config = optimizer_config(grad_clip_norm=clip, weight_decay=0.0)
    ours = run_optimizer(optimizer.make_optimizer(config, params), params, grads, lrs)
    kw = dict(b1=0.9, b2=0.98, eps=1e-6, wd=0.0, max_lr=1e-3, decays=DECAYS)
    expected, raw = (numpy_stable_adamw(params, g, lrs, **kw) for g in (clipped, grads))
    assert max(np.abs(expected[k] - raw[k]).max() for k in raw) > 1e-4   # clipping matters
    for k in expected:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


# --- FLOPs, the plan's window, GLUE -----------------------------------------------------------

def window_keys(model: ModelConfig, layer: int, seq: int, query: int) -> int:
    """Keys `query` of a `seq`-token row sees in `layer`, counted on the attention mask."""
    visible = attention.attention_mask(seq, seq, causal=model.causal,
                                       window_size=model.window_size(layer))
    return int(np.asarray(visible)[0, query].sum())


@pytest.mark.parametrize("seq_len", [128, 12])
def test_training_flops_count_a_local_layers_window_not_the_whole_row(seq_len):
    """MFU's FLOPs of one MLM row by the convention's terms: 6 x (matmul params of the layers,
    counted on the model's own tensors) per token, 6 x (head + tied decoder) per predicted
    token and 12 x hidden x keys per token per layer, keys = what a query in the middle of
    the row sees: the whole row in a global layer, the window (clipped to the row) in a
    local one."""
    config = ettin_tiny.get_config("mlm")
    config.train.seq_len = seq_len
    model = ModelConfig.from_config(config.model)
    params = model_loader.model_parts(config.model).abstract_params
    layers = params["layers"]
    H = model.hidden_size
    expected = 0.0
    for layer in range(model.num_layers):
        matmuls = sum(np.prod(layers[layer][name].shape)
                      for name in ("qkv", "attn_out", "mlp_in", "mlp_out"))
        keys = window_keys(model, layer, seq_len, seq_len // 2)
        expected += 6 * matmuls * seq_len + 12 * H * keys * seq_len
    head = np.prod(params["head_dense"].shape) + np.prod(params["tok_embeddings"].shape)
    expected += 6 * head * seq_len * config.train.mask_ratio
    local = [window_keys(model, i, seq_len, seq_len // 2) for i in range(model.num_layers)
             if not model.is_global(i)]
    assert local and set(local) == {min(seq_len, model.local_attention + 1)}
    np.testing.assert_allclose(train_metrics.training_flops_per_row(config), expected,
                               rtol=1e-12)


@pytest.mark.parametrize("window", ["training", "transformers"])
def test_plan_reports_the_keys_a_decoders_local_layer_sees(tmp_path, window):
    """The plan's decoder_window_keys is the number of keys a query far into the row sees in
    a local layer of the decoder, itself included, counted on the attention mask."""
    config = ettin_tiny.get_config(f"clm,window={window}")
    plan = plan_lib.make_plan(config, str(tmp_path / "w"), num_devices=1,
                              assumed_mean_length=100.0)
    model = ModelConfig.from_config(config.model)
    local = next(i for i in range(model.num_layers) if not model.is_global(i))
    seq = 64
    assert plan["decoder_window_keys"] == window_keys(model, local, seq, seq - 1)


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_glue_loss_averages_the_real_rows_of_a_padded_batch(regression):
    """A GLUE batch filled up with padding rows (weight 0) has the loss of its real rows
    alone: cross-entropy or squared error averaged over the weighted rows, by hand."""
    rng = np.random.default_rng(7)
    rows, classes = 6, 1 if regression else 3
    logits = rng.normal(size=(rows, classes)).astype(np.float32)
    labels = (rng.normal(size=rows).astype(np.float32) if regression
              else rng.integers(0, classes, rows).astype(np.int32))
    weight = np.array([1, 1, 1, 1, 0, 0], np.float32)
    if regression:
        per_row = np.square(logits[:, 0].astype(np.float64) - labels)
    else:
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        per_row = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(rows), labels]
    expected = per_row[:4].mean()
    assert abs(per_row.mean() - expected) > 1e-3        # the padding rows would move it
    loss, prediction = finetune._loss_and_predictions(  # pylint: disable=protected-access
        jnp.asarray(logits), {"weight": jnp.asarray(weight), "labels": jnp.asarray(labels)},
        regression)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(prediction),
                                  logits[:, 0] if regression else logits.argmax(-1))
