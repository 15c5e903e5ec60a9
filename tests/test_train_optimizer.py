"""StableAdamW against a plain NumPy transcription of recipe §4.1, and the decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import optimizer


def numpy_stable_adamw(params, grads_per_step, lrs, *, b1, b2, eps, wd, max_lr, decays):
    """Recipe §4.1 line by line, one tensor at a time, in float64."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        bias1 = (b1 ** t - b1) / (b1 ** t - 1)
        bias2 = (b2 ** t - b2) / (b2 ** t - 1)
        for k in params:
            g = grads[k].astype(np.float64)
            m[k] = m[k] + (1 - bias1) * (g - m[k])
            v[k] = bias2 * v[k] + (1 - bias2) * g * g
            r = np.mean(g * g / np.maximum(v[k], eps * eps))
            lr_t = lr / max(1.0, np.sqrt(r))
            if decays[k] and wd:
                params[k] = params[k] * (1 - (lr_t / max_lr) * wd)
            params[k] = params[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
    return params


@pytest.mark.parametrize("wd", [0.0, 3e-4, 0.1])
def test_stable_adamw_matches_numpy_transcription(wd):
    rng = np.random.default_rng(0)
    shapes = {"embed": (13, 8), "kernel": (8, 3, 5), "norm": (8,), "decoder_bias": (13,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    steps = 6
    grads = []
    for t in range(steps):
        # Step 4 brings a gradient 50x larger than before, so that the per-tensor RMS
        # exceeds 1 and the update clipping takes effect.
        scale = 50.0 if t == 3 else 1.0
        grads.append({k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()})
    lrs = [1e-3, 2e-3, 3e-3, 3e-3, 2.5e-3, 1e-3]
    max_lr = 3e-3
    mask = optimizer.weight_decay_mask(params)
    assert mask == {"embed": True, "kernel": True, "norm": False, "decoder_bias": False}

    tx = optimizer.stable_adamw(b1=0.9, b2=0.98, eps=1e-6, weight_decay=wd, max_lr=max_lr,
                                weight_decay_mask=mask)
    jax_params = jax.tree.map(jnp.asarray, params)
    state = tx.init(jax_params)
    update = jax.jit(lambda g, s, p, lr: tx.update(g, s, p, learning_rate=lr))
    for g, lr in zip(grads, lrs):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, jax_params, lr)
        jax_params = jax.tree.map(lambda p, u: p + u, jax_params, updates)

    expected = numpy_stable_adamw(params, grads, lrs, b1=0.9, b2=0.98, eps=1e-6, wd=wd,
                                  max_lr=max_lr, decays=mask)
    for k in params:
        np.testing.assert_allclose(np.asarray(jax_params[k]), expected[k], rtol=2e-6, atol=2e-7,
                                   err_msg=k)
    assert int(state.count) == steps


def test_update_clipping_caps_the_step():
    """A gradient spike after quiet steps: RMS(g²/v) > 1, so the step is lr/rms, not lr."""
    params = {"w": jnp.zeros((4, 4))}
    tx = optimizer.stable_adamw(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0, max_lr=1.0)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update({"w": jnp.full((4, 4), 1e-3)}, state, params, learning_rate=1.0)
    updates, state = tx.update({"w": jnp.full((4, 4), 1.0)}, state, params, learning_rate=1.0)
    m, v = float(state.mu["w"][0, 0]), float(state.nu["w"][0, 0])
    unclipped = m / (np.sqrt(v) + 1e-6)            # about 0.51 here
    rms = np.sqrt(1.0 / v)                          # g = 1 everywhere: mean(g²/v) = 1/v, about 5.7
    assert unclipped > 0.4 and rms > 2
    np.testing.assert_allclose(np.asarray(updates["w"]), -unclipped / rms, rtol=1e-5)


def test_adamw_matches_optax_adamw_with_constant_lr():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    mask = optimizer.weight_decay_mask(params)
    ours = optimizer.adamw(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, weight_decay_mask=mask)
    ref = __import__("optax").adamw(1e-2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, mask=mask)
    p1, p2 = params, params
    s1, s2 = ours.init(p1), ref.init(p2)
    for _ in range(3):
        g = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
        u1, s1 = ours.update(g, s1, p1, learning_rate=1e-2)
        u2, s2 = ref.update(g, s2, p2)
        p1 = jax.tree.map(lambda p, u: p + u, p1, u1)
        p2 = jax.tree.map(lambda p, u: p + u, p2, u2)
    for k in params:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)


def test_make_optimizer_rejects_unknown_name():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(name="sgd", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0,
                                         peak_lr=1e-3, max_lr_fraction=1.0, grad_clip_norm=0.0))
    with pytest.raises(ValueError, match="config.optimizer.name='sgd'"):
        optimizer.make_optimizer(cfg, {"w": jnp.zeros((2, 2))})


def test_bfloat16_moments_track_the_float32_update():
    """moments_dtype='bfloat16' (the TPU switch) stores m and v in bfloat16 and stays within
    bfloat16 rounding of the NumPy transcription."""
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(16, 8)).astype(np.float32)}
    grads = [{"w": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(5)]
    lrs = [1e-3] * 5
    tx = optimizer.stable_adamw(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, max_lr=1e-3,
                                moments_dtype=jnp.bfloat16)
    p = {"w": jnp.asarray(params["w"])}
    state = tx.init(p)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.bfloat16
    for g, lr in zip(grads, lrs):
        updates, state = tx.update({"w": jnp.asarray(g["w"])}, state, p, learning_rate=lr)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    assert p["w"].dtype == jnp.float32 and state.mu["w"].dtype == jnp.bfloat16
    expected = numpy_stable_adamw(params, grads, lrs, b1=0.9, b2=0.98, eps=1e-6, wd=0.1,
                                  max_lr=1e-3, decays={"w": True})
    moved = expected["w"] - params["w"]
    error = (np.asarray(p["w"]) - params["w"]) - moved
    assert np.linalg.norm(error) / np.linalg.norm(moved) < 2e-2


def test_make_optimizer_rejects_unknown_moments_dtype():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(name="stableadamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0,
                                         peak_lr=1e-3, max_lr_fraction=1.0, grad_clip_norm=0.0,
                                         moments_dtype="float8"))
    with pytest.raises(ValueError, match="moments_dtype='float8'"):
        optimizer.make_optimizer(cfg, {"w": jnp.zeros((2, 2))})
