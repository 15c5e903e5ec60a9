"""The train step's speed knobs (config.train.prng_impl, loss_vocab_chunk, loss_row_chunk):
each runs, the PRNG changes dropout but nothing else about a step, the chunk sizes change
nothing about the loss or its gradients, bad values fail naming the key, and the workdir
identity records the PRNG but not the chunks. Tiny config, one device, in process."""
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from bench.batches import make_batch
from configs import ettin_tiny
from ettin_jax import losses, model_loader, sharding, train, xla_options
from ettin_jax import workdir as workdir_lib

ROWS, SEQ_LEN = 4, 64


def tiny_config(**train_keys):
    config = ettin_tiny.get_config("mlm")
    config.train.global_batch_size, config.train.seq_len = ROWS, SEQ_LEN
    config.train.xla_options = "xla_backend_optimization_level=0"
    for key, value in train_keys.items():
        config.train[key] = value
    return config


def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_prng_impls_run_and_dropout_follows_the_step_and_the_prng():
    """With dropout on (attn_out_dropout 0.1), one train step from the same params under each
    PRNG: finite loss, params move, the same step number gives the same loss and another step
    another loss (other masks); the three PRNGs give three losses at one step."""
    host = None
    first_losses = {}
    for impl in model_loader.PRNG_IMPLS:
        config = tiny_config(prng_impl=impl)
        assert config.model.attn_out_dropout > 0
        setup = train.make_setup(config, one_device_mesh())
        host = make_batch(config, ROWS, SEQ_LEN) if host is None else host
        batch = sharding.host_batch_to_global(
            {k: host[k] for k in losses.BATCH_KEYS["mlm"]}, setup.mesh, num_micro=1)
        params = jax.tree.map(np.asarray, setup.init_state()["params"])

        def step_loss(step, setup=setup, batch=batch, params=params, config=config):
            state = setup.init_state()               # donated: a fresh copy of the same params
            new_state, metrics = setup.train_step(state, batch, config.optimizer.peak_lr, step)
            moved = any(not np.array_equal(a, np.asarray(b)) for a, b in zip(
                jax.tree.leaves(params), jax.tree.leaves(new_state["params"])))
            return float(metrics.compute()["loss"]), moved

        (first, moved), (again, _), (other, _) = step_loss(0), step_loss(0), step_loss(1)
        assert np.isfinite(first) and np.isfinite(other) and moved, impl
        assert first == again, impl
        assert first != other, impl
        first_losses[impl] = first
    assert len(set(first_losses.values())) == 3, first_losses


def test_loss_and_grads_do_not_depend_on_the_chunks():
    """The loss plumbed from config.train.loss_vocab_chunk / loss_row_chunk: a vocab chunk
    that does not divide the 512-token vocabulary and a row chunk smaller than the predicted
    positions (so padded row chunks) give the loss and gradients of the one-chunk default."""
    base = tiny_config()
    base.model.attn_out_dropout = 0.0              # deterministic: only the chunks differ
    small = tiny_config(loss_vocab_chunk=96, loss_row_chunk=16)
    small.model = base.model
    host = make_batch(base, ROWS, SEQ_LEN)
    assert (host["mask_labels"] != losses.IGNORE).sum() > 16
    model = model_loader.new_model(base.model, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def mean_loss(params, loss_fn):
        total, stats = loss_fn(nnx.merge(graphdef, params, rest), host)
        return total / stats["count"]

    results = []
    for config in (base, small):
        loss_fn = losses.loss_fn_for(config)
        jaxpr = str(jax.make_jaxpr(lambda p, f=loss_fn: mean_loss(p, f))(params))
        loop_lengths = {int(n) for n in re.findall(r"length=(\d+)", jaxpr)}
        results.append((loop_lengths, jax.value_and_grad(mean_loss)(params, loss_fn)))
    (base_loops, (base_loss, base_grads)), (small_loops, (small_loss, small_grads)) = results
    # Plumbed: the loops run over ceil(rows / 16) row chunks and ceil(512 / 96) vocab chunks.
    rows = host["mask_labels"].size
    assert {-(-rows // 16), 6} <= small_loops and base_loops == {1}, (small_loops, base_loops)
    np.testing.assert_allclose(small_loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(base_grads), jax.tree.leaves(small_grads)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("key,value", [("prng_impl", "philox"), ("loss_vocab_chunk", 0),
                                       ("loss_row_chunk", -8)])
def test_bad_knob_values_fail_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"config.train.{key}="):
        train.make_setup(tiny_config(**{key: value}), one_device_mesh())


def test_workdir_records_the_prng_but_not_the_chunks(tmp_path):
    """Another PRNG is another run's dropout: a recorded setting, refused on resume unless
    allowed. Chunk sizes change only how the loss runs: free to change."""
    workdir_lib.check_identity(tiny_config(), str(tmp_path))()
    workdir_lib.check_identity(tiny_config(loss_vocab_chunk=128, loss_row_chunk=64),
                               str(tmp_path))
    with pytest.raises(workdir_lib.RunIdentityError, match="train.prng_impl: 'threefry' -> 'rbg'"):
        workdir_lib.check_identity(tiny_config(prng_impl="rbg"), str(tmp_path))
    # An allowed change is recorded only when the start gets past its restore (the returned
    # function): a start refused after the check left the record changed, and the original
    # command was refused then.
    record = workdir_lib.check_identity(tiny_config(prng_impl="rbg", allow_config_change=True),
                                        str(tmp_path))
    path = tmp_path / workdir_lib.IDENTITY_NAME
    assert json.loads(path.read_text())["settings"]["train.prng_impl"] == "threefry"
    workdir_lib.check_identity(tiny_config(), str(tmp_path))
    record()
    recorded = json.loads(path.read_text())
    assert recorded["settings"]["train.prng_impl"] == "rbg"
    assert recorded["changes"][-1]["changed"] == ["train.prng_impl: 'threefry' -> 'rbg'"]


def test_a_run_recorded_before_the_prng_key_resumes_as_threefry(tmp_path):
    """run_identity.json written before train.prng_impl existed: threefry is what it ran."""
    workdir_lib.check_identity(tiny_config(), str(tmp_path))()
    path = tmp_path / workdir_lib.IDENTITY_NAME
    record = json.loads(path.read_text())
    del record["settings"]["train.prng_impl"]
    path.write_text(json.dumps(record))
    workdir_lib.check_identity(tiny_config(), str(tmp_path))
    with pytest.raises(workdir_lib.RunIdentityError, match="train.prng_impl: 'threefry' -> 'rbg'"):
        workdir_lib.check_identity(tiny_config(prng_impl="rbg"), str(tmp_path))


def test_workdir_records_the_loaders_worker_count_and_group_size(tmp_path):
    """The saved data iterator state depends on them (a change restores no checkpoint), so a
    resume that changes them is refused up front; a record written before they were recorded
    takes the run's values."""
    config = tiny_config()
    workdir_lib.check_identity(config, str(tmp_path))()
    for key, value in (("num_workers", config.data.num_workers + 2), ("worker_group_rows", 5)):
        changed = tiny_config()
        changed.data[key] = value
        with pytest.raises(workdir_lib.RunIdentityError, match=f"data.{key}: .* -> {value}"):
            workdir_lib.check_identity(changed, str(tmp_path))
    path = tmp_path / workdir_lib.IDENTITY_NAME
    record = json.loads(path.read_text())
    del record["settings"]["data.num_workers"], record["settings"]["data.worker_group_rows"]
    path.write_text(json.dumps(record))
    changed.data.num_workers = 3
    workdir_lib.check_identity(changed, str(tmp_path))()
    assert json.loads(path.read_text())["settings"]["data.num_workers"] == 3


def test_xla_options_parse_to_typed_values_and_bad_entries_fail_naming_the_key():
    assert xla_options.parse("") == {}
    assert xla_options.parse(" xla_a=0, xla_b=false ,xla_c=1.5,xla_d=/tmp/x=y") == {
        "xla_a": 0, "xla_b": False, "xla_c": 1.5, "xla_d": "/tmp/x=y"}
    for text in ("xla_a", "gpu_autotune_level=0", "xla_a=", "=1"):
        with pytest.raises(ValueError, match=r"config\.train\.xla_options="):
            xla_options.parse(text)
    assert xla_options.compiler_options("") is None
    with pytest.raises(ValueError, match=r"xla_options=.*XLA refused it.*xla_gpu_autotune_levl"):
        xla_options.compiler_options("xla_gpu_autotune_levl=0")
    with pytest.raises(ValueError, match="xla_gpu_autotune_levl"):   # at set-up, not compile
        train.make_setup(tiny_config(xla_options="xla_gpu_autotune_levl=0"), one_device_mesh())


def test_an_empty_eval_batch_changes_no_eval_metric():
    """A process whose held-out documents ran out steps on empty rows (ettin_jax.evaluation):
    they predict nothing, so merged into the real batches' metrics they change no figure."""
    from data_pipeline import loader  # pylint: disable=import-outside-toplevel
    config = tiny_config()
    setup = train.make_setup(config, one_device_mesh())
    params = setup.init_state()["params"]
    keys = losses.BATCH_KEYS["mlm"]
    host = make_batch(config, ROWS, SEQ_LEN)
    empty = loader.empty_eval_batch(config, process_index=0, process_count=1, batch_rows=ROWS)
    assert set(keys) <= set(empty) and not empty["segment_ids"].any()
    real, nothing = (setup.eval_step(params, sharding.host_batch_to_global(
        {k: batch[k] for k in keys}, setup.mesh)) for batch in (host, empty))
    assert float(nothing.loss.count) == 0 and float(real.loss.count) > 0
    assert real.merge(nothing).compute() == real.compute()


def test_xla_options_reach_the_runs_programs(tmp_path):
    """An option given in the config changes how XLA compiles the run's own programs: with
    xla_dump_to, the train step, the eval step and the params init each leave their modules
    in that directory; a workdir resumes under other options (how the run executes)."""
    dump = tmp_path / "dump"
    config = tiny_config(xla_options=f"xla_backend_optimization_level=0,xla_dump_to={dump}")
    setup = train.make_setup(config, one_device_mesh())
    state = setup.init_state()
    host = make_batch(config, ROWS, SEQ_LEN)
    keys = losses.BATCH_KEYS["mlm"]
    setup.eval_step(state["params"], sharding.host_batch_to_global(
        {k: host[k] for k in keys}, setup.mesh))
    setup.train_step(state, sharding.host_batch_to_global({k: host[k] for k in keys},
                                                          setup.mesh, num_micro=1),
                     config.optimizer.peak_lr, 0)
    names = " ".join(path.name for path in dump.iterdir())
    for program in ("jit_train_step", "jit_eval_step", "jit_init_params"):
        assert program in names, program
    run = tmp_path / "run"
    run.mkdir()
    workdir_lib.check_identity(tiny_config(), str(run))()
    workdir_lib.check_identity(tiny_config(xla_options="xla_gpu_autotune_level=0"), str(run))
